import re

import numpy as np
import pandas as pd
import pytest
from conftest import csv_dataset, folder_dataset, resolved_config
from hypothesis import given, settings
from hypothesis import strategies as st

from medfold.core.errors import ConfigError, LeakageError
from medfold.data.index.build import build_index
from medfold.split import check_split, image_groups, iterative_stratification, make_splits

CLASSES = ["A", "B", "C"]


def split_cfg(**overrides):
    return resolved_config({"split": overrides})["split"]


def table_from(rows):
    """rows: (patient, labels, hash or None) -> a minimal index table."""
    return pd.DataFrame(
        {
            "image_id": [f"img{i:04d}.png" for i in range(len(rows))],
            "patient_id": [f"p{p}" for p, _, _ in rows],
            "labels": [list(labels) for _, labels, _ in rows],
            "content_hash": [h for _, _, h in rows],
            "source_split": [None] * len(rows),
        }
    )


patient_rows = st.lists(
    st.tuples(
        st.integers(0, 40),
        st.sets(st.sampled_from(CLASSES), max_size=3).map(sorted),
        st.one_of(st.none(), st.integers(0, 30).map(lambda h: f"h{h}")),
    ),
    min_size=12,
    max_size=120,
)


@settings(max_examples=60, deadline=None)
@given(rows=patient_rows, folds=st.integers(2, 5), seed=st.integers(0, 2**31))
def test_folds_are_patient_and_duplicate_disjoint_cover_every_image_and_are_stable(rows, folds, seed):
    index = table_from(rows)
    cfg = split_cfg(folds=folds, seed=seed, test_fraction=0.2)
    try:
        splits, _ = make_splits(index, CLASSES, cfg)
    except ConfigError as exc:  # too few patient groups left for K folds: refused, with the reason
        left = re.search(r"only (\d+) patients remain outside the test set", str(exc))
        assert left and int(left.group(1)) < folds
        assert int(left.group(1)) <= image_groups(index).max() + 1  # no more than there are
        return
    report = check_split(index, splits)  # raises on any crossing
    assert report["verdict"] == "leak-free"
    assert sorted(splits["image_id"]) == sorted(index["image_id"])
    again, _ = make_splits(index, CLASSES, cfg)
    pd.testing.assert_frame_equal(splits, again)
    shuffled = index.sample(frac=1, random_state=seed % 1000).reset_index(drop=True)
    reordered, _ = make_splits(shuffled, CLASSES, cfg)
    by_image = splits.set_index("image_id")["fold"]
    assert (reordered.set_index("image_id")["fold"].loc[by_image.index] == by_image).all()


def test_iterative_stratification_spreads_each_label_in_proportion():
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.4, (2000, 6)) * rng.integers(1, 8, (2000, 1))
    part = iterative_stratification(counts, [0.2, 0.2, 0.2, 0.2, 0.2], seed=0)
    per_part = np.stack([counts[part == k].sum(0) for k in range(5)])
    share = per_part / per_part.sum(0)
    assert np.abs(share - 0.2).max() < 0.01


def test_demo_split_keeps_every_class_in_every_fold_and_test_near_its_fraction(demo_dir):
    index, report = build_index(csv_dataset(demo_dir), threads=2)
    splits, summary = make_splits(index, report["classes"], split_cfg(folds=3, test_fraction=0.2))
    assert abs(summary["sets"]["test"]["images"] / len(index) - 0.2) < 0.03
    for name, part in summary["sets"].items():
        assert all(v > 0 for v in part["images_per_class"].values()), name
        assert max(abs(v) for v in part["prevalence_minus_overall_pp"].values()) < 6, name


def test_duplicate_images_of_different_patients_are_kept_together():
    rows = [(i, ["A"] if i % 2 else ["B"], None) for i in range(40)]
    rows[3] = (3, ["A"], "same")
    rows[30] = (30, ["A"], "same")  # the same picture filed under another patient
    index = table_from(rows)
    for seed in range(10):
        splits, _ = make_splits(index, CLASSES, split_cfg(seed=seed, folds=4))
        assert splits.loc[3, "fold"] == splits.loc[30, "fold"]


def test_check_split_names_the_patient_and_the_duplicate_that_cross(demo_dir):
    index, report = build_index(csv_dataset(demo_dir), threads=2)
    splits, _ = make_splits(index, report["classes"], split_cfg())
    patient = splits.groupby("patient_id").size().loc[lambda s: s > 1].index[0]
    rows = splits.index[splits["patient_id"] == patient]
    leaky = splits.copy()
    leaky.loc[rows[0], "fold"] = (leaky.loc[rows[1], "fold"] + 1) % 3 if leaky.loc[rows[1], "fold"] >= 0 else 0
    with pytest.raises(LeakageError, match=rf"1 patients cross sets: {patient} in"):
        check_split(index, leaky)
    dup = index.copy()
    other = splits.index[splits["fold"] != splits.loc[rows[0], "fold"]][0]
    dup.loc[other, "content_hash"] = dup.loc[rows[0], "content_hash"]
    with pytest.raises(LeakageError, match="duplicate images \\(same content hash\\) cross sets"):
        check_split(dup, splits)
    with pytest.raises(LeakageError, match="indexed images are in no set"):
        check_split(index, splits.drop(index=rows[0]))


def test_source_test_split_leak_is_reported_and_resplit_or_stopped(demo_dir):
    index, report = build_index(folder_dataset(demo_dir / "chest_xray"), threads=2)
    splits, summary = make_splits(index, report["classes"], split_cfg(test_from_source=True, on_source_leak="resplit"))
    # person1's own images (in both folders), and the 8 planted copies in the other split folder,
    # each found as a near-duplicate of its original (named with its distance and how it was
    # transformed); the demo copies one of person1's images, so that leak is one group with it
    leaks = summary["source_leaks"]
    own = [leak for leak in leaks if "person1" in leak["patients"]]
    assert len(own) == 1 and any(i.startswith("test/Effusion/person1_") for i in own[0]["test_images"])
    assert any(i.startswith("train/Effusion/person1_") for i in own[0]["other_images"])
    planted = pd.read_csv(demo_dir / "chest_xray_planted.csv")
    described = " ".join(text for leak in leaks for text in leak.get("near_duplicates", []))
    assert len(leaks) == 8 and all(copy in described for copy in planted["copy"])
    assert "rotated 90°" in described and "mirrored left-right" in described
    assert summary["test_method"].startswith("re-split by patient: the source split leaked 8")
    assert check_split(index, splits)["verdict"] == "leak-free"
    with pytest.raises(LeakageError, match=r"patient \[[^]]*'person1'\]: test \['test/"):
        make_splits(index, report["classes"], split_cfg(test_from_source=True, on_source_leak="stop"))
    with pytest.raises(LeakageError, match=r"near-duplicates: .*distance \d+, rotated"):
        make_splits(index, report["classes"], split_cfg(test_from_source=True, on_source_leak="stop"))


def test_source_test_split_is_honoured_when_clean(demo_dir):
    index, report = build_index(folder_dataset(demo_dir / "chest_xray"), threads=2)
    copies = index["near_duplicate_cluster"].notna() & index["patient_id"].str.startswith("image:")
    clean = index[(index["patient_id"] != "person1") & ~copies].reset_index(drop=True)
    splits, summary = make_splits(clean, report["classes"], split_cfg(test_from_source=True))
    is_test = splits["set"] == "test"
    assert (clean.loc[is_test, "source_split"] == "test").all() and (
        clean.loc[~is_test, "source_split"] == "train"
    ).all()
    assert summary["source_leaks"] == []


def test_a_split_manifest_reproduces_the_folds_on_a_moved_and_renamed_copy(demo_dir, tmp_path):
    import shutil

    from medfold.core.privacy import Pseudonyms
    from medfold.split import read_manifest, split_manifest, write_manifest

    index, report = build_index(csv_dataset(demo_dir), threads=2, pseudonyms=Pseudonyms(bytes(range(32))))
    splits, _ = make_splits(index, report["classes"], split_cfg())
    write_manifest(split_manifest(index, splits), tmp_path / "split_manifest.csv", "demo_cxr14")
    text = (tmp_path / "split_manifest.csv").read_text()
    assert text.startswith("# medfold split manifest") and "# split_digest: sha256:" in text
    listed = pd.read_csv(tmp_path / "split_manifest.csv", comment="#", dtype=str)
    assert listed["patient"].str.fullmatch(r"P[0-9a-f]{12}").all() and not set(listed["patient"]) & set(
        index["patient_id"]
    )
    # a second group's copy: every file moved and renamed, its own table, its own patient IDs
    table = pd.read_csv(demo_dir / "cxr14" / "Data_Entry.csv", dtype=str).drop_duplicates("Image Index")
    rng = np.random.default_rng(5)
    order = rng.permutation(len(table))
    names = {old: f"batch{k % 7}/scan_{k:05d}.png" for k, old in zip(order, table["Image Index"])}
    for old, new in names.items():
        (tmp_path / "copy" / new).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_dir / "cxr14" / "images" / old, tmp_path / "copy" / new)
    extra = demo_dir / "chest_xray" / "train" / "Normal"
    shutil.copy(sorted(extra.glob("*.png"))[0], tmp_path / "copy" / "batch0" / "scan_extra.png")
    theirs = table.assign(
        **{"Image Index": table["Image Index"].map(names), "Patient ID": "their-" + table["Patient ID"]}
    )
    extra_row = theirs.iloc[:1].assign(**{"Image Index": "batch0/scan_extra.png", "Patient ID": "their-new"})
    pd.concat([theirs, extra_row]).to_csv(tmp_path / "theirs.csv", index=False)
    copy_ds = csv_dataset(demo_dir, table=str(tmp_path / "theirs.csv"), root=str(tmp_path / "copy"))
    copy_index, copy_report = build_index(copy_ds, threads=2)
    applied, summary = make_splits(
        copy_index, copy_report["classes"], split_cfg(method="manifest", manifest=str(tmp_path / "split_manifest.csv"))
    )
    ours = splits.assign(hash=splits["image_id"].map(dict(zip(index["image_id"], index["content_hash"]))))
    got = applied.assign(hash=applied["image_id"].map(dict(zip(copy_index["image_id"], copy_index["content_hash"]))))
    mine = ours.drop_duplicates("hash").set_index("hash")[["set", "fold"]].sort_index()
    matched = got[got["set"] != "excluded"].drop_duplicates("hash").set_index("hash")[["set", "fold"]].sort_index()
    pd.testing.assert_frame_equal(mine, matched)  # identical folds, image for image
    assert summary["manifest"]["images_not_in_manifest"] == ["batch0/scan_extra.png"]
    assert summary["manifest"]["manifest_images_not_here"] == 0
    assert check_split(copy_index, applied)["verdict"] == "leak-free"
    # their patients are theirs: one of them with images in two sets, and the manifest would now leak
    test_image = applied.loc[applied["set"] == "test", "image_id"].iloc[0]
    fold_image = applied.loc[applied["fold"] == 0, "image_id"].iloc[0]
    leaky = copy_index.copy()
    leaky.loc[leaky["image_id"].isin([test_image, fold_image]), "patient_id"] = "their-same-person"
    with pytest.raises(LeakageError, match="their-same-person"):
        check_split(leaky, applied)
    # a manifest changed by hand is refused, naming the digest
    rows, header = read_manifest(tmp_path / "split_manifest.csv")
    (tmp_path / "edited.csv").write_text(text.replace(",test,", ",cv,", 1))
    with pytest.raises(ConfigError, match="the file was changed after the split wrote it"):
        make_splits(
            copy_index, copy_report["classes"], split_cfg(method="manifest", manifest=str(tmp_path / "edited.csv"))
        )
    assert header["medfold_version"] and len(rows) == index["content_hash"].nunique()


def test_a_leaking_source_test_set_is_kept_whole_and_what_crosses_it_set_aside_by_drop(demo_dir):
    index, report = build_index(folder_dataset(demo_dir / "chest_xray"), threads=2)
    splits, summary = make_splits(index, report["classes"], split_cfg(test_from_source=True, on_source_leak="drop"))
    source_test = (index["source_split"] == "test").to_numpy()
    # the dataset's own test set, every image of it, and nothing else
    assert (splits.loc[source_test, "set"] == "test").all() and not (splits.loc[~source_test, "set"] == "test").any()
    # the other images of the 8 leaking groups (person1's own films, the planted copies) are set aside
    crossing = {i for leak in summary["source_leaks"] for i in leak["other_images"]}
    dropped = summary["dropped_for_source_leak"]
    assert len(summary["source_leaks"]) == 8 and crossing
    excluded = set(splits.loc[splits["set"] == "excluded", "image_id"])
    assert {d["image_id"] for d in dropped["images"]} == crossing == excluded
    assert dropped["count"] == len(crossing) and "set aside" in summary["test_method"]
    assert check_split(index, splits)["verdict"] == "leak-free"
    assert (splits.loc[splits["set"] == "cv", "fold"] >= 0).all()
