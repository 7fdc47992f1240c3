"""DICOM images as hospitals export them, read with pydicom into what the rest of medfold uses:
a uint8 picture as a radiologist would first see it, and the header fields the index keeps.

* Grey levels: the modality LUT (RescaleSlope/Intercept, or a Modality LUT) is applied, then the
  VOI LUT or the first window (WindowCenter/Width) when the file has one; the result is scaled
  from the VOI output range to 0-255. Without a window, stored values are scaled by the bits
  actually stored (BitsStored, signed when PixelRepresentation is 1), never by the container's
  16 bits (a 12-bit image would keep only 16 grey levels); an image whose values span less than
  1/16 of that range (a CT slice stored in 16 bits, no window) is scaled by its own range.
* MONOCHROME1 (white = low values, as many computed radiography systems export) is inverted.
* Colour (RGB, YBR_*) becomes RGB; multi-frame files give their first frame (reported).
* Compressed transfer syntaxes decode when pydicom has a decoder for them (RLE always; JPEG and
  JPEG 2000 with pylibjpeg or Pillow's plugins): otherwise the file is skipped with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC_OFFSET = 128
EXTENSIONS = (".dcm", ".dicom")


@dataclass(frozen=True)
class DicomImage:
    pixels: np.ndarray  # uint8 (H, W) or (H, W, 3)
    mode: str  # e.g. "DICOM MONOCHROME1 12-bit"
    patient_id: str | None
    study_uid: str | None
    series_uid: str | None
    note: str | None = None


def looks_like_dicom(path) -> bool:
    """A .dcm/.dicom name, or the 'DICM' preamble marker (exports often have no extension)."""
    path = Path(path)
    if path.suffix.lower() in EXTENSIONS:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(MAGIC_OFFSET)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (values.astype(np.float64) - low) / max(high - low, 1e-12)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() or None if value is not None else None


def _stored_range(ds, bits: int) -> tuple[float, float]:
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _voi_output_range(ds, bits: int) -> tuple[float, float]:
    """The range pydicom's VOI step maps onto (PS3.3 C.11.2.1.2): a VOI LUT's own output bits,
    else the stored (or Modality LUT) range carried through the rescale."""
    if "VOILUTSequence" in ds:
        return 0, 2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    if "ModalityLUTSequence" in ds:
        low, high = 0, 2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    else:
        low, high = _stored_range(ds, bits)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = low * slope + intercept, high * slope + intercept
    return low, high


def read_dicom(path) -> DicomImage:
    """Decode ``path``; raises ValueError (with the reason) for a file that is not a usable image."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise ValueError(f"not a DICOM file ({exc})") from exc
    except Exception as exc:  # a truncated or mangled header: pydicom raises many kinds
        raise ValueError(f"DICOM header cannot be read ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        raise ValueError(
            f"DICOM without pixel data (Modality {_text(ds, 'Modality')}, SOP class {_text(ds, 'SOPClassUID')})"
        )
    try:
        array = ds.pixel_array
    except Exception as exc:  # no decoder for the transfer syntax, truncated data...
        raise ValueError(
            f"DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc}; transfer syntax "
            f"{ds.file_meta.get('TransferSyntaxUID', '?')})"
        ) from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    note = None
    samples = int(ds.get("SamplesPerPixel", 1))
    if frames > 1:
        array, note = array[0], f"{frames} frames: the first is used"
    if samples == 3:
        if photometric.startswith("YBR"):
            array = convert_color_space(array, photometric, "RGB")
        top = float(2**bits - 1)
        pixels = array if array.dtype == np.uint8 and bits == 8 else _to_uint8(array, 0.0, top)
        mode = f"DICOM RGB {bits}-bit"
    else:
        has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
        if has_voi:
            values = apply_voi_lut(apply_modality_lut(array, ds), ds, index=0)
            pixels = _to_uint8(values, *_voi_output_range(ds, bits))
        else:
            low, high = _stored_range(ds, bits)
            seen_low, seen_high = float(array.min()), float(array.max())
            if seen_high - seen_low < (high - low) / 16:  # e.g. CT stored in 16 bits: a flat grey
                low, high, note = (
                    seen_low,
                    seen_high,
                    "no window and values span under 1/16 of BitsStored: scaled by their own range",
                )
            pixels = _to_uint8(array, low, high)
        if photometric == "MONOCHROME1":
            pixels = 255 - pixels
        mode = f"DICOM {photometric} {bits}-bit" + (" windowed" if has_voi else "")
    return DicomImage(
        np.ascontiguousarray(pixels),
        mode,
        _text(ds, "PatientID"),
        _text(ds, "StudyInstanceUID"),
        _text(ds, "SeriesInstanceUID"),
        note,
    )
