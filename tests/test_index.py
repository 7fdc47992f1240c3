import shutil

import jsonschema
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, csv_dataset, folder_dataset, resolved_config
from PIL import Image

from medfold.core.errors import ConfigError
from medfold.data.images import check_image, pixels_to_uint8
from medfold.data.index._constants import INDEX_SCHEMA
from medfold.data.index.build import build_index
from medfold.data.index.io import read_index, write_index
from medfold.data.index.patients import patient_from_name


def test_csv_adapter_indexes_every_row_with_patients_and_multilabels(demo_dir):
    table, report = build_index(csv_dataset(demo_dir), threads=2)
    rows = pd.read_csv(demo_dir / "cxr14" / "Data_Entry.csv", dtype=str)
    # the demo lists one file twice, under a second patient: one image, that patient an alias
    files = rows["Image Index"].drop_duplicates()
    assert len(table) == len(files) == report["images_indexed"] == len(rows) - 1 and report["images_skipped"] == 0
    twice = rows[rows["Image Index"].duplicated(keep=False)]
    [repeat] = report["listed_more_than_once"]
    assert repeat["image_id"] == twice["Image Index"].iloc[0] and repeat["patients"] == twice["Patient ID"].tolist()
    assert table.set_index("image_id").loc[repeat["image_id"], "patient_aliases"] == [twice["Patient ID"].iloc[1]]
    assert report["patient_id_source"] == "column" and report["patients"] == rows["Patient ID"].nunique() - 1
    first = table.set_index("image_id").loc["00000002_000.png"]
    listed = rows.set_index("Image Index").loc["00000002_000.png", "Finding Labels"]
    assert sorted(first["labels"]) == sorted(set(listed.split("|")) - {"No Finding"}) and first["patient_id"] == "2"
    assert (table["labels"].map(len) == 0).sum() == (rows["Finding Labels"] == "No Finding").sum()
    assert table["present"].all() and table["content_hash"].str.len().eq(32).all()
    assert set(table["mode"]) == {"L", "RGB", "I;16"}


def test_index_round_trips_through_parquet_and_matches_the_documented_schema(tmp_path, demo_dir):
    table, report = build_index(csv_dataset(demo_dir), threads=2)
    write_index(table, report, tmp_path / "index.parquet", tmp_path / "report.json")
    back, meta = read_index(tmp_path / "index.parquet")
    assert meta["classes"] == ["Cardiomegaly", "Effusion", "Nodule", "Pneumonia"] and meta["task"] == "multilabel"
    pd.testing.assert_frame_equal(back, table)
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "index.schema.yaml").read_text())
    assert list(schema["properties"]) == INDEX_SCHEMA.names
    for record in back.head(50).to_dict("records"):
        record = {k: (v if isinstance(v, list) else None if pd.isna(v) else v) for k, v in record.items()}
        jsonschema.validate(record, schema)


def test_folder_adapter_reads_classes_split_folders_and_patient_regex(demo_dir):
    table, report = build_index(folder_dataset(demo_dir / "chest_xray"), threads=2)
    assert report["classes"] == ["Effusion", "Normal", "Pneumonia"]
    assert set(table["source_split"]) == {"train", "test"}
    row = table[table["image_id"].str.startswith("train/Normal/person")].iloc[0]
    assert row["labels"] == ["Normal"] and row["patient_id"] == row["image_id"].split("/")[-1].split("_")[0]
    # the planted copies ('90Rotated_person7_...') carry no patient the regex can read: each is
    # its own patient, warned about, and found again as a near-duplicate of its original
    assert report["patient_id_source"] == "regex" and len(report["warnings"]) == 1
    assert "does not match 8 file names" in report["warnings"][0]


def test_folder_adapter_reads_nested_fold_folders(tmp_path, demo_dir):
    src = next((demo_dir / "chest_xray" / "train" / "Normal").glob("*.png"))
    for fold in ("Fold0", "Fold1"):
        for part in ("train", "valid"):
            for cls in ("normal", "abnormal"):
                (tmp_path / fold / part / cls).mkdir(parents=True)
                shutil.copy(src, tmp_path / fold / part / cls / f"person{len(fold + part + cls)}_{fold}_{part}.png")
    (tmp_path / "README.txt").write_text("not an image")
    table, report = build_index(folder_dataset(tmp_path), threads=1)
    assert set(table["source_split"]) == {"Fold0/train", "Fold0/valid", "Fold1/train", "Fold1/valid"}
    assert report["classes"] == ["abnormal", "normal"]
    assert [f["path"].endswith("README.txt") for f in report["ignored_files"]] == [True]
    assert report["duplicates"]["groups"] == 1 and report["duplicates"]["images"] == 8


@pytest.mark.parametrize(
    "name,pattern,expected",
    [
        ("00000001_000.png", r"^(\d+)_", "00000001"),
        ("00030805_000.png", r"^(\d+)_", "00030805"),
        ("person1_bacteria_1.jpeg", r"^(person\d+)_", "person1"),
        ("person1490_virus_2589.jpeg", r"^(person\d+)_", "person1490"),
        ("NORMAL2-IM-1427-0001.jpeg", r"^(?P<patient>NORMAL2-IM-\d+)-", "NORMAL2-IM-1427"),
        ("IM-0115-0001.jpeg", r"^(person\d+)_", None),
    ],
)
def test_patient_regex(name, pattern, expected):
    assert patient_from_name(pd.Series([f"train/NORMAL/{name}"]), pattern).iloc[0] == expected


def test_images_without_patient_ids_are_their_own_patients_and_the_report_says_so_loudly(demo_dir):
    table, report = build_index(folder_dataset(demo_dir / "chest_xray", patient_regex=None), threads=2)
    assert table["patient_id"].nunique() == len(table)
    assert report["patient_id_source"].startswith("none") and "NO PATIENT IDS" in report["warnings"][0]


def test_regex_missing_some_files_warns_and_names_them(tmp_path, demo_dir):
    root = tmp_path / "tree"
    shutil.copytree(demo_dir / "chest_xray", root)
    for copy in pd.read_csv(demo_dir / "chest_xray_planted.csv")["copy"]:  # their names miss the regex too
        (root / copy).unlink()
    shutil.copy(next(root.rglob("*.png")), root / "train" / "Normal" / "IM-0001-0001.png")
    table, report = build_index(folder_dataset(root), threads=2)
    assert "does not match 1 file names" in report["warnings"][0] and "IM-0001-0001.png" in report["warnings"][0]
    assert table.set_index("image_id").loc["train/Normal/IM-0001-0001.png", "patient_id"].startswith("image:")


def _png_bytes(demo_dir):
    return (demo_dir / "cxr14" / "images" / "00000002_000.png").read_bytes()


def test_bad_files_are_reported_with_their_reason_and_the_rest_is_indexed(tmp_path, demo_dir):
    root = tmp_path / "tree" / "Normal"
    root.mkdir(parents=True)
    good = sorted((demo_dir / "chest_xray" / "train" / "Normal").glob("*.png"))[:5]
    for f in good:
        shutil.copy(f, root / f.name)
    data = bytearray(_png_bytes(demo_dir))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # damage the compressed pixel data
    (root / "person901_corrupt_0.png").write_bytes(bytes(data))
    buffer = tmp_path / "x.jpg"
    Image.open(good[0]).convert("L").save(buffer, "JPEG")
    (root / "person902_truncated_0.jpg").write_bytes(buffer.read_bytes()[: buffer.stat().st_size // 2])
    (root / "person903_empty_0.png").write_bytes(b"")
    (root / "person904_text_0.png").write_text("this is a text file named like an image\n")
    table, report = build_index(folder_dataset(tmp_path / "tree", task="multilabel", labels=["Normal"]), threads=2)
    reasons = {s["image_id"].split("/")[-1]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {
        "person901_corrupt_0.png",
        "person902_truncated_0.jpg",
        "person903_empty_0.png",
        "person904_text_0.png",
    }
    assert reasons["person901_corrupt_0.png"].startswith("corrupt image")
    assert reasons["person902_truncated_0.jpg"].startswith("truncated image")
    assert reasons["person903_empty_0.png"] == "empty file (0 bytes)"
    assert reasons["person904_text_0.png"].startswith("not an image")
    assert sorted(table["image_id"]) == sorted(f"Normal/{f.name}" for f in good)
    assert report["images_listed"] == 9 and report["images_skipped"] == 4


def test_sixteen_bit_images_keep_their_contrast():
    ramp = (np.linspace(0, 65535, 256).astype(np.uint16)[None, :]).repeat(4, 0)
    pixels = pixels_to_uint8(Image.fromarray(ramp))
    assert pixels.dtype == np.uint8 and pixels.min() == 0 and pixels.max() == 255
    assert np.all(np.diff(pixels[0].astype(int)) >= 0) and len(np.unique(pixels)) > 200


def test_duplicate_content_is_found_even_when_reencoded(tmp_path, demo_dir):
    src = demo_dir / "cxr14" / "images" / "00000002_000.png"
    Image.open(src).save(tmp_path / "copy.png", compress_level=1)  # other bytes, same pixels
    assert (tmp_path / "copy.png").read_bytes() != src.read_bytes()
    assert check_image(tmp_path / "copy.png").content_hash == check_image(src).content_hash


def _npz(path, multilabel=False):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 30), ("val", 10), ("test", 12)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.integers(0, 2, (n, 3)) if multilabel else rng.integers(0, 4, (n, 1))).astype(
            np.uint8
        )
    np.savez(path, **arrays)
    return arrays


def test_npz_adapter_keeps_official_splits_and_flags_missing_patients(tmp_path):
    arrays = _npz(tmp_path / "organsmnist.npz")
    ds = resolved_config(
        {
            "dataset": {
                "format": "npz",
                "task": "multiclass",
                "npz": str(tmp_path / "organsmnist.npz"),
                "labels": ["liver", "kidney", "spleen", "bladder"],
                "patient_column": None,
            }
        }
    )["dataset"]
    table, report = build_index(ds)
    assert report["source_splits"] == {"test": 12, "train": 30, "val": 10}
    row = table.set_index("image_id").loc["val/000003"]
    assert row["labels"] == [ds["labels"][int(arrays["val_labels"][3, 0])]] and row["npz_index"] == 3
    assert "NO PATIENT IDS" in report["warnings"][0] and table["patient_id"].nunique() == 52


def test_npz_adapter_multilabel(tmp_path):
    arrays = _npz(tmp_path / "chestmnist.npz", multilabel=True)
    ds = resolved_config(
        {
            "dataset": {
                "format": "npz",
                "task": "multilabel",
                "npz": str(tmp_path / "chestmnist.npz"),
                "labels": ["a", "b", "c"],
                "patient_column": None,
            }
        }
    )["dataset"]
    table, _ = build_index(ds)
    expected = [[n for n, v in zip("abc", row) if v] for row in arrays["train_labels"]]
    assert table[table["source_split"] == "train"]["labels"].tolist() == expected


def test_no_images_is_a_config_error_naming_the_folder(tmp_path):
    (tmp_path / "empty" / "Normal").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"empty: no images found"):
        build_index(folder_dataset(tmp_path / "empty"))


def test_missing_column_names_the_file_the_key_and_the_columns_present(demo_dir):
    with pytest.raises(ConfigError) as err:
        build_index(csv_dataset(demo_dir, patient_column="PatientID"))
    message = str(err.value)
    assert "Data_Entry.csv" in message and "dataset.patient_column" in message and "'Patient ID'" in message


def test_unknown_label_names_the_label_the_image_and_the_key(demo_dir):
    with pytest.raises(ConfigError, match=r"label 'Pneumonia' \(image '\d+_\d+\.png'\) is not in dataset\.labels"):
        build_index(csv_dataset(demo_dir, labels=["Cardiomegaly", "Effusion", "Nodule"]))


def test_regex_matching_nothing_is_a_config_error(demo_dir):
    with pytest.raises(
        ConfigError, match=r"dataset\.patient_regex: '\^patient_\(\\\\d\+\)' matches none of the \d+ file names"
    ):
        build_index(folder_dataset(demo_dir / "chest_xray", patient_regex=r"^patient_(\d+)"))


def test_single_label_task_refuses_multilabel_rows(demo_dir):
    with pytest.raises(ConfigError, match=r"dataset.task is 'multiclass', so every image needs exactly one label"):
        build_index(csv_dataset(demo_dir, task="multiclass", labels=[], no_finding_label=None))


def test_metadata_only_index_opens_no_files(tmp_path, demo_dir):
    table_path = tmp_path / "entries.csv"
    rows = pd.read_csv(demo_dir / "cxr14" / "Data_Entry.csv").assign(W=1024, H=1024)
    rows.to_csv(table_path, index=False)
    ds = csv_dataset(
        demo_dir,
        table=str(table_path),
        root=str(tmp_path / "nowhere"),
        metadata_only=True,
        metadata_width_column="W",
        metadata_height_column="H",
    )
    table, report = build_index(ds)
    assert len(table) == rows["Image Index"].nunique() and not table["present"].any()
    assert table["content_hash"].isna().all() and table["fingerprint"].isna().all()
    assert not report["near_duplicates"]["searched"]
    assert (table["width"] == 1024).all() and report["metadata_only"]


def test_metadata_only_needs_a_table(demo_dir):
    with pytest.raises(ConfigError, match="dataset.metadata_only works with dataset.format 'csv'"):
        build_index(folder_dataset(demo_dir / "chest_xray", metadata_only=True))


def test_csv_with_one_hot_label_columns_nested_images_and_a_split_column(tmp_path, demo_dir):
    rows = pd.read_csv(demo_dir / "cxr14" / "Data_Entry.csv").head(12)
    for i, name in enumerate(rows["Image Index"]):  # images spread over sub-folders, as NIH ships them
        target = tmp_path / "images" / f"images_{i % 3:03d}" / "images" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_dir / "cxr14" / "images" / name, target)
    table = pd.DataFrame(
        {
            "file": rows["Image Index"],
            "pid": rows["Patient ID"],
            "Effusion": rows["Finding Labels"].str.contains("Effusion").astype(int),
            "Nodule": rows["Finding Labels"].str.contains("Nodule").astype(int),
            "split": ["train"] * 9 + ["test"] * 3,
        }
    )
    table.to_csv(tmp_path / "labels.csv", index=False)
    ds = csv_dataset(
        demo_dir,
        table=str(tmp_path / "labels.csv"),
        root=str(tmp_path / "images"),
        path_column="file",
        label_column=None,
        label_columns=["Effusion", "Nodule"],
        labels=["Effusion", "Nodule"],
        patient_column="pid",
        source_split_column="split",
        recursive_lookup=True,
    )
    index, report = build_index(ds)
    assert report["images_skipped"] == 0 and len(index) == 12
    expected = [[c for c in ("Effusion", "Nodule") if r[c] == 1] for _, r in table.iterrows()]
    assert index["labels"].tolist() == expected
    assert index["path"].str.contains("images_00").all() and index["source_split"].tolist() == table["split"].tolist()
    without = csv_dataset(
        demo_dir,
        table=str(tmp_path / "labels.csv"),
        root=str(tmp_path / "images"),
        path_column="file",
        label_column=None,
        label_columns=["Effusion", "Nodule"],
        labels=["Effusion", "Nodule"],
        patient_column="pid",
    )
    with pytest.raises(ConfigError, match=r"all 12 images were unreadable; first: .*00000001_000\.png: file not found"):
        build_index(without)  # without recursive_lookup the nested files are not where the table says


def test_excluded_folders_are_not_indexed(tmp_path, demo_dir):
    root = tmp_path / "covid"
    shutil.copytree(demo_dir / "chest_xray" / "train", root)
    (root / "Normal" / "masks").mkdir()
    shutil.copy(next((root / "Normal").glob("*.png")), root / "Normal" / "masks" / "person999_mask_0.png")
    _, report = build_index(folder_dataset(root))
    assert "masks" in report["classes"]
    index, report = build_index(folder_dataset(root, exclude_folders=["masks"]))
    assert "masks" not in report["classes"] and not index["image_id"].str.contains("masks").any()


def test_metadata_columns_travel_into_the_index_and_a_wrong_name_is_named(demo_dir, tmp_path):
    ds = csv_dataset(demo_dir, metadata_columns=["Patient Age", "View Position"])
    table, report = build_index(ds, threads=2)
    write_index(table, report, tmp_path / "index.parquet", tmp_path / "report.json")
    index, _ = read_index(tmp_path / "index.parquet")
    rows = pd.read_csv(demo_dir / "cxr14" / "Data_Entry.csv", dtype=str).drop_duplicates("Image Index")
    expected = rows.set_index("Image Index").loc[index["image_id"]]
    assert index["meta:Patient Age"].tolist() == expected["Patient Age"].tolist()
    assert index["meta:View Position"].tolist() == expected["View Position"].tolist()
    with pytest.raises(
        ConfigError, match=r"column 'Age' \(dataset.metadata_columns \(or evaluation.subgroups\)\) not found"
    ):
        build_index(csv_dataset(demo_dir, metadata_columns=["Age"]))
    with pytest.raises(
        ConfigError, match=r"\['Patient Age'\]: not carried into the index.*'folders' dataset carries none"
    ):
        build_index(folder_dataset(demo_dir / "chest_xray", metadata_columns=["Patient Age"]))


def test_a_table_row_whose_path_leaves_the_root_is_refused_and_listed_unless_allowed(demo_dir, tmp_path):
    rows = pd.read_csv(demo_dir / "cxr14" / "Data_Entry.csv", dtype=str).head(30)
    escape = rows.iloc[:2].copy()
    escape["Image Index"] = ["../../../../../../etc/passwd", "/etc/hostname"]
    table = tmp_path / "table.csv"
    pd.concat([rows, escape]).to_csv(table, index=False)
    index, report = build_index(csv_dataset(demo_dir, table=str(table)))
    assert len(index) == 30 and not index["path"].str.contains("/etc/").any()
    refused = [i for i in report["ignored_files"] if "leaves dataset.root" in i["reason"]]
    assert [r["reason"].split(":")[0] for r in refused] == ["line 32", "line 33"]
    assert "set dataset.allow_outside_root" in refused[0]["reason"]
    # allowed: they are opened, and skipped for what they are
    _, allowed = build_index(csv_dataset(demo_dir, table=str(table), allow_outside_root=True))
    assert {s["image_id"] for s in allowed["skipped"]} == {"../../../../../../etc/passwd", "/etc/hostname"}


def _decodes_as_pil_does(path) -> None:
    """medfold's decode gives PIL's own pixels and mode (EXIF turn applied) for ``path``."""
    from PIL import Image, ImageOps

    from medfold.data.images import decode, pixels_to_uint8

    with Image.open(path) as image:
        image.load()
        expected, mode = pixels_to_uint8(ImageOps.exif_transpose(image)), image.mode
    got = decode(path)
    assert got.mode == mode and np.array_equal(got.pixels, expected), path.name


def test_pngs_decoded_by_opencv_are_the_pixels_pil_gives_and_bad_ones_keep_their_reason(tmp_path):
    from PIL import Image

    from medfold.data.images import _png_by_opencv

    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (61, 47), dtype=np.uint8)
    colour = rng.integers(0, 256, (61, 47, 3), dtype=np.uint8)
    kinds = {
        "grey": Image.fromarray(grey),
        "rgb": Image.fromarray(colour),
        "palette": Image.fromarray(colour).convert("P"),
        "grey_alpha": Image.fromarray(grey).convert("LA"),
        "rgba": Image.fromarray(colour).convert("RGBA"),
        "sixteen": Image.fromarray(grey.astype(np.uint16) * 16),
        "one_bit": Image.fromarray(grey > 128),
    }
    for name, image in kinds.items():
        image.save(tmp_path / f"{name}.png")
    kinds["grey"].save(tmp_path / "interlaced.png", interlace=1)
    kinds["grey"].save(tmp_path / "four_bit.png", bits=4)
    for path in sorted(tmp_path.glob("*.png")):
        _decodes_as_pil_does(path)
        with Image.open(path) as image:  # OpenCV decodes the 8-bit grey and RGB kinds, PIL the others
            taken = _png_by_opencv(path, image) is not None
        assert taken == (path.stem in ("grey", "rgb", "interlaced")), path.name
    # a truncated or damaged PNG is still named for what it is (PIL decodes what OpenCV refuses)
    data = (tmp_path / "grey.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    (tmp_path / "damaged.png").write_bytes(bytes(damaged))
    assert check_image(tmp_path / "cut.png").reason.startswith("truncated image")
    assert check_image(tmp_path / "damaged.png").reason is not None


def test_jpegs_decoded_by_simplejpeg_are_the_pixels_pil_gives_and_bad_ones_keep_their_reason(tmp_path):
    from PIL import Image

    from medfold.data.images import _jpeg_by_simplejpeg, decode

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:83, 0:67]
    smooth = (np.sin(yy / 7.0) * np.cos(xx / 5.0) * 90 + 128).astype(np.uint8)
    grey = np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    colour = np.stack([grey, np.roll(grey, 9, 1), 255 - grey], -1)
    saved = {
        "grey": (Image.fromarray(grey), {}),
        "grey_as_rgb": (Image.fromarray(grey).convert("RGB"), {}),
        "rgb_420": (Image.fromarray(colour), {"subsampling": 2}),
        "rgb_422": (Image.fromarray(colour), {"subsampling": 1}),
        "rgb_444": (Image.fromarray(colour), {"subsampling": 0, "quality": 95}),
        "progressive": (Image.fromarray(colour), {"progressive": True}),
        "cmyk": (Image.fromarray(colour).convert("CMYK"), {}),
    }
    turned = Image.Exif()
    turned[0x0112] = 6  # EXIF orientation: rotated 90 degrees
    upright = Image.Exif()
    upright[0x0112] = 1
    saved["exif_turned"] = (Image.fromarray(colour), {"exif": turned.tobytes()})
    saved["exif_upright"] = (Image.fromarray(colour), {"exif": upright.tobytes()})
    for name, (image, options) in saved.items():
        image.save(tmp_path / f"{name}.jpg", **options)
    for path in sorted(tmp_path.glob("*.jpg")):
        _decodes_as_pil_does(path)
        # simplejpeg decodes grey and colour JPEGs without EXIF; PIL the CMYK and EXIF ones
        assert (_jpeg_by_simplejpeg(path) is not None) == ("cmyk" not in path.stem and "exif" not in path.stem)
    assert decode(tmp_path / "exif_turned.jpg").pixels.shape[:2] == (67, 83)  # turned upright by PIL
    # damaged and truncated files: what simplejpeg decodes, PIL decodes to the same pixels
    # (libjpeg's corrupt-data warnings are errors in both); the rest is PIL's to decode or refuse
    data = (tmp_path / "rgb_420.jpg").read_bytes()
    outcomes = set()
    for at in np.linspace(len(data) * 0.3, len(data) - 40, 12).astype(int):
        damaged = bytearray(data)
        damaged[at : at + 12] = rng.integers(0, 256, 12, dtype=np.uint8).tobytes()
        (tmp_path / "damaged.jpeg").write_bytes(bytes(damaged))
        try:
            with Image.open(tmp_path / "damaged.jpeg") as image:
                image.load()
                by_pil = np.asarray(image)
        except OSError:
            by_pil = None
        by_simplejpeg = _jpeg_by_simplejpeg(tmp_path / "damaged.jpeg")
        if by_simplejpeg is not None:  # what simplejpeg accepts, PIL decodes to the same pixels
            assert by_pil is not None and np.array_equal(by_simplejpeg[0], by_pil), at
        check = check_image(tmp_path / "damaged.jpeg")
        assert (check.reason is None) == (by_pil is not None)
        outcomes.add(by_pil is None)
    assert outcomes == {True, False}  # both kinds of damage were met
    (tmp_path / "cut.jpeg").write_bytes(data[: len(data) // 2])
    assert check_image(tmp_path / "cut.jpeg").reason.startswith("truncated image")


def test_a_grey_film_stored_as_rgb_has_the_hash_and_signatures_of_the_film_stored_grey(tmp_path):
    from PIL import Image

    film = Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 40), dtype=np.uint8))
    film.save(tmp_path / "grey.png")
    film.convert("RGB").save(tmp_path / "rgb.png")
    grey, rgb = check_image(tmp_path / "grey.png"), check_image(tmp_path / "rgb.png")
    assert (grey.mode, rgb.mode) == ("L", "RGB")
    assert grey.content_hash == rgb.content_hash and grey.fingerprint == rgb.fingerprint
    tinted = np.asarray(film.convert("RGB")).copy()
    tinted[0, 0, 2] ^= 1  # one channel of one pixel differs: a colour image, another hash
    Image.fromarray(tinted).save(tmp_path / "tinted.png")
    assert check_image(tmp_path / "tinted.png").content_hash != grey.content_hash


def test_signature_shortcuts_compute_what_numpy_computes():
    from medfold.data.fingerprint import BORDER_STD, _flat
    from medfold.data.matching import _fifth_percentile

    rng = np.random.default_rng(8)
    for n in (1, 2, 3, 20, 21, 256, 257):
        for values in (rng.normal(size=n) * 40, np.round(rng.normal(size=n) * 3)):
            assert _fifth_percentile(values) == np.percentile(values, 5)
    for shape in ((8, 224), (16, 61), (3, 1000)):
        lines = rng.normal(128, rng.uniform(0.5, 3, (shape[0], 1)), shape).astype(np.float32)
        lines[::3] = np.round(lines[::3] / 8) * 8  # flat-ish lines, near the threshold
        for axis, view in ((1, lines), (0, lines.T)):
            expected = ~((np.ptp(view, axis) > BORDER_STD) & (view.std(axis) > BORDER_STD))
            assert np.array_equal(_flat(view, axis), expected)


def test_images_checked_in_worker_processes_give_what_one_process_gives(demo_dir):
    from medfold.data.index.build import PROCESS_MIN_IMAGES, check_images

    paths = sorted(str(p) for p in (demo_dir / "cxr14" / "images").glob("*.png"))
    assert len(paths) >= PROCESS_MIN_IMAGES  # the forked path is taken
    one, forked = check_images(paths, 1), check_images(paths, 2)
    assert [(c.content_hash, c.fingerprint, c.reason) for c in one] == [
        (c.content_hash, c.fingerprint, c.reason) for c in forked
    ]
    assert all(np.array_equal(a.signature.descriptor, b.signature.descriptor) for a, b in zip(one, forked))
    assert all(np.array_equal(a.signature.thumbnail, b.signature.thumbnail) for a, b in zip(one, forked))
