"""Patient-level split: a held-out test set and K folds, and the check that proves it leak-free.

Images are first joined into groups: images of one patient, and images with the same content
hash (a duplicate filed under two patients joins them). Groups, never images, are assigned.

Assignment is iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML PKDD 2011) run on
per-group *image counts* per label rather than 0/1 vectors: a patient with ten Effusion images
moves the fold's Effusion prevalence ten times as much as a patient with one, and the algorithm
should know it. An extra column counts images without any finding, so normals are balanced too.
For single-label tasks the count vector is one class column, so the same code gives a
stratified group split.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from medfold.core import files, seeds
from medfold.core.errors import ConfigError, LeakageError
from medfold.data.index.labels import label_matrix
from medfold.settings.sections import SplitSettings

TEST = "test"
CV = "cv"
EXCLUDED = "excluded"  # a copy the split set aside (split.on_source_duplicate: drop)


def image_groups(index: pd.DataFrame) -> np.ndarray:
    """Group number per image: connected components of 'same patient' (a repeated table row's
    patient aliases included), 'same content hash' and 'same near-duplicate cluster'."""
    n = len(index)
    aliases = index["patient_aliases"] if "patient_aliases" in index else pd.Series([[]] * n, index=index.index)
    alias_rows = np.repeat(np.arange(n), aliases.map(len).to_numpy())
    alias_ids = [a for group in aliases for a in group]
    patient_codes, patients = pd.factorize(
        pd.concat([index["patient_id"], pd.Series(alias_ids, dtype=object)], ignore_index=True)
    )
    rows = [np.arange(n), alias_rows]
    cols = [patient_codes]
    offset = len(patients)
    keys = ["content_hash"] + (["near_duplicate_cluster"] if "near_duplicate_cluster" in index else [])
    for key in keys:  # bipartite graph: images 0..n-1, then patients, hashes, clusters
        codes, uniques = pd.factorize(index[key])  # missing -> -1
        has = codes >= 0
        rows.append(np.arange(n)[has])
        cols.append(offset + codes[has])
        offset += len(uniques)
    rows, cols = np.concatenate(rows), n + np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n + offset, n + offset))
    _, labels = connected_components(graph, directed=False)
    # renumber by first appearance in image_id order so group numbers do not depend on row order
    order = np.argsort(index["image_id"].to_numpy(), kind="stable")
    _, first = np.unique(labels[:n][order], return_index=True)
    renumber = np.empty(labels.max() + 1, np.int64)
    renumber[labels[:n][order][np.sort(first)]] = np.arange(len(first))
    return renumber[labels[:n]]


def iterative_stratification(counts: np.ndarray, ratios, seed: int) -> np.ndarray:
    """Assign each row (a group) of ``counts`` (groups x labels, image counts) to one of
    ``len(ratios)`` parts so that every label's images are spread in proportion to ``ratios``.

    The rarest remaining label is handled first; its groups, largest first, go to the part that
    still wants most of that label (ties: the part that wants most images overall, then random).
    Returns the part number per group.
    """
    counts = np.asarray(counts, np.float64)
    ratios = np.asarray(ratios, np.float64) / np.sum(ratios)
    rng = np.random.default_rng(seed)
    n_groups, _ = counts.shape
    sizes = counts.sum(1)
    # an image without findings still counts towards its part's size
    wanted = ratios[:, None] * counts.sum(0)[None, :]
    wanted_size = ratios * sizes.sum()
    part = np.full(n_groups, -1, np.int64)
    remaining = counts.sum(0)
    shuffle = rng.permutation(n_groups)  # random order among equal-sized groups

    def choose(scores: np.ndarray) -> int:
        best = np.flatnonzero(scores == scores.max())
        if len(best) > 1:
            sub = wanted_size[best]
            best = best[sub == sub.max()]
        return int(best[0] if len(best) == 1 else rng.choice(best))

    while True:
        active = remaining > 0
        if not active.any():
            break
        label = int(np.flatnonzero(active)[np.argmin(remaining[active])])
        members = shuffle[(counts[shuffle, label] > 0) & (part[shuffle] < 0)]
        members = members[np.argsort(-counts[members, label], kind="stable")]
        for g in members:
            p = choose(wanted[:, label])
            part[g] = p
            wanted[p] -= counts[g]
            wanted_size[p] -= sizes[g]
            remaining -= counts[g]
    # groups with no counts at all (should not occur: every image counts somewhere)
    for g in shuffle[part[shuffle] < 0]:
        p = choose(wanted_size.copy())
        part[g] = p
        wanted_size[p] -= sizes[g]
    return part


def _group_counts(index: pd.DataFrame, groups: np.ndarray, classes: list[str]) -> np.ndarray:
    labels = label_matrix(index["labels"], classes)
    no_finding = (labels.sum(1) == 0).astype(np.int64)[:, None]
    per_image = np.hstack([labels, no_finding])
    counts = np.zeros((groups.max() + 1, per_image.shape[1]), np.int64)
    np.add.at(counts, groups, per_image)
    return counts


def _source_test_set(index: pd.DataFrame, groups: np.ndarray, split: SplitSettings):
    """The dataset's own test set (split.test_from_source), by group: kept whole when no patient
    or copy crosses it; with crossings, stop (LeakageError), drop what crosses it from the other
    side, or re-split by patient (split.on_source_leak). Returns (groups in the test set, or None
    to re-split; images set aside, or None; how the test set was made; the crossings)."""
    is_test = set_aside = None
    source = index["source_split"].fillna("")
    if (source == "").all():
        raise ConfigError(
            "split.test_from_source is true but the index has no source split (folder or dataset.source_split_column)"
        )
    image_test = source.isin(split.source_test_names).to_numpy()
    if not image_test.any():
        raise ConfigError(
            "split.test_from_source: no image's source split is in split.source_test_names "
            f"{split.source_test_names}; "
            f"source splits are {sorted(source.unique())}"
        )
    per_group = pd.Series(image_test).groupby(groups).agg(["min", "max"])
    mixed = per_group.index[per_group["min"] != per_group["max"]].to_numpy()
    source_leaks = _describe_groups(index, groups, mixed, image_test)
    if len(mixed) and split.on_source_leak == "stop":
        crossing = np.isin(groups, mixed)
        raise LeakageError(
            f"the dataset's own split puts {len(mixed)} patients (or duplicate images) in both test and "
            f"training sets (split.on_source_leak is 'stop'): "
            + "; ".join(
                f"patient {leak['patients']}: test {leak['test_images']}, other {leak['other_images']}"
                + (f" (near-duplicates: {leak['near_duplicates']})" if leak.get("near_duplicates") else "")
                for leak in source_leaks[:5]
            ),
            crossing=index.loc[crossing, ["image_id", "path", "patient_id", "source_split"]].assign(
                crossing_group=pd.factorize(groups[crossing])[0], side=np.where(image_test[crossing], TEST, "other")
            ),
        )
    if len(mixed) and split.on_source_leak == "drop":
        # the official test set stays whole; what crosses it from the other side is set aside
        is_test = per_group["max"].to_numpy().astype(bool)
        set_aside = np.isin(groups, mixed) & ~image_test
        test_method = (
            f"the dataset's own split {split.source_test_names}; {int(set_aside.sum())} other images of the "
            f"{len(mixed)} patients (or copies) that cross it set aside"
        )
    elif len(mixed):
        test_method = f"re-split by patient: the source split leaked {len(mixed)} patients"
    else:
        is_test = per_group["max"].to_numpy().astype(bool)
        test_method = f"the dataset's own split {split.source_test_names}"
    return is_test, set_aside, test_method, source_leaks


def make_splits(index: pd.DataFrame, classes: list[str], split: SplitSettings | dict) -> tuple[pd.DataFrame, dict]:
    """Return (splits table, summary). ``split``: the ``split`` settings (or the section's dict)."""
    split = SplitSettings.of(split)
    if split.method == "source":
        return source_splits(index, classes, split)
    if split.method == "manifest":
        return manifest_splits(index, classes, split)
    if split.folds < 2:
        raise ConfigError(f"split.folds is {split.folds}; split.method 'stratified' needs at least 2")
    groups = image_groups(index)
    counts = _group_counts(index, groups, classes)
    n_groups = len(counts)
    source_leaks: list[dict] = []
    test_method = "stratified by patient"
    is_test = set_aside = None
    if split.test_from_source:
        is_test, set_aside, test_method, source_leaks = _source_test_set(index, groups, split)
    if is_test is None:
        ratios = [split.test_fraction, 1 - split.test_fraction]
        is_test = iterative_stratification(counts, ratios, seeds.split_test(split.seed)) == 0
    cv_groups = np.flatnonzero(~is_test)
    if len(cv_groups) < split.folds:
        raise ConfigError(
            f"split.folds is {split.folds} but only {len(cv_groups)} patients remain outside the test set"
        )
    group_fold = np.full(n_groups, -1, np.int64)
    group_fold[cv_groups] = iterative_stratification(
        counts[cv_groups], [1.0] * split.folds, seeds.split_folds(split.seed)
    )
    fold = group_fold[groups]
    sets = np.where(fold < 0, TEST, CV).astype(object)
    dropped = []
    if set_aside is not None:
        sets[set_aside] = EXCLUDED
        dropped = [
            {"image_id": i, "fold": "-", "role": s}
            for i, s in zip(index["image_id"].to_numpy()[set_aside], index["source_split"].to_numpy()[set_aside])
        ]
    splits = _split_table(index, groups, sets, fold)
    summary = summarize(index, splits, classes)
    summary.update({"seed": split.seed, "folds": split.folds, "test_method": test_method, "source_leaks": source_leaks})
    if set_aside is not None:
        summary["dropped_for_source_leak"] = {
            "count": len(dropped),
            "images": dropped,
            "rule": "split.on_source_leak 'drop': the dataset's own test set kept whole; the other images of "
            "every patient or copy that crosses it set aside",
        }
    return splits, summary


def _split_table(index: pd.DataFrame, groups, sets, folds) -> pd.DataFrame:
    """splits.parquet's rows: each image, its patient, split group, set and fold."""
    return pd.DataFrame(
        {
            "image_id": index["image_id"].to_numpy(),
            "patient_id": index["patient_id"].to_numpy(),
            "group": groups,
            "set": sets,
            "fold": folds,
        }
    )


def _source_folds(index: pd.DataFrame, source: pd.Series, split: SplitSettings) -> np.ndarray:
    """Each image's fold from its source split (split.source_fold_pattern's group 1), else fold 0."""
    if not split.source_fold_pattern:
        return np.zeros(len(index), np.int64)
    try:
        pattern = re.compile(split.source_fold_pattern)
    except re.error as exc:
        raise ConfigError(
            f"split.source_fold_pattern: {split.source_fold_pattern!r} is not a regular expression: {exc}"
        ) from exc
    found = source.map(lambda s: pattern.search(s))
    if found.isna().any():
        bad = index.loc[found.isna()].iloc[0]
        raise ConfigError(
            f"split.source_fold_pattern {split.source_fold_pattern!r} does not match source split "
            f"{bad['source_split']!r} of image {bad['image_id']!r}"
        )
    return found.map(lambda m: int(m.group(1))).to_numpy()


def source_splits(index: pd.DataFrame, classes: list[str], split: SplitSettings | dict) -> tuple[pd.DataFrame, dict]:
    """The dataset's own folds and roles, as given: each image's source split names its fold
    (``source_fold_pattern``'s group 1, else fold 0) and, in its last part, its role within that
    fold. A dataset that copies each image into every fold (glaucoma Fold0..Fold9) gives one row
    per copy, so roles never mix across folds."""
    split = SplitSettings.of(split)
    source = index["source_split"].fillna("")
    if (source == "").all():
        raise ConfigError(
            "split.method is 'source' but the index has no source split (split folders, "
            "dataset.source_split_column or dataset.source_split_lists)"
        )
    role_of = {name.lower(): role for role, names in split.source_roles.items() for name in names}
    roles = source.map(lambda s: role_of.get(s.rsplit("/", 1)[-1].lower()))
    if roles.isna().any():
        bad = index.loc[roles.isna()].iloc[0]
        raise ConfigError(
            f"split.source_roles: source split {bad['source_split']!r} of image {bad['image_id']!r} names no "
            f"role; the roles are {dict(split.source_roles.items())} ({int(roles.isna().sum())} such images)"
        )
    fold = _source_folds(index, source, split)
    present = sorted(set(fold.tolist()))
    if present != list(range(split.folds)):
        raise ConfigError(
            f"split.folds is {split.folds} but the dataset's own folds are {present}; set split.folds "
            f"to {len(present)} (numbered from 0)"
        )
    roles = roles.to_numpy()
    for k in present:
        for role in ("train", "val"):
            if not ((fold == k) & (roles == role)).any():
                raise ConfigError(
                    f"split.method 'source': fold {k} has no {role} images (split.source_roles.{role} "
                    f"{split.source_roles.names(role)})"
                )
    splits = _split_table(index, image_groups(index), roles, fold)
    dropped = _drop_later_copies(index, splits) if split.on_source_duplicate == "drop" else []
    summary = summarize(index, splits, classes)
    summary.update(
        {
            "seed": None,
            "folds": split.folds,
            "test_method": "the dataset's own folds and roles",
            "method": "source",
            "source_leaks": [],
            "dropped_copies": {
                "count": len(dropped),
                "images": dropped,
                "rule": "split.on_source_duplicate 'drop': the earliest copy (train, val, "
                "test) kept, the others set aside",
            },
        }
    )
    return splits, summary


def _drop_later_copies(index: pd.DataFrame, splits: pd.DataFrame) -> list[dict]:
    """Within each fold, copies of one image (same pixels or near-duplicate cluster) in several
    roles keep the earliest role's copies; the others become ``excluded``. Changes ``splits``."""
    copies = index[["image_id", "content_hash"]].assign(patient_id=index["image_id"])
    if "near_duplicate_cluster" in index:
        copies["near_duplicate_cluster"] = index["near_duplicate_cluster"]
    copy_group = image_groups(copies)  # copies only: patients play no part here
    rank = splits["set"].map({role: i for i, role in enumerate(SOURCE_ROLES)}).to_numpy()
    frame = pd.DataFrame({"fold": splits["fold"].to_numpy(), "copy": copy_group, "rank": rank})
    first = frame.groupby(["fold", "copy"])["rank"].transform("min").to_numpy()
    later = rank > first
    dropped = [
        {"image_id": i, "fold": int(f), "role": r}
        for i, f, r in zip(splits.loc[later, "image_id"], splits.loc[later, "fold"], splits.loc[later, "set"])
    ]
    splits.loc[later, "set"] = EXCLUDED
    return dropped


def _describe_groups(index, groups, which, image_test) -> list[dict]:
    out = []
    for g in which[:50]:
        rows = np.flatnonzero(groups == g)
        out.append(
            {
                "patients": sorted(index["patient_id"].iloc[rows].unique().tolist()),
                "test_images": index["image_id"].iloc[rows[image_test[rows]]].tolist(),
                "other_images": index["image_id"].iloc[rows[~image_test[rows]]].tolist(),
            }
        )
        if "near_duplicate_cluster" in index and index["near_duplicate_cluster"].iloc[rows].notna().any():
            members = index.iloc[rows].assign(part=np.where(image_test[rows], TEST, "other"))
            clustered = members.dropna(subset=["near_duplicate_cluster"])
            out[-1]["near_duplicates"] = [
                _near_duplicate_crossing(m)
                for _, m in clustered.groupby("near_duplicate_cluster")
                if m["part"].nunique() > 1
            ]
    return out


SOURCE_ROLES = ("train", "val", "test")


def is_source(splits: pd.DataFrame) -> bool:
    """True for the dataset's own folds (split.method 'source'): sets are roles within a fold."""
    return bool(splits["set"].isin(("train", "val")).any())  # 'test' is a set of both kinds


def fold_members(splits: pd.DataFrame, fold: int) -> dict[str, pd.Series]:
    """The image_ids fold ``fold``'s model trains on, is selected on and is tested on."""
    if is_source(splits):
        here = splits[splits["fold"] == fold]
        return {role: here.loc[here["set"] == role, "image_id"] for role in SOURCE_ROLES}
    return {
        "train": splits.loc[(splits["set"] == CV) & (splits["fold"] != fold), "image_id"],
        "val": splits.loc[splits["fold"] == fold, "image_id"],
        "test": splits.loc[splits["set"] == TEST, "image_id"],
    }


def partition_names(splits: pd.DataFrame) -> pd.Series:
    """The sets that must not share a patient: 'test' or 'fold_k' per image; with the dataset's
    own folds, 'fold_k/<role>' (sharing across folds is what such folds do)."""
    if is_source(splits):
        return pd.Series("fold_" + splits["fold"].astype(str) + "/" + splits["set"], index=splits.index)
    return pd.Series(np.where(splits["fold"] < 0, TEST, "fold_" + splits["fold"].astype(str)), index=splits.index)


def summarize(index: pd.DataFrame, splits: pd.DataFrame, classes: list[str]) -> dict:
    labels = label_matrix(index["labels"], classes)
    parts = partition_names(splits)
    overall = labels.mean(0)
    out = {"classes": classes, "images": int(len(index)), "patients": int(index["patient_id"].nunique()), "sets": {}}
    for name in sorted(parts.unique(), key=lambda s: (s != TEST, s)):
        mask = (parts == name).to_numpy()
        prevalence = labels[mask].mean(0)
        out["sets"][name] = {
            "images": int(mask.sum()),
            "patients": int(index.loc[mask, "patient_id"].nunique()),
            "images_per_class": {c: int(v) for c, v in zip(classes, labels[mask].sum(0))},
            "images_without_finding": int((labels[mask].sum(1) == 0).sum()),
            "prevalence_minus_overall_pp": {
                c: round(float(100 * (p - o)), 3) for c, p, o in zip(classes, prevalence, overall)
            },
        }
    return out


def _coverage_problems(index: pd.DataFrame, splits: pd.DataFrame) -> list[str]:
    """Every indexed image in the split once, and no image the index does not hold."""
    problems = []
    ids = splits["image_id"]
    if ids.duplicated().any():
        problems.append(f"images listed twice in the split: {ids[ids.duplicated()].head(5).tolist()}")
    missing = sorted(set(index["image_id"]) - set(ids))
    extra = sorted(set(ids) - set(index["image_id"]))
    if missing:
        problems.append(f"{len(missing)} indexed images are in no set, e.g. {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} images in the split are not in the index, e.g. {extra[:5]}")
    return problems


def _crossings(checks: list, near_pairs: list[dict] | None, problems: list[str]) -> dict:
    """For each (key, what, rows): how many values of ``key`` lie in two sets of one scope;
    each crossing described (up to 5 per key) in ``problems``."""
    crossings = {}
    for key, what, rows in checks:
        rows = rows.dropna(subset=[key])
        parts_per = rows.groupby(["scope", key])["part"].unique().droplevel("scope")
        crossing = parts_per[parts_per.map(len) > 1]
        crossings[key] = int(len(crossing))
        if len(crossing):
            examples = []
            for value, parts in crossing.head(5).items():
                members = rows.loc[rows[key] == value]
                if key == "near_duplicate_cluster":
                    examples.append(_near_duplicate_crossing(members, near_pairs))
                else:
                    examples.append(f"{value} in {sorted(parts)} ({members[['image_id', 'part']].values.tolist()[:4]})")
            problems.append(f"{len(crossing)} {what} cross sets: " + "; ".join(examples))
    return crossings


def check_split(index: pd.DataFrame, splits: pd.DataFrame, near_pairs: list[dict] | None = None) -> dict:
    """Prove the split leak-free: every indexed image once, and no patient (aliases included), no
    duplicate content hash and no near-duplicate cluster in two of {test, fold_0, ..., fold_K-1}
    (with the dataset's own folds: two roles of one fold). Images the split set aside
    (``excluded``) take no part. Raises LeakageError naming what crosses: for a near-duplicate
    cluster, its pairs across sets with their kind of match and verification score when
    ``near_pairs`` (index_report.json's near_duplicates.pair_list) is given, else the
    fingerprints' distance."""
    problems = _coverage_problems(index, splits)
    used = splits[splits["set"] != EXCLUDED]
    # with the dataset's own folds, sets are compared within a fold only
    scope = used["fold"] if is_source(splits) else pd.Series(0, index=used.index)
    columns = ["image_id", "patient_id", "content_hash"] + [
        c for c in ("near_duplicate_cluster", "patient_aliases", "fingerprint") if c in index
    ]
    merged = (
        used[["image_id"]]
        .assign(part=partition_names(used), scope=scope.to_numpy())
        .merge(index[columns], on="image_id", how="inner")
    )
    patients = merged[["image_id", "part", "scope", "patient_id"]]
    if "patient_aliases" in merged:
        aliases = merged[["image_id", "part", "scope", "patient_aliases"]].explode("patient_aliases").dropna()
        patients = pd.concat([patients, aliases.rename(columns={"patient_aliases": "patient_id"})], ignore_index=True)
    checks = [("patient_id", "patients", patients), ("content_hash", "duplicate images (same content hash)", merged)]
    if "near_duplicate_cluster" in merged:
        checks.append(("near_duplicate_cluster", "near-duplicate clusters (the same radiograph transformed)", merged))
    crossings = _crossings(checks, near_pairs, problems)
    report = {
        "verdict": "leak-free" if not problems else "LEAKAGE",
        "images_checked": int(len(merged)),
        "images_excluded": int((splits["set"] == EXCLUDED).sum()),
        "patients_crossing_sets": crossings["patient_id"],
        "duplicate_hashes_crossing_sets": crossings["content_hash"],
        "near_duplicate_clusters_crossing_sets": crossings.get("near_duplicate_cluster", 0),
        "sets": sorted(merged["part"].unique().tolist()),
        "problems": problems,
    }
    if problems:
        hint = (
            " (copies across a fold's roles: split.on_source_duplicate 'drop' keeps the earliest copy)"
            if is_source(splits)
            else ""
        )
        raise LeakageError("split check failed: " + " | ".join(problems) + hint)
    return report


def _near_duplicate_crossing(members: pd.DataFrame, near_pairs: list[dict] | None = None) -> str:
    """'a (test) ~ b (fold_1): registered copy, score 0.93, fingerprint distance 14, mirrored
    left-right' for the closest pairs across sets (without the verified pairs: the fingerprints'
    distance and orientation alone)."""
    from medfold.data.fingerprint import distance

    part = dict(zip(members["image_id"], members["part"]))
    found = []
    if near_pairs:
        for p in near_pairs:
            if p["a"] in part and p["b"] in part and part[p["a"]] != part[p["b"]]:
                text = (
                    f"{p['a']} ({part[p['a']]}) ~ {p['b']} ({part[p['b']]}): {p['kind']}, score {p['score']:.3f}, "
                    f"fingerprint distance {p['distance']}, {p['how']}"
                )
                found.append((-p["score"], text))
    if not found:
        rows = members[["image_id", "part", "fingerprint"]].values.tolist()
        for i, (a, part_a, fa) in enumerate(rows):
            for b, part_b, fb in rows[i + 1 :]:
                if part_a != part_b and fa and fb:
                    d, how = distance(fa, fb)
                    found.append((d, f"{a} ({part_a}) ~ {b} ({part_b}): distance {d}, {how}"))
    return "; ".join(text for _, text in sorted(found)[:3])


# ----------------------------------------------------------------------------- shareable split
MANIFEST_COLUMNS = ["content_hash", "patient", "set", "fold"]


def split_manifest(index: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """The split as others can apply it to their own copy of the images: each image by the hash
    of its decoded pixels (names and folders differ between copies, pixels do not), its patient's
    shared ID (medfold.core.privacy), set and fold; one row per distinct (hash, set, fold)."""
    shared = index["shared_patient_id"] if "shared_patient_id" in index else index["patient_id"]
    patient_of = dict(zip(index["image_id"], shared))
    hash_of = dict(zip(index["image_id"], index["content_hash"]))
    used = splits[splits["set"] != EXCLUDED]
    rows = pd.DataFrame(
        {
            "content_hash": used["image_id"].map(hash_of).to_numpy(),
            "patient": used["image_id"].map(patient_of).to_numpy(),
            "set": used["set"].to_numpy(),
            "fold": used["fold"].to_numpy(),
        }
    )
    rows = rows.dropna(subset=["content_hash"]).drop_duplicates(["content_hash", "set", "fold"])
    return rows.sort_values(["content_hash", "fold", "set"]).reset_index(drop=True)


def manifest_digest(rows: pd.DataFrame) -> str:
    """SHA-256 of the manifest's (hash, set, fold) rows in hash order: the split's identity."""
    lines = sorted(f"{h},{s},{int(f)}" for h, s, f in zip(rows["content_hash"], rows["set"], rows["fold"]))
    return hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest()


def write_manifest(rows: pd.DataFrame, path, dataset: str) -> None:
    from medfold import __version__

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        fh.write(
            f"# medfold split manifest of {dataset}: apply with split.method manifest, split.manifest <this file>\n"
            f"# medfold_version: {__version__}\n# split_digest: sha256:{manifest_digest(rows)}\n"
            f"# images: {len(rows)}\n"
        )
        rows.to_csv(fh, index=False)


def read_manifest(path) -> tuple[pd.DataFrame, dict]:
    """The manifest's rows and header; ConfigError for a file that is not one, or whose rows no
    longer give the digest it states (edited by hand, cut short)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"split.manifest: file {path} does not exist (the split rule writes split_manifest.csv)")
    header = {}
    with open(path) as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            key, _, value = line[1:].partition(":")
            header[key.strip()] = value.strip()
    rows = pd.read_csv(path, comment="#", dtype={"content_hash": str, "patient": str, "set": str})
    if list(rows.columns) != MANIFEST_COLUMNS or "split_digest" not in header:
        raise ConfigError(
            f"split.manifest {path}: not a medfold split manifest (columns {list(rows.columns)}, expected "
            f"{MANIFEST_COLUMNS} under a '# split_digest:' header)"
        )
    digest = f"sha256:{manifest_digest(rows)}"
    if digest != header["split_digest"]:
        raise ConfigError(
            f"split.manifest {path}: its rows give digest {digest}, not the {header['split_digest']} it states "
            "(the file was changed after the split wrote it)"
        )
    return rows, header


def manifest_splits(index: pd.DataFrame, classes: list[str], split: SplitSettings | dict) -> tuple[pd.DataFrame, dict]:
    """Another group's split applied to one's own copy of its images, matched by content hash.
    Images the manifest does not list are set aside (``excluded``) and listed; check_split then
    proves the result leak-free with this index's own patients and near-duplicates."""
    split = SplitSettings.of(split)
    if not split.manifest:
        raise ConfigError("split.method is 'manifest' but split.manifest names no file")
    rows, header = read_manifest(split.manifest)
    placed = rows.drop_duplicates("content_hash", keep=False)
    if len(placed) < len(rows):
        raise ConfigError(
            f"split.manifest {split.manifest}: some images are in several sets or folds (a manifest of a "
            "dataset's own folds, split.method 'source'); apply it with split.method 'source' instead"
        )
    placed = placed.set_index("content_hash")
    found = index["content_hash"].isin(placed.index).to_numpy()
    set_of = np.where(found, index["content_hash"].map(placed["set"]).fillna(EXCLUDED), EXCLUDED)
    fold = np.where(found, index["content_hash"].map(placed["fold"]).fillna(-1), -1).astype(np.int64)
    present = sorted(set(fold[found & (set_of == CV)].tolist()))
    if present and present != list(range(split.folds)):
        raise ConfigError(
            f"split.folds is {split.folds} but split.manifest {split.manifest} has folds {present}; "
            f"set split.folds to {len(present)}"
        )
    splits = _split_table(index, image_groups(index), set_of, fold)
    summary = summarize(index[found].reset_index(drop=True), splits[found].reset_index(drop=True), classes)
    missing_here = int(len(placed) - index.loc[found, "content_hash"].nunique())
    summary.update(
        {
            "seed": None,
            "folds": split.folds,
            "method": "manifest",
            "test_method": f"applied from split manifest {Path(split.manifest).name} ({header['split_digest']})",
            "source_leaks": [],
            "manifest": {
                "file": str(split.manifest),
                "split_digest": header["split_digest"],
                "medfold_version": header.get("medfold_version"),
                "images_matched": int(found.sum()),
                "images_not_in_manifest": index.loc[~found, "image_id"].tolist(),
                "manifest_images_not_here": missing_here,
            },
        }
    )
    return splits, summary


def write_json(obj: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------- the split stage


@dataclass(frozen=True)
class SplitOutputs(files.Outputs):
    """What the split rule writes."""

    splits: Path
    summary: Path
    manifest: Path
    NAMES: ClassVar[dict[str, str]] = {
        "splits": "splits.parquet",
        "summary": "split_summary.json",
        "manifest": "split_manifest.csv",
    }


@dataclass(frozen=True)
class CheckOutputs(files.Outputs):
    """What the check_split rule writes."""

    check: Path
    NAMES: ClassVar[dict[str, str]] = {"check": "split_check.json"}


def split_job(index_path, split: SplitSettings | dict, outputs: SplitOutputs, refused_path=None) -> None:
    """The split rule: the splits, their summary (shared identifiers only) and the manifest. A
    split refused for leaking writes every crossing image by its real name and path to
    ``refused_path`` (beside the results' privacy key, never in a shared output), for the data's
    owner: the message, like every log, names them by their pseudonyms."""
    from medfold.core.privacy import index_scrubber
    from medfold.data.index.io import read_index

    index, meta = read_index(index_path)
    try:
        splits, summary = make_splits(index, meta["classes"], split)
    except LeakageError as exc:
        if exc.crossing is None or refused_path is None:
            raise
        Path(refused_path).parent.mkdir(parents=True, exist_ok=True)
        exc.crossing.to_csv(refused_path, index=False)
        raise LeakageError(
            f"{exc}. Every crossing image by its own file name: {refused_path} (written beside the results' "
            f"privacy key for the data's owner; not for sharing)"
        ) from None
    splits.to_parquet(outputs.splits, index=False)
    write_json(index_scrubber(index).record(summary), outputs.summary)
    write_manifest(split_manifest(index, splits), outputs.manifest, meta["dataset"])


def check_split_job(index_path, index_report_path, splits_path, outputs: CheckOutputs) -> None:
    """The check_split rule: the leak check, on the shared view of the index (the near-duplicate
    pairs of the index report are in shared identifiers already)."""
    from medfold.core.privacy import shareable_view, shared_splits
    from medfold.data.index.io import read_index

    index, _ = read_index(index_path)
    near = json.loads(Path(index_report_path).read_text()).get("near_duplicates", {})
    check = check_split(
        shareable_view(index), shared_splits(index, pd.read_parquet(splits_path)), near.get("pair_list")
    )
    write_json(check, outputs.check)
