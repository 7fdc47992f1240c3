"""The dataset and split sections of the report: the plan read from the data, the index,
near-duplicates, examples, the split."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, in jobs and tests alike
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from medfold.report.helpers import _pixels, png_data_url  # noqa: E402
from medfold.report.views import (  # noqa: E402
    DatasetView,
    NearDuplicateCluster,
    NearDuplicates,
    Picture,
    PlanView,
    SplitView,
    Table,
)


# ----------------------------------------------------------------------------- dataset and split
def dataset_view(index_report: dict, split_summary: dict, index: pd.DataFrame, cache: np.ndarray | None) -> DatasetView:
    r = index_report
    counts = Table(
        ["", "count"],
        [
            ["images listed", r["images_listed"]],
            ["images indexed", r["images_indexed"]],
            ["images skipped", r["images_skipped"]],
            ["other files ignored", len(r["ignored_files"])],
            ["patients", r["patients"]],
            ["patient ID from", r["patient_id_source"]],
            ["duplicate groups (identical pixels)", r["duplicates"]["groups"]],
            ["images in duplicate groups", r["duplicates"]["images"]],
        ],
    )
    left_out = r.get("rows_left_out") or {}
    mapping = r.get("label_map") or {}
    label_map, unmapped = None, ""
    if mapping.get("mapped"):
        label_map = Table(["raw label -> class", "labels"], [[k, v] for k, v in mapping["mapped"].items()])
        where = "sent to " + mapping["unmapped_label"] if mapping["unmapped_label"] else "dropped"
        raw = ", ".join(f"{k} ({v})" for k, v in mapping["unmapped_raw_labels"].items()) or "none"
        unmapped = f"Raw labels the map does not name ({where}): {raw}."
    twice = r.get("listed_more_than_once") or []
    sets = split_summary["sets"]
    names = list(sets)
    per_set = [[c, *[sets[n]["images_per_class"][c] for n in names]] for c in split_summary["classes"]]
    per_set.append(["(no finding)", *[sets[n]["images_without_finding"] for n in names]])
    per_set.append(["images", *[sets[n]["images"] for n in names]])
    per_set.append(["patients", *[sets[n]["patients"] for n in names]])
    return DatasetView(
        name=r["dataset"],
        format=r["format"],
        task=r["task"],
        classes=len(r["classes"]),
        counts=counts,
        left_out=Table(["reason", "rows"], [[k, v] for k, v in left_out.items()]) if left_out else None,
        label_map=label_map,
        unmapped=unmapped,
        listed_twice=Table(
            ["image", "table lines", "patients", "labels"],
            [
                [x["image_id"], ", ".join(map(str, x["lines"])), ", ".join(x["patients"]), ", ".join(x["labels"])]
                for x in twice
            ],
            left=4,
        )
        if twice
        else None,
        warnings=list(r["warnings"]),
        skipped=Table(["file", "reason"], [[s["path"], s["reason"]] for s in r["skipped"]], left=2)
        if r["skipped"]
        else None,
        per_set=Table(["class", *names], per_set),
        near=near_duplicates_view(r.get("near_duplicates"), index, cache),
        examples=examples(index, r["classes"], cache) if cache is not None else [],
    )


def near_duplicates_view(
    near: dict | None, index: pd.DataFrame, cache: np.ndarray | None, shown: int = 24
) -> NearDuplicates | None:
    """The near-duplicate clusters that join patients or source folders, each as its images side
    by side with the distance, the transform found, the patients and the folders."""
    if not near:
        return None
    if not near["searched"]:
        return NearDuplicates(searched=False, why=near["why"])
    joining = [c for c in near["cluster_list"] if len(c["patients"]) > 1 or len(c["source_splits"]) > 1]
    row_of = {image: i for i, image in enumerate(index["image_id"])}
    clusters = []
    for cluster in joining[:shown]:
        pictures = []
        if cache is not None:
            pictures = [
                Picture(png_data_url(_pixels(cache, row_of[image])), image, image)
                for image in cluster["images"]
                if image in row_of
            ]
        pairs = [_pair_text(p) for p in cluster["pairs"][:6]]
        clusters.append(NearDuplicateCluster(cluster["patients"], cluster["source_splits"], pairs, pictures))
    return NearDuplicates(
        searched=True,
        pairs=near["pairs"],
        max_distance=near["max_distance"],
        bits=near["fingerprint_bits"],
        clusters=near["clusters"],
        images=near["images"],
        joining=near["clusters_joining_patients_or_sources"],
        distances=", ".join(f"{k}: {v}" for k, v in near["distances"].items()) or "none",
        shown=clusters,
        more=max(0, len(joining) - shown),
        kinds=", ".join(f"{v} {k}" for k, v in near.get("kinds", {}).items()) or "none",
        candidates=near.get("stages", {}).get("candidates", 0),
        verified=near.get("stages", {}).get("verified", 0),
        min_score=near.get("min_score", 0.0),
        neighbours=near.get("neighbours", 0),
        closest_rejected="; ".join(
            f"{p['a']} ~ {p['b']} {p['score']:.3f}" for p in near.get("closest_rejected", [])[:3]
        ),
        largest=near.get("largest_cluster", 0),
        chained=near.get("core_check", {}).get("largest_cluster_before", 0),
        cut=[
            f"{c['a']} ~ {c['b']} ({c['score']:.3f}): {c['image']} scores {c['score_against_core']:.3f} against "
            f"the cluster's core {c['core']}"
            for c in near.get("core_check", {}).get("links_cut", [])[:10]
        ],
        large=[
            f"cluster {c['cluster']}: {c['images']} images; weakest links "
            + "; ".join(f"{p['a']} ~ {p['b']} {p['score']:.3f}" for p in c["weakest_links"])
            for c in near.get("large_clusters", [])
        ],
    )


def _pair_text(p: dict) -> str:
    """'b is a mirrored left-right: registered copy, score 0.934 (shifted 2 % x -1 %, scaled
    1.04 x 0.97, rotated 1.2°), fingerprint distance 14'."""
    if p.get("exact"):
        return f"{p['b']} is {p['a']} {p['how']}: identical pixels"
    text = f"{p['b']} is {p['a']} {p['how']}"
    if "score" not in p:  # a report of an older index
        return f"{text}, distance {p['distance']}"
    r = p["registration"]
    shifted = f"shifted {round(100 * r['shift_x']):d} % x {round(100 * r['shift_y']):d} %"
    rotated = round(r["rotation_degrees"], 1) + 0.0  # no '-0.0'
    return (
        f"{text}: {p['kind']}, score {p['score']:.3f} ({shifted}, "
        f"scaled {r['scale_x']:.2f} x {r['scale_y']:.2f}, rotated {rotated:.1f}°), "
        f"fingerprint distance {p['distance']}"
    )


def examples(index: pd.DataFrame, classes: list[str], cache: np.ndarray, per_class: int = 4):
    out = []
    for c in classes:
        rows = np.flatnonzero([c in labels for labels in index["labels"]])[:per_class]
        out.append(
            (
                c,
                [
                    Picture(
                        png_data_url(_pixels(cache, i)), f"{c}: {index['image_id'].iat[i]}", index["image_id"].iat[i]
                    )
                    for i in rows
                ],
            )
        )
    return out


def grouping_note(index_report: dict) -> str:
    """Where the dataset names no patients (MedMNIST, COVID-19 Radiography): what the split's
    groups stand for, and what they cannot keep apart."""
    from medfold.data.index.patients import NO_PATIENTS

    if index_report.get("patient_id_source") != NO_PATIENTS:
        return ""
    near = index_report.get("near_duplicates") or {}
    copies = (
        f"exact and near-duplicate copies of one image ({near.get('images', 0)} images in "
        f"{near.get('clusters', 0)} clusters here) are kept in one set"
        if near.get("searched")
        else "exact copies of one image are kept in one set (the near-duplicate search is off)"
    )
    return (
        "This dataset names no patients (no patient column, file-name pattern or DICOM PatientID), so each "
        f"image is a group of its own and the copy grouping stands in for patients: {copies}. It cannot see "
        "other images of the same person (follow-up films, the other eye, other frames or slices of one "
        "examination): those may sit in different sets, and the test and cross-validation figures may be "
        "optimistic."
    )


def split_view(split_summary: dict, check: dict, index_report: dict | None = None) -> SplitView:
    sets = split_summary["sets"]
    leaks = split_summary["source_leaks"]
    dropped = split_summary.get("dropped_copies") or split_summary.get("dropped_for_source_leak") or {}
    return SplitView(
        method=split_summary["test_method"],
        folds=split_summary["folds"],
        seed=split_summary["seed"],
        verdict=check["verdict"],
        ok=check["verdict"] == "leak-free",
        images_checked=check["images_checked"],
        patients_crossing=check["patients_crossing_sets"],
        duplicates_crossing=check["duplicate_hashes_crossing_sets"],
        near_crossing=check.get("near_duplicate_clusters_crossing_sets", 0),
        sets=Table(
            ["set", "images", "patients", "largest prevalence deviation (pp)"],
            [
                [n, s["images"], s["patients"], max(abs(v) for v in s["prevalence_minus_overall_pp"].values())]
                for n, s in sets.items()
            ],
        ),
        source_leaks=Table(
            ["patients", "test images", "other images", "near-duplicates"],
            [
                [
                    ", ".join(x["patients"]),
                    ", ".join(x["test_images"]),
                    ", ".join(x["other_images"]),
                    "; ".join(x.get("near_duplicates", [])),
                ]
                for x in leaks
            ],
            left=4,
        )
        if leaks
        else None,
        dropped=dropped.get("count", 0),
        dropped_rule=dropped.get("rule", ""),
        dropped_table=Table(
            ["image", "fold", "role it had"], [[d["image_id"], d["fold"], d["role"]] for d in dropped["images"]], left=3
        )
        if dropped.get("count")
        else None,
        grouping=grouping_note(index_report or {}),
    )


def plan_view(path) -> PlanView:
    """plan.json (medfold.study.plan.write_plan) as the page shows it: the fingerprint in rows,
    each decision with its reason. Every string (class names, the source path) is escaped by the
    template."""
    record = json.loads(Path(path).read_text())
    fp, sizes = record["fingerprint"], record["fingerprint"]["sizes"]
    value = lambda v: v if isinstance(v, str | int | float) else json.dumps(v, sort_keys=False)  # noqa: E731
    rows = [
        ["source", f"{fp['source']} ({fp['format']})"],
        ["images", fp["images"]],
        ["task and classes", f"{fp['task']}: " + ", ".join(f"{c} {n}" for c, n in fp["classes"].items())],
        ["the dataset's own roles", ", ".join(f"{r} {n}" for r, n in fp["roles"].items()) or "none"],
        ["patients", fp["patients"]["statement"]],
        ["image sides", ", ".join(f"{k} {v}" for k, v in sizes.items())],
        ["colour", fp["colour"]],
        ["modality", fp["modality"]],
        ["byte-identical files", fp["exact_duplicates"]],
    ]
    decisions = [[d["key"], value(d["value"]), d["reason"]] for d in record["decisions"] if d["key"] != "dataset"]
    return PlanView(
        statement=f"{fp['images']} images read from {fp['source']}",
        fingerprint=Table(["found", "value"], rows, left=2),
        decisions=Table(["setting", "planned", "why"], decisions, left=3),
        doubts=list(fp.get("doubts", [])),
    )
