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
* Every transfer syntax hospitals export decodes through pydicom's pixel-data plugins, installed
  with medfold: JPEG baseline, extended (12-bit) and lossless (process 14, SV1) and JPEG-LS with
  pylibjpeg-libjpeg (the ISO reference codec; pydicom's GDCM plugin refuses 12-bit extended),
  JPEG-LS also with pyjpegls (CharLS), JPEG 2000 and HTJ2K with pylibjpeg-openjpeg, RLE with
  pylibjpeg-rle (or pydicom itself), deflate with pydicom itself. A syntax no installed plugin
  decodes is skipped as "unsupported transfer syntax <name> (<uid>): install <package>", never
  as a corrupt file.
* Legacy ACR-NEMA files (no preamble, no file meta, the encoding guessed from the first element)
  are read as what they are: their transfer syntax is the one pydicom found them in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC_OFFSET = 128
EXTENSIONS = (".dcm", ".dicom")
# what to install for a syntax whose decoder is missing (pydicom's own plugins need nothing)
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG extended (12-bit)
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless, process 14
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless, SV1
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
}


# header fields carried into the index as ``meta:<keyword>`` by default (dataset.dicom_metadata):
# what subgroups by sex, age, view, scanner and site need
HEADER_FIELDS = (
    "PatientSex",
    "PatientAge",
    "ViewPosition",
    "Manufacturer",
    "ManufacturerModelName",
    "BodyPartExamined",
    "StudyDate",
    "InstitutionName",
)
# never read into any output: direct identifiers of a patient or a person in the record (HIPAA
# Safe Harbor's names, numbers, addresses and dates of birth; DICOM PS3.15 E.1 basic profile)
IDENTIFIERS = frozenset(
    {
        "PatientName",
        "PatientID",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "MedicalRecordLocator",
        "IssuerOfPatientID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "NameOfPhysiciansReadingStudy",
        "PhysiciansOfRecord",
        "RequestingPhysician",
        "PatientInsurancePlanCodeSequence",
        "MilitaryRank",
        "StudyID",
        "DeviceSerialNumber",
    }
)
_AGE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([YyMmWwDd]?)\s*$")
_AGE_UNIT_YEARS = {"": 1.0, "y": 1.0, "m": 1 / 12, "w": 7 / 365.25, "d": 1 / 365.25}


def number_or_age(value) -> float | None:
    """A number from a metadata cell: ``65``, ``65.0``, or a DICOM age string ``065Y`` / ``006M``
    (in years). None when the cell is empty or not a number."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    match = _AGE.match(str(value))
    if not match:
        return None
    return float(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).lower()]


def check_header_fields(keywords, key: str = "dataset.dicom_metadata") -> None:
    """Refuse a keyword pydicom does not know or one that identifies a person (ConfigError)."""
    from pydicom.datadict import tag_for_keyword

    from medfold.core.errors import ConfigError

    for keyword in keywords:
        if keyword in IDENTIFIERS:
            raise ConfigError(
                f"{key}: {keyword!r} identifies a person and is never read into medfold's outputs "
                "(a patient is pseudonymised from PatientID by the split; see privacy)"
            )
        if tag_for_keyword(keyword) is None:
            raise ConfigError(
                f"{key}: {keyword!r} is not a DICOM keyword (pydicom's dictionary; e.g. {list(HEADER_FIELDS[:3])})"
            )


def header_fields(ds, keywords) -> dict[str, str | None]:
    """The text of each of ``keywords`` in ``ds`` (None when absent or empty); ages in years
    ("065Y" gives "65", "006M" gives "0.5")."""
    out = {}
    for keyword in keywords:
        value = _text(ds, keyword)
        if keyword == "PatientAge" and value is not None:
            years = number_or_age(value)
            value = None if years is None else f"{round(years, 2):g}"
        out[keyword] = value
    return out


def read_header_fields(path, keywords) -> dict[str, str | None] | None:
    """``header_fields`` of the DICOM file at ``path``; None for a file that is not DICOM or whose
    header cannot be read (decoding it later reports why)."""
    if not looks_like_dicom(path):
        return None
    try:
        return header_fields(read_header(path), keywords)
    except (ValueError, OSError):
        return None


class UnsupportedTransferSyntax(ValueError):
    """The file is sound but no installed decoder reads its pixel data's encoding."""


@dataclass(frozen=True)
class DicomImage:
    pixels: np.ndarray  # uint8 (H, W) or (H, W, 3)
    mode: str  # e.g. "DICOM MONOCHROME1 12-bit"
    patient_id: str | None
    study_uid: str | None
    series_uid: str | None
    note: str | None = None


def looks_like_dicom(path) -> bool:
    """A .dcm/.dicom name, the 'DICM' preamble marker (exports often have no extension), or a
    legacy ACR-NEMA stream: no preamble, starting with an element of group 0008 (or a group
    length) in little-endian order, whose length fits in the file."""
    path = Path(path)
    if path.suffix.lower() in EXTENSIONS:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(MAGIC_OFFSET + 4)
            size = fh.seek(0, 2)
    except OSError:
        return False
    return head[MAGIC_OFFSET : MAGIC_OFFSET + 4] == b"DICM" or _acr_nema_head(head, size)


def _acr_nema_head(head: bytes, size: int) -> bool:
    if len(head) < 8:
        return False
    group, element = int.from_bytes(head[0:2], "little"), int.from_bytes(head[2:4], "little")
    if group not in (0x0000, 0x0008) or element > 0x1000:
        return False
    if head[4:6].isalpha() and head[4:6].isupper():  # explicit VR: a two-letter VR, then a 2-byte length
        length = int.from_bytes(head[6:8], "little")
    else:
        length = int.from_bytes(head[4:8], "little")
    return 0 < length < size


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


def read_header(path, pixels: bool = False):
    """The pydicom dataset of ``path`` (without its pixel data unless ``pixels``). A legacy
    ACR-NEMA file, which has no file meta, gets the transfer syntax pydicom read it in."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        try:
            return pydicom.dcmread(path, stop_before_pixels=not pixels)
        except InvalidDicomError as exc:
            with open(path, "rb") as fh:
                head = fh.read(MAGIC_OFFSET + 4)
                size = fh.seek(0, 2)
            if not _acr_nema_head(head, size):
                raise ValueError(f"not a DICOM file ({exc})") from exc
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=not pixels)
    except ValueError:
        raise
    except Exception as exc:  # a truncated or mangled header: pydicom raises many kinds
        raise ValueError(f"DICOM header cannot be read ({type(exc).__name__}: {exc})") from exc
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError("not a DICOM file (no preamble, and no image rows/columns in what reads as ACR-NEMA)")
    implicit, little = ds.original_encoding
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _check_decoder(syntax) -> None:
    """Raise UnsupportedTransferSyntax when no installed plugin decodes ``syntax``."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntax(
            f"unsupported transfer syntax {syntax.name} ({syntax}): no pydicom pixel-data plugin decodes it"
        ) from exc
    if not decoder.is_available:
        raise UnsupportedTransferSyntax(
            f"unsupported transfer syntax {syntax.name} ({syntax}): install "
            f"{DECODER_PACKAGES.get(str(syntax), 'a pydicom pixel-data plugin for it')}"
        )


# JPEG markers (ITU-T T.81 table B.1): frames of the sequential DCT processes, the scan header,
# and the markers without a length field
SEQUENTIAL_FRAMES = (0xC0, 0xC1)  # SOF0 baseline, SOF1 extended sequential (8 and 12 bits)
OTHER_FRAMES = (0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
SOS = 0xDA
NO_LENGTH = {0x01, 0xD8, 0xD9, *range(0xD0, 0xD8)}
SEQUENTIAL_SCAN = bytes([0, 63, 0])  # Ss, Se, Ah|Al of every sequential scan (T.81 B.2.3)
JPEG_SEQUENTIAL = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")
REPAIRED_SCANS = (
    "JPEG scan headers with spectral-selection values the sequential processes do not allow "
    "(DCMTK: 'Invalid SOS parameters for sequential JPEG') read as sequential scans (Ss 0, Se 63)"
)


def _entropy_end(data: bytes, i: int) -> int:
    """The position of the first marker after the entropy-coded data starting at ``i`` (0xFF
    followed by neither a stuffed 0x00 nor a restart marker)."""
    while True:
        i = data.find(b"\xff", i)
        if i < 0 or i + 1 >= len(data):
            return len(data)
        if data[i + 1] == 0x00 or 0xD0 <= data[i + 1] <= 0xD7 or data[i + 1] == 0xFF:
            i += 1
            continue
        return i


def sequential_scans_repaired(frame: bytes) -> bytes | None:
    """``frame`` (one JPEG codestream of a sequential DCT process) with every scan header's
    Ss, Se and Ah/Al set to what the sequential processes require (0, 63, 0), as DCMTK's libjpeg
    reads such a scan after warning 'Invalid SOS parameters for sequential JPEG'. None when the
    frame is not sequential DCT or its scan headers are already right."""
    data, i, sequential, changed = bytearray(frame), 2, None, False
    if data[:2] != b"\xff\xd8":
        return None
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill bytes before a marker
            i += 1
            continue
        if marker in NO_LENGTH:
            if marker == 0xD9:
                break
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in SEQUENTIAL_FRAMES or marker in OTHER_FRAMES:
            sequential = marker in SEQUENTIAL_FRAMES
        if marker == SOS:
            if not sequential:
                return None
            at = i + 5 + 2 * data[i + 4]  # after Ns and the components' selectors
            if bytes(data[at : at + 3]) != SEQUENTIAL_SCAN:
                data[at : at + 3] = SEQUENTIAL_SCAN
                changed = True
            i = _entropy_end(data, i + 2 + length)
            continue
        i += 2 + length
    return bytes(data) if changed else None


def _also(note: str | None, more: str) -> str:
    return f"{note}; {more}" if note else more


def _after_repair(ds, syntax, exc: Exception):
    """(pixels, "") of a sequential JPEG file that did not decode, read with its scan headers'
    Ss/Se/Ah-Al repaired; (None, "") when they needed no repair, (None, what the repaired file's
    decoding said) when it does not decode either."""
    if str(syntax) not in JPEG_SEQUENTIAL:
        return None, ""
    try:
        array = _repaired_pixels(ds)
    except Exception as again:  # the repair was not all it needed: both reasons are the file's
        return None, f"; with its scan headers repaired: {type(again).__name__}: {again}"
    return array, ""


def _repaired_pixels(ds):
    """The pixel array of a sequential JPEG file after its scan headers are repaired
    (``sequential_scans_repaired``); None when no frame needed it."""
    from pydicom.encaps import encapsulate, generate_frames

    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    repaired = [sequential_scans_repaired(f) for f in frames]
    if not any(r is not None for r in repaired):
        return None
    ds.PixelData = encapsulate([r if r is not None else f for f, r in zip(frames, repaired)])
    return ds.pixel_array


def _decoded(ds, syntax) -> tuple[np.ndarray, str | None]:
    """The stored pixel values, and a note when the scan headers had to be repaired; ValueError
    with the decoders' reasons when they do not decode."""
    try:
        return ds.pixel_array, None
    except Exception as exc:  # truncated or damaged pixel data: the plugins raise many kinds
        array, after = _after_repair(ds, syntax, exc)
        if array is None:
            raise ValueError(
                f"DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc}{after}; transfer syntax "
                f"{syntax.name} ({syntax}))"
            ) from exc
        return array, REPAIRED_SCANS


def read_dicom(path) -> DicomImage:
    """Decode ``path``; raises ValueError (with the reason) for a file that is not a usable image."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    ds = read_header(path, pixels=True)
    if "PixelData" not in ds:
        raise ValueError(
            f"DICOM without pixel data (Modality {_text(ds, 'Modality')}, SOP class {_text(ds, 'SOPClassUID')})"
        )
    syntax = ds.file_meta.TransferSyntaxUID
    _check_decoder(syntax)
    array, note = _decoded(ds, syntax)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    if frames > 1:
        array, note = array[0], _also(note, f"{frames} frames: the first is used")
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
                    _also(
                        note,
                        "no window and values span under 1/16 of BitsStored: scaled by their own range",
                    ),
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
