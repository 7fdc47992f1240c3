"""Images per second of one training epoch's data path: medfold's memory-mapped uint8 cache with
batched flips and normalisation, against a plain PIL ImageFolder-style loader (decode, resize to
224 px, to tensor, normalise, random horizontal flip; a DataLoader with 2 workers), over the same
source files in the same run. Source images are 8-bit 1024 x 1024 PNGs like NIH ChestX-ray14's,
generated here. Target (issue 3): ratio >= 100x.

Run: .venv/bin/python bench/data_path.py [--images 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from medfold.cache import build_cache, open_cache
from medfold.demo import Anatomy, render_radiograph
from medfold.transforms import AugmentConfig, CachedBatches, augment_batch, normalize

SIZE, BATCH = 224, 32


def make_sources(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    anatomy = Anatomy(0.5, 0.17, 0.33, 0.12, 1.0, (1024, 1024))
    base = render_radiograph(anatomy, {"Effusion"}, rng)
    paths = []
    for i in range(n):  # distinct files: noise differs per image, so no decoder cache helps
        noisy = np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1)
        path = root / "class_a" / f"img{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((noisy * 255).astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return paths


class PlainFolder(Dataset):
    def __init__(self, paths):
        self.paths = paths
        self.transform = v2.Compose(
            [
                v2.Resize((SIZE, SIZE)),
                v2.RandomHorizontalFlip(),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize([0.5], [0.25]),
            ]
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("L")), 0


def plain_epoch(paths) -> float:
    loader = DataLoader(PlainFolder(paths), batch_size=BATCH, shuffle=True, num_workers=2)
    start = time.perf_counter()
    n = sum(len(x) for x, _ in loader)
    return n / (time.perf_counter() - start)


def cached_epochs(cache: np.ndarray, epochs: int) -> float:
    batches = CachedBatches(cache, np.arange(len(cache)), BATCH, shuffle=True, seed=0)
    augment = AugmentConfig(hflip=0.5)
    gen = torch.Generator().manual_seed(0)
    n = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for images, _ in batches:
            x = normalize(augment_batch(images.float().div_(255), augment, gen))
            n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="32 images (the test suite)")
    args = parser.parse_args()
    if args.quick:
        args.images = 32
    from medfold.hardware import describe

    print(f"host: {describe()}")
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_sources(root / "src", args.images)
        index = pd.DataFrame(
            {
                "image_id": [p.name for p in paths],
                "path": [str(p) for p in paths],
                "npz_index": pd.array([None] * len(paths), dtype="Int64"),
                "present": True,
            }
        )
        start = time.perf_counter()
        build_cache(index, root / "cache", SIZE, 1, threads=2)
        build = time.perf_counter() - start
        cache = open_cache(root / "cache", index)
        # best of several runs for both: on a shared 2-core machine single runs vary up to 2x
        plain = max(plain_epoch(paths) for _ in range(3))
        cached = max(cached_epochs(cache, epochs=20) for _ in range(5))
    print(f"{args.images} source PNGs, 1024x1024 8-bit; batches of {BATCH} at {SIZE} px, horizontal flip only")
    print(f"cache build (once per dataset and size): {build:.1f} s = {args.images / build:.0f} img/s")
    print(f"plain PIL folder loader, 2 workers: {plain:,.0f} img/s (best of 3 epochs)")
    print(f"medfold cache + batched flip + normalise: {cached:,.0f} img/s (best of 5 runs of 20 epochs)")
    ratio = cached / plain
    print(f"ratio: {ratio:.0f}x  (target >= 100x) -> {'TARGET MET' if ratio >= 100 else 'TARGET MISSED'}")


if __name__ == "__main__":
    main()
