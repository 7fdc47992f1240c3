"""Opening, checking and normalising one image, the same way for indexing and caching."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medfold.data.dicom import UnsupportedTransferSyntax
from medfold.data.fingerprint import area_average, fingerprint, grey_plane, trimmed_grey

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
HIGH_BIT_DEPTHS = (8, 10, 12, 14, 16)


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
    dicom_patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    signature: object | None = None  # medfold.data.matching.Signature: for the near-duplicate search, not the table


def signatures(pixels: np.ndarray) -> tuple[str, object]:
    """The fingerprint and the matching signature of decoded pixels, from one trimming."""
    from medfold.data.matching import signature

    grey = trimmed_grey(pixels)
    return fingerprint(pixels, area_average(grey)), signature(grey, is_colour(pixels))


def is_colour(pixels: np.ndarray) -> bool:
    """Whether ``pixels`` hold colour: three channels that are not all equal (grey stored as RGB
    is grey)."""
    if pixels.ndim != 3 or pixels.shape[2] < 3:
        return False
    first = pixels[..., 0]
    return not (np.array_equal(first, pixels[..., 1]) and np.array_equal(first, pixels[..., 2]))


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 (H, W) or (H, W, 3)
    mode: str
    dicom: object | None = None  # medfold.data.dicom.DicomImage


def decode(path) -> Decoded:
    """The one way medfold turns a file into pixels (indexing and caching alike): DICOM through
    medfold.data.dicom, everything else through PIL with its EXIF orientation applied (8-bit PNGs and
    JPEGs that need no turn by faster decoders, to PIL's own pixels). Raises
    ValueError/OSError/UnidentifiedImageError for files it cannot use."""
    from medfold.data.dicom import looks_like_dicom, read_dicom

    if looks_like_dicom(path):
        image = read_dicom(path)
        return Decoded(image.pixels, image.mode, image)
    fast = _jpeg_by_simplejpeg(path)
    if fast is not None:
        return Decoded(*fast)
    with Image.open(path) as image:
        pixels = _png_by_opencv(path, image)
        if pixels is not None:
            return Decoded(pixels, image.mode)
        image.load()  # a full decode: catches truncation that verify() misses
        mode = image.mode
        upright = ImageOps.exif_transpose(image)  # a phone photo of a film is often stored sideways
        return Decoded(pixels_to_uint8(upright), mode)


JPEG_MODES = {"Gray": "L", "YCbCr": "RGB", "RGB": "RGB"}  # libjpeg's colour space: PIL's mode


def _jpeg_by_simplejpeg(path) -> tuple[np.ndarray, str] | None:
    """(pixels, PIL's mode) of a grey or colour JPEG without EXIF, by simplejpeg: the
    libjpeg-turbo that PIL uses, with the same accurate DCT and fancy upsampling, without PIL's
    Python-side parsing and buffering (224 px Kermany films decoded in 0.38 of PIL's time, the
    same pixels on all 5,840). None for anything else (CMYK, EXIF that may turn the image, a file
    it cannot decode): PIL then decodes it, or names what is wrong. ``strict`` makes libjpeg's
    corrupt-data warnings errors, as PIL does ("broken data stream"): OpenCV's decoder only
    prints them and returns the damaged image, so it is not used for JPEG (tests/test_index.py
    checks damaged and truncated files)."""
    import simplejpeg

    try:
        with open(path, "rb") as file:
            data = file.read(3)
            if data != b"\xff\xd8\xff":
                return None
            data += file.read()
        if _has_exif(data):
            return None
        height, width, space, _ = simplejpeg.decode_jpeg_header(data)
        mode = JPEG_MODES.get(space)
        if mode is None:
            return None
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="GRAY" if mode == "L" else "RGB", fastdct=False, fastupsample=False, strict=True
        )
    except (ValueError, OSError):
        return None
    pixels = pixels[..., 0] if mode == "L" else pixels
    return (pixels, mode) if pixels.shape[:2] == (height, width) else None


def _has_exif(data: bytes) -> bool:
    """Whether a JPEG stream has an EXIF segment before its image data (its segments from SOI up
    to the first start-of-scan; a malformed header counts as EXIF: PIL then reads the file)."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return True
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xDA:  # start of scan: no EXIF after this point matters
            return False
        if marker == 0xE1 and data[at + 4 : at + 10] == b"Exif\x00\x00":
            return True
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return True


def _png_by_opencv(path, image: Image.Image) -> np.ndarray | None:
    """An 8-bit grey or RGB PNG (NIH ChestX-ray14's kind) by OpenCV's libpng, which inflated
    1024 px films in three quarters of PIL's time (bench/index_throughput.py); PNG is lossless,
    so the pixels are the same. A PNG with EXIF is left to PIL, which turns it upright. None
    also when OpenCV cannot read the file: PIL then decodes it and names what is wrong.
    ``image`` is the file opened by PIL, header only."""
    if image.format != "PNG" or image.mode not in ("L", "RGB") or "exif" in image.info:
        return None
    if len(image.tile) != 1 or image.tile[0].args != image.mode:  # 8 bits a sample, no palette or alpha
        return None
    import cv2

    try:
        pixels = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None
    expected = (image.height, image.width) + ((3,) if image.mode == "RGB" else ())
    if pixels is None or pixels.dtype != np.uint8 or pixels.shape != expected:
        return None
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB) if image.mode == "RGB" else pixels


def pixels_to_uint8(image: Image.Image) -> np.ndarray:
    """Any PIL mode to a uint8 array (H, W) or (H, W, 3).

    PIL's own ``convert("L")`` clips 16-bit values above 255 to white, which would erase a
    16-bit radiograph. A 16-bit PNG/TIFF rarely uses its 16 bits: detectors store 10, 12 or 14,
    and scaling those by 65535 (or ``>> 8``) leaves a 12-bit image 16 grey levels. The rule:
    the image's bit depth is the smallest of 8, 10, 12, 14, 16 that holds its largest value, and
    values are scaled from that range (a 12-bit image darker than 1024 everywhere would read as
    10-bit; DICOM says its BitsStored and needs no rule). 32-bit integer and float images are
    scaled by their observed range.
    """
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(image, dtype=np.uint16)
        return scale_by_bits(arr)
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


def bit_depth(values: np.ndarray) -> int:
    top = int(values.max()) if values.size else 0
    return next(bits for bits in HIGH_BIT_DEPTHS if top < 2**bits)


def scale_by_bits(values: np.ndarray) -> np.ndarray:
    """Unsigned integers to uint8 by the bit depth they use (``bit_depth``)."""
    top = 2 ** bit_depth(values) - 1
    return np.round(values.astype(np.float64) * (255 / top)).astype(np.uint8)


def content_hash(pixels: np.ndarray) -> str:
    """Hash of decoded pixels: a re-encoded copy of the same image has the same hash, and so has
    a grey film stored as RGB (three equal channels) and the same film stored as grey."""
    pixels = grey_plane(pixels)
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
        decoded = decode(path)
    except UnidentifiedImageError:
        return ImageCheck(file_bytes=size, reason="not an image (no decoder recognises its content)")
    except OSError as exc:
        message = str(exc)
        kind = "truncated image" if "truncated" in message.lower() else "corrupt image"
        return ImageCheck(file_bytes=size, reason=f"{kind}: {message}")
    except UnsupportedTransferSyntax as exc:  # a sound file this installation cannot decode: not "corrupt"
        return ImageCheck(file_bytes=size, reason=str(exc))
    except (SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return ImageCheck(file_bytes=size, reason=f"corrupt image: {exc}")
    pixels, dicom = grey_plane(decoded.pixels), decoded.dicom  # grey once, for the hash and the signatures
    print_, signature = signatures(pixels)
    return ImageCheck(
        pixels.shape[1],
        pixels.shape[0],
        decoded.mode,
        size,
        content_hash(pixels),
        fingerprint=print_,
        signature=signature,
        dicom_patient_id=dicom.patient_id if dicom else None,
        study_uid=dicom.study_uid if dicom else None,
        series_uid=dicom.series_uid if dicom else None,
    )
