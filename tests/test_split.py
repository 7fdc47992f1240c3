import re

import numpy as np
import pandas as pd
import pytest
from conftest import csv_dataset, folder_dataset, resolved_config
from hypothesis import given, settings
from hypothesis import strategies as st

from medfold.errors import ConfigError, LeakageError
from medfold.index import build_index
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
