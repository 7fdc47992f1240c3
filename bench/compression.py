"""fp32 against int8 (torchao PT2E, X86InductorQuantizer, inductor with freezing) for ResNet50 and
DenseNet121 at 224 px on this CPU, and the compressed size of a 70 %-pruned model, all in one
run. Targets (issue 4): int8 at least 4x faster than fp32 at batch 1 and at most 0.26x its size;
70 % pruning compressed to at most 0.4x.

Latency is the median of repeated passes after warm-up, with torch's default thread count.
fp32 is timed eager (what a user runs without compiling) and compiled the same way as int8, so
the gain of compiling alone is visible. Sizes are files on disk: fp32 a state_dict saved with
torch.save; int8 medfold's .pt2 artifact (graph included), and its tensors alone.

The figures hold for the ISA printed first (AVX2 only, AVX-512 VNNI or AMX): int8 kernels differ
per ISA, and README gives the figures per ISA measured.

Run: .venv/bin/python bench/compression.py [--models resnet50 densenet121] [--repeats 20] [--engines]
     .venv/bin/python bench/compression.py --quick   (ResNet18 at 64 px, the test suite)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from medfold.compression import quantize
from medfold.compression.compress import latency_ms
from medfold.training import prune as pruning
from medfold.training.models import build_model

SIZE, CLASSES, CHANNELS = 224, 14, 1  # NIH ChestX-ray14: 14 findings, grayscale


def row(label: str, value: str) -> None:
    print(f"  {label:<44} {value}")


def fx_engines(name: str, x1: torch.Tensor, calibration, repeats: int) -> dict[str, float]:
    """Batch-1 latency of FX-mode static int8 (torch.ao's prepare_fx/convert_fx, run eagerly) on
    each quantized engine: the alternatives to the default path, per ISA."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    out = {}
    for engine in ("fbgemm", "x86", "onednn"):
        if engine not in torch.backends.quantized.supported_engines:
            continue
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            prepared = prepare_fx(
                build_model(name, CHANNELS, CLASSES, init_seed=0).eval(), get_default_qconfig_mapping(engine), (x1,)
            )
            with torch.no_grad():
                for batch in calibration:
                    prepared(batch)
            out[f"int8 FX {engine} eager b1"] = latency_ms(convert_fx(prepared), x1, 3, repeats)
        finally:
            torch.backends.quantized.engine = previous
    return out


def bench_model(name: str, repeats: int, big_repeats: int, work: Path, size: int = SIZE, engines: bool = False) -> dict:
    global SIZE
    SIZE = size
    torch.manual_seed(0)
    model = build_model(name, CHANNELS, CLASSES, init_seed=0).eval()
    x1, x32 = torch.randn(1, CHANNELS, SIZE, SIZE), torch.randn(32, CHANNELS, SIZE, SIZE)
    fp32_path = work / f"{name}_fp32.pt"
    torch.save(model.state_dict(), fp32_path)

    start = time.perf_counter()
    calibration = [torch.randn(8, CHANNELS, SIZE, SIZE) for _ in range(4)]
    int8 = quantize.post_training_int8(model, calibration, x32[:2])
    int8_path = work / f"{name}_int8.pt2"
    quantize.save_artifact(int8, x32[:2], int8_path, {})
    loaded, meta = quantize.load_artifact(int8_path)
    quantize_s = time.perf_counter() - start

    t = {"fp32 eager b1": latency_ms(model, x1, 3, repeats), "fp32 eager b32": latency_ms(model, x32, 1, big_repeats)}
    start = time.perf_counter()
    fp32_compiled = quantize.compiled(build_model(name, CHANNELS, CLASSES, init_seed=0).eval())
    t["fp32 compiled b1"] = latency_ms(fp32_compiled, x1, 3, repeats)
    t["fp32 compiled b32"] = latency_ms(fp32_compiled, x32, 2, big_repeats)
    int8_compiled = quantize.compiled(loaded)
    t["int8 compiled b1"] = latency_ms(int8_compiled, x1, 3, repeats)
    t["int8 compiled b32"] = latency_ms(int8_compiled, x32, 2, big_repeats)
    compile_s = time.perf_counter() - start
    if engines:
        t.update(fx_engines(name, x1, calibration, repeats))
    with torch.no_grad():
        reference = model(x32[:8])
        error = float((int8_compiled(x32[:8]) - reference).abs().max() / reference.abs().max())

    pruned = build_model(name, CHANNELS, CLASSES, init_seed=0)
    pruner = pruning.Pruner(pruned, pruning.SparsitySchedule(0.7, 0.7, 0, 1), "global")
    pruner.update(1.0)
    pruner.make_permanent()
    dense_path = work / f"{name}_pruned_dense.pt"
    torch.save(pruned.state_dict(), dense_path)
    sparse_bytes = pruning.save_sparse(pruned.state_dict(), work / f"{name}_pruned_sparse.pt")

    fp32_bytes = fp32_path.stat().st_size
    out = {
        "int8_size": int8_path.stat().st_size / fp32_bytes,
        "int8_tensor_size": meta["tensor_bytes"] / quantize.tensor_bytes(model.state_dict().values()),
        "speedup_b1": t["fp32 eager b1"] / t["int8 compiled b1"],
        "speedup_b32": t["fp32 eager b32"] / t["int8 compiled b32"],
        "speedup_vs_compiled_b1": t["fp32 compiled b1"] / t["int8 compiled b1"],
        "speedup_vs_compiled_b32": t["fp32 compiled b32"] / t["int8 compiled b32"],
        "pruned_ratio": sparse_bytes / dense_path.stat().st_size,
        "pruned_gzip_ratio": pruning.gzip_size(dense_path) / dense_path.stat().st_size,
    }
    print(f"\n{name} ({CHANNELS}x{SIZE}x{SIZE}, {CLASSES} classes, {torch.get_num_threads()} threads)")
    for label, ms in t.items():
        row(f"latency {label}", f"{ms:9.2f} ms")
    row("fp32 state_dict", f"{fp32_bytes / 1e6:9.2f} MB")
    row("int8 .pt2 artifact", f"{int8_path.stat().st_size / 1e6:9.2f} MB")
    row("int8 max |logit error| / max |logit|", f"{error:9.4f}")
    row("quantize + save + load / compile+timing", f"{quantize_s:6.1f} s / {compile_s:.1f} s")
    row(
        "70% pruned: bitmask+values / dense", f"{sparse_bytes / 1e6:9.2f} MB / {dense_path.stat().st_size / 1e6:.2f} MB"
    )
    row(
        "RATIO int8/fp32 size (target <= 0.26)",
        f"{out['int8_size']:9.3f}  (tensors alone {out['int8_tensor_size']:.3f})",
    )
    row("RATIO int8 speed-up b1 vs eager (target >= 4)", f"{out['speedup_b1']:9.2f}x")
    row("RATIO int8 speed-up b32 vs eager", f"{out['speedup_b32']:9.2f}x")
    row(
        "RATIO int8 speed-up vs compiled fp32 b1 / b32",
        f"{out['speedup_vs_compiled_b1']:9.2f}x / {out['speedup_vs_compiled_b32']:.2f}x",
    )
    row(
        "RATIO 70% pruned compressed (target <= 0.4)",
        f"{out['pruned_ratio']:9.3f}  (gzip of dense {out['pruned_gzip_ratio']:.3f})",
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "densenet121"])
    parser.add_argument("--repeats", type=int, default=20, help="timed passes at batch 1")
    parser.add_argument("--big-repeats", type=int, default=3, help="timed passes at batch 32")
    parser.add_argument("--size", type=int, default=SIZE, help="image side in pixels")
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64 px, few repeats")
    parser.add_argument("--engines", action="store_true", help="also FX-mode int8 on each quantized engine")
    args = parser.parse_args()
    if args.quick:
        args.models, args.size, args.repeats, args.big_repeats = ["resnet18"], 64, 3, 1
        args.engines = True  # the suite runs every path the bench has
    from medfold.core.hardware import describe

    print(f"host: {describe()}  (the int8 figures hold for this ISA)")
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            m: bench_model(m, args.repeats, args.big_repeats, Path(tmp), args.size, args.engines) for m in args.models
        }
    print("\nsummary")
    for m, r in results.items():
        ok = r["int8_size"] <= 0.26 and r["speedup_b1"] >= 4 and r["pruned_ratio"] <= 0.4
        print(
            f"  {m:<12} size {r['int8_size']:.3f}x  b1 {r['speedup_b1']:.2f}x  pruned {r['pruned_ratio']:.3f}x"
            f"  -> {'meets' if ok else 'MISSES'} the targets"
        )


if __name__ == "__main__":
    main()
