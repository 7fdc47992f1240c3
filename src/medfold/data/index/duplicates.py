"""Exact and near-duplicate images in the index: clusters by content hash and by perceptual
fingerprint with verification, and their records in the report (shared identifiers only)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from medfold.data import fingerprint as fp
from medfold.settings.sections import DatasetSettings

log = logging.getLogger("medfold.data.index")


# One piece (70 lines): index_report.json's near_duplicates record is one literal, in the order
# the report reads it; the search, the clusters and the core check are the helpers it calls.
def _near_duplicates(table: pd.DataFrame, dataset: DatasetSettings, signatures: list, threads: int = 1) -> dict:
    """Fill ``near_duplicate_cluster`` and describe each cluster for the report: its images,
    their patients and source splits, and its accepted pairs with kind, verification score,
    fingerprint distance and orientation (medfold.data.matching); ``pair_list`` holds every accepted
    pair for check_split, ``closest_rejected`` the best-scoring pairs that were not accepted."""
    from medfold.data import matching

    near = dataset.near_duplicates
    table["near_duplicate_cluster"] = pd.array([None] * len(table), dtype="Int64")
    has = table["fingerprint"].notna().to_numpy() & np.array([s is not None for s in signatures], bool)
    if not near.enabled or has.sum() < 2:
        why = "dataset.near_duplicates.enabled is false" if not near.enabled else "no fingerprints (images not opened)"
        return {"searched": False, "why": why, "max_distance": near.max_distance}
    rows = np.flatnonzero(has)
    typed = matching.MatchSettings.from_config(near)
    start = time.perf_counter()
    found, stats = matching.find_copies(
        fp.hex_to_bits(table["fingerprint"].to_numpy()[rows]),
        [signatures[i] for i in rows],
        table["content_hash"].to_numpy()[rows],
        _text(table["patient_id"])[rows],
        typed,
        threads,
    )
    seconds = time.perf_counter() - start
    found["a"], found["b"] = rows[found["a"]], rows[found["b"]]
    chained = found[found["accepted"]].reset_index(drop=True)
    largest_chained = matching.largest_cluster(len(table), chained)
    pairs, cut = matching.checked_clusters(len(table), chained, signatures, typed)
    ids = table["image_id"].to_numpy()
    listed = [_pair_record(ids, p) for p in pairs.itertuples(index=False)]
    described, in_cluster, sizes = _describe_clusters(table, pairs, listed)
    joining = [c for c in described if len(c["patients"]) > 1 or len(c["source_splits"]) > 1]
    rejected = found[~found["accepted"]].sort_values(["score", "a", "b"], ascending=[False, True, True]).head(20)
    large = [
        {"cluster": c["cluster"], "images": len(c["images"]), "weakest_links": sorted(c["pairs"], key=_score)[:5]}
        for c in described
        if len(c["images"]) > matching.LARGE_CLUSTER
    ]
    log.info(
        "near-duplicates: %(candidates)d candidate pairs, %(verified)d verified, %(pairs)d accepted in %(clusters)d "
        "clusters (%(joining)d join patients or source splits) among %(images)d images, %(seconds).2f s",
        {**stats, "pairs": len(pairs), "clusters": len(described), "joining": len(joining), "images": len(rows)}
        | {"seconds": seconds},
    )
    return {
        "searched": True,
        "max_distance": near.max_distance,
        "fingerprint_bits": fp.BITS,
        "neighbours": typed.neighbours,
        "min_score": typed.min_score,
        "early_score": typed.early_score,
        "seconds": round(seconds, 3),
        "stages": stats,
        "pairs": int(len(pairs)),
        "kinds": {k: int(v) for k, v in pairs["kind"].value_counts().sort_index().items()},
        "clusters": len(described),
        "images": int(in_cluster.sum()),
        "clusters_joining_patients_or_sources": len(joining),
        "largest_cluster": int(sizes.max()) if len(sizes) else 0,
        # chains checked against each cluster's core (medfold.data.matching.checked_clusters)
        "core_check": _core_check(cut, ids, largest_chained),
        # clusters larger than the data make plausible for copies of one image, with their weakest links
        "large_clusters": large,
        "distances": {str(k): int(v) for k, v in pairs["distance"].value_counts().sort_index().items()},
        # the ones that change the split first; clusters within one patient after them
        "cluster_list": (joining + [c for c in described if c not in joining])[:500],
        "pair_list": listed,
        "closest_rejected": [_pair_record(ids, p) for p in rejected.itertuples(index=False)],
    }


def _score(pair: dict) -> float:
    return pair["score"]


def _describe_clusters(table: pd.DataFrame, pairs: pd.DataFrame, listed: list) -> tuple[list, np.ndarray, np.ndarray]:
    """Number the clusters the accepted pairs make (by their first image in image_id order, as
    split groups are), fill ``near_duplicate_cluster`` and describe each: images, patients,
    source splits, pairs. Returns the descriptions, which rows are in a cluster, cluster sizes."""
    component = fp.clusters(len(table), pairs["a"].to_numpy(), pairs["b"].to_numpy())
    sizes = np.bincount(component)
    in_cluster = sizes[component] > 1
    order = np.argsort(table["image_id"].to_numpy(), kind="stable")
    first_seen = list(dict.fromkeys(component[order][in_cluster[order]].tolist()))
    number = {c: i for i, c in enumerate(first_seen)}
    table.loc[in_cluster, "near_duplicate_cluster"] = [number[c] for c in component[in_cluster]]
    # members and pairs grouped by cluster once (a scan per cluster was O(clusters x images))
    clustered = order[in_cluster[order]]  # rows in image_id order
    members_of = pd.Series(clustered).groupby(component[clustered]).agg(list)
    edges_of = pd.Series(range(len(pairs))).groupby(component[pairs["a"].to_numpy()]).agg(list) if len(pairs) else {}
    described = []
    for c in first_seen:
        members = members_of[c]
        described.append(
            {
                "cluster": number[c],
                "images": table["image_id"].iloc[members].tolist(),
                "patients": sorted(set(table["patient_id"].iloc[members])),
                "source_splits": sorted({str(s) for s in table["source_split"].iloc[members] if s is not None}),
                "pairs": [listed[i] for i in edges_of[c]],
            }
        )
    return described, in_cluster, sizes


def _core_check(cut: pd.DataFrame, ids: np.ndarray, largest_before: int) -> dict:
    """The chained links cut by the check against each cluster's core (matching.checked_clusters)."""
    return {
        "largest_cluster_before": largest_before,
        "links_cut": [
            {
                "a": str(ids[r.a]),
                "b": str(ids[r.b]),
                "score": round(float(r.score), 4),
                "image": str(ids[r.image]),
                "core": str(ids[r.core]),
                "score_against_core": float(r.score_against_core),
            }
            for r in cut.itertuples(index=False)
        ][:200],
        "links_cut_count": int(len(cut)),
    }


def _text(column: pd.Series) -> np.ndarray:
    """A column as plain strings, missing values as '' (so that two missing values are equal)."""
    return np.array(["" if pd.isna(v) else str(v) for v in column], dtype=object)


def _pair_record(ids: np.ndarray, p) -> dict:
    """One verified pair as the report and check_split read it."""
    from medfold.data.fingerprint import ORIENTATION_NAMES

    return {
        "a": str(ids[p.a]),
        "b": str(ids[p.b]),
        "kind": p.kind,
        "score": round(float(p.score), 4),
        "distance": int(p.distance),
        "how": ORIENTATION_NAMES[int(p.orientation)],
        "exact": p.kind == "exact copy",
        "similarity": float(p.similarity),
        "registration": {
            "shift_x": round(float(p.shift_x), 4),
            "shift_y": round(float(p.shift_y), 4),
            "scale_x": round(float(p.scale_x), 4),
            "scale_y": round(float(p.scale_y), 4),
            "rotation_degrees": round(float(p.rotation), 2),
            "overlap": round(float(p.overlap), 3),
        },
    }
