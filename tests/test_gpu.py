"""On a GPU (``pytest -m gpu``; skipped where CUDA is not available): a demo fold trained on the
GPU with bf16 autocast learns, and a run killed after an epoch resumes to the numbers of one that
never stopped; the fp16 and bf16 inference variants run on the GPU and agree with fp32.

Written for issue #29 while no device was lent: these have not run yet. On CPU the resume is
bit-exact (tests/test_train.py); on a GPU cuDNN's backward kernels are not deterministic unless
asked, so the numbers are compared to 1e-3 here."""

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import prepare_demo, resolved_config, train_command

from medfold.compression.quantize import reduced_precision
from medfold.training.fold import FoldData, Runner, load_model
from medfold.training.train import run_fold

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (run on a GPU machine: pytest -m gpu)"),
]
FOLD = 0
ON_GPU = dict(
    batch_norm=True,
    device="cuda",
    amp=True,  # bf16 autocast
    epochs=12,
    threads=2,
    plateau={"factor": 0.5, "patience": 3, "min_lr": 1.0e-5},
    early_stopping={"enabled": False},
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, demo_dir):
    return prepare_demo(tmp_path_factory.mktemp("prepared"), demo_dir)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_fold")
    cfg = resolved_config({"training": ON_GPU})["training"]
    result = run_fold(cfg, prepared / "index.parquet", prepared / "splits.parquet", prepared / "cache", FOLD, out, 2)
    return out, result, cfg


def test_a_demo_fold_trained_on_the_gpu_with_bf16_learns(trained):
    out, result, _ = trained
    assert result["test"]["auroc_macro"] > 0.8, result["test"]  # chance is 0.5
    assert (out / "model.pt").exists() and not (out / "checkpoint.pt").exists()
    model, saved = load_model(out / "model.pt")
    assert saved["classes"] == result["classes"]


def _numbers(record, prefix=""):
    if isinstance(record, dict):
        for key, value in record.items():
            yield from _numbers(value, f"{prefix}.{key}")
    elif isinstance(record, float) and "seconds" not in prefix and "images_per_s" not in prefix:
        yield prefix, record


def test_a_gpu_run_killed_after_an_epoch_resumes_to_the_same_numbers(prepared, trained, tmp_path):
    _, result, cfg = trained
    out = tmp_path / "killed"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(cfg))
    cmd = train_command(settings, prepared, FOLD, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint, epoch, deadline = out / "checkpoint.pt", 0, time.time() + 300
    while time.time() < deadline and epoch < 3:
        time.sleep(0.2)
        if checkpoint.exists():
            epoch = torch.load(checkpoint, weights_only=True, map_location="cpu")["state"]["epoch"]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and epoch >= 3 and not (out / "metrics.json").exists()
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed fold 0" in resumed.stderr
    again = dict(_numbers(json.loads((out / "metrics.json").read_text())))
    first = dict(_numbers(json.loads(json.dumps(result))))
    assert again.keys() == first.keys()
    worst = max(abs(again[k] - first[k]) for k in first)
    assert worst < 1e-3, worst


@pytest.mark.parametrize("method", ["fp16", "bf16"])
def test_reduced_precision_inference_runs_on_the_gpu_and_agrees_with_fp32(prepared, trained, method):
    out, _, cfg = trained
    data = FoldData(prepared / "index.parquet", prepared / "splits.parquet", prepared / "cache", FOLD)
    device = torch.device("cuda")
    base, _ = load_model(out / "model.pt")
    runner = Runner(cfg, data.cache, data.targets, data.task, device, base.to(device))
    rows = data.rows["test"]
    fp32, _ = runner.predict(rows, None, base.to(device))
    variant = reduced_precision(load_model(out / "model.pt")[0], method).to(device)
    low, _ = runner.predict(rows, None, variant)
    assert next(variant.parameters()).dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[method]
    assert np.abs(np.asarray(low) - np.asarray(fp32)).max() < 2e-2
