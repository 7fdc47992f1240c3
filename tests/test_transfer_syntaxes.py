"""Every transfer syntax hospitals export, in files written by real encoders: DCMTK's (the JPEG
processes, which pydicom cannot encode) and pydicom's own plugins (RLE, JPEG-LS, JPEG 2000,
deflate). Lossless syntaxes must decode to exactly the uncompressed pixels; lossy ones within
the error stated here. A syntax without its decoder is "unsupported", never "corrupt"."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfold.data.demo import _patient_anatomy, render_radiograph
from medfold.data.dicom import looks_like_dicom, read_dicom, read_header
from medfold.data.images import check_image

pydicom = pytest.importorskip("pydicom")
from pydicom import uid  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_modality_lut  # noqa: E402

DCMTK = shutil.which("dcmcjpeg")
needs_dcmtk = pytest.mark.skipif(
    not DCMTK and not os.environ.get("CI"), reason="DCMTK is not installed (install/system-packages.sh installs it)"
)
# lossy codecs: error of the decoded values (after the modality rescale) against the original, as
# a fraction of the range of the bits stored (DCMTK at IJG quality 90, JPEG-LS NEAR 3, JPEG 2000 at
# 10:1 measured 0.1-0.6 % RMS, 0.4-3.1 % at most)
LOSSY_RMS, LOSSY_MAX = 0.01, 0.04


def radiograph(bits: int, shape=(301, 257)) -> np.ndarray:
    """A demo radiograph at ``bits`` bits stored, odd-sized (codecs tile and pad), with detector
    noise, inside 5-95 % of the range as real exposures are."""
    rng = np.random.default_rng(bits)
    picture = render_radiograph(_patient_anatomy(rng), {"Effusion"}, rng)
    grown = np.asarray(Image.fromarray((picture * 65535).astype(np.uint16)).resize(shape[::-1], Image.BILINEAR))
    top = 2**bits - 1
    values = 0.05 * top + 0.9 * top * grown / 65535 + rng.normal(0, top / 400, shape)
    return np.clip(np.round(values), 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def write_plain(path, pixels, bits, photometric="MONOCHROME2", acr_nema=False):
    ds = Dataset()
    ds.PatientID, ds.Modality = "MRN-0042", "CR"
    if not acr_nema:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = uid.ComputedRadiographyImageStorage
        meta.MediaStorageSOPInstanceUID = uid.generate_uid()
        meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    else:
        ds.add_new(0x00080010, "SH", "ACR-NEMA 2.0")  # Recognition Code (retired)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PixelData = pixels.tobytes()
    if acr_nema:  # no preamble, no file meta, implicit VR little endian: how ACR-NEMA 2.0 wrote them
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:
        ds.save_as(path, enforce_file_format=True)
    return ds


def dcmtk(tool: str, *args: str) -> None:
    proc = subprocess.run([tool, *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"{tool} {args}: {proc.stderr}"


def encode_with_pydicom(source, target, syntax, **options):
    ds = pydicom.dcmread(source)
    if syntax == uid.DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax, **options)
    ds.save_as(target, enforce_file_format=True)


# (name, bits stored, encoder, lossless): every syntax the issue names
SYNTAXES = [
    ("JPEG baseline", 8, ("dcmcjpeg", "+eb", "+rm"), False),
    ("JPEG extended 12-bit", 12, ("dcmcjpeg", "+ee", "+rm"), False),
    ("JPEG lossless process 14", 16, ("dcmcjpeg", "+el"), True),
    ("JPEG lossless SV1", 12, ("dcmcjpeg", "+e1"), True),
    ("JPEG lossless SV1 16-bit", 16, ("dcmcjpeg", "+e1"), True),
    ("JPEG-LS lossless", 12, (uid.JPEGLSLossless, {}), True),
    ("JPEG-LS near-lossless", 12, (uid.JPEGLSNearLossless, {"jls_error": 3}), False),
    ("JPEG-LS lossless (DCMTK)", 16, ("dcmcjpls", "+el"), True),
    ("JPEG 2000 lossless", 16, (uid.JPEG2000Lossless, {}), True),
    ("JPEG 2000", 12, (uid.JPEG2000, {"j2k_cr": [10]}), False),
    ("RLE", 12, (uid.RLELossless, {}), True),
    ("deflated explicit VR", 12, (uid.DeflatedExplicitVRLittleEndian, {}), True),
]


@pytest.mark.parametrize("name, bits, encoder, lossless", SYNTAXES, ids=[s[0] for s in SYNTAXES])
def test_each_transfer_syntax_decodes_exactly_or_within_the_lossy_error(tmp_path, name, bits, encoder, lossless):
    original = radiograph(bits)
    write_plain(tmp_path / "plain.dcm", original, bits)
    target = tmp_path / "encoded.dcm"
    if not isinstance(encoder[1], dict):  # a DCMTK command line (a pydicom syntax and its options otherwise)
        if not DCMTK:
            pytest.fail("DCMTK (dcmcjpeg, dcmcjpls) is needed for the JPEG processes: install/system-packages.sh")
        dcmtk(encoder[0], *encoder[1:], str(tmp_path / "plain.dcm"), str(target))
    else:
        encode_with_pydicom(tmp_path / "plain.dcm", target, encoder[0], **encoder[1])
    ds = pydicom.dcmread(target)
    assert ds.file_meta.TransferSyntaxUID != uid.ExplicitVRLittleEndian  # it really is encoded
    check = check_image(target)
    assert check.reason is None, check.reason
    decoded = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if lossless:
        assert ds.file_meta.TransferSyntaxUID.is_compressed or name.startswith("deflated")
        assert np.array_equal(ds.pixel_array, original)
        assert np.array_equal(read_dicom(target).pixels, read_dicom(tmp_path / "plain.dcm").pixels)
        assert check.content_hash == check_image(tmp_path / "plain.dcm").content_hash
    else:
        span = 2.0**bits - 1
        error = np.abs(decoded - original)
        print(f"{name}: RMS {np.sqrt((error**2).mean()) / span:.4%}, max {error.max() / span:.4%} of {bits} bits")
        assert 0 < np.sqrt((error**2).mean()) <= LOSSY_RMS * span and error.max() <= LOSSY_MAX * span


@needs_dcmtk
def test_monochrome1_jpeg_lossless_renders_as_its_uncompressed_file(tmp_path):
    # computed radiography as PACS export it: MONOCHROME1, 12 bits, JPEG Lossless SV1
    original = radiograph(12)
    write_plain(tmp_path / "plain.dcm", original, 12, photometric="MONOCHROME1")
    dcmtk("dcmcjpeg", "+e1", str(tmp_path / "plain.dcm"), str(tmp_path / "sv1.dcm"))
    plain, sv1 = read_dicom(tmp_path / "plain.dcm"), read_dicom(tmp_path / "sv1.dcm")
    assert np.array_equal(plain.pixels, sv1.pixels) and sv1.mode == "DICOM MONOCHROME1 12-bit"
    # inverted: the highest stored value is the darkest pixel (the exposure spans 5-95 % of 12 bits)
    assert sv1.pixels.ravel()[np.argmax(original)] < 20 and sv1.pixels.ravel()[np.argmin(original)] > 235


def test_a_legacy_acr_nema_file_is_read_with_or_without_an_extension(tmp_path):
    original = radiograph(12)
    write_plain(tmp_path / "plain.dcm", original, 12)
    for name in ("chest.dcm", "CHEST001"):
        write_plain(tmp_path / name, original, 12, acr_nema=True)
        assert (tmp_path / name).read_bytes()[:2] == b"\x08\x00"  # no preamble: group 0008 first
        assert looks_like_dicom(tmp_path / name)
        assert read_header(tmp_path / name).file_meta.TransferSyntaxUID == uid.ImplicitVRLittleEndian
        check = check_image(tmp_path / name)
        assert check.reason is None and check.content_hash == check_image(tmp_path / "plain.dcm").content_hash
    # a file that starts like no DICOM stream is not taken for one
    for name in ("notes", "notes.dcm"):
        (tmp_path / name).write_bytes(b"\x08\x00 this is text, not an image" * 4)
    assert not looks_like_dicom(tmp_path / "notes")
    assert check_image(tmp_path / "notes").reason == "not an image (no decoder recognises its content)"
    assert check_image(tmp_path / "notes.dcm").reason.startswith("corrupt image: not a DICOM file")


REASONS = (
    "import json, sys; from medfold.data.images import check_image; "
    "print(json.dumps([check_image(p).reason for p in sys.argv[1:]]))"
)


def site_without(tmp_path, *packages: str):
    """This environment's site-packages less ``packages`` (their modules and dist-info): a real
    installation without them, as on a machine set up by hand, for ``python -S``."""
    site = Path(pydicom.__file__).parents[1]
    shadow = tmp_path / "site-packages"
    shadow.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(packages):
            (shadow / entry.name).symlink_to(entry)
    return f"{shadow}{os.pathsep}{Path(__file__).parents[1] / 'src'}"


@needs_dcmtk
def test_a_syntax_without_its_decoder_is_unsupported_with_the_package_to_install(tmp_path):
    write_plain(tmp_path / "plain.dcm", radiograph(12), 12)
    dcmtk("dcmcjpeg", "+e1", str(tmp_path / "plain.dcm"), str(tmp_path / "sv1.dcm"))
    # a syntax no pydicom plugin decodes at all: MPEG-2 video
    ds = pydicom.dcmread(tmp_path / "plain.dcm")
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds.save_as(tmp_path / "video.dcm", enforce_file_format=True)
    proc = subprocess.run(
        [sys.executable, "-S", "-c", REASONS, str(tmp_path / "sv1.dcm"), str(tmp_path / "video.dcm")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": site_without(tmp_path, "libjpeg", "pylibjpeg_libjpeg", "gdcm", "python_gdcm")},
    )
    assert proc.returncode == 0, proc.stderr
    jpeg, video = json.loads(proc.stdout)
    assert jpeg == (
        "unsupported transfer syntax JPEG Lossless, Non-Hierarchical, First-Order Prediction "
        "(Process 14 [Selection Value 1]) (1.2.840.10008.1.2.4.70): install pylibjpeg pylibjpeg-libjpeg"
    )
    assert video == (
        "unsupported transfer syntax MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100): "
        "no pydicom pixel-data plugin decodes it"
    )
    # with the decoder present (this environment), the same file decodes
    assert check_image(tmp_path / "sv1.dcm").reason is None


def _scan_header_written_as(path, target, values: bytes) -> None:
    """``path``'s JPEG frame with its scan header's Ss, Se and Ah/Al set to ``values``, as the
    encoders of the DICOM committee's WG04 JPEG Extended files wrote them."""
    ds = pydicom.dcmread(path)
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    sos = frame.index(b"\xff\xda")
    at = sos + 5 + 2 * frame[sos + 4]
    ds.PixelData = pydicom.encaps.encapsulate([frame[:at] + values + frame[at + 3 :]])
    ds.save_as(target)


@needs_dcmtk
@pytest.mark.parametrize("values", [bytes([0, 0, 0]), bytes([1, 0, 0])], ids=["Se 0", "Ss 1 Se 0"])
def test_jpeg_extended_with_sequential_scan_parameters_out_of_range_decodes_as_dcmtk_decodes_it(tmp_path, values):
    original = radiograph(12)
    write_plain(tmp_path / "plain.dcm", original, 12)
    dcmtk("dcmcjpeg", "+ee", "+rm", str(tmp_path / "plain.dcm"), str(tmp_path / "extended.dcm"))
    _scan_header_written_as(tmp_path / "extended.dcm", tmp_path / "wg04.dcm", values)
    with pytest.raises(Exception, match="scan start must be zero"):  # what pydicom's plugin says of it
        _ = pydicom.dcmread(tmp_path / "wg04.dcm").pixel_array
    proc = subprocess.run(["dcmdjpeg", str(tmp_path / "wg04.dcm"), str(tmp_path / "dcmtk.dcm")], capture_output=True)
    assert proc.returncode == 0 and b"Invalid SOS parameters for sequential JPEG" in proc.stderr
    image, untouched = read_dicom(tmp_path / "wg04.dcm"), read_dicom(tmp_path / "extended.dcm")
    assert np.array_equal(image.pixels, untouched.pixels) and "read as sequential scans" in image.note
    assert check_image(tmp_path / "wg04.dcm").reason is None
    # its 12-bit values against DCMTK's decode, and the original's (IJG quality 90)
    from medfold.data.dicom import _repaired_pixels

    ds = pydicom.dcmread(tmp_path / "wg04.dcm")
    ours = _repaired_pixels(ds).astype(float)
    theirs = pydicom.dcmread(tmp_path / "dcmtk.dcm").pixel_array.astype(float)
    error = np.abs(apply_modality_lut(ours, ds) - original)  # DCMTK's encoder rescales: values after the LUT
    assert np.abs(ours - theirs).max() <= 1 and error.mean() <= 0.004 * 4095


@needs_dcmtk
def test_a_jpeg_file_the_repair_does_not_decode_keeps_both_true_reasons(tmp_path):
    write_plain(tmp_path / "plain.dcm", radiograph(12), 12)
    dcmtk("dcmcjpeg", "+ee", "+rm", str(tmp_path / "plain.dcm"), str(tmp_path / "extended.dcm"))
    _scan_header_written_as(tmp_path / "extended.dcm", tmp_path / "wg04.dcm", bytes([0, 0, 0]))
    ds = pydicom.dcmread(tmp_path / "wg04.dcm")
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    # a quantisation table segment too short to hold one, after the scan
    ds.PixelData = pydicom.encaps.encapsulate([frame[:-2] + b"\xff\xdb\x00\x03\xff\xd9"])
    ds.save_as(tmp_path / "damaged.dcm")
    reason = check_image(tmp_path / "damaged.dcm").reason
    assert reason.startswith("corrupt image: DICOM pixel data cannot be decoded")
    assert "scan start must be zero" in reason and "with its scan headers repaired" in reason
    assert "DQT marker size corrupt" in reason
