"""One self-contained HTML page from the result files alone: no training, no model loading.

Two steps: :func:`gather` reads the result files into typed views (dataclasses of tables,
figures and values, below), and the Jinja2 templates in ``templates/`` lay them out. Jinja2 runs
with autoescaping on, so every string from a dataset (file names, class names, patient IDs,
config values) is escaped by default; only the figures this module draws (matplotlib SVG, PNG data
URLs) are marked safe. Figures are inline, styles are inline, and the page asks no other host for
anything, so it reads the same offline or mailed as one file.

The page opens with the comparison of experiments; each experiment's detail (a grid's
combinations included), the dataset's near-duplicates, the explanations and the job timings are
collapsible ``<details>`` blocks, and wide tables scroll inside the page.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import matplotlib

matplotlib.use("Agg")
import jinja2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from markupsafe import Markup  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from . import hardware  # noqa: E402
from .files import Outputs  # noqa: E402
from .metrics import targets_for  # noqa: E402
from .report_files import ReportInputs  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"
# Okabe & Ito (2008), a palette that colour-blind readers can tell apart.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
# CheXNet's test-set AUROC per finding (Rajpurkar et al. 2017, arXiv:1711.05225, Table 1).
CHEXNET_AUROC = {
    "Atelectasis": 0.8094,
    "Cardiomegaly": 0.9248,
    "Consolidation": 0.7901,
    "Edema": 0.8878,
    "Effusion": 0.8638,
    "Emphysema": 0.9371,
    "Fibrosis": 0.8047,
    "Hernia": 0.9164,
    "Infiltration": 0.7345,
    "Mass": 0.8676,
    "Nodule": 0.7802,
    "Pleural_Thickening": 0.8062,
    "Pneumonia": 0.7680,
    "Pneumothorax": 0.8887,
}


# ----------------------------------------------------------------------------- views
@dataclass
class Table:
    """Rows of cells (text, numbers, None); the first ``left`` columns are left-aligned text.
    Numbers are formatted by the template (3 decimals), None and NaN shown as a dash."""

    headers: list[str]
    rows: list[list[Any]]
    left: int = 1
    row_classes: list[str] | None = None

    def __bool__(self) -> bool:
        return bool(self.rows)


@dataclass
class Picture:
    """An image embedded as a data URL, with its text alternative and caption."""

    src: str
    alt: str
    caption: str = ""


@dataclass
class NearDuplicateCluster:
    patients: list[str]
    folders: list[str]
    pairs: list[str]
    pictures: list[Picture]


@dataclass
class NearDuplicates:
    searched: bool
    why: str = ""
    pairs: int = 0
    max_distance: int = 0
    bits: int = 0
    clusters: int = 0
    images: int = 0
    joining: int = 0
    distances: str = ""
    shown: list[NearDuplicateCluster] = field(default_factory=list)
    more: int = 0
    kinds: str = ""
    candidates: int = 0
    verified: int = 0
    min_score: float = 0.0
    neighbours: int = 0
    closest_rejected: str = ""


@dataclass
class DatasetView:
    name: str
    format: str
    task: str
    classes: int
    counts: Table
    left_out: Table | None
    label_map: Table | None
    unmapped: str
    listed_twice: Table | None
    warnings: list[str]
    skipped: Table | None
    per_set: Table
    near: NearDuplicates | None
    examples: list[tuple[str, list[Picture]]]


@dataclass
class SplitView:
    method: str
    folds: int
    seed: Any
    verdict: str
    ok: bool
    images_checked: int
    patients_crossing: int
    duplicates_crossing: int
    near_crossing: int
    sets: Table
    source_leaks: Table | None
    dropped: int
    dropped_rule: str
    dropped_table: Table | None


@dataclass
class Ensemble:
    models: int
    metrics: Table
    per_class: Table
    confusion: list[tuple[str, Table]]


@dataclass
class Clinical:
    skipped: str | None = None
    source: str = ""
    resamples: int = 0
    subgroups: Table | None = None
    forest: Markup | None = None
    temperatures: str = ""
    calibration: Table | None = None
    reliability: Markup | None = None
    operating_points: Table | None = None
    patient_aggregate: str = ""
    per_patient: Table | None = None


@dataclass
class ExperimentView:
    name: str
    best: bool
    headline: str
    per_fold: Table
    across: Table
    per_class: Table
    ensemble: Ensemble | None
    roc: Markup
    curves: Markup | None
    clinical: Clinical | None
    fold_reports: list = field(default_factory=list)  # of FoldReport, when there is no fold ensemble
    stages: Table | None = None  # staged fine-tuning: each stage's own test result, per fold
    decision: str = ""  # the rule accuracy, F1 and the confusion matrices use (training.decision)
    pruned: str = ""  # pruning while training: sparsity and storage, over the folds
    labels: LabelAuditView | None = None  # likely label errors from the out-of-fold predictions
    variance: Table | None = None  # with repeats: spread over folds and seeds, the variance split
    models: int = 0  # models trained (folds x seeds)


@dataclass
class LabelAuditView:
    """The top of an experiment's label audit (medfold.labels): counts, table, thumbnails."""

    note: str
    table: Table
    pictures: list[Picture]


@dataclass
class ReferenceView:
    study: str
    source: str
    table: Table


@dataclass
class GridView:
    name: str
    combinations: int
    rank_by: str
    top: Table
    folds: list[int] | None = None  # the folds it was tuned on, when not every fold


@dataclass
class ExplainedFold:
    fold: int
    pictures: list[Picture]


@dataclass
class ExplanationsView:
    name: str
    folds: list[ExplainedFold]


@dataclass
class CompressedExperiment:
    name: str
    cpu_models: str
    isas: str
    table: Table
    figure: Markup


@dataclass
class CompressionView:
    threads: Any
    repeats: Any
    warmup: Any
    experiments: list[CompressedExperiment]


@dataclass
class Provenance:
    about: Table
    timings: Table | None
    config: str
    recipe: Table | None = None  # each experiment's training recipe, from its fold models' settings


@dataclass
class CardView:
    """An exported experiment's model card (medfold.card), as the page shows it."""

    name: str
    facts: Table  # section, field, text
    test: Table
    subgroups: Table
    calibration: Table
    operating_points: Table


@dataclass
class ExternalView:
    """One external validation (medfold.external), as the page shows it."""

    name: str
    experiment: str
    note: str
    metrics: Table
    copies: Table
    calibration: Table
    thresholds: Table
    figure: Picture | None


@dataclass
class Report:
    title: str
    experiments: Table | None
    comparisons: Table | None
    details: list[ExperimentView]
    grids: list[GridView]
    dataset: DatasetView
    split: SplitView
    explanations: list[ExplanationsView]
    compression: CompressionView | None
    provenance: Provenance
    reference: ReferenceView | None = None
    cards: list[CardView] = field(default_factory=list)
    externals: list[ExternalView] = field(default_factory=list)
    cv_tests: Table | None = None  # the corrected repeated k-fold t-tests of the same pairs


# ----------------------------------------------------------------------------- small helpers
def fmt(value, digits: int = 3) -> str:
    """A cell's text: floats to ``digits`` decimals, None and NaN as a dash."""
    if value is None or (isinstance(value, float | np.floating) and np.isnan(value)):
        return "–"
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}f}"
    if isinstance(value, np.integer):
        return str(int(value))
    return value if isinstance(value, Markup) else str(value)


def svg(fig) -> Markup:
    """A matplotlib figure as inline SVG (its text is XML-escaped by matplotlib)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return Markup(text[text.index("<svg") :])  # drop the XML prolog and doctype: inline SVG needs neither


def png_data_url(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def file_data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _ci(low, high, digits: int = 3) -> str:
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return "–"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _with_ci(value, low, high) -> str:
    if value is None or pd.isna(value):
        return "–"
    return f"{value:.3f} {_ci(low, high)}" if low is not None and not pd.isna(low) else f"{value:.3f}"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not pd.isna(v)]
    return float(np.mean(values)) if values else None


def _pm(stat: dict) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat.get("std") is not None else f"{stat['mean']:.3f}"


def _mean_pm(row: pd.Series, column: str, digits: int = 3, scale: float = 1.0) -> str:
    mean, std = row.get(f"{column}.mean"), row.get(f"{column}.std")
    if mean is None or pd.isna(mean):
        return "–"
    if std is None or pd.isna(std):  # one fold
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _count(value) -> str | None:
    return None if value is None or pd.isna(value) else str(int(value))


def _pixels(cache: np.ndarray, row: int) -> np.ndarray:
    return np.asarray(cache[row][0] if cache.shape[1] == 1 else np.moveaxis(cache[row], 0, 2))


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


def split_view(split_summary: dict, check: dict) -> SplitView:
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
    )


# ----------------------------------------------------------------------------- experiments
HEADLINE = ["val.auroc_macro", "test.auroc_macro", "test.accuracy", "test.balanced_accuracy", "test.f1_macro"]


def experiments_table(comparison: pd.DataFrame) -> Table:
    headers = [
        "experiment",
        *[f"{m} (mean ± std)" for m in HEADLINE],
        "ensemble test AUROC [95% CI]",
        "train s/fold",
    ]
    rows, marks = [], []
    for _, r in comparison.iterrows():
        cells = [r["experiment"] + (" ★" if r["best"] else "")]
        cells += [
            f"{r[f'{m}.mean']:.3f} ± {r[f'{m}.std']:.3f}" if pd.notna(r.get(f"{m}.mean")) else "–" for m in HEADLINE
        ]
        cells.append(
            _with_ci(
                r["ensemble_test.auroc_macro"],
                r.get("ensemble_test.auroc_macro.ci_low"),
                r.get("ensemble_test.auroc_macro.ci_high"),
            )
        )
        cells.append(r.get("train_seconds.mean"))
        rows.append(cells)
        marks.append("best" if r["best"] else "")
    return Table(headers, rows, left=len(HEADLINE) + 2, row_classes=marks)


def _p(value) -> str:
    """A p-value as the tables show it (4 decimals; a dash where the test had nothing to test)."""
    return "–" if value is None or pd.isna(value) else f"{value:.4f}"


def comparisons_table(comparisons: pd.DataFrame) -> Table | None:
    """Paired comparisons on the same test images: DeLong per class, bootstrap for the macro."""
    if comparisons is None or not len(comparisons):
        return None
    return Table(
        ["a", "b", "class", "AUROC a", "AUROC b", "difference", "DeLong p", "DeLong 95% CI", "bootstrap 95% CI"],
        [
            [
                r["a"],
                r["b"],
                r["class"],
                r["auroc_a"],
                r["auroc_b"],
                r["difference"],
                _p(r["delong_p"]),
                _ci(r["delong_ci_low"], r["delong_ci_high"]),
                _ci(r["bootstrap_ci_low"], r["bootstrap_ci_high"]),
            ]
            for _, r in comparisons.iterrows()
        ],
        left=3,
    )


def cv_tests_table(tests: pd.DataFrame) -> Table | None:
    """The pairs' cross-validation t-tests: the naive paired p beside the corrected one."""
    if tests is None or not len(tests):
        return None
    return Table(
        ["a", "b", "score", "fold x seed pairs", "mean a", "mean b", "difference", "naive p", "corrected p"],
        [
            [
                r["a"],
                r["b"],
                r["metric"],
                f"{int(r['pairs'])} ({int(r['folds'])} folds x {int(r['seeds'])} seeds)",
                r["mean_a"],
                r["mean_b"],
                r["difference"],
                _p(r["p_naive"]),
                _p(r["p_corrected"]),
            ]
            for _, r in tests.iterrows()
        ],
        left=4,
    )


def variance_table(variance: dict | None) -> Table | None:
    """With repeats: each headline metric's mean, its spread over folds, seeds and both, and its
    variance split into the fold and the seed parts (``medfold.aggregate.variance_split``)."""
    if not variance:
        return None
    shown = [
        c
        for c in variance["metrics"]
        if c.split(".", 1)[1] in ("auroc_macro", "accuracy", "balanced_accuracy", "f1_macro", "loss")
    ]
    return Table(
        [
            "metric",
            "mean",
            "std over folds",
            "std over seeds",
            "std (all models)",
            "fold variance",
            "seed variance",
            "seed share",
        ],
        [
            [
                c,
                m["mean"],
                m["std_over_folds"],
                m["std_over_seeds"],
                m["std_all"],
                f"{m['var_fold']:.2e}",
                f"{m['var_seed']:.2e}",
                "–" if m["seed_share"] is None else f"{100 * m['seed_share']:.0f}%",
            ]
            for c, m in ((c, variance["metrics"][c]) for c in shown)
        ],
        left=1,
    )


def _figure(path, draw) -> Markup:
    """A figure the rule already wrote as PNG, embedded as it is; drawn here (SVG) without one."""
    if path and Path(path).is_file():
        return Markup('<img class="figure" alt="{}" src="{}">').format(Path(path).name, file_data_url(path))
    return svg(draw())


def clinical_view(name: str, record: dict | None, figures: dict | None = None) -> Clinical:
    """Subgroups (table and forest plot), calibration, operating points and patient-level
    results of one experiment, from its clinical.json."""
    from . import clinical

    if not record or record.get("skipped"):
        return Clinical(skipped=(record or {}).get("skipped", "not available"))
    view = Clinical(source=record["test_source"], resamples=record["bootstrap"]["resamples"])
    figures = figures or {}
    subgroups = pd.DataFrame(record.get("subgroups") or [])
    if len(subgroups):
        classes = [m.split(".", 1)[1] for m in dict.fromkeys(subgroups["metric"]) if m.startswith("auroc.")]
        rows = []
        for (column, group), part in subgroups.groupby(["subgroup", "group"], sort=False):
            first = part.iloc[0]
            head = [column, group, int(first["images"]), int(first["patients"])]
            if first["too_small"]:
                rows.append([*head, "too small", *["" for _ in classes], "", ""])
                continue
            by = part.set_index("metric")

            def value(metric, by=by):
                return by.loc[metric, "value"] if metric in by.index else None

            macro = (
                _with_ci(*by.loc["auroc_macro", ["value", "ci_low", "ci_high"]]) if "auroc_macro" in by.index else "–"
            )
            rows.append(
                [
                    *head,
                    macro,
                    *[value(f"auroc.{c}") for c in classes],
                    _mean([value(f"sensitivity.{c}") for c in classes]),
                    _mean([value(f"specificity.{c}") for c in classes]),
                ]
            )
        view.subgroups = Table(
            [
                "subgroup",
                "group",
                "images",
                "patients",
                "macro AUROC [95% CI]",
                *[f"AUROC {c}" for c in classes],
                "mean sensitivity",
                "mean specificity",
            ],
            rows,
            left=2,
        )
        view.forest = _figure(figures.get("forest"), lambda: clinical.forest_figure(name, subgroups))
    calib = record.get("calibration") or {}
    if calib.get("before"):
        after = calib.get("after") or {}
        temps = calib.get("temperatures") or {}
        view.temperatures = ", ".join(f"fold {k}: {v:.2f}" for k, v in temps.items())
        view.calibration = Table(
            ["class", "ECE", "ECE, temperature-scaled", "Brier", "Brier, temperature-scaled"],
            [
                [c, r["ece"], (after.get(c) or {}).get("ece"), r["brier"], (after.get(c) or {}).get("brier")]
                for c, r in calib["before"].items()
            ],
        )
        view.reliability = _figure(figures.get("reliability"), lambda: clinical.reliability_figure(name, calib))
    points = pd.DataFrame(record.get("operating_points") or [])
    if len(points):
        rows = []
        for _, r in points.iterrows():
            target = "Youden" if r["target"] == "youden" else f"{r['target']} ≥ {r['target_value']:.2f}"
            other = "sensitivity" if r["target"] == "specificity" else "specificity"
            best = r.get(f"test_roc.{other}")
            best_ci = _ci(r.get(f"test_roc.{other}.ci_low"), r.get(f"test_roc.{other}.ci_high"))
            rows.append(
                [
                    r["class"],
                    target,
                    r["threshold"],
                    r.get("val.sensitivity"),
                    r.get("val.specificity"),
                    _with_ci(
                        r.get("test.sensitivity"), r.get("test.sensitivity.ci_low"), r.get("test.sensitivity.ci_high")
                    ),
                    _with_ci(
                        r.get("test.specificity"), r.get("test.specificity.ci_low"), r.get("test.specificity.ci_high")
                    ),
                    "–" if best is None or pd.isna(best) else f"{best:.3f} {best_ci}",
                ]
            )
        view.operating_points = Table(
            [
                "class",
                "target",
                "threshold",
                "validation sensitivity",
                "validation specificity",
                "test sensitivity [95% CI]",
                "test specificity [95% CI]",
                "best on test ROC [95% CI]",
            ],
            rows,
            left=2,
        )
    level = record.get("patient_level")
    if level:
        rows = []
        for unit in ("image", "patient"):
            r = level[unit]
            ci = r.get("auroc_macro_ci95") or [None, None]
            rows.append(
                [
                    f"per {unit}",
                    r.get("images", r.get("rows")),
                    r["patients"],
                    _with_ci(r["auroc_macro"], *ci),
                    r.get("balanced_accuracy"),
                    r.get("f1_macro"),
                ]
            )
        view.patient_aggregate = level["aggregate"]
        view.per_patient = Table(
            ["unit", "rows", "patients", "macro AUROC [95% CI]", "balanced accuracy", "F1 macro"], rows
        )
    return view


@dataclass
class FoldReport:
    """One fold's classification report and confusion matrices on its own validation (and test)
    set: what the report shows when the folds share no test set (a dataset's own folds)."""

    title: str
    per_class: Table
    confusion: list[tuple[str, Table]]


def report_tables(result: dict, classes: list[str], task: str) -> tuple[Table, list[tuple[str, Table]]]:
    """The classification report and confusion matrices of one ``metrics.evaluate`` result."""
    per_class = [
        [
            c,
            *[result["per_class"][c][k] for k in ("precision", "recall", "f1-score")],
            int(result["per_class"][c]["support"]),
        ]
        for c in classes
    ]
    if task == "multilabel":
        confusion = [
            (
                c,
                Table(
                    ["", "predicted no", "predicted yes"],
                    [["no", *result["confusion"][c][0]], ["yes", *result["confusion"][c][1]]],
                ),
            )
            for c in classes
        ]
    else:
        confusion = [
            ("", Table(["truth \\ prediction", *classes], [[c, *row] for c, row in zip(classes, result["confusion"])]))
        ]
    return Table(["class", "precision", "recall", "f1-score", "support"], per_class), confusion


def pruned_line(metrics_paths: dict) -> str:
    """Pruning while training, over the folds: the kept models' sparsity and what they take to
    store (dense, medfold's sparse format, that gzip-compressed), as the thesis reports it."""
    records = [json.loads(Path(p).read_text()).get("pruning") for p in metrics_paths.values()]
    records = [r for r in records if r and r.get("storage")]
    if not records:
        return ""
    mean = lambda key: float(np.mean([r["storage"][key] for r in records])) / 1e6  # noqa: E731
    sparsity = float(np.mean([r["overall"] for r in records]))
    return (
        f"Pruned while training: {100 * sparsity:.1f} % of the pruned layers' weights are zero; storage "
        f"{mean('dense_bytes'):.2f} MB dense, {mean('sparse_bytes'):.2f} MB sparse, "
        f"{mean('sparse_gzip_bytes'):.2f} MB sparse and gzip-compressed (means over {len(records)} folds)."
    )


def stages_table(metrics_paths: dict) -> Table | None:
    """Staged fine-tuning: per fold and stage, what it trained, its epochs and the test result of
    the weights it handed on (as staged studies report each model in turn)."""
    rows = []
    for fold, path in sorted((int(k), v) for k, v in metrics_paths.items()):
        for number, stage in enumerate(json.loads(Path(path).read_text()).get("stages") or [], 1):
            test = stage.get("test") or {}
            trained = stage["train"] + (f" ({stage['blocks']})" if stage["train"] == "last_blocks" else "")
            rows.append(
                [
                    f"fold {fold}, stage {number}",
                    trained,
                    _count(stage.get("trainable_parameters")),
                    _count(stage["epochs_run"]),
                    stage.get("best_value"),
                    test.get("auroc_macro"),
                    test.get("accuracy"),
                ]
            )
    if not rows:
        return None
    heads = ["stage", "trains", "trainable parameters", "epochs", "best monitored value", "test AUROC", "test accuracy"]
    return Table(heads, rows, left=2)


def run_value(name: str, summary: dict, ensemble: dict | None) -> float | None:
    """This run's value of a quantity the ``reference`` block names (see the schema)."""
    if name.startswith("ensemble."):
        key = name.split(".", 1)[1]
        if key.startswith("auroc."):
            return ((ensemble or {}).get("auroc") or {}).get(key.split(".", 1)[1])
        return (ensemble or {}).get(key)
    return (summary["statistics"].get(name) or {}).get("mean")


def reference_view(reference: dict, every: dict) -> ReferenceView | None:
    """The study's published figures beside this run's: study / this run, and the difference."""
    rows = []
    for name, quantities in (reference.get("experiments") or {}).items():
        files = every.get(name)
        if files is None:
            continue
        summary = json.loads(Path(files["summary"]).read_text())
        ensemble = json.loads(Path(files["ensemble"]).read_text())
        for quantity, study in quantities.items():
            ours = run_value(quantity, summary, ensemble)
            whole = quantity in ("parameters", "epochs_trained")
            rows.append(
                [
                    name,
                    quantity,
                    _count(study) if whole else study,
                    _count(ours) if whole and ours is not None else ours,
                    None if ours is None or whole else ours - study,
                ]
            )
    if not rows:
        return None
    table = Table(["experiment", "quantity", "study", "this run", "this run - study"], rows, left=2)
    return ReferenceView(reference.get("study", ""), reference.get("source", ""), table)


def fold_reports(metrics_paths: dict, classes: list[str], task: str) -> list[FoldReport]:
    """Each fold's report on the sets it was evaluated on (thresholds chosen on its validation set)."""
    out = []
    for fold, path in sorted((int(k), v) for k, v in metrics_paths.items()):
        result = json.loads(Path(path).read_text())
        for part, label in (("val", "validation"), ("test", "test")):
            if part in result and "per_class" in result[part]:
                table, confusion = report_tables(result[part], classes, task)
                out.append(FoldReport(f"fold {fold}, {label} set ({result[part]['images']} images)", table, confusion))
    return out


def ensemble_view(ensemble: dict, classes: list[str], task: str) -> Ensemble:
    ci = ensemble["ci95"]
    metrics = [
        [m, ensemble.get(m), f"[{ci[m][0]:.3f}, {ci[m][1]:.3f}]" if ci.get(m) else "–"]
        for m in ("auroc_macro", "accuracy", "balanced_accuracy")
    ] + [[m, ensemble.get(m), "–"] for m in ("f1_macro", "f1_weighted", "precision_macro", "recall_macro")]
    per_class_table, confusion = report_tables(ensemble, classes, task)
    return Ensemble(
        models=ensemble["models"],
        metrics=Table(["metric", "value", "95% CI (patient bootstrap)"], metrics),
        per_class=per_class_table,
        confusion=confusion,
    )


def experiment_view(name: str, files: dict, best: bool) -> ExperimentView:
    """One experiment's (or cross-experiment ensemble's) detail, from its result files."""
    summary = json.loads(Path(files["summary"]).read_text())
    ensemble = json.loads(Path(files["ensemble"]).read_text())
    predictions = pd.concat([pd.read_parquet(p) for p in files["predictions"]], ignore_index=True)
    ens_pred = pd.read_parquet(files["ensemble_predictions"]) if files.get("ensemble_predictions") else None
    ens_pred = ens_pred if ens_pred is not None and len(ens_pred) else None
    histories = {int(fold): pd.read_csv(path) for fold, path in (files.get("histories") or {}).items()}
    per_fold = pd.read_csv(files["per_fold"])
    classes, task = summary["classes"], summary["task"]
    headline = [f"train.{m}" for m in ("auroc_macro", "accuracy") if f"train.{m}" in per_fold.columns] + [
        f"{part}.{m}"
        for part in ("val", "test")
        for m in ("auroc_macro", "accuracy", "balanced_accuracy", "f1_macro")
        if f"{part}.{m}" in per_fold.columns
    ]
    shown = [c for c in per_fold.columns if c.startswith(("train.", "val.", "test.")) and ".auroc." not in c]
    stats = summary["statistics"]
    order = ["count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    reference = set(classes) <= set(CHEXNET_AUROC) and len(classes) >= 10
    heads = ["class", "validation AUROC (mean ± std)", "test AUROC (mean ± std)", "ensemble test AUROC", "95% CI"]
    rows = []
    for c in [classes[1]] if task == "binary" else classes:
        v, t = summary["per_class_auroc"]["val"].get(c, {}), summary["per_class_auroc"]["test"].get(c, {})
        ci = (ensemble or {}).get("ci95", {}).get(f"auroc.{c}")
        row = [
            c,
            _pm(v),
            _pm(t),
            (ensemble or {}).get("auroc", {}).get(c),
            f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "–",
        ]
        rows.append([*row, CHEXNET_AUROC.get(c)] if reference else row)
    val = per_fold.get("val.auroc_macro")
    line = (
        f"validation AUROC {val.mean():.3f} ± {val.std():.3f}"
        if val is not None and len(val) > 1 and val.notna().all()
        else ""
    )
    if ensemble and ensemble.get("auroc_macro") is not None:
        ci = ensemble.get("ci95", {}).get("auroc_macro") or [None, None]
        line += ("; " if line else "") + f"ensemble test AUROC {_with_ci(ensemble['auroc_macro'], *ci)}"
    record = json.loads(Path(files["clinical"]).read_text()) if files.get("clinical") else None
    figures = {k: files[k] for k in ("forest", "reliability") if files.get(k)}
    seeded = "seed" in per_fold and per_fold["seed"].max() > 0  # repeats: each fold trained with R seeds
    return ExperimentView(
        name=name,
        best=best,
        headline=line,
        per_fold=Table(
            [
                "fold",
                *(["seed"] if seeded else []),
                *headline,
                "best epoch",
                "epochs",
                "s/epoch",
                "parameters",
                "train s",
            ],
            [
                [
                    int(r["fold"]),
                    *([int(r["seed"])] if seeded else []),
                    *[r[c] for c in headline],
                    _count(r["best_epoch"]),
                    _count(r.get("epochs_trained")),
                    r.get("seconds_per_epoch"),
                    _count(r.get("parameters")),
                    r["train_seconds"],
                ]
                for _, r in per_fold.iterrows()
            ],
        ),
        across=Table(["metric", *order], [[c, *[stats[c][s] for s in order]] for c in shown]),
        per_class=Table([*heads, "CheXNet (Rajpurkar 2017)"] if reference else heads, rows, left=3),
        ensemble=ensemble_view(ensemble, classes, task) if ensemble else None,
        roc=roc_figure(name, predictions, ens_pred if ens_pred is not None else predictions.iloc[:0], classes, task),
        curves=curves_figure(name, histories) if histories else None,
        clinical=clinical_view(name, record, figures) if record is not None else None,
        fold_reports=fold_reports(files.get("metrics") or {}, classes, task) if not ensemble else [],
        stages=stages_table(files.get("metrics") or {}),
        decision=summary.get("decision", ""),
        pruned=pruned_line(files.get("metrics") or {}),
        variance=variance_table(summary.get("variance")),
        models=int(summary.get("models") or len(per_fold)),
    )


def grid_view(name: str, ranked: pd.DataFrame, rank_by: str, top_k: int, folds: list[int] | None = None) -> GridView:
    """A grid's best combinations by mean validation metric, with their values and costs."""
    params = [c for c in ranked.columns if c.startswith("param:")]
    test = rank_by.replace("val.", "test.", 1)
    rows = [
        [
            int(r["rank"]),
            r["experiment"],
            *[r[c] for c in params],
            r[f"{rank_by}.mean"],
            r[f"{rank_by}.std"],
            r[f"{test}.mean"],
            r["train_seconds.mean"],
        ]
        for _, r in ranked.head(top_k).iterrows()
    ]
    return GridView(
        name=name,
        combinations=len(ranked),
        rank_by=rank_by.split(".", 1)[1],
        top=Table(
            [
                "rank",
                "experiment",
                *[c.split(":", 1)[1] for c in params],
                f"{rank_by} mean",
                "std",
                f"{test} mean",
                "train s/fold",
            ],
            rows,
            left=2 + len(params),
            row_classes=["best" if i == 0 else "" for i in range(len(rows))],
        ),
        folds=folds,
    )


def explanations_view(name: str, records: list[str]) -> ExplanationsView:
    """Each fold's explained test images: the overlay PNGs with what they explain."""
    folds = []
    for path in records:
        record = json.loads(Path(path).read_text())
        pictures = []
        for item in record["images"]:
            cls = item["explained_class"]
            caption = (
                f"{item['image_id']}: explains {cls} (p = {item['probabilities'][cls]:.2f}); true: "
                f"{', '.join(item['true_labels']) or 'no finding'}; predicted: "
                f"{', '.join(item['predicted_labels']) or 'no finding'}"
            )
            pictures.append(Picture(file_data_url(Path(path).parent / item["overlay"]), item["image_id"], caption))
        folds.append(ExplainedFold(int(record["fold"]), pictures))
    return ExplanationsView(name, folds)


def compression_view(variants: dict[str, tuple[pd.DataFrame, pd.DataFrame]], config: dict) -> CompressionView:
    """``variants``: experiment -> (per-fold table, summary) of its compressed variants."""
    settings = config.get("compression", {})
    latency = settings.get("latency", {})
    largest = max(latency.get("batch_sizes", [32]))
    headers = [
        "variant",
        "method",
        "size (x base)",
        "tensors (x base)",
        "bitmask+values (x base)",
        "sparsity",
        "latency b1 (ms)",
        "base latency b1 (ms)",
        "speed-up b1",
        f"speed-up b{largest}",
        "speed-up b1 vs compiled fp32",
        "images/s",
        "test AUROC change",
        "label agreement with base",
        "out-of-fold AUROC",
        "base out-of-fold AUROC",
    ]
    experiments = []
    for name, (per_fold, summary) in variants.items():
        rows = [
            [
                r["variant"],
                r["method"],
                _mean_pm(r, "ratio.size", 2),
                _mean_pm(r, "ratio.tensor_size", 2),
                _mean_pm(r, "compressed.ratio", 2),
                _mean_pm(r, "sparsity", 3),
                _mean_pm(r, "variant.latency_ms_b1", 2),
                _mean_pm(r, "base.latency_ms_b1", 2),
                _mean_pm(r, "ratio.speedup_b1", 2),
                _mean_pm(r, "ratio.speedup_b32", 2),
                _mean_pm(r, "ratio.speedup_vs_compiled_b1", 2),
                _mean_pm(r, "variant.images_per_s", 0),
                _mean_pm(r, "delta.test.auroc_macro", 4),
                _mean_pm(r, "agreement.label_agreement", 3),
                r.get("oof.auroc_macro"),
                r.get("base.oof.auroc_macro"),
            ]
            for _, r in summary.iterrows()
        ]
        isas = sorted({str(v) for v in per_fold.get("cpu.isa", pd.Series(dtype=str)).dropna()})
        models = sorted({str(v) for v in per_fold.get("cpu.model", pd.Series(dtype=str)).dropna()})
        experiments.append(
            CompressedExperiment(
                name=name,
                cpu_models=", ".join(models) or "?",
                isas=", ".join(isas) or "?",
                table=Table(headers, rows, left=2),
                figure=compression_figure(name, per_fold),
            )
        )
    return CompressionView(
        threads=settings.get("threads", "?"),
        repeats=latency.get("repeats", "?"),
        warmup=latency.get("warmup", "?"),
        experiments=experiments,
    )


def provenance_view(config: dict, timings: pd.DataFrame, repo: Path | None, recipe: Table | None = None) -> Provenance:
    import snakemake
    import torch
    import torchvision

    commit = "unknown"
    if repo is not None:
        try:
            commit = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True
            ).stdout
            commit += " (with uncommitted changes)" if dirty.strip() else ""
        except (OSError, subprocess.CalledProcessError):
            pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    about = [
        ["date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")],
        ["workflow commit", commit],
        ["python", sys.version.split()[0]],
        ["torch", torch.__version__],
        ["torchvision", torchvision.__version__],
        ["snakemake", snakemake.__version__],
        ["cpu (report job)", hardware.describe()],
        ["gpu", gpu],
        ["platform", platform.platform()],
    ]
    return Provenance(
        about=Table(["", ""], about, left=2),
        timings=Table(["job", "seconds", "max RSS (MB)"], timings[["job", "s", "max_rss"]].values.tolist())
        if len(timings)
        else None,
        config=yaml.safe_dump(config, sort_keys=False),
        recipe=recipe,
    )


def recipe_table(experiments: dict) -> Table | None:
    """Each experiment's training recipe as its first fold model was trained (metrics.json)."""
    rows = []
    for name, files in experiments.items():
        paths = list((files.get("metrics") or {}).values())
        if not paths:
            continue
        t = json.loads(Path(paths[0]).read_text()).get("settings") or {}
        schedule = t.get("schedule") or {"name": "plateau"}
        mix = t.get("mixup") or {}
        rows.append(
            [
                name,
                t.get("model"),
                t.get("optimizer"),
                t.get("lr"),
                schedule["name"] + (f", {schedule['warmup_epochs']} warm-up" if schedule.get("warmup_epochs") else ""),
                t.get("label_smoothing", 0.0),
                mix.get("mixup_alpha", 0.0),
                mix.get("cutmix_alpha", 0.0),
                (t.get("ema") or {}).get("decay", 0.0),
                t.get("tta", "none"),
                (t.get("train_metrics") or {}).get("images", 0),
            ]
        )
    heads = ["experiment", "model", "optimizer", "lr", "schedule", "label smoothing", "mixup α", "CutMix α"]
    heads += ["weights average", "TTA", "train-metric images"]
    return Table(heads, rows, left=5) if rows else None


# ----------------------------------------------------------------------------- figures
def roc_figure(name: str, predictions: pd.DataFrame, ensemble: pd.DataFrame, classes: list[str], task: str) -> str:
    scored = [classes[1]] if task == "binary" else classes
    cols = min(4, len(scored))
    nrows = int(np.ceil(len(scored) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.3 * nrows), squeeze=False, layout="constrained")
    test = predictions[predictions["set"] == "test"]
    for ax, c in zip(axes.ravel(), scored):
        j = classes.index(c)
        for k, (fold, part) in enumerate(test.groupby("fold")):
            y = targets_for(part["labels"], classes, task)
            y01 = y[:, j] if task == "multilabel" else (y == j).astype(int)
            if 0 < y01.sum() < len(y01):
                fpr, tpr, _ = roc_curve(y01, part[f"prob:{c}"])
                ax.plot(fpr, tpr, color=PALETTE[k % len(PALETTE)], lw=1, alpha=0.8, label=f"fold {fold}")
        y = targets_for(ensemble["labels"], classes, task) if ensemble is not None else np.zeros(0)
        y01 = y[:, j] if task == "multilabel" else (y == j).astype(int)
        if ensemble is not None and 0 < y01.sum() < len(y01):
            fpr, tpr, _ = roc_curve(y01, ensemble[f"prob:{c}"])
            ax.plot(fpr, tpr, color="black", lw=2, label="ensemble")
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        ax.set(title=c, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes.ravel()[len(scored) :]:
        ax.axis("off")
    fig.suptitle(f"{name}: ROC on the held-out test set")
    return svg(fig)


CURVES = (  # (title, training column, validation column)
    ("loss", "train_eval_loss", "val_loss"),
    ("macro AUROC", "train_auroc_macro", "val_auroc_macro"),
    ("accuracy", "train_accuracy", "val_accuracy"),
    ("macro F1", "train_f1_macro", "val_f1_macro"),
)


def curves_figure(name: str, histories: dict[int, pd.DataFrame]) -> str:
    """Learning curves, training set (solid) against validation (dashed), one colour per fold. The
    training values are those of the fixed subsample scored in eval mode after each epoch, so both
    lines measure the same model the same way; the running loss of the augmented batches is dotted.
    Histories from before train-set metrics existed plot their validation lines only."""
    panels = [c for c in CURVES if any(c[2] in h for h in histories.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6), layout="constrained", squeeze=False)
    for ax, (title, train_col, val_col) in zip(axes[0], panels):
        for k, (fold, h) in enumerate(sorted(histories.items())):
            color = PALETTE[k % len(PALETTE)]
            if train_col in h and h[train_col].notna().any():
                ax.plot(h["epoch"], h[train_col], color=color, lw=1.2, label=f"fold {fold} train")
            elif val_col == "val_loss" and "train_loss" in h:
                ax.plot(h["epoch"], h["train_loss"], color=color, lw=1.2, label=f"fold {fold} train")
            if val_col == "val_loss" and train_col in h:
                ax.plot(h["epoch"], h["train_loss"], color=color, lw=0.8, ls=":")
            if val_col in h:
                ax.plot(h["epoch"], h[val_col], color=color, lw=1.2, ls="--", label=f"fold {fold} validation")
        ax.set(xlabel="epoch", title=title)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle(
        f"{name}: learning curves (solid: training set, dashed: validation; "
        "dotted: running loss of the augmented batches)",
        fontsize=9,
    )
    return svg(fig)


def compression_figure(name: str, table: pd.DataFrame) -> str:
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for k, (variant, group) in enumerate(table.groupby("variant", sort=False)):
        ax.scatter(
            group["ratio.size"],
            group["delta.test.auroc_macro"],
            color=PALETTE[k % len(PALETTE)],
            label=str(variant),
            s=28,
        )
    ax.axhline(0, color="#888", lw=0.8)
    ax.set_xlabel("on-disk size (x base model)")
    ax.set_ylabel("test AUROC change")
    ax.set_title(f"{name}: size against AUROC, one point per fold", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    return svg(fig)


def read_timings(paths) -> pd.DataFrame:
    rows = []
    for p in paths:
        frame = pd.read_csv(p, sep="\t")
        rows.append(
            {
                "job": Path(p).stem,
                "s": float(frame["s"].iloc[0]),
                "max_rss": pd.to_numeric(frame["max_rss"], errors="coerce").iloc[0],
            }
        )
    return pd.DataFrame(rows, columns=["job", "s", "max_rss"])


# ----------------------------------------------------------------------------- the page
def gather(inputs: ReportInputs | dict, config: dict, repo: Path | None = None) -> Report:
    """Every view of the page from the result files ``inputs`` names (a ``ReportInputs``, or a
    dict of its shape)."""
    from .index import read_index
    from .privacy import shareable_view

    inputs = ReportInputs.of(inputs)
    index = shareable_view(read_index(inputs.index)[0])
    index_report = json.loads(Path(inputs.index_report).read_text())
    split_summary = json.loads(Path(inputs.split_summary).read_text())
    check = json.loads(Path(inputs.split_check).read_text())
    cache = np.load(inputs.cache, mmap_mode="r") if inputs.cache else None
    experiments, best = None, set()
    if inputs.comparison:
        comparison = pd.read_csv(inputs.comparison)
        best = set(comparison.loc[comparison["best"], "experiment"])
        experiments = experiments_table(comparison)
    comparisons = comparisons_table(pd.read_csv(inputs.comparisons)) if inputs.comparisons else None
    cv_tests = cv_tests_table(pd.read_csv(inputs.cv_tests)) if inputs.cv_tests else None
    # ensembles across experiments are shown as experiments are, without training curves
    every = {**inputs.experiments, **inputs.ensembles}
    details = [experiment_view(name, files, name in best) for name, files in every.items()]
    for view in details:  # the label audit's thumbnails come from the cache, as the dataset's do
        path = every[view.name].label_issues
        if path and Path(path).exists():
            view.labels = label_audit_view(path, index, cache)
    grids = [
        grid_view(
            name,
            pd.read_csv(path),
            config["grids"]["rank_by"],
            config["grids"]["top_k"],
            sorted((config["experiments"].get(name) or {}).get("folds") or []) or None,
        )
        for name, path in inputs.grids.items()
    ]
    explanations = [
        explanations_view(name, files.explanations) for name, files in inputs.experiments.items() if files.explanations
    ]
    variants = {
        name: (pd.read_csv(files.variants["table"]), pd.read_csv(files.variants["summary"]))
        for name, files in inputs.experiments.items()
        if files.variants
    }
    return Report(
        title=f"medfold report: {index_report['dataset']}",
        experiments=experiments,
        comparisons=comparisons,
        cv_tests=cv_tests,
        details=details,
        grids=grids,
        dataset=dataset_view(index_report, split_summary, index, cache),
        split=split_view(split_summary, check),
        explanations=explanations,
        compression=compression_view(variants, config) if variants else None,
        provenance=provenance_view(config, read_timings(inputs.benchmarks), repo, recipe_table(inputs.experiments)),
        reference=reference_view(config.get("reference") or {}, every),
        externals=[external_view(name, files) for name, files in inputs.externals.items()],
        cards=[card_view(name, files.model_card) for name, files in inputs.experiments.items() if files.model_card],
    )


def label_audit_view(path, index: pd.DataFrame, cache, shown: int = 8, listed: int = 20) -> LabelAuditView:
    """The flagged images first (confident learning on the out-of-fold predictions), their
    thumbnails with the given and suggested label and the model's confidence."""
    issues = pd.read_csv(path)
    flagged = issues[issues["flagged"]]
    per_label = issues["label"].notna().any()
    note = (
        f"{len(flagged)} of {len(issues)} out-of-fold {'image labels' if per_label else 'images'} flagged by confident "
        f"learning (Northcutt et al. 2021), listed by the model's probability of the given label, lowest first. "
        f"Nothing is relabelled; list image IDs in dataset.exclude_images to leave images out (cv/label_issues.csv)."
    )
    top = flagged.head(listed)
    table = Table(
        ["rank", "image", *(["label"] if per_label else []), "given", "suggested", "confidence", "p(given)"],
        [
            [
                r["rank"],
                r["image_id"],
                *([r["label"]] if per_label else []),
                r["given"],
                r["suggested"],
                r["confidence"],
                r["self_confidence"],
            ]
            for _, r in top.iterrows()
        ],
        left=4 if per_label else 3,
    )
    pictures = []
    if cache is not None:
        row_of = {image: k for k, image in enumerate(index["image_id"])}
        for _, r in top.head(shown).iterrows():
            if r["image_id"] in row_of:
                caption = f"{r['image_id']}: given {r['given']}, suggested {r['suggested']} (p={r['confidence']:.2f})"
                pictures.append(Picture(png_data_url(_pixels(cache, row_of[r["image_id"]])), caption, caption))
    return LabelAuditView(note, table, pictures)


def card_view(name: str, path) -> CardView:
    """The model card's sections as tables; every text is escaped by the template."""
    c = json.loads(Path(path).read_text())
    d, use, m, train = c["model_details"], c["intended_use"], c["metrics"], c["training_data"]
    held = c["evaluation_data"]["held_out_test_set"]
    q = c["quantitative_analyses"]
    export = d.get("export") or {}
    facts = [
        [
            "Model details",
            "model",
            f"{d['what']}; {d['architecture']}, {_count(d['parameters_per_model'])} parameters each",
        ],
        ["Model details", "input", f"{d['input']}; resize: {export.get('resize', 'n/a')}"],
        [
            "Model details",
            "file",
            f"{export.get('file')} ({_count(export.get('bytes'))} bytes; onnxruntime within "
            f"{fmt(export.get('parity_max_abs_difference'), 7)} of PyTorch)",
        ],
        ["Intended use", "intended use", use["intended_use"]],
        ["Intended use", "intended users", use["intended_users"]],
        ["Intended use", "out of scope", use["out_of_scope"]],
        ["Factors", "subgroups", ", ".join(c["factors"]["subgroups"]) or "none configured"],
        ["Metrics", "decision", f"{m['decision']}; thresholds from {m['thresholds_from']}"],
        ["Metrics", "thresholds", ", ".join(f"{k} {fmt(v)}" for k, v in (m["thresholds"] or {}).items()) or "n/a"],
        ["Metrics", "intervals", m["intervals"]],
        [
            "Evaluation data",
            "held-out test set",
            f"{_count(held['images'])} images, {_count(held['patients'])} patients ({held['method']})",
        ],
        [
            "Training data",
            "dataset",
            f"{train['dataset']}: {_count(train['images_indexed'])} images, "
            f"{_count(train['patients'])} patients, {_count(train['images_excluded'])} excluded",
        ],
        ["Training data", "split", f"{train['split']}; {train['cross_validation']['folds']} folds"],
        [
            "Training data",
            "copies",
            f"{_count(train['exact_duplicate_groups'])} exact-duplicate groups, "
            f"{_count(train['near_duplicate_clusters'])} near-duplicate clusters",
        ],
        ["Ethical considerations", "", c["ethical_considerations"]],
        ["Caveats and recommendations", "", c["caveats_and_recommendations"]],
        ["Software", "versions", ", ".join(f"{k} {v}" for k, v in c["software"].items())],
        ["Software", "split digest", c["split_digest"] or "n/a"],
    ]
    test = [
        [k, v["value"], _ci(*(v["ci95"] or (None, None)))] for k, v in (q["test"] or {}).items() if isinstance(v, dict)
    ]
    subgroups = [
        [r["subgroup"], r["group"], r["images"], r["patients"], r["value"], _ci(r["ci_low"], r["ci_high"])]
        for r in q["subgroups"]
    ]
    calibration = [[k, v["ece"], v["max_gap"], v["brier"]] for k, v in q["calibration"].items()]
    points = [
        [
            r["class"],
            r["target"] + (f" {fmt(r['target_value'])}" if r.get("target_value") is not None else ""),
            r["threshold"],
            _with_ci(r["test.sensitivity"], r["test.sensitivity.ci_low"], r["test.sensitivity.ci_high"]),
            _with_ci(r["test.specificity"], r["test.specificity.ci_low"], r["test.specificity.ci_high"]),
        ]
        for r in q["operating_points"]
    ]
    return CardView(
        name,
        Table(["section", "field", "text"], facts, left=3),
        Table(["metric (held-out test set)", "value", "95% CI"], test),
        Table(["subgroup", "group", "images", "patients", "AUROC", "95% CI"], subgroups, left=2),
        Table(["class", "ECE", "largest gap", "Brier"], calibration),
        Table(["class", "operating point", "threshold", "sensitivity (test)", "specificity (test)"], points, left=2),
    )


def external_view(name: str, files: dict) -> ExternalView:
    """Internal test set against the external data: metrics, copies found, calibration drift,
    sensitivity and specificity at the internal and at re-chosen thresholds."""
    r = json.loads(Path(files["record"]).read_text())
    internal, external = r["internal"], r["external"]

    def cell(result: dict, key: str) -> str:  # a metric of external.json with its interval
        value = (result.get("auroc") or {}).get(key[6:]) if key.startswith("auroc.") else result.get(key)
        return _with_ci(value, *((result.get("ci95") or {}).get(key) or (None, None)))

    keys = ["auroc_macro", "accuracy", "balanced_accuracy", "f1_macro", *(f"auroc.{c}" for c in r["classes"])]
    rows = [[key, cell(internal, key), cell(external, key)] for key in keys]
    copies = pd.read_csv(Path(files["record"]).with_name("copies.csv"))
    calib = r["calibration"]
    recal = r.get("recalibration") or {}
    cal_rows = [
        [
            c,
            calib["internal"][c]["ece"],
            calib["external"][c]["ece"],
            (recal.get("before") or {}).get(c, {}).get("ece"),
            (recal.get("after") or {}).get(c, {}).get("ece"),
        ]
        for c in calib["internal"]
    ]
    t = r["thresholds"]
    thr_rows = []
    if t.get("at_internal"):
        for c in t["at_internal"]:
            k = 0 if r["task"] == "binary" else r["classes"].index(c)  # binary: one threshold, the positive class's
            thr_rows.append(
                [
                    c,
                    t["internal"][k],
                    t["internal_test_at_internal"][c]["sensitivity"],
                    t["internal_test_at_internal"][c]["specificity"],
                    t["at_internal"][c]["sensitivity"],
                    t["at_internal"][c]["specificity"],
                    t["rechosen"][k],
                    t["at_rechosen"][c]["sensitivity"],
                    t["at_rechosen"][c]["specificity"],
                ]
            )
    n = r["copies"]
    note = (
        f"{_count(external.get('images'))} images of {_count(external.get('patients'))} patients validated; "
        f"{n['found']} copies of the training dataset's images found ({n['exact']} exact, {n['near']} near) and "
        f"{'left out' if n['on_copy'] == 'exclude' else 'the run stopped'}."
    )
    if recal:
        note += (
            f" Recalibration: {recal['method']} fitted on {recal['fit']['patients']} patients' images "
            f"({recal['fit']['images']}), evaluated on the other {recal['evaluated']['patients']} "
            f"({recal['evaluated']['images']} images)."
        )
    figure = Path(files["reliability"])
    return ExternalView(
        name,
        r["experiment"],
        note,
        Table(["metric", "internal test set (95% CI)", "external (95% CI)"], rows),
        Table(
            ["external image", "copy of", "in", "kind", "score"],
            copies[["external_image", "copy_of", "copy_of_set", "kind", "score"]].values.tolist(),
            left=4,
        ),
        Table(["class", "ECE internal", "ECE external", "ECE before recal. (held out)", "ECE after"], cal_rows),
        Table(
            [
                "class",
                "internal threshold",
                "sens. internal test",
                "spec. internal test",
                "sens. external",
                "spec. external",
                "re-chosen threshold",
                "sens. external (re-chosen)",
                "spec. external (re-chosen)",
            ],
            thr_rows,
        ),
        Picture(file_data_url(figure), f"reliability of {name}", "internal test set against the external data")
        if figure.exists()
        else None,
    )


def environment() -> jinja2.Environment:
    """Jinja2 with autoescaping on for every template, and the one cell filter."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["cell"] = fmt
    return env


def render(inputs: ReportInputs | dict, config: dict, repo: Path | None = None) -> str:
    """The report page as one HTML string (see :func:`gather` for ``inputs``)."""
    return environment().get_template("report.html.j2").render(report=gather(inputs, config, repo))


# ----------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class ReportOutputs(Outputs):
    """What the report rule writes."""

    html: Path
    NAMES: ClassVar[dict[str, str]] = {"html": "index.html"}


def report_job(inputs: ReportInputs, config: dict, repo, outputs: ReportOutputs) -> None:
    """The report rule: the page, from the result files ``inputs`` names."""
    Path(outputs.html).write_text(render(inputs, config, Path(repo)))
