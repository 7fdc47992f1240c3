"""DICOM as hospitals export it, in files these tests write with pydicom, and pydicom's own
sample files: grey levels as a radiologist sees them, patients from the header, nothing lost."""

import shutil

import numpy as np
import pytest
from conftest import folder_dataset
from PIL import Image

from medfold.data.dicom import read_dicom
from medfold.data.images import check_image, decode, pixels_to_uint8
from medfold.data.index.build import build_index
from medfold.split import make_splits

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid  # noqa: E402


def write_dicom(
    path, pixels: np.ndarray, *, bits: int, photometric: str = "MONOCHROME2", patient="P1", signed=False, **extra
):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def ramp(bits: int, shape=(64, 64)) -> np.ndarray:
    return np.linspace(0, 2**bits - 1, shape[0] * shape[1]).reshape(shape).astype(np.uint16)


def test_twelve_bit_monochrome2_uses_all_grey_levels(tmp_path):
    write_dicom(tmp_path / "a.dcm", ramp(12), bits=12)
    pixels = read_dicom(tmp_path / "a.dcm").pixels
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) > 200  # `>> 8` left 16


def test_sixteen_bit_monochrome1_with_a_window_is_windowed_then_inverted(tmp_path):
    values = ramp(16)
    write_dicom(
        tmp_path / "w.dcm",
        values,
        bits=16,
        photometric="MONOCHROME1",
        WindowCenter=20000,
        WindowWidth=10000,
        RescaleSlope=1,
        RescaleIntercept=0,
    )
    image = read_dicom(tmp_path / "w.dcm")
    below, above = values < 15000, values > 25000
    # MONOCHROME1: low values are white; below the window all white, above it all black
    assert (image.pixels[below] == 255).all() and (image.pixels[above] == 0).all()
    inside = (values > 16000) & (values < 24000)
    assert 0 < image.pixels[inside].min() < image.pixels[inside].max() < 255
    assert np.all(np.diff(image.pixels.ravel()[inside.ravel()].astype(int)) <= 0)  # inverted, monotone
    assert image.mode == "DICOM MONOCHROME1 16-bit windowed"


def test_rgb_and_rle_compressed_files_decode(tmp_path):
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[8:, :, 2] = 90
    write_dicom(tmp_path / "rgb.dcm", rgb, bits=8, photometric="RGB")
    assert np.array_equal(read_dicom(tmp_path / "rgb.dcm").pixels, rgb)
    ds = write_dicom(tmp_path / "plain.dcm", ramp(12), bits=12)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(read_dicom(tmp_path / "rle.dcm").pixels, read_dicom(tmp_path / "plain.dcm").pixels)


def test_a_folder_of_dicom_files_is_split_by_patient_id_with_no_table(tmp_path):
    rng = np.random.default_rng(0)
    for p in range(12):
        cls = "Pneumonia" if p % 3 == 0 else "Normal"
        for k in range(2):
            pixels = (rng.random((40, 40)) * 4095).astype(np.uint16)
            write_dicom(tmp_path / "export" / cls / f"IMG{p:03d}{k}.dcm", pixels, bits=12, patient=f"PAT-{p}")
    # a corrupt file, and an export without file extension that is still DICOM
    (tmp_path / "export" / "Normal" / "broken.dcm").write_bytes(
        (tmp_path / "export" / "Normal" / "IMG0010.dcm").read_bytes()[:300]
    )
    shutil.copy(tmp_path / "export" / "Normal" / "IMG0010.dcm", tmp_path / "export" / "Normal" / "NOEXT")
    ds = folder_dataset(tmp_path / "export", patient_regex=None)
    index, report = build_index(ds)
    assert report["patient_id_source"] == "DICOM PatientID" and report["patients"] == 12
    assert not any("NO PATIENT IDS" in w for w in report["warnings"])
    assert [s["image_id"] for s in report["skipped"]] == ["Normal/broken.dcm"]
    assert "cannot" in report["skipped"][0]["reason"] or "corrupt" in report["skipped"][0]["reason"]
    assert "Normal/NOEXT" in set(index["image_id"]) and index["study_uid"].notna().all()
    assert index["mode"].str.startswith("DICOM MONOCHROME2 12-bit").all()
    config = {
        "seed": 0,
        "folds": 2,
        "test_fraction": 0.25,
        "method": "stratified",
        "test_from_source": False,
        "source_test_names": ["test"],
        "on_source_leak": "resplit",
    }
    splits, _ = make_splits(index, report["classes"], config)
    assert splits.groupby("patient_id")["fold"].nunique().max() == 1


def test_pydicom_sample_files(tmp_path):
    from pydicom.data import get_testdata_file

    ct = read_dicom(get_testdata_file("CT_small.dcm"))  # signed 16-bit CT with a rescale
    assert ct.pixels.dtype == np.uint8 and ct.pixels.shape == (128, 128) and ct.pixels.std() > 5
    mr, mr_rle = (read_dicom(get_testdata_file(n)) for n in ("MR_small.dcm", "MR_small_RLE.dcm"))
    assert np.array_equal(mr.pixels, mr_rle.pixels) and mr.patient_id
    # pydicom's own JPEG 2000 and JPEG-LS samples decode with the plugins medfold installs
    for name in ("JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        assert check_image(get_testdata_file(name)).reason is None, name


def test_png_high_bit_depth_is_scaled_by_the_bits_used_and_exif_orientation_applied(tmp_path):
    twelve = ramp(12)
    Image.fromarray(twelve).save(tmp_path / "twelve.png")
    pixels = pixels_to_uint8(Image.open(tmp_path / "twelve.png"))
    assert pixels.max() == 255 and len(np.unique(pixels)) > 200
    wide = np.zeros((20, 40), np.uint8)
    wide[:, :10] = 255  # bright on the left
    image = Image.fromarray(wide)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = decode(tmp_path / "phone.jpg").pixels
    assert upright.shape == (40, 20) and upright[:10].mean() > 200 and upright[-10:].mean() < 50


def test_dicom_header_fields_go_into_the_index_for_filters_and_subgroups_and_identifiers_never(tmp_path):
    import pyarrow.parquet as pq

    from medfold.core.errors import ConfigError
    from medfold.data.index.io import write_index

    rng = np.random.default_rng(1)
    views = ["PA", "AP", "LL"]
    for p in range(9):
        cls = "Pneumonia" if p % 2 else "Normal"
        pixels = (rng.random((40, 40)) * 4095).astype(np.uint16)
        write_dicom(
            tmp_path / "export" / cls / f"{p}.dcm",
            pixels,
            bits=12,
            patient=f"MRN{p:07d}",
            PatientName=f"Doe^Jane{p}",
            PatientBirthDate="19600101",
            PatientSex="F" if p % 3 else "M",
            PatientAge="006M" if p == 0 else f"{40 + p:03d}Y",
            ViewPosition=views[p % 3],
            Manufacturer="Acme" if p < 5 else "Other",
            AccessionNumber=f"ACC{p}",
        )
    index, report = build_index(
        folder_dataset(tmp_path / "export", patient_regex=None, metadata_columns=["Manufacturer"])
    )
    by_name = index.set_index("image_id")
    assert (
        by_name.loc["Normal/0.dcm", "meta:PatientAge"] == "0.5"
        and by_name.loc["Pneumonia/1.dcm", "meta:PatientAge"] == "41"
    )
    assert (
        by_name.loc["Normal/0.dcm", "meta:ViewPosition"] == "PA"
        and by_name.loc["Pneumonia/5.dcm", "meta:Manufacturer"] == "Other"
    )
    assert {"meta:PatientSex", "meta:StudyDate", "meta:InstitutionName"} <= set(index.columns)
    write_index(index, report, tmp_path / "index.parquet", tmp_path / "report.json")
    stored = (tmp_path / "index.parquet").read_bytes() + (tmp_path / "report.json").read_bytes()
    assert b"Doe^Jane" not in stored and b"19600101" not in stored and b"ACC1" not in stored
    assert "meta:Manufacturer" in pq.read_schema(tmp_path / "index.parquet").names
    # frontal views only, and adults: by keyword, the age in years
    frontal = folder_dataset(
        tmp_path / "export", patient_regex=None, filter="ViewPosition in ['PA', 'AP'] and PatientAge >= 18"
    )
    kept, kept_report = build_index(frontal)
    assert set(kept["meta:ViewPosition"]) == {"PA", "AP"} and len(kept) == 5  # 6 frontal, less the 6-month-old
    assert kept_report["rows_left_out"] == {"dataset.filter": 4}
    for keyword, message in (("PatientName", "identifies a person"), ("Manufacturor", "is not a DICOM keyword")):
        with pytest.raises(ConfigError, match=f"dataset.dicom_metadata: '{keyword}' {message}"):
            build_index(folder_dataset(tmp_path / "export", patient_regex=None, dicom_metadata=[keyword]))
    with pytest.raises(ConfigError, match=r"\['Scanner'\]: not carried into the index"):
        build_index(folder_dataset(tmp_path / "export", patient_regex=None, metadata_columns=["Scanner"]))
