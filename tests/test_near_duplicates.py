"""Near-duplicates: the planted copies of the demo found, distinct radiographs never merged, the
search exact against brute force, and the split and its check honouring the clusters."""

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import csv_dataset, folder_dataset, resolved_config
from PIL import Image

from medfold.core.errors import ConfigError, LeakageError
from medfold.data import fingerprint as fp
from medfold.data.index.build import build_index
from medfold.split import check_split, make_splits


def _single_label_table(table: Path, root: Path) -> dict:
    """The dataset section of a CSV with columns file, label, patient (one label an image)."""
    return csv_dataset(
        root,
        table=str(table),
        root=str(root),
        path_column="file",
        label_column="label",
        label_separator=None,
        patient_column="patient",
        task="multiclass",
        labels=[],
        no_finding_label=None,
    )


@pytest.mark.parametrize("form", ["csv", "folders"])
def test_every_planted_copy_is_found_and_no_distinct_radiographs_are_merged(demo_dir, form):
    if form == "csv":
        ds = csv_dataset(demo_dir)
        planted = pd.read_csv(demo_dir / "cxr14" / "planted_copies.csv")
    else:
        ds = folder_dataset(demo_dir / "chest_xray")
        planted = pd.read_csv(demo_dir / "chest_xray_planted.csv")
    table, report = build_index(ds, threads=2)
    near = report["near_duplicates"]
    clusters = [set(c["images"]) for c in near["cluster_list"]]
    # every copy with its original, and nothing else: each cluster is exactly one planted pair
    assert sorted(map(sorted, clusters)) == sorted(sorted(p) for p in zip(planted["copy"], planted["original"]))
    assert near["clusters_joining_patients_or_sources"] == len(planted) == (12 if form == "csv" else 8)
    hows = {pair["how"] for c in near["cluster_list"] for pair in c["pairs"]}
    assert {"mirrored left-right", "rotated 180°", "flipped top-bottom"} <= hows
    # a 90° copy reads as the other direction when the copy sorts before its original
    assert hows & {"rotated 90° anticlockwise", "rotated 90° clockwise"}
    kinds = {pair["kind"] for c in near["cluster_list"] for pair in c["pairs"]}
    # the re-published copies (crop, gamma, text, arrow, stacked changes) lie beyond the fingerprint
    assert kinds == ({"transformed copy", "registered copy"} if form == "csv" else {"transformed copy"})
    # the margin, both sides: every planted copy scores above min_score, every other pair below
    accepted = [p["score"] for p in near["pair_list"]]
    closest_other = near["closest_rejected"][0]["score"]
    assert min(accepted) >= near["min_score"] > closest_other
    assert near["stages"]["verified"] > 20 * len(planted)  # look-alikes were candidates, and rejected
    print(f"{form}: planted copies score {min(accepted):.3f}+, closest other pair {closest_other:.3f}")


def test_the_8_orientations_agree_for_pixels_fingerprint_and_descriptor(demo_dir):
    from medfold.data import matching
    from medfold.data.images import pixels_to_uint8

    pixels = pixels_to_uint8(Image.open(demo_dir / "cxr14" / "images" / "00000003_000.png"))
    grey = fp.trimmed_grey(pixels)
    bits = fp.hex_to_bits([fp.fingerprint(pixels)])
    desc = matching.descriptor(grey)[None]
    inverse = matching.inverse_orientations()
    for g in range(8):
        moved = matching.orient_pixels(pixels, g)
        assert fp.hex_to_bits([fp.fingerprint(moved)]).tolist() == fp.oriented(bits, g).tolist()
        expected = matching.oriented_descriptors(desc, g)[0]
        got = matching.descriptor(fp.trimmed_grey(moved)).astype(np.float64)
        assert got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)) > 0.995
        assert np.array_equal(matching.orient_pixels(moved, inverse[g]), pixels)
        # a copy in orientation g verifies in orientation g, and scores low in a wrong one
        thumb, moved_thumb = matching.thumbnail(grey), matching.thumbnail(fp.trimmed_grey(moved))
        assert matching.verify(thumb, moved_thumb, g).score > 0.99
        if g != 0:
            assert matching.verify(thumb, moved_thumb, 0).score < 0.8


def _copies_of(demo_dir, kind: str, count: int, seed: int):
    from medfold.data.images import pixels_to_uint8
    from medfold.data.republish import republished

    rng = np.random.default_rng(seed)
    names = sorted(p.name for p in (demo_dir / "cxr14" / "images").glob("000000[0-9][0-9]_00[0-2].png"))
    for name in rng.choice(names, count, replace=False):
        pixels = pixels_to_uint8(Image.open(demo_dir / "cxr14" / "images" / name))
        yield name, pixels, republished(pixels, kind, rng)


@pytest.mark.parametrize(
    "kind,least",
    [("mild", 10), ("crop", 9), ("shift", 10), ("rescale_aspect", 10), ("rotate", 10), ("gamma", 10)]
    + [("contrast", 10), ("equalize", 10), ("jpeg", 10), ("border", 10), ("text", 10), ("arrow", 10)]
    + [("orientation", 10), ("combined", 8)],
)
def test_a_republished_copy_is_registered_and_scores_above_the_threshold(demo_dir, kind, least):
    """Recall by kind of change on the demo's radiographs (the real-image figures are
    bench/near_duplicates.py --real's): of 10 copies, at least ``least`` verify."""
    from medfold.data import matching

    min_score = matching.MatchSettings().min_score
    scores = []
    for _, pixels, copy in _copies_of(demo_dir, kind, 10, seed=len(kind)):
        a, b = (matching.thumbnail(fp.trimmed_grey(x)) for x in (pixels, copy))
        scores.append(max(matching.verify(a, b, g).score for g in range(8)))
    assert sum(s >= min_score for s in scores) >= least, scores


def test_republished_copies_are_deterministic_and_every_kind_changes_the_image(demo_dir):
    from medfold.data.republish import KINDS, republished

    pixels = np.asarray(Image.open(demo_dir / "cxr14" / "images" / "00000003_000.png").convert("L"))
    for kind in KINDS:
        first = republished(pixels, kind, np.random.default_rng(7))
        again = republished(pixels, kind, np.random.default_rng(7))
        assert np.array_equal(first, again), kind
        assert first.shape != pixels.shape or not np.array_equal(first, pixels), kind
    with pytest.raises(ValueError, match="unknown kind of copy 'blur'"):
        republished(pixels, "blur", np.random.default_rng(0))
    # a colour photograph stays colour under every kind, each deterministic and a change
    from medfold.data.demo import render_fundus
    from medfold.data.images import is_colour

    photo = render_fundus(np.random.default_rng(0), "left")
    for kind in KINDS:
        first = republished(photo, kind, np.random.default_rng(7))
        assert np.array_equal(first, republished(photo, kind, np.random.default_rng(7))), kind
        assert is_colour(first) and (first.shape != photo.shape or not np.array_equal(first, photo)), kind


KERMANY = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany_224"


@pytest.mark.skipif(not KERMANY.is_dir(), reason="the real Kermany radiographs (../shared/data) are not here")
def test_on_real_radiographs_copies_are_found_among_look_alikes(tmp_path):
    """400 real Kermany radiographs and 40 re-published copies of them (the recall target's
    envelope: crops up to 5 %, gamma 0.7-1.4, JPEG) under patients of their own."""
    from medfold.data.republish import republished

    rng = np.random.default_rng(0)
    files = sorted((KERMANY / "train" / "PNEUMONIA").glob("person*.jpeg"))[:200]
    files += sorted((KERMANY / "train" / "NORMAL").glob("*.jpeg"))[:200]
    (tmp_path / "images").mkdir()
    rows = []
    for f in files:
        (tmp_path / "images" / f.name).write_bytes(f.read_bytes())
        rows.append((f.name, f.parent.name, re.match(r"(person\d+|(?:NORMAL2-)?IM-\d+)", f.name).group(1)))
    planted = []
    for k, i in enumerate(rng.choice(len(files), 40, replace=False)):
        pixels = np.asarray(Image.open(files[i]).convert("L"))
        name = f"copy{k:03d}.png"
        Image.fromarray(republished(pixels, "mild", rng)).save(tmp_path / "images" / name)
        rows.append((name, files[i].parent.name, f"copy{k}"))
        planted.append({files[i].name, name})
    pd.DataFrame(rows, columns=["file", "label", "patient"]).to_csv(tmp_path / "table.csv", index=False)
    ds = _single_label_table(tmp_path / "table.csv", tmp_path / "images")
    _, report = build_index(ds, threads=2)
    near = report["near_duplicates"]
    pairs = [{p["a"], p["b"]} for p in near["pair_list"]]
    found = sum(p in pairs for p in planted)
    others = [p for p in near["pair_list"] if {p["a"], p["b"]} not in planted]
    assert found == len(planted), (found, len(planted))
    # anything else accepted is a copy the collection itself holds: identical or near-identical
    assert all(p["score"] > 0.95 for p in others), others
    print(f"Kermany: {found}/{len(planted)} copies found; other accepted pairs", [(p["a"], p["b"]) for p in others])


def test_fingerprint_is_invariant_to_orientation_and_tolerant_of_reencoding(demo_dir):
    from medfold.data.images import pixels_to_uint8

    pixels = pixels_to_uint8(Image.open(demo_dir / "cxr14" / "images" / "00000002_000.png"))
    base = fp.fingerprint(pixels)
    for turn in range(4):
        for mirror in (False, True):
            moved = np.rot90(pixels, turn)
            moved = moved[:, ::-1] if mirror else moved
            assert fp.distance(fp.fingerprint(np.ascontiguousarray(moved)), base)[0] == 0
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    image.resize((image.width // 2, image.height // 2)).save(buf, "JPEG", quality=50)
    assert fp.distance(fp.fingerprint(np.asarray(Image.open(buf))), base)[0] <= 5
    brighter = np.clip(pixels.astype(np.float64) * 0.8 + 30, 0, 255).astype(np.uint8)
    assert fp.distance(fp.fingerprint(brighter), base)[0] <= 1
    padded = np.pad(pixels, 12)
    assert fp.distance(fp.fingerprint(padded), base)[0] == 0


def test_search_finds_exactly_what_brute_force_finds():
    rng = np.random.default_rng(3)
    bias = 0.5 + rng.uniform(-0.4, 0.4, fp.BITS)
    bits = (rng.random((3000, fp.BITS)) < bias).astype(np.uint8)
    for i in range(40):  # planted: oriented copies with a few bits flipped
        copy = fp.oriented(bits[i : i + 1], i % 8)[0]
        copy[rng.choice(fp.BITS, i % 6, replace=False)] ^= 1
        bits[1000 + i] = copy
    fast = fp.near_duplicate_pairs(bits, 5)
    slow = fp.brute_force_pairs(bits, 5)
    pd.testing.assert_frame_equal(
        fast.reset_index(drop=True), slow.sort_values(["a", "b"]).reset_index(drop=True), check_dtype=False
    )
    assert {(i, 1000 + i) for i in range(40)} <= set(zip(fast["a"], fast["b"]))


def test_near_duplicate_clusters_never_cross_sets_and_check_split_names_a_crossing(demo_dir):
    index, report = build_index(csv_dataset(demo_dir), threads=2)
    splits, _ = make_splits(index, report["classes"], resolved_config()["split"])
    assert check_split(index, splits)["near_duplicate_clusters_crossing_sets"] == 0
    # a split it did not make: move one planted copy to another set
    planted = pd.read_csv(demo_dir / "cxr14" / "planted_copies.csv").iloc[0]
    where = splits.set_index("image_id")
    moved = splits.copy()
    row = moved["image_id"] == planted["copy"]
    moved.loc[row, "fold"] = -1 if where.loc[planted["original"], "fold"] >= 0 else 0
    moved.loc[row, "set"] = "test" if where.loc[planted["original"], "fold"] >= 0 else "cv"
    moved.loc[row, "patient_id"] = "someone else"
    with pytest.raises(
        LeakageError, match=rf"near-duplicate clusters .* cross sets: .*{planted['copy']}.*distance \d+"
    ):
        check_split(index, moved)
    # with the verified pairs (index_report.json), the kind of match and its score are named
    pairs = report["near_duplicates"]["pair_list"]
    registered = next(p for p in pairs if p["kind"] == "registered copy")
    copy = registered["b"] if registered["b"].startswith("000001") else registered["a"]
    moved = splits.copy()
    row = moved["image_id"] == copy
    other = where.loc[registered["a"] if copy == registered["b"] else registered["b"]]
    moved.loc[row, "fold"] = -1 if other["fold"] >= 0 else 0
    moved.loc[row, "set"] = "test" if other["fold"] >= 0 else "cv"
    moved.loc[row, "patient_id"] = "someone else"
    with pytest.raises(LeakageError, match=rf"{copy} .*registered copy, score 0\.\d+, fingerprint distance \d+"):
        check_split(index, moved, pairs)


def test_a_file_listed_twice_joins_its_patients_and_conflicting_labels_are_named(tmp_path, demo_dir):
    rows = pd.read_csv(demo_dir / "cxr14" / "Data_Entry.csv", dtype=str)
    index, report = build_index(csv_dataset(demo_dir), threads=2)
    [repeat] = report["listed_more_than_once"]
    splits, _ = make_splits(index, report["classes"], resolved_config()["split"])
    a, b = repeat["patients"]
    other = splits[splits["patient_id"] == b]  # the second patient's own images share the group
    first = splits[splits["image_id"] == repeat["image_id"]]
    assert len(other) == 0 or other["group"].eq(first["group"].iloc[0]).all()
    # multi-label: a union of the rows' findings
    extra = rows.iloc[[5]].assign(**{"Finding Labels": "Nodule", "Patient ID": "999"})
    path = tmp_path / "twice.csv"
    pd.concat([rows, extra]).to_csv(path, index=False)
    table, report = build_index(csv_dataset(demo_dir, table=str(path)), threads=2)
    merged = table.set_index("image_id").loc[rows.iloc[5]["Image Index"]]
    listed = set(rows.iloc[5]["Finding Labels"].split("|")) - {"No Finding"}
    assert set(merged["labels"]) == listed | {"Nodule"} and "999" in merged["patient_aliases"]
    # single-label: an error naming the lines
    single = pd.DataFrame(
        {"file": ["a.png", "b.png", "a.png"], "label": ["Normal", "Pneumonia", "Pneumonia"], "patient": ["1", "2", "3"]}
    )
    single.to_csv(tmp_path / "single.csv", index=False)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((40, 40), 100, np.uint8)).save(tmp_path / name)
    ds = _single_label_table(tmp_path / "single.csv", tmp_path)
    with pytest.raises(ConfigError, match=r"'a.png' is listed on lines \[2, 4\] with different labels"):
        build_index(ds)


def _npz_with_shared_images(path):
    rng = np.random.default_rng(0)
    images = {
        s: rng.integers(0, 255, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 40), ("val", 12), ("test", 12))
    }
    images["val"][:3] = images["train"][:3]  # PneumoniaMNIST ships identical images in train and val
    labels = {s: (np.arange(len(v)) % 2)[:, None] for s, v in images.items()}
    np.savez(path, **{f"{s}_images": v for s, v in images.items()}, **{f"{s}_labels": v for s, v in labels.items()})


def test_an_official_split_that_leaks_stops_or_drops_the_later_copies(tmp_path):
    _npz_with_shared_images(tmp_path / "p.npz")
    config = resolved_config(
        {
            "dataset": {
                "format": "npz",
                "npz": str(tmp_path / "p.npz"),
                "task": "binary",
                "labels": ["normal", "pneumonia"],
                "patient_column": None,
            },
            "split": {"method": "source", "folds": 1},
        }
    )
    index, report = build_index(config["dataset"])
    splits, summary = make_splits(index, report["classes"], config["split"])
    with pytest.raises(LeakageError, match="on_source_duplicate 'drop'"):
        check_split(index, splits)
    splits, summary = make_splits(index, report["classes"], {**config["split"], "on_source_duplicate": "drop"})
    dropped = summary["dropped_copies"]
    assert dropped["count"] == 3 and {d["image_id"] for d in dropped["images"]} == {f"val/{i:06d}" for i in range(3)}
    assert (splits.set_index("image_id").loc[[f"train/{i:06d}" for i in range(3)], "set"] == "train").all()
    assert check_split(index, splits)["images_excluded"] == 3


def test_at_28_px_same_frame_copies_across_the_official_split_are_grouped_and_nothing_else(tmp_path):
    """The 28 px MedMNIST form of the demo (no patient IDs): the frames its official split
    repeats in val and test verify at their own size (an upsampling that drew the pixel blocks
    scored such copies 0.83-0.85, under min_score), every copy lands in its original's set, no
    two different films are merged, and the report says what the grouping stands for."""
    from medfold.data.demo import generate_small_npz
    from medfold.report.dataset import grouping_note

    path = generate_small_npz(tmp_path, patients=60, seed=0)
    planted = pd.read_csv(tmp_path / "small_planted.csv")
    config = resolved_config(
        {
            "dataset": {
                "format": "npz",
                "npz": str(path),
                "task": "binary",
                "labels": ["normal", "finding"],
                "patient_column": None,
            }
        }
    )
    index, report = build_index(config["dataset"], threads=2)
    near = report["near_duplicates"]
    clusters = sorted(sorted(c["images"]) for c in near["cluster_list"])
    assert clusters == sorted(sorted(p) for p in zip(planted["copy"], planted["original"]))
    assert min(p["score"] for p in near["pair_list"]) >= near["min_score"] > near["closest_rejected"][0]["score"]
    assert near["largest_cluster"] == 2
    splits, _ = make_splits(index, report["classes"], config["split"])
    where = splits.set_index("image_id")["set"]
    assert all(where[c] == where[o] for c, o in zip(planted["copy"], planted["original"]))
    assert check_split(index, splits)["verdict"] == "leak-free"
    note = grouping_note(report)
    assert "names no patients" in note and f"{near['images']} images in {near['clusters']} clusters" in note
    assert "other images of the same person" in note


def test_colour_fundus_photographs_copies_are_found_and_distinct_eyes_never_merged(tmp_path):
    """Fundus-like photographs (a circular field on black, vignetting, colour casts, one in three
    dim and hazy): scored within their field of view, at a band a re-encode does not posterise
    and tile by tile, copies turned, re-cropped to their circle or re-coloured are found and no
    two eyes are merged (without the tiles, two hazy photographs joined a copy's cluster)."""
    from medfold.data.demo import generate_fundus
    from medfold.data.images import signatures

    root = generate_fundus(tmp_path, patients=30, seed=0)
    planted = pd.read_csv(tmp_path / "fundus_planted.csv")
    ds = folder_dataset(root, patient_regex=r"^(\d+)_(?:left|right)")
    index, report = build_index(ds, threads=2)
    near = report["near_duplicates"]
    clusters = sorted(sorted(c["images"]) for c in near["cluster_list"])
    assert clusters == sorted(sorted(p) for p in zip(planted["copy"], planted["original"]))
    assert near["largest_cluster"] == 2 and near["core_check"]["links_cut_count"] == 0
    # every photograph is compared within its field of view, a copy with a colour cast as well
    for name in (planted["original"].iloc[0], planted["copy"].iloc[2]):
        assert signatures(np.asarray(Image.open(root / name)))[1].field is not None, name


def test_a_chain_of_accepted_pairs_is_checked_against_its_core(demo_dir):
    """Three radiographs of different people joined by a chain of accepted pairs (as look-alikes
    chain in a large collection) to a copy pair: the core check cuts the link that does not hold
    against the cluster's core, and the cluster is what copies remain."""
    from medfold.data import matching
    from medfold.data.images import signatures

    table = pd.read_csv(demo_dir / "cxr14" / "Data_Entry.csv", dtype=str)
    planted = pd.read_csv(demo_dir / "cxr14" / "planted_copies.csv").iloc[0]
    others = table[~table["Patient ID"].isin([planted["original"][:8]])].drop_duplicates("Patient ID")
    names = [planted["original"], planted["copy"], *others["Image Index"].iloc[:2]]
    sigs = [signatures(np.asarray(Image.open(demo_dir / "cxr14" / "images" / n).convert("L")))[1] for n in names]
    g = next(g for g in range(8) if matching.verify(sigs[0], sigs[1], g).score >= 0.85)
    chain = pd.DataFrame({"a": [0, 1, 2], "b": [1, 2, 3], "orientation": [g, 0, 0], "score": [0.97, 0.9, 0.9]})
    kept, cut = matching.checked_clusters(4, chain, sigs, matching.MatchSettings())
    assert list(cut["image"]) == [3] and list(zip(cut["a"], cut["b"])) == [(2, 3)]
    assert cut["score_against_core"].iloc[0] < 0.85 and cut["core"].iloc[0] == 1
    assert list(zip(kept["a"], kept["b"])) == [(0, 1), (1, 2)]
