"""Staged fine-tuning: each stage trains exactly the part it names, batch-norm stays frozen
where it says, and a stage starts from the previous stage's best weights."""

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from medfold.settings.training import OptimizerOptions
from medfold.training.loop import make_optimizer
from medfold.training.models import BATCH_NORMS, build_model, classifier, feature_blocks, set_trainable, train_mode


def _names(model, modules) -> set[str]:
    ids = {id(p) for m in modules for p in m.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def _norm_names(model) -> set[str]:
    return _names(model, [m for m in model.modules() if isinstance(m, BATCH_NORMS)])


def _steps(model, frozen_norms, in_channels: int, n: int = 3) -> None:
    """Real optimisation steps (AdamW with weight decay: decay alone would move a weight)."""
    optimizer = make_optimizer(
        [p for p in model.parameters() if p.requires_grad],
        SimpleNamespace(optimizer="adamw", weight_decay=0.1, momentum=0.0, optimizer_options=OptimizerOptions()),
        0.01,
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        train_mode(model, frozen_norms)
        x = torch.randn(4, in_channels, 64, 64, generator=gen)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("name,in_channels", [("lenet", 1), ("resnet18", 3), ("efficientnet_b0", 3)])
@pytest.mark.parametrize("train,blocks", [("head", 1), ("last_blocks", 2), ("all", 1)])
def test_a_stage_changes_exactly_the_parameters_it_trains(name, in_channels, train, blocks):
    model = build_model(name, in_channels, 3, batch_norm=True)
    parts = feature_blocks(model)
    if train == "head":
        expected = _names(model, [classifier(model)]) - _norm_names(model)
    elif train == "last_blocks":
        expected = _names(model, [classifier(model), *[m for b in parts[-blocks:] for m in b]]) - _norm_names(model)
    else:
        expected = {n for n, _ in model.named_parameters()}
    frozen_norms = set_trainable(model, train, blocks)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _steps(model, frozen_norms, in_channels)
    after = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    changed = {k for k in params if not torch.equal(before[k], after[k])}
    assert changed == expected  # bit-identical where frozen; moved where trained
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    moved_stats = {k for k in stats if not torch.equal(before[k], after[k])}
    assert moved_stats == (set(stats) if train == "all" else set())  # frozen batch-norm keeps its statistics


def test_batch_norm_can_train_with_the_last_blocks_when_asked():
    model = build_model("resnet18", 3, 2)
    set_trainable(model, "last_blocks", 1, freeze_batch_norm=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "layer4.1.bn2.weight" in trainable and "layer3.1.bn2.weight" not in trainable


def test_too_many_blocks_is_refused_naming_the_count():
    from medfold.core.errors import ConfigError

    with pytest.raises(ConfigError, match="has 2 feature blocks"):
        set_trainable(build_model("lenet", 1, 2), "last_blocks", 3)


def test_each_stage_starts_from_the_previous_stages_best_weights(tmp_path, demo_dir):
    """run_fold with a head stage then an all stage: in the first, the features stay at their
    initial values; the second starts from the first's best epoch, not its last."""
    from conftest import prepare_demo, resolved_config

    from medfold.training.fold import load_model
    from medfold.training.train import run_fold

    prepare_demo(tmp_path, demo_dir, size=32)
    training = resolved_config(
        {
            "training": {
                "batch_norm": True,
                "device": "cpu",
                "image_size": 32,
                "early_stopping": {"enabled": False},
                "stages": [{"train": "head", "epochs": 4, "lr": 0.3}],
            }
        }
    )["training"]
    head_only = run_fold(
        training,
        tmp_path / "index.parquet",
        tmp_path / "splits.parquet",
        tmp_path / "cache",
        0,
        tmp_path / "head",
        threads=2,
    )
    trained, _ = load_model(tmp_path / "head" / "model.pt")
    initial = build_model("lenet", 1, 4, batch_norm=True)  # the same init_seed: the same initial weights
    for (name, a), b in zip(trained.state_dict().items(), initial.state_dict().values()):
        assert torch.equal(a, b) == (not name.startswith("head.")), name
    assert head_only["stages"][0]["epochs_run"] == 4

    # Stage 1 is cut at an epoch that is not its best, so "started from the best" and "started
    # from the last" differ by construction, whatever this CPU's float trajectory: the uncut run
    # gives the trajectory, and a shorter run of the same stage repeats its prefix exactly (same
    # seeds, same process; plateau scheduling looks only backwards).
    long = {**training, "stages": [{"train": "head", "epochs": 10, "lr": 0.3}]}
    run_fold(
        long,
        tmp_path / "index.parquet",
        tmp_path / "splits.parquet",
        tmp_path / "cache",
        0,
        tmp_path / "long",
        threads=2,
    )
    trajectory = pd.read_csv(tmp_path / "long" / "history.csv")["val_auroc_macro"].to_numpy()
    below_best = [e for e in range(1, len(trajectory)) if trajectory[e] < trajectory[:e].max() - 1e-3]
    assert below_best, f"lr 0.3 for 10 epochs never fell below an earlier epoch: {trajectory.round(4).tolist()}"
    cut = below_best[0] + 1  # stage 1 ends on an epoch worse than an earlier one
    best = float(trajectory[:cut].max())
    # a second stage that cannot move the weights (lr 1e-9, batch-norm frozen): its validation
    # value is that of the weights it started from, which must be stage 1's best, not its last
    two = {
        **training,
        "stages": [{"train": "head", "epochs": cut, "lr": 0.3}, {"train": "head", "epochs": 1, "lr": 1e-9}],
    }
    result = run_fold(
        two, tmp_path / "index.parquet", tmp_path / "splits.parquet", tmp_path / "cache", 0, tmp_path / "two", threads=2
    )
    history = pd.read_csv(tmp_path / "two" / "history.csv")
    assert history["stage"].tolist() == [1] * cut + [2]
    assert history["val_auroc_macro"].iloc[:cut].to_numpy() == pytest.approx(trajectory[:cut], abs=1e-12)  # the prefix
    assert result["stages"][0]["best_value"] == pytest.approx(best, abs=1e-12)
    assert history["val_auroc_macro"].iloc[cut] == pytest.approx(best, abs=1e-6)
    assert history["val_auroc_macro"].iloc[cut - 1] < best - 1e-3  # the last epoch of stage 1 was not its best
    print(
        "stage 1 val AUROC per epoch:",
        history["val_auroc_macro"].iloc[:cut].round(4).tolist(),
        "stage 2 start:",
        round(history["val_auroc_macro"].iloc[cut], 4),
    )
