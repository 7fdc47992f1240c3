"""Compression variants: the pruning schedule and masks, the compressed format, the quantized
artifacts (closeness to fp32, save/load in a fresh process), and the workflow's variant jobs."""

import functools
import json
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import planned, run_snakemake, workflow_dir

from medfold.compression import quantize
from medfold.core.errors import ConfigError, DataError
from medfold.training import prune as pruning
from medfold.training.models import build_model

DS = "results/demo_cxr14"


# ----------------------------------------------------------------------------- pruning
def test_schedule_follows_zhu_and_gupta():
    s = pruning.SparsitySchedule(0.1, 0.7, 0.5, 2.0, 3)
    assert s.at(0.0) == 0.0 and s.at(0.49) == 0.0
    assert s.at(0.5) == pytest.approx(0.1)
    assert s.at(1.25) == pytest.approx(0.7 + (0.1 - 0.7) * 0.5**3)
    assert s.at(2.0) == 0.7 and s.at(9.0) == 0.7
    grid = [s.at(t) for t in np.linspace(0.5, 2.0, 31)]
    assert all(b >= a for a, b in zip(grid, grid[1:]))
    with pytest.raises(ConfigError, match="initial_sparsity"):
        pruning.SparsitySchedule(0.8, 0.5, 0, 1)
    with pytest.raises(ConfigError, match="start_epoch"):
        pruning.SparsitySchedule(0.1, 0.5, 3, 1)


def _conv_weights(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_pruner_reaches_the_scheduled_sparsity_at_each_update_and_the_final_exactly(scope):
    model = build_model("lenet_wide", 1, 3, init_seed=1)
    schedule = pruning.SparsitySchedule(0.1, 0.7, 0.5, 2.0)
    pruner = pruning.Pruner(model, schedule, scope)
    sizes = {n: m.weight.numel() for n, m in _conv_weights(model).items()}
    total = sum(sizes.values())
    for t in (0.25, 0.5, 0.8, 1.1, 1.6, 2.0, 2.5):
        pruner.update(t)
        s = schedule.at(t)
        got = pruner.sparsity()
        if scope == "global":
            assert got["overall"] == round(s * total) / total
        else:
            for name, n in sizes.items():
                assert got["per_layer"][name] == round(s * n) / n
    assert abs(pruner.sparsity()["overall"] - 0.7) < 2 / total
    pruner.make_permanent()
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    zeros = sum(int((m.weight == 0).sum()) for m in _conv_weights(model).values())
    assert abs(zeros / total - 0.7) < 2 / total
    # the classifier and batch-norm stay dense by default
    assert float((model.head[-1].weight == 0).float().mean()) == 0.0


def test_adaptive_scope_gives_each_layer_its_target_by_output_channels():
    model = build_model("lenet_wide", 1, 3, init_seed=1)
    targets = [[16, 0.2], [64, 0.5], [128, 0.8]]
    pruner = pruning.Pruner(model, pruning.SparsitySchedule(0.1, 0.9, 0, 1), "adaptive", adaptive_targets=targets)
    pruner.update(1.0)
    for name, m in _conv_weights(model).items():
        expected = pruning.adaptive_target(m.weight.shape[0], targets)
        assert pruner.sparsity()["per_layer"][name] == round(expected * m.weight.numel()) / m.weight.numel()
    assert pruning.adaptive_target(8, targets) == 0.2 and pruning.adaptive_target(100, targets) == 0.5
    assert pruning.adaptive_target(4096, targets) == 0.8


def test_pruned_weights_stay_zero_through_fine_tuning():
    torch.manual_seed(0)
    model = build_model("lenet", 1, 2, init_seed=0)
    pruner = pruning.Pruner(model, pruning.SparsitySchedule(0.3, 0.6, 0, 2), "global")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(16, 1, 32, 32), torch.randint(0, 2, (16,))
    pruner.update(0.0)
    pruned_before = {n: (m.weight == 0).clone() for n, m in _conv_weights(model).items()}
    for step in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for name, m in _conv_weights(model).items():
            assert bool((m.weight[pruned_before[name]] == 0).all()), f"step {step}: a pruned weight of {name} moved"
        if step == 10:
            pruner.update(1.0)  # sparsity rises: what was pruned stays pruned
            for name, m in _conv_weights(model).items():
                assert bool((m.weight[pruned_before[name]] == 0).all())


def test_bitmask_format_round_trips_and_beats_dense_and_torch_sparse_at_70_percent(tmp_path):
    model = build_model("resnet18", 3, 4, init_seed=0)
    pruner = pruning.Pruner(model, pruning.SparsitySchedule(0.7, 0.7, 0, 1), "global")
    pruner.update(1.0)
    pruner.make_permanent()
    state = model.state_dict()
    dense = tmp_path / "dense.pt"
    torch.save(state, dense)
    size = pruning.save_sparse(state, tmp_path / "sparse.pt")
    back = pruning.load_sparse(tmp_path / "sparse.pt")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert size / dense.stat().st_size < 0.4
    # what DESIGN says of torch's own formats: COO is larger than dense at this sparsity
    coo = tmp_path / "coo.pt"
    torch.save({k: v.to_sparse() if v.dim() == 4 else v for k, v in state.items()}, coo)
    assert coo.stat().st_size > dense.stat().st_size


# ----------------------------------------------------------------------------- quantization
def test_int8_and_reduced_precision_artifacts_round_trip_and_stay_close(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet", 1, 4, init_seed=0, batch_norm=True).eval()
    calibration = [torch.randn(16, 1, 32, 32) for _ in range(4)]
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        reference = model(x)
    scale = float(reference.abs().max())
    cases = {
        "ptq": quantize.post_training_int8(model, calibration, x),
        "dynamic_int8": quantize.post_training_int8(model, calibration, x, dynamic=True),
        "fp16": quantize.reduced_precision(build_model("lenet", 1, 4, init_seed=0, batch_norm=True), "fp16"),
        "bf16": quantize.reduced_precision(build_model("lenet", 1, 4, init_seed=0, batch_norm=True), "bf16"),
    }
    # per-tensor uint8 activations: a step of 1/255 of each range; a few steps of error per layer
    bound = {"ptq": 0.1, "dynamic_int8": 0.1, "fp16": 0.01, "bf16": 0.05}
    for method, variant in cases.items():
        path = tmp_path / f"{method}.pt2"
        quantize.save_artifact(variant, x, path, {"method": method})
        loaded, meta = quantize.load_artifact(path)
        with torch.no_grad():
            out = loaded(x)
            assert torch.allclose(out, variant(x), atol=1e-5), method  # the file is the model in memory
        assert meta["method"] == method
        assert float((out - reference).abs().max()) / scale < bound[method], method
        assert out.shape == reference.shape and loaded(x[:1]).shape == (1, 4)  # any batch size
    fp32 = quantize.tensor_bytes(model.state_dict().values())
    assert quantize.load_artifact(tmp_path / "ptq.pt2")[1]["tensor_bytes"] < 0.3 * fp32
    assert quantize.load_artifact(tmp_path / "fp16.pt2")[1]["tensor_bytes"] == pytest.approx(0.5 * fp32, rel=0.01)


def test_load_artifact_refuses_pickled_tensors_and_non_archives(tmp_path):
    model = quantize.reduced_precision(build_model("lenet", 1, 2), "bf16")
    good = tmp_path / "m.pt2"
    quantize.save_artifact(model, torch.randn(2, 1, 32, 32), good, {})
    bad = tmp_path / "pickled.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("model_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
            dst.writestr(item, data)
    with pytest.raises(DataError, match="pickled"):
        quantize.load_artifact(bad)
    (tmp_path / "junk.pt2").write_text("not a zip")
    with pytest.raises(DataError, match="not a torch.export archive"):
        quantize.load_artifact(tmp_path / "junk.pt2")


# ----------------------------------------------------------------------------- the workflow
def test_variants_of_the_trained_workflow_are_measured_and_close_to_their_base(trained_workflow):
    base = trained_workflow / DS / "batchnorm"
    table = pd.read_csv(base / "variants" / "variants.csv")
    assert sorted(table["variant"].unique()) == ["int8", "pruned"] and len(table) == 6
    int8 = table[table["variant"] == "int8"]
    # int8 weights are a quarter of fp32 (plus per-channel scales); the file adds the graph
    assert (int8["ratio.tensor_size"] < 0.3).all() and int8["cpu.isa"].notna().all()
    # closeness to fp32 on the demo test images: probabilities within 0.01 and ranked alike, so
    # AUROC moves by < 0.02. (Label agreement is not asserted: after 3 epochs the quick models'
    # probabilities spread by only 0.01-0.03 around their thresholds, so a 0.001 change flips
    # labels; how many depends on the host's float trajectory, not on int8.)
    assert (int8["agreement.max_abs_prob_diff"] < 0.01).all()
    assert (int8["delta.test.auroc_macro"].abs() < 0.02).all()
    from scipy.stats import spearmanr

    for fold in range(3):
        b, v = (
            pd.read_parquet(p)
            for p in (
                base / f"fold_{fold}" / "predictions.parquet",
                base / "variants" / "int8" / f"fold_{fold}" / "predictions.parquet",
            )
        )
        b, v = (x[x["set"] == "test"].filter(like="prob:").to_numpy() for x in (b, v))
        assert min(spearmanr(b[:, j], v[:, j])[0] for j in range(b.shape[1])) > 0.99
    pruned = table[table["variant"] == "pruned"]
    assert np.allclose(pruned["sparsity"], 0.6, atol=1e-3)
    assert (pruned["compressed.format"] == "bitmask+values").all()
    for fold in range(3):
        record = json.loads((base / "variants" / "pruned" / f"fold_{fold}" / "compression.json").read_text())
        assert record["finetune"]["epochs"] == 2 and record["base"]["latency_ms_b1"] > 0
        # measured where it ran: the CPU model and the ISA that decides the int8 kernels
        assert record["cpu"]["isa"] in ("avx2", "avx512", "avx512_vnni", "amx") and record["cpu"]["model"]
        metrics = json.loads((base / "variants" / "int8" / f"fold_{fold}" / "metrics.json").read_text())
        assert metrics["test"]["auroc_macro"] > 0.5 and metrics["variant"] == "int8"
    # a variant is aggregated like any model
    summary = json.loads((base / "variants" / "int8" / "cv" / "summary.json").read_text())
    assert summary["folds"] == 3


def test_a_saved_int8_model_predicts_the_same_in_a_fresh_process(trained_workflow):
    fold_dir = trained_workflow / DS / "batchnorm" / "variants" / "int8" / "fold_0"
    threads = json.loads((fold_dir / "compression.json").read_text())["threads"]
    script = f"""
import json, numpy as np, pandas as pd, torch
torch.set_num_threads({threads})  # as the job ran
from medfold.compression.quantize import load_artifact, compiled
from medfold.compression.quantize import FixedBatch
from medfold.training.fold import FoldData, Runner
data = FoldData("{trained_workflow / DS / "index.parquet"}", "{trained_workflow / DS / "splits.parquet"}",
                "{trained_workflow / DS / "cache" / "64"}", 0)
model, meta = load_artifact("{fold_dir / "model.pt2"}")
runner = Runner({{"eval_batch_size": 64, "amp": False, "channels_last": False}}, data.cache, data.targets, data.task,
                torch.device("cpu"), None)
probs, _ = runner.predict(data.rows["test"], None, FixedBatch(compiled(model), 32))
saved = pd.read_parquet("{fold_dir / "predictions.parquet"}")
saved = saved[saved["set"] == "test"].filter(like="prob:").to_numpy()
print(json.dumps({{"diff": float(np.abs(saved - probs).max()), "classes": meta["classes"]}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # the same graph, compiled through the same passes, on the same fixed batches: identical on
    # any host (it differed by 0.008 on an AVX2-only one while a fresh process compiled the
    # archive without torchao's x86 passes; quantize.compiled now imports them)
    assert out["diff"] == 0.0 and out["classes"] == ["Cardiomegaly", "Effusion", "Nodule", "Pneumonia"]


def test_one_variant_of_one_fold_builds_only_what_it_needs(tmp_path):
    from conftest import QUICK

    work = workflow_dir(tmp_path, QUICK)
    proc = run_snakemake(work, "--cores", "2", "--dry-run", f"{DS}/batchnorm/variants/int8/fold_1/metrics.json")
    assert planned(proc) == {
        "demo_cxr14": 1,
        "index": 1,
        "split": 1,
        "check_split": 1,
        "cache": 1,
        "train": 1,
        "compress": 1,
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"variants": {"bad": {"method": "prune", "pruning": {"initial_sparsity": 0.8, "final_sparsity": 0.5}}}},
            "variants.bad.pruning: need 0 <= initial_sparsity",
        ),
        ({"variants": {"odd": {"method": "int4"}}}, "int4"),
        ({"variants": {"x": {"method": "ptq", "calibration_imgs": 3}}}, "calibration_imgs"),
        ({"compression": {"experiments": ["nope"]}}, "compression.experiments: ['nope'] are not experiments"),
    ],
)
def test_bad_variant_config_stops_before_any_job(tmp_path, overrides, message):
    work = workflow_dir(tmp_path, overrides)
    proc = run_snakemake(work, "--cores", "1", "--dry-run", check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert "Job stats" not in proc.stdout + proc.stderr


def test_conv_only_quantization_leaves_the_linear_layers_float():
    """The thesis's conv-only scope: int8 weights for the convolutions, float for the dense head."""
    from medfold.compression import quantize
    from medfold.training.models import build_model

    model = build_model("lenet", 1, 4, init_seed=0).eval()
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    example = torch.rand(2, 1, 32, 32)
    calibration = [torch.rand(8, 1, 32, 32)]

    def int8_weights(graph) -> int:
        tensors = [*graph.parameters(), *graph.buffers()]
        attrs = [n.target for n in graph.graph.nodes if n.op == "get_attr"]
        tensors += [functools.reduce(getattr, target.split("."), graph) for target in attrs]
        return len({id(t) for t in tensors if t.dtype == torch.int8 and t.dim() >= 2})

    whole = quantize.post_training_int8(model, calibration, example)
    conv_only = quantize.post_training_int8(model, calibration, example, layers="conv")
    assert int8_weights(whole) == convs + linears
    assert int8_weights(conv_only) == convs
    with torch.no_grad():
        assert torch.allclose(conv_only(example), model(example), atol=0.05)
