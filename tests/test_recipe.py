"""The timm-style training recipe, each a config switch: cosine and one-cycle schedules with
warm-up, label smoothing, mixup/CutMix, a moving average of the weights and flip test-time
augmentation. Each piece checked on its own, then all of them on the demo: the model learns, and
a run killed mid-way resumes to the same numbers (schedule, average and mixing draws included)."""

import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import SCHEMA, prepare_demo, resolved_config

from medfold.settings.training import LrSchedule, Mixing
from medfold.training.fold import Criterion
from medfold.training.loop import ema_model, step_schedule
from medfold.training.train import run_fold


def lrs(schedule: LrSchedule, epochs: int, steps: int) -> list[float]:
    w = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.1)
    sched = step_schedule(optimizer, schedule, epochs, steps)
    seen = []
    for _ in range(epochs * steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    return seen


def test_cosine_warms_up_linearly_then_decays_to_zero():
    seen = lrs(LrSchedule("cosine", warmup_epochs=1), epochs=5, steps=10)
    assert seen[:10] == pytest.approx([0.1 * (i + 1) / 10 for i in range(10)])
    assert max(seen) == pytest.approx(0.1) and all(a >= b for a, b in zip(seen[10:], seen[11:]))
    assert seen[-1] == pytest.approx(0.0, abs=1e-12)
    assert seen[10 + 19] == pytest.approx(0.05)  # halfway through the 40 steps of decay: half the peak
    assert step_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), LrSchedule(), 5, 10) is None


def test_one_cycle_starts_at_a_25th_peaks_and_ends_near_zero():
    seen = lrs(LrSchedule("onecycle"), epochs=10, steps=10)
    assert seen[0] == pytest.approx(0.1 / 25 + (0.1 - 0.1 / 25) / 30, rel=1e-6)
    assert int(np.argmax(seen)) == 29 and seen[29] == pytest.approx(0.1)  # warm-up: 30 % of the steps
    assert seen[30] < seen[29] and seen[-1] == pytest.approx(0.1 * 1e-4)


def test_label_smoothing_changes_the_training_loss_only():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    y = torch.tensor([0, 2])
    targets = np.array([0, 1, 2, 2])
    plain = Criterion("multiclass", targets, 3, False, "cpu")
    smooth = Criterion("multiclass", targets, 3, False, "cpu", label_smoothing=0.2)
    assert torch.equal(smooth(logits, y), plain(logits, y))  # what validation reports
    soft = torch.full((2, 3), 0.2 / 3) + 0.8 * F.one_hot(y, 3)
    manual = -(soft * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(smooth.training(logits, y), manual)
    multi = Criterion("multilabel", np.eye(3)[[0, 1, 2]], 3, False, "cpu", label_smoothing=0.2)
    y01 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    moved = F.binary_cross_entropy_with_logits(logits, y01 * 0.8 + 0.1)
    assert torch.allclose(multi.training(logits, y01), moved)


def test_mixup_and_cutmix_mix_a_batch_with_its_shuffle():
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    mixed, partner, lam = Mixing(mixup_alpha=0.4).draw(x, torch.Generator().manual_seed(1))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner]) and 0 < lam < 1
    again = Mixing(mixup_alpha=0.4).draw(x, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], mixed)  # the epoch's seeded generator decides: a resume repeats it
    cut, partner, kept = Mixing(cutmix_alpha=1.0).draw(x, torch.Generator().manual_seed(2))
    from_partner = (cut != x).float().mean().item()
    changed = (x[partner] != x).float().mean().item()  # pixels the partner really changes
    assert from_partner == pytest.approx((1 - kept) * changed, abs=0.02)
    assert Mixing(mixup_alpha=0.4, prob=0.0).draw(x, torch.Generator().manual_seed(1)) is None


def test_the_weights_average_follows_its_decay():
    model = torch.nn.Linear(2, 1)
    ema = ema_model(model, 0.9)
    ema.update_parameters(model)  # the first step's weights start the average
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, start * 0.9 + (start + 1.0) * 0.1)
    assert ema_model(model, 0.0) is None


# ----------------------------------------------------------------------------- on the demo
RECIPE = dict(
    batch_norm=True,
    device="cpu",
    epochs=12,
    threads=2,
    lr=0.003,
    schedule={"name": "cosine", "warmup_epochs": 1},
    label_smoothing=0.1,
    mixup={"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 0.5},
    ema={"decay": 0.98},
    tta="hflip",
    early_stopping={"enabled": False, "metric": "auroc_macro", "patience": 5},
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, demo_dir):
    return prepare_demo(tmp_path_factory.mktemp("prepared"), demo_dir)


def test_the_whole_recipe_learns_and_resumes_exactly_after_a_kill(prepared, tmp_path):
    settings = resolved_config({"training": RECIPE})["training"]
    args = [prepared / "index.parquet", prepared / "splits.parquet", prepared / "cache", 0]
    result = run_fold(settings, *args, tmp_path / "whole", threads=2)
    assert result["test"]["auroc_macro"] > 0.8, result["test"]["auroc"]
    history = pd.read_csv(tmp_path / "whole" / "history.csv")
    # the cosine schedule ran: the last epoch's LR is a small fraction of the peak
    assert history["lr"].max() == pytest.approx(0.003, rel=0.05) and history["lr"].iloc[-1] < 0.0003
    assert result["settings"]["ema"]["decay"] == 0.98 and result["settings"]["tta"] == "hflip"

    out = tmp_path / "killed"
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(settings))
    cmd = [sys.executable, "-m", "medfold.training.train", "--settings", str(settings_file), "--index", str(args[0])]
    cmd += ["--splits", str(args[1]), "--cache", str(args[2]), "--fold", "0", "--out", str(out), "--threads", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint, epoch, deadline = out / "checkpoint.pt", 0, time.time() + 120
    while time.time() < deadline and epoch < 3:
        time.sleep(0.2)
        if checkpoint.exists():
            try:
                epoch = torch.load(checkpoint, weights_only=True)["state"]["epoch"]
            except Exception:  # caught mid-rename on a slow disk: look again
                continue
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and epoch >= 3
    assert "ema" in torch.load(checkpoint, weights_only=True)
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed fold 0" in resumed.stderr, resumed.stderr
    again = json.loads((out / "metrics.json").read_text())
    for part in ("val", "test"):
        assert again[part]["auroc"] == result[part]["auroc"] and again[part]["loss"] == result[part]["loss"]
    full = history.drop(columns=["images_per_s", "seconds"])
    pd.testing.assert_frame_equal(full, pd.read_csv(out / "history.csv").drop(columns=["images_per_s", "seconds"]))
    assert not any(math.isnan(v) for v in full["train_loss"])


def test_pruning_while_training_ends_at_the_final_sparsity_and_still_learns(prepared, tmp_path):
    """The thesis's schedule shortened: 10 % at epoch 0.5 to 50 % by epoch 3 of 8; the chosen
    epoch is one at the final sparsity, and the saved model's convolutions are that sparse."""
    from medfold.training.fold import load_model

    pruning = {"enabled": True, "initial_sparsity": 0.1, "final_sparsity": 0.5, "start_epoch": 0.5, "end_epoch": 3}
    cfg = dict(batch_norm=True, device="cpu", epochs=8, threads=2, pruning=pruning)
    settings = resolved_config({"training": cfg})["training"]
    args = [prepared / "index.parquet", prepared / "splits.parquet", prepared / "cache", 0]
    result = run_fold(settings, *args, tmp_path / "pruned", threads=2)
    assert result["pruning"]["overall"] == pytest.approx(0.5, abs=0.01) and result["best_epoch"] >= 3
    model, _ = load_model(tmp_path / "pruned" / "model.pt")  # plain weights: the masks made permanent
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    zeros = sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs)
    assert zeros == pytest.approx(0.5, abs=0.01)
    assert result["test"]["auroc_macro"] > 0.75
    # what it takes to store, as the thesis reports it: the sparse file is smaller than the dense one
    storage = result["pruning"]["storage"]
    assert storage["sparse_gzip_bytes"] < storage["sparse_bytes"] < storage["dense_bytes"]
    from medfold.report.experiments import pruned_line

    line = pruned_line({0: tmp_path / "pruned" / "metrics.json"})
    assert line.startswith("Pruned while training: 50.") and "MB sparse and gzip-compressed" in line


def test_pruning_must_reach_its_final_sparsity_within_the_epochs():
    from medfold.core.errors import ConfigError
    from medfold.study.resolve import experiment_settings

    config = resolved_config(
        {"training": {"epochs": 5, "pruning": {"enabled": True, "end_epoch": 7}}, "experiments": {"a": {}}}
    )
    with pytest.raises(ConfigError, match=r"experiments.a.pruning.end_epoch: 7 is after the last of the 5 epochs"):
        experiment_settings(config, "a", SCHEMA)


def test_flip_tta_averages_each_image_with_its_mirror_in_evaluation_and_predict():
    """Runner (validation, test, compression) and Predictor (medfold predict) alike."""
    from medfold.deploy.predict import Predictor
    from medfold.training.fold import Runner, probabilities
    from medfold.training.models import build_model

    model = build_model("lenet", 1, 3, init_seed=1).eval()
    cache = np.random.default_rng(0).integers(0, 256, (5, 1, 32, 32), dtype=np.uint8)
    targets = np.array([0, 1, 2, 0, 1])
    cfg = resolved_config({"training": {"tta": "hflip", "device": "cpu"}})["training"]
    runner = Runner(cfg, cache, targets, "multiclass", torch.device("cpu"), model)
    x = runner.prepare(torch.from_numpy(cache), None, None)
    with torch.no_grad():
        plain, mirrored = probabilities(model(x), "multiclass"), probabilities(model(x.flip(-1)), "multiclass")
    assert not torch.allclose(plain, mirrored)  # the flip changes this model's outputs
    probs, _ = runner.predict(np.arange(5))
    assert np.allclose(probs, ((plain + mirrored) / 2).numpy(), atol=1e-6)
    predictor = Predictor([model], ["a", "b", "c"], "multiclass", 32, 1, None, tta="hflip")
    assert np.allclose(predictor.probabilities(x), probs, atol=1e-6)
    without = Predictor([model], ["a", "b", "c"], "multiclass", 32, 1, None)
    assert np.allclose(without.probabilities(x), plain.numpy(), atol=1e-6)
