"""Images per second of indexing (medfold.data.index.check_images: decode, content hash, fingerprint,
near-duplicate signature) against a plain PIL decode of the same files with the same number of
threads, measured in one run (medfold decodes 8-bit grey and RGB PNGs with OpenCV's libpng and
JPEGs with simplejpeg, to PIL's pixels), on two kinds of file: 224 px JPEGs (the Kermany collection as
published) and 1024 px 8-bit PNGs (NIH ChestX-ray14's). Also the share of the cache rule's time
that is decoding: what decoding each file once, in index and cache together, would save.
Target (issue 24): index at least 0.7 of the plain decode's rate on both kinds.

Run: .venv/bin/python bench/index_throughput.py [--real ../shared/data/kermany_224] [--images 2000]
  --real: the 224 px JPEGs are that folder's, and the 1024 px PNGs are those films resized (the
  real images' texture, NIH's size); without it both are demo radiographs generated here.
Quick mode (the test suite): --quick, 96 generated images of each kind.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medfold.core.hardware import describe
from medfold.data.cache import build_cache
from medfold.data.demo import _patient_anatomy, render_radiograph
from medfold.data.images import decode
from medfold.data.index.build import check_images

TARGET = 0.7


def plain_decode(path: str) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        return np.asarray(image)


def rate(work, paths: list[str], threads: int) -> float:
    start = time.perf_counter()
    work(paths, threads)
    return len(paths) / (time.perf_counter() - start)


def pil_rate(paths: list[str], threads: int) -> float:
    def run(items, n):
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(plain_decode, items, chunksize=64))

    return rate(run, paths, threads)


def generated(root: Path, n: int, side: int, suffix: str) -> list[str]:
    rng = np.random.default_rng([side, 7])
    paths = []
    for i in range(n):  # distinct films: every decode is a real one
        picture = render_radiograph(_patient_anatomy(rng), set(), rng)
        picture = np.clip(picture + rng.normal(0, 0.02, picture.shape), 0, 1)
        image = Image.fromarray((picture * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        path = root / f"gen{side}_{i:05d}{suffix}"
        image.convert("RGB").save(path, quality=90) if suffix == ".jpeg" else image.save(path)
        paths.append(str(path))
    return paths


def real_sets(folder: Path, root: Path, n: int) -> tuple[list[str], list[str]]:
    jpegs = sorted(str(p) for p in folder.rglob("*.jpeg"))
    jpegs = [jpegs[i] for i in np.linspace(0, len(jpegs) - 1, min(n, len(jpegs))).astype(int)]
    pngs = []
    for i, path in enumerate(jpegs):
        with Image.open(path) as image:
            large = image.convert("L").resize((1024, 1024), Image.BICUBIC)
        pngs.append(str(root / f"real1024_{i:05d}.png"))
        large.save(pngs[-1])
    return jpegs, pngs


def cache_share(paths: list[str], threads: int, root: Path) -> tuple[float, float]:
    """(seconds of the cache rule's work at 224 px, seconds of medfold's decoding of the same
    files, which the cache rule uses)."""
    index = pd.DataFrame({"image_id": paths, "path": paths, "present": True, "npz_index": None})
    start = time.perf_counter()
    build_cache(index, root / "cache", 224, 1, threads=threads)
    cache_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, paths, chunksize=64))
    return cache_seconds, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, help="a folder of 224 px JPEG radiographs (Kermany)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="96 generated images of each kind")
    args = parser.parse_args()
    n = 96 if args.quick else args.images
    print(f"host: {describe()}")
    met = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.real and not args.quick:
            jpegs, pngs = real_sets(args.real, root, n)
            source = f"real: {args.real}"
        else:
            jpegs, pngs = generated(root, n, 224, ".jpeg"), generated(root, max(n // 4, 24), 1024, ".png")
            source = "generated demo radiographs"
        print(f"{source}; {args.threads} threads; rates in images/s, each the better of two runs")
        for kind, paths in (("224 px JPEG", jpegs), ("1024 px PNG", pngs)):
            check_images(paths[:8], 1)  # imports and first-call costs out of the timing
            plain = max(pil_rate(paths, args.threads) for _ in range(2))
            ours = max(rate(check_images, paths, args.threads) for _ in range(2))
            ratio = ours / plain
            met &= ratio >= TARGET
            print(
                f"{kind:12s} {len(paths):5d} files  plain PIL decode {plain:7.1f}  index {ours:7.1f}  "
                f"ratio index/decode {ratio:.3f}  (target {TARGET})"
            )
        cache_seconds, decode_seconds = cache_share(pngs, args.threads, root)
        print(
            f"cache 224 px of the 1024 px PNGs: {cache_seconds:.2f} s, of which decoding {decode_seconds:.2f} s "
            f"({decode_seconds / cache_seconds:.0%}): what decoding once for index and cache would save there"
        )
    print("TARGETS MET" if met else "TARGETS NOT MET")


if __name__ == "__main__":
    main()
