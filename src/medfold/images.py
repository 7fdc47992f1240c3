"""Opening, checking and normalising one image, the same way for indexing and caching."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .fingerprint import fingerprint

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageCheck:
    """What indexing learns from decoding one image; ``reason`` is set when it cannot be used."""

    width: int | None = None
    height: int | None = None
    mode: str | None = None
    file_bytes: int | None = None
    content_hash: str | None = None
    reason: str | None = None
    fingerprint: str | None = None


def pixels_to_uint8(image: Image.Image) -> np.ndarray:
    """Any PIL mode to a uint8 array (H, W) or (H, W, 3), scaling 16/32-bit by the actual range.

    PIL's own ``convert("L")`` clips 16-bit values above 255 to white, which would erase a
    16-bit radiograph, so high-bit-depth images are scaled by their maximum representable
    value for I;16, or by their observed range for 32-bit integer/float images.
    """
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(image, dtype=np.uint16)
        return (arr >> 8).astype(np.uint8)
    if mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return np.round(scaled * 255).astype(np.uint8)
    if mode in ("L", "RGB"):
        return np.asarray(image)
    if mode in ("1", "P", "LA", "PA"):
        return np.asarray(image.convert("L" if mode in ("1", "LA") else "RGB"))
    return np.asarray(image.convert("RGB"))


def content_hash(pixels: np.ndarray) -> str:
    """Hash of decoded pixels: a re-encoded copy of the same image has the same hash."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def check_image(path: str | Path) -> ImageCheck:
    """Decode ``path`` fully. Never raises for a bad file: the reason says what is wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return ImageCheck(reason="file not found")
    except OSError as exc:
        return ImageCheck(reason=f"cannot read file: {exc.strerror or exc}")
    if size == 0:
        return ImageCheck(file_bytes=0, reason="empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            image.load()  # a full decode: catches truncation that verify() misses
            pixels = pixels_to_uint8(image)
            return ImageCheck(image.width, image.height, image.mode, size, content_hash(pixels),
                              fingerprint=fingerprint(pixels))
    except UnidentifiedImageError:
        return ImageCheck(file_bytes=size, reason="not an image (no decoder recognises its content)")
    except OSError as exc:
        message = str(exc)
        kind = "truncated image" if "truncated" in message.lower() else "corrupt image"
        return ImageCheck(file_bytes=size, reason=f"{kind}: {message}")
    except (SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return ImageCheck(file_bytes=size, reason=f"corrupt image: {exc}")
