"""The experiment sections of the report: the comparison table, paired comparisons, t-tests,
variance, each experiment's detail and clinical evaluation, grids, explanations, compression,
provenance."""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, in jobs and tests alike
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from markupsafe import Markup  # noqa: E402

from medfold.core import hardware  # noqa: E402
from medfold.report._constants import CHEXNET_AUROC  # noqa: E402
from medfold.report.figures import compression_figure, curves_figure, roc_figure  # noqa: E402
from medfold.report.helpers import _ci, _count, _mean, _mean_pm, _pm, _with_ci, file_data_url, svg  # noqa: E402
from medfold.report.views import (
    Clinical,
    CompressedExperiment,
    CompressionView,
    Ensemble,
    ExperimentView,
    ExplainedFold,
    ExplanationsView,
    GridView,
    Picture,
    Provenance,
    ReferenceView,
    Table,
)
from medfold.settings.sections import CompressionSettings, ReferenceSettings  # noqa: E402

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
    variance split into the fold and the seed parts (``medfold.evaluation.aggregate.variance_split``)."""
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
    if not record or record.get("skipped"):
        return Clinical(skipped=(record or {}).get("skipped", "not available"))
    view = Clinical(source=record["test_source"], resamples=record["bootstrap"]["resamples"])
    figures = figures or {}
    _subgroups_section(view, name, record, figures)
    _calibration_section(view, name, record, figures)
    _operating_points_section(view, record)
    _patient_level_section(view, record)
    return view


def _subgroups_section(view: Clinical, name: str, record: dict, figures: dict) -> None:
    """The subgroups table and forest plot."""
    from medfold.evaluation.clinical.figures import forest_figure

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
        view.forest = _figure(figures.get("forest"), lambda: forest_figure(name, subgroups))


def _calibration_section(view: Clinical, name: str, record: dict, figures: dict) -> None:
    """Calibration before and after temperature scaling, and the reliability figure."""
    from medfold.evaluation.clinical.figures import reliability_figure

    measured = record.get("calibration") or {}
    if measured.get("before"):
        after = measured.get("after") or {}
        temps = measured.get("temperatures") or {}
        view.temperatures = ", ".join(f"fold {k}: {v:.2f}" for k, v in temps.items())
        view.calibration = Table(
            ["class", "ECE", "ECE, temperature-scaled", "Brier", "Brier, temperature-scaled"],
            [
                [c, r["ece"], (after.get(c) or {}).get("ece"), r["brier"], (after.get(c) or {}).get("brier")]
                for c, r in measured["before"].items()
            ],
        )
        view.reliability = _figure(figures.get("reliability"), lambda: reliability_figure(name, measured))


def _operating_points_section(view: Clinical, record: dict) -> None:
    """Thresholds for the configured sensitivity and specificity targets, on test."""
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


def _patient_level_section(view: Clinical, record: dict) -> None:
    """Per image against per patient."""
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


def reference_view(reference: ReferenceSettings | dict, every: dict) -> ReferenceView | None:
    """The study's published figures beside this run's: study / this run, and the difference."""
    reference = ReferenceSettings.of(reference)
    rows = []
    for name, quantities in (reference.experiments or {}).items():
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
    return ReferenceView(reference.study, reference.source, table)


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
    shown = [c for c in per_fold.columns if c.startswith(("train.", "val.", "test.")) and ".auroc." not in c]
    stats = summary["statistics"]
    order = ["count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    record = json.loads(Path(files["clinical"]).read_text()) if files.get("clinical") else None
    figures = {k: files[k] for k in ("forest", "reliability") if files.get(k)}
    return ExperimentView(
        name=name,
        best=best,
        headline=_headline(per_fold, ensemble),
        per_fold=_per_fold_table(per_fold),
        across=Table(["metric", *order], [[c, *[stats[c][s] for s in order]] for c in shown]),
        per_class=_per_class_table(summary, ensemble, classes, task),
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


def _headline(per_fold: pd.DataFrame, ensemble: dict | None) -> str:
    """The validation AUROC across folds and the fold ensemble's test AUROC, in one line."""
    val = per_fold.get("val.auroc_macro")
    line = (
        f"validation AUROC {val.mean():.3f} ± {val.std():.3f}"
        if val is not None and len(val) > 1 and val.notna().all()
        else ""
    )
    if ensemble and ensemble.get("auroc_macro") is not None:
        ci = ensemble.get("ci95", {}).get("auroc_macro") or [None, None]
        line += ("; " if line else "") + f"ensemble test AUROC {_with_ci(ensemble['auroc_macro'], *ci)}"
    return line


def _per_fold_table(per_fold: pd.DataFrame) -> Table:
    """One row per fold (and seed, with repeats): the headline metrics and the training's cost."""
    headline = [f"train.{m}" for m in ("auroc_macro", "accuracy") if f"train.{m}" in per_fold.columns] + [
        f"{part}.{m}"
        for part in ("val", "test")
        for m in ("auroc_macro", "accuracy", "balanced_accuracy", "f1_macro")
        if f"{part}.{m}" in per_fold.columns
    ]
    seeded = "seed" in per_fold and per_fold["seed"].max() > 0  # repeats: each fold trained with R seeds
    return Table(
        ["fold", *(["seed"] if seeded else []), *headline, "best epoch", "epochs", "s/epoch", "parameters", "train s"],
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
    )


def _per_class_table(summary: dict, ensemble: dict | None, classes: list[str], task: str) -> Table:
    """AUROC per class across folds and for the fold ensemble; CheXNet's beside them for NIH's 14."""
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
    return Table([*heads, "CheXNet (Rajpurkar 2017)"] if reference else heads, rows, left=3)


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


def _compression_headers(largest: int) -> list[str]:
    return [
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


def _compression_row(r, largest: int) -> list:
    """One variant's row: each measure's mean ± std over its folds."""
    return [
        r["variant"],
        r["method"],
        _mean_pm(r, "ratio.size", 2),
        _mean_pm(r, "ratio.tensor_size", 2),
        _mean_pm(r, "compressed.ratio", 2),
        _mean_pm(r, "sparsity", 3),
        _mean_pm(r, "variant.latency_ms_b1", 2),
        _mean_pm(r, "base.latency_ms_b1", 2),
        _mean_pm(r, "ratio.speedup_b1", 2),
        _mean_pm(r, f"ratio.speedup_b{largest}", 2),
        _mean_pm(r, "ratio.speedup_vs_compiled_b1", 2),
        _mean_pm(r, "variant.images_per_s", 0),
        _mean_pm(r, "delta.test.auroc_macro", 4),
        _mean_pm(r, "agreement.label_agreement", 3),
        r.get("oof.auroc_macro"),
        r.get("base.oof.auroc_macro"),
    ]


def compression_view(
    variants: dict[str, tuple[pd.DataFrame, pd.DataFrame]], compression: CompressionSettings | dict
) -> CompressionView:
    """``variants``: experiment -> (per-fold table, summary) of its compressed variants;
    ``compression``: the ``compression`` settings they were measured with."""
    compression = CompressionSettings.of(compression)
    latency = compression.latency
    largest = max(latency.batch_sizes or [32])
    headers = _compression_headers(largest)
    experiments = []
    for name, (per_fold, summary) in variants.items():
        rows = [_compression_row(r, largest) for _, r in summary.iterrows()]
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
        threads=compression.threads,
        repeats=latency.repeats,
        warmup=latency.warmup,
        experiments=experiments,
    )


def provenance_view(config: dict, timings: pd.DataFrame, repo: Path | None, recipe: Table | None = None) -> Provenance:
    import snakemake
    import torch
    import torchvision

    from medfold import __version__

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
        ["medfold", __version__],
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
