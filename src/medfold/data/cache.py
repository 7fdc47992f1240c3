"""Decode, convert and resize every indexed image once into one memory-mapped uint8 array.

``<results>/<dataset>/cache/<size>/images.npy`` holds (N, C, size, size) uint8 in index order
(C = 1 for grayscale, 3 for RGB); ``image_ids.txt`` records that order. Training reads batches
straight out of the array, so decoding and resizing cost nothing per epoch.

The array's space is reserved before it is filled (a full disk is an error naming the path, not a
SIGBUS halfway), it is written under a temporary name and renamed when complete, and
``images.npy.blake2b`` records its digest: ``open_cache`` refuses a truncated or altered cache
(about 1 s per GB to check) instead of training on garbage.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from PIL import Image

from medfold.core import files
from medfold.core.errors import DataError
from medfold.core.progress import Progress, tracked
from medfold.data.images import decode

log = logging.getLogger(__name__)
DIGEST = "images.npy.blake2b"


def _to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1:
        if pixels.ndim == 3:  # ITU-R 601 luma, as PIL's "L" conversion
            pixels = np.round(pixels[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        return pixels[None]
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return np.moveaxis(pixels[..., :3], 2, 0)


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(pixels)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image)


def load_file(path: str, size: int, channels: int) -> np.ndarray:
    try:
        pixels = decode(path).pixels
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"{path}: cannot be decoded any more ({exc}); it was readable when indexed - re-run the index rule"
        ) from exc
    return _to_channels(_resize(pixels, size), channels)


def build_cache(index: pd.DataFrame, out_dir, size: int, channels: int, threads: int = 1) -> Path:
    """Write images.npy and image_ids.txt under ``out_dir``; returns the array's path."""
    if not index["present"].all():
        raise DataError("the index was built with dataset.metadata_only: there are no image files to cache or train on")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "images.npy"
    partial = out / "images.npy.partial"
    with files.writing(partial, "creating the image cache"):
        array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(index), channels, size, size))
    files.reserve(partial, files.array_bytes(partial))
    npz_rows = index["npz_index"].notna()
    if npz_rows.any():
        _fill_from_npz(array, index, size, channels)
    file_rows = np.flatnonzero(~npz_rows.to_numpy())

    def one(row: int, into: np.ndarray = array) -> None:
        into[row] = load_file(index["path"].iat[row], size, channels)

    with (
        ThreadPoolExecutor(max_workers=max(1, threads)) as pool,
        Progress(f"cache {size} px", len(file_rows)) as progress,
    ):
        list(tracked(pool.map(one, file_rows), progress))
    array.flush()
    del array, one  # the memory map closes before the file is hashed and renamed
    with files.writing(out, "finishing the image cache"):
        (out / DIGEST).write_text(files.digest(partial) + "\n")
        (out / "image_ids.txt").write_text("\n".join(index["image_id"]) + "\n")
    partial.rename(target)
    log.info(
        "cached %d images at %dx%d, %d channel(s): %s (%.1f MB)",
        len(index),
        size,
        size,
        channels,
        target,
        target.stat().st_size / 1e6,
    )
    return target


def _fill_from_npz(array: np.ndarray, index: pd.DataFrame, size: int, channels: int) -> None:
    for path, rows in index[index["npz_index"].notna()].groupby("path").groups.items():
        with np.load(path, allow_pickle=False) as archive:
            for split, sub in index.loc[rows].groupby("source_split"):
                images = archive[f"{split}_images"]
                for row, i in zip(sub.index, sub["npz_index"].astype(int)):
                    array[row] = _to_channels(_resize(images[i], size), channels)


def open_cache(cache_dir, index: pd.DataFrame) -> np.ndarray:
    """The cached array, memory-mapped read-only, after checking it matches the index order."""
    cache_dir = Path(cache_dir)
    ids = (cache_dir / "image_ids.txt").read_text().split("\n")[:-1]
    if ids != index["image_id"].tolist():
        raise DataError(
            f"{cache_dir}: cached image order does not match the index; delete the cache folder to rebuild it"
        )
    check_cache(cache_dir)
    return np.load(cache_dir / "images.npy", mmap_mode="r")


def check_cache(cache_dir) -> None:
    """Refuse a cache whose array is truncated or whose bytes are not the ones written."""
    path = Path(cache_dir) / "images.npy"
    rebuild = f"delete {path.parent} (or run snakemake with --forcerun cache) to rebuild it"
    try:
        expected = files.array_bytes(path)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable array ({exc}); {rebuild}") from exc
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(f"{path}: truncated ({actual:,} bytes, its header needs {expected:,}); {rebuild}")
    recorded = path.parent / DIGEST
    if not recorded.exists():
        raise DataError(f"{recorded}: missing, so {path} cannot be verified; {rebuild}")
    if files.digest(path) != recorded.read_text().strip():
        raise DataError(f"{path}: its bytes differ from those written (digest in {recorded}); {rebuild}")


# ----------------------------------------------------------------------------- the cache stage


@dataclass(frozen=True)
class CacheOutputs(files.Outputs):
    """What the cache rule writes (both in one folder)."""

    images: Path
    ids: Path
    NAMES: ClassVar[dict[str, str]] = {"images": "images.npy", "ids": "image_ids.txt"}


def cache_job(index_path, size: int, channels: int, outputs: CacheOutputs, threads: int = 1) -> None:
    """The cache rule: every indexed image decoded and resized once, at ``size``."""
    from medfold.data.index.io import read_index

    index, _ = read_index(index_path)
    build_cache(index, outputs.images.parent, size, channels, threads)
