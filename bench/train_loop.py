"""medfold's training step, data path included, against a minimal plain PyTorch loop on the same
model, batch size and cached uint8 tensors, in the same run; prints images/s of each and the
ratio (target >= 0.9 on CPU).

medfold's path: CachedBatches (seeded shuffle over the memory-mapped cache) -> Runner.prepare
(to device, /255, augmentation, normalisation, channels_last on GPU) -> Runner.forward (bf16
autocast on GPU) -> Criterion (class-weighted BCE) -> train_epoch's step, progress and loss
bookkeeping. The plain loop: a shuffled index, the same uint8 batch to float, the same
normalisation, model, BCE with logits, AdamW step. Both start from the same initial weights.

Beside both, the plain step alone on one batch already resident on the device (no data path):
the rate the model and optimiser allow, which issue #29 asks medfold's loop to reach within 0.95.
With peak device memory per case on CUDA.

Run: .venv/bin/python bench/train_loop.py                       (CPU: small CNN at 28 and 64 px, ResNet18 at 128 px)
     python3 bench/train_loop.py --device cuda                   (issue #29 item 1: DenseNet121 and ResNet50 at
                                                                  224 px, batch 64/128/256, eager and compiled)
     python3 bench/train_loop.py --device cuda --models densenet121 --batch-sizes 128 --modes compiled
     .venv/bin/python bench/train_loop.py --quick                (the test suite)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # also where medfold is not installed

from medfold.core.hardware import describe  # noqa: E402
from medfold.settings.training import (
    AugmentConfig,  # noqa: E402
    OptimizerOptions,  # noqa: E402
)
from medfold.training.fold import Criterion, Runner  # noqa: E402
from medfold.training.loop import make_optimizer, seed_epoch, train_epoch
from medfold.training.models import build_model  # noqa: E402
from medfold.training.transforms import CachedBatches, normalize

CLASSES = 14


def data(n: int, size: int, channels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    cache = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    targets = (rng.random((n, CLASSES)) < 0.1).astype(np.float32)
    return cache, targets


def medfold_epochs(model, cache, targets, cfg, device, epochs: int) -> float:
    runner = Runner(cfg, cache, targets, "multilabel", device, model)
    if runner.channels_last:
        model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg["compile"] else model
    rows = np.arange(len(cache))
    criterion = Criterion("multilabel", targets, CLASSES, True, device)
    optimizer = make_optimizer(
        model.parameters(), SimpleNamespace(**cfg, optimizer_options=OptimizerOptions()), cfg["lr"]
    )
    batches = CachedBatches(cache, rows, cfg["batch_size"], shuffle=True, seed=0)
    augment = AugmentConfig.from_config({"hflip": 0.5})
    model.train()
    seen, seconds = 0, 0.0
    for epoch in range(epochs + 1):  # the first is warm-up (compilation, allocator)
        batches.set_epoch(epoch)
        _, n, s = train_epoch(
            runner,
            step_model,
            batches,
            augment,
            criterion,
            optimizer,
            seed_epoch(cfg["seed"], 0, epoch, device),
            0,
            epoch,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        if epoch:
            seen, seconds = seen + n, seconds + s
    return seen / seconds


def plain_setup(model, cfg, device):
    """The plain loop's model (channels_last on CUDA, compiled if asked), AdamW and BCE."""
    channels_last = device.type == "cuda" and cfg["channels_last"]
    if channels_last:
        model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg["compile"] else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return channels_last, step_model, optimizer, torch.nn.BCEWithLogitsLoss()


def plain_epochs(model, cache, targets, cfg, device, epochs: int) -> float:
    channels_last, step_model, optimizer, loss_fn = plain_setup(model, cfg, device)
    y_all = torch.from_numpy(targets)
    model.train()
    seen, seconds = 0, 0.0
    for epoch in range(epochs + 1):
        order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(epoch))
        start = time.perf_counter()
        for i in range(0, len(order), cfg["batch_size"]):
            idx = np.sort(order[i : i + cfg["batch_size"]].numpy())
            x = normalize(torch.from_numpy(cache[idx]).to(device, non_blocking=True).float().div_(255))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg["amp"]):
                loss = loss_fn(step_model(x).float(), y_all[idx].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if epoch:
            seen, seconds = seen + len(order), seconds + time.perf_counter() - start
    return seen / seconds


def resident_step(model, cfg, device, batch: int, size: int, steps: int) -> float:
    """Images/s of the plain training step on one batch that stays on the device: no data path,
    the ceiling medfold's loop is measured against."""
    channels_last, step_model, optimizer, loss_fn = plain_setup(model, cfg, device)
    gen = torch.Generator().manual_seed(0)
    x = normalize(torch.rand((batch, 1, size, size), generator=gen)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand((batch, CLASSES), generator=gen) < 0.1).float().to(device)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg["amp"]):
            loss = loss_fn(step_model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: compilation, the allocator, cudnn's choice of kernels
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="several, one case each")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=None)
    parser.add_argument("--resident-steps", type=int, default=30, help="steps timed on the resident batch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternated timings of each loop")
    parser.add_argument("--quick", action="store_true", help="one tiny case (the test suite)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    gpu_default = device.type == "cuda" and not args.models and not args.quick
    models = args.models or (["densenet121", "resnet50"] if gpu_default else None)
    batch_sizes = args.batch_sizes or ([args.batch_size] if args.batch_size else None)
    if gpu_default:
        batch_sizes = batch_sizes or [64, 128, 256]
    modes = args.modes or (["eager", "compiled"] if gpu_default else ["compiled" if args.compile else "eager"])
    if args.quick:
        cases = [("lenet", 28, 512, 64, True)]
        args.resident_steps = min(args.resident_steps, 20)
    elif models:
        sizes = batch_sizes or [64]
        cases = [(m, args.size or 224, args.images or max(2048, 16 * b), b, False) for m in models for b in sizes]
    else:
        cases = [("lenet", 28, 4096, 64, True), ("lenet", 64, 2048, 32, True), ("resnet18", 128, 512, 32, False)]
    print(
        f"host: {describe()}; device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
        f"torch {torch.__version__}"
    )
    for (name, size, n, batch, batch_norm), mode in ((c, m) for c in cases for m in modes):
        cfg = {
            "optimizer": "adamw",
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "momentum": 0.9,
            "batch_size": batch,
            "amp": device.type == "cuda",
            "channels_last": device.type == "cuda",
            "compile": mode == "compiled",
            "eval_batch_size": batch,
            "seed": 0,
        }
        channels = 1
        cache, targets = data(n, size, channels)
        base = build_model(name, channels, CLASSES, 0, None, batch_norm, 0.0)
        rates = {"plain": [], "medfold": []}
        # alternated, the best of each: a noisy neighbour slows one timing, not the comparison
        for _ in range(args.rounds):
            for label, run in (("plain", plain_epochs), ("medfold", medfold_epochs)):
                rates[label].append(run(copy.deepcopy(base).to(device), cache, targets, cfg, device, args.epochs))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        resident = max(
            resident_step(copy.deepcopy(base).to(device), cfg, device, batch, size, args.resident_steps)
            for _ in range(args.rounds)
        )
        plain, ours = max(rates["plain"]), max(rates["medfold"])
        peak = f"  peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(
            f"{name:<12} {size:>4} px  batch {batch:>3}  {mode:<8} plain {plain:9.1f} img/s  medfold {ours:9.1f} "
            f"img/s  ratio {ours / plain:.3f}  resident step {resident:9.1f} img/s  medfold/resident "
            f"{ours / resident:.3f}{peak}  (best of {args.rounds} alternated timings each)"
        )


if __name__ == "__main__":
    main()
