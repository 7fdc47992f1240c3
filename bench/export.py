"""The exported ONNX fold ensemble (medfold.deploy.export) under onnxruntime on the CPU, against the
PyTorch fold ensemble medfold predict runs (eager, fp32, the same normalisation and averaging),
in the same run: latency at batch 1 and images/s at batch 32, and their ratio.

Both sides get the same uint8 batch, the same threads; PyTorch's side is medfold.deploy.predict's
Predictor (input() then probabilities()), onnxruntime's one InferenceSession.run on the file.

Run: .venv/bin/python bench/export.py              (ResNet18 and DenseNet121 at 224 px, 5 folds)
     .venv/bin/python bench/export.py --quick      (the test suite: LeNet at 64 px, 3 folds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # also where medfold is not installed

from medfold.core.hardware import describe  # noqa: E402
from medfold.deploy.export import InferencePath, parity, write_onnx  # noqa: E402
from medfold.deploy.predict import (
    Predictor,  # noqa: E402
    session,
)
from medfold.training.models import build_model  # noqa: E402

CLASSES = 14


def timed(run, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after two warm-up calls."""
    run()
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def one(name: str, size: int, folds: int, repeats: int, threads: int, tmp: Path) -> float:
    models = [build_model(name, 1, CLASSES, init_seed=k).eval() for k in range(folds)]
    mean, std = [0.5], [0.25]
    predictor = Predictor(models, [str(c) for c in range(CLASSES)], "multilabel", size, 1, None, mean=mean, std=std)
    module = InferencePath(models, mean, std, "255", "none", "multilabel").eval()
    rng = np.random.default_rng(0)
    batches = {b: rng.integers(0, 256, (b, 1, size, size), dtype=np.uint8) for b in (1, 32)}
    path = tmp / f"{name}.onnx"
    write_onnx(module, torch.from_numpy(batches[32][:2]), path)
    difference = parity(path, module, batches[32])
    ort = session(path, threads)
    line = [f"{name:<12} {size:>4} px {folds} folds"]
    ratios = []
    for b, images in batches.items():
        torch_s = timed(lambda images=images: predictor.probabilities(predictor.input(images)), repeats)
        ort_s = timed(lambda images=images: ort.run(None, {"images": images}), repeats)
        ratios.append(torch_s / ort_s)
        if b == 1:
            line.append(f"b1 latency torch {1000 * torch_s:8.2f} ms  onnxruntime {1000 * ort_s:8.2f} ms")
        else:
            line.append(f"b32 torch {b / torch_s:8.1f} img/s  onnxruntime {b / ort_s:8.1f} img/s")
    line.append(f"ratio onnxruntime/torch speed b1 {ratios[0]:.2f}x b32 {ratios[1]:.2f}x  max |diff| {difference:.1e}")
    print("  ".join(line), flush=True)
    return min(ratios)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"host: {describe()}", flush=True)
    plan = [("lenet", 64, 3, 5)] if args.quick else [("resnet18", 224, 5, 10), ("densenet121", 224, 5, 5)]
    with tempfile.TemporaryDirectory() as tmp:
        slowest = min(one(name, size, folds, repeats, args.threads, Path(tmp)) for name, size, folds, repeats in plan)
    verdict = "at least as fast as" if slowest >= 1 else "slower than"
    print(f"VERDICT the exported file under onnxruntime is {verdict} the PyTorch ensemble", end=" ")
    print(f"(lowest ratio {slowest:.2f}x)")


if __name__ == "__main__":
    main()
