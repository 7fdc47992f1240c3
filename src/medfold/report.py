"""One self-contained HTML page from the result files alone: no training, no model loading.

Figures are inline SVG (matplotlib) or PNG data URLs, styles are inline, and the page asks no
other host for anything, so it reads the same offline or mailed as one file. Every string that
comes from a dataset (file names, class names, patient IDs, config values) is escaped.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import platform
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from . import hardware  # noqa: E402
from .metrics import targets_for  # noqa: E402

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
STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0 auto;max-width:1180px;
padding:0 24px 48px;color:#1b1b1b;line-height:1.45}
h1{border-bottom:3px solid #0072B2;padding-bottom:6px}h2{margin-top:40px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:10px 0 18px;font-size:13px}th,td{border:1px solid #d0d0d0;padding:3px 8px;
text-align:right}th{background:#f2f4f7}td.l,th.l{text-align:left}tr.best td{background:#e3f1e6;font-weight:600}
.verdict-ok{color:#00704a;font-weight:700}.verdict-bad{color:#b00020;font-weight:700}
.figs{display:flex;flex-wrap:wrap;gap:12px}.thumbs img{width:96px;height:96px;margin:2px;image-rendering:auto}
.nd .thumbs{display:flex;gap:8px}.nd figure{margin:0;text-align:center;font-size:12px}
.nd{border-left:3px solid #D55E00;padding-left:10px;margin:10px 0}
pre{background:#f6f8fa;padding:10px;overflow-x:auto;font-size:12px}nav a{margin-right:12px}
.note{color:#555;font-size:13px}.scroll{overflow-x:auto;max-width:100%}
details{margin:12px 0;padding:4px 10px;border:1px solid #ddd;border-radius:4px}summary{cursor:pointer}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return esc(value)


def table(headers: list[str], rows: list[list], left: int = 1, classes: list[str] | None = None) -> str:
    """An HTML table; the first ``left`` columns are left-aligned text. Every cell is escaped."""
    head = "".join(f'<th class="l">{esc(h)}</th>' if i < left else f"<th>{esc(h)}</th>" for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f'<td class="l">{fmt(v)}</td>' if i < left else f"<td>{fmt(v)}</td>" for i, v in enumerate(row))
        cls = f' class="{classes[r]}"' if classes and classes[r] else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: inline SVG needs neither


def png_data_url(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ----------------------------------------------------------------------------- sections
def dataset_section(index_report: dict, split_summary: dict, index: pd.DataFrame, cache: np.ndarray | None) -> str:
    r = index_report
    parts = [
        f'<h2 id="dataset">Dataset</h2><p>{esc(r["dataset"])}: {esc(r["format"])}, {esc(r["task"])} task, '
        f"{len(r['classes'])} classes.</p>"
    ]
    parts.append(
        table(
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
    )
    left_out = r.get("rows_left_out") or {}
    if left_out:
        parts.append(
            "<h3>Rows left out</h3>" + table(["reason", "rows"], [[k, v] for k, v in left_out.items()], left=1)
        )
    mapping = r.get("label_map") or {}
    if mapping.get("mapped"):
        parts.append(
            "<h3>Labels mapped (dataset.label_map)</h3>"
            + table(["raw label -> class", "labels"], [[k, v] for k, v in mapping["mapped"].items()], left=1)
            + (
                "<p>Raw labels the map does not name ("
                f"{'sent to ' + esc(mapping['unmapped_label']) if mapping['unmapped_label'] else 'dropped'}): "
                f"{esc(', '.join(f'{k} ({v})' for k, v in mapping['unmapped_raw_labels'].items()) or 'none')}.</p>"
            )
        )
    if r.get("listed_more_than_once"):
        parts.append(
            "<h3>Files listed more than once</h3><p>Each is one image; its patients were joined into one "
            "group.</p>"
            + table(
                ["image", "table lines", "patients", "labels"],
                [
                    [x["image_id"], ", ".join(map(str, x["lines"])), ", ".join(x["patients"]), ", ".join(x["labels"])]
                    for x in r["listed_more_than_once"]
                ],
                left=4,
            )
        )
    for warning in r["warnings"]:
        parts.append(f'<p class="verdict-bad">{esc(warning)}</p>')
    if r["skipped"]:
        parts.append(
            "<h3>Skipped images</h3>"
            + table(["file", "reason"], [[s["path"], s["reason"]] for s in r["skipped"]], left=2)
        )
    sets = split_summary["sets"]
    names = list(sets)
    rows = [[c, *[sets[n]["images_per_class"][c] for n in names]] for c in split_summary["classes"]]
    rows.append(["(no finding)", *[sets[n]["images_without_finding"] for n in names]])
    rows.append(["images", *[sets[n]["images"] for n in names]])
    rows.append(["patients", *[sets[n]["patients"] for n in names]])
    parts.append("<h3>Images per class per set</h3>" + table(["class", *names], rows))
    parts.append(near_duplicates_block(r.get("near_duplicates"), index, cache))
    if cache is not None:
        parts.append("<h3>Examples</h3>" + thumbnails(index, r["classes"], cache))
    return "".join(parts)


def _thumb(cache: np.ndarray, row: int, caption: str) -> str:
    pixels = cache[row][0] if cache.shape[1] == 1 else np.moveaxis(cache[row], 0, 2)
    return f'<img alt="{esc(caption)}" title="{esc(caption)}" src="{png_data_url(np.asarray(pixels))}">'


def near_duplicates_block(near: dict | None, index: pd.DataFrame, cache: np.ndarray | None, shown: int = 24) -> str:
    """The near-duplicate clusters that join patients or source folders, each as its images side
    by side with the distance, the transform found, the patients and the folders."""
    if not near:
        return ""
    if not near["searched"]:
        return f"<h3>Near-duplicates</h3><p>Not searched: {esc(near['why'])}.</p>"
    joining = [c for c in near["cluster_list"] if len(c["patients"]) > 1 or len(c["source_splits"]) > 1]
    parts = [
        "<h3>Near-duplicates</h3>",
        f"<p>{near['pairs']} pairs within {near['max_distance']} of {near['fingerprint_bits']} fingerprint bits "
        f"(the best of 8 orientations) form {near['clusters']} clusters of {near['images']} images; "
        f"<b>{near['clusters_joining_patients_or_sources']}</b> join different patients or source folders and were "
        f"made one group of the split. Distances found: "
        f"{esc(', '.join(f'{k}: {v}' for k, v in near['distances'].items()) or 'none')}.</p>",
    ]
    row_of = {image: i for i, image in enumerate(index["image_id"])}
    for cluster in joining[:shown]:
        pictures = ""
        if cache is not None:
            pictures = "".join(
                f"<figure>{_thumb(cache, row_of[image], image)}<figcaption>{esc(image)}</figcaption></figure>"
                for image in cluster["images"]
                if image in row_of
            )
        pairs = "; ".join(
            f"{esc(p['b'])} is {esc(p['a'])} {esc(p['how'])}, distance {p['distance']}"
            + (" (identical pixels)" if p["exact"] else "")
            for p in cluster["pairs"][:6]
        )
        parts.append(
            f'<div class="nd"><p><b>The same radiograph</b> under patients {esc(", ".join(cluster["patients"]))}'
            + (f" in folders {esc(', '.join(cluster['source_splits']))}" if cluster["source_splits"] else "")
            + f'.<br>{pairs}</p><div class="thumbs">{pictures}</div></div>'
        )
    if len(joining) > shown:
        parts.append(f"<p>… and {len(joining) - shown} more clusters (index_report.json lists them all).</p>")
    return "".join(parts)


def thumbnails(index: pd.DataFrame, classes: list[str], cache: np.ndarray, per_class: int = 4) -> str:
    out = ['<div class="thumbs">']
    for c in classes:
        rows = np.flatnonzero([c in labels for labels in index["labels"]])[:per_class]
        imgs = "".join(
            f'<img alt="{esc(c)}: {esc(index["image_id"].iat[i])}" title="{esc(index["image_id"].iat[i])}" '
            f'src="{png_data_url(cache[i][0] if cache.shape[1] == 1 else np.moveaxis(cache[i], 0, 2))}">'
            for i in rows
        )
        out.append(f"<p><b>{esc(c)}</b><br>{imgs}</p>")
    return "".join(out) + "</div>"


def split_section(split_summary: dict, check: dict) -> str:
    ok = check["verdict"] == "leak-free"
    parts = [
        '<h2 id="split">Split</h2>',
        f"<p>{esc(split_summary['test_method'])}; {split_summary['folds']} folds by patient, "
        f"seed {split_summary['seed']}.</p>",
        f'<p>Leakage check: <span class="{"verdict-ok" if ok else "verdict-bad"}">{esc(check["verdict"])}</span> — '
        f"{check['images_checked']} images, {check['patients_crossing_sets']} patients, "
        f"{check['duplicate_hashes_crossing_sets']} duplicate images and "
        f"{check.get('near_duplicate_clusters_crossing_sets', 0)} near-duplicate clusters crossing sets.</p>",
    ]
    sets = split_summary["sets"]
    rows = [
        [n, s["images"], s["patients"], max(abs(v) for v in s["prevalence_minus_overall_pp"].values())]
        for n, s in sets.items()
    ]
    parts.append(table(["set", "images", "patients", "largest prevalence deviation (pp)"], rows))
    if split_summary["source_leaks"]:
        parts.append(
            "<p>The dataset's own split put these patients or copies of one radiograph on both sides:</p>"
            + table(
                ["patients", "test images", "other images", "near-duplicates"],
                [
                    [
                        ", ".join(x["patients"]),
                        ", ".join(x["test_images"]),
                        ", ".join(x["other_images"]),
                        "; ".join(x.get("near_duplicates", [])),
                    ]
                    for x in split_summary["source_leaks"]
                ],
                left=4,
            )
        )
    dropped = split_summary.get("dropped_copies", {})
    if dropped.get("count"):
        parts.append(
            f"<p>{dropped['count']} copies set aside ({esc(dropped['rule'])}):</p>"
            + table(
                ["image", "fold", "role it had"],
                [[d["image_id"], d["fold"], d["role"]] for d in dropped["images"]],
                left=3,
            )
        )
    return "".join(parts)


def experiments_section(comparison: pd.DataFrame) -> str:
    metrics = ["val.auroc_macro", "test.auroc_macro", "test.balanced_accuracy", "test.f1_macro"]
    headers = ["experiment", *[f"{m} (mean ± std)" for m in metrics], "ensemble test AUROC [95% CI]", "train s/fold"]
    rows, marks = [], []
    for _, r in comparison.iterrows():
        cells = [r["experiment"] + (" ★" if r["best"] else "")]
        cells += [
            f"{r[f'{m}.mean']:.3f} ± {r[f'{m}.std']:.3f}" if pd.notna(r.get(f"{m}.mean")) else "–" for m in metrics
        ]
        ci = (
            f" [{r['ensemble_test.auroc_macro.ci_low']:.3f}, {r['ensemble_test.auroc_macro.ci_high']:.3f}]"
            if pd.notna(r.get("ensemble_test.auroc_macro.ci_low"))
            else ""
        )
        cells.append(f"{r['ensemble_test.auroc_macro']:.3f}{ci}" if pd.notna(r["ensemble_test.auroc_macro"]) else "–")
        cells.append(r.get("train_seconds.mean"))
        rows.append(cells)
        marks.append("best" if r["best"] else "")
    return (
        '<h2 id="experiments">Experiments</h2><p class="note">★ best mean validation AUROC (the test set plays no '
        "part in choosing).</p>" + table(headers, rows, left=6, classes=marks)
    )


def _ci(low, high, digits: int = 3) -> str:
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return "–"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _with_ci(value, low, high) -> str:
    if value is None or pd.isna(value):
        return "–"
    return f"{value:.3f} {_ci(low, high)}" if low is not None and not pd.isna(low) else f"{value:.3f}"


def comparisons_section(comparisons: pd.DataFrame) -> str:
    """Paired comparisons on the same test images: DeLong per class, bootstrap for the macro."""
    if comparisons is None or not len(comparisons):
        return ""
    rows = [
        [
            r["a"],
            r["b"],
            r["class"],
            r["auroc_a"],
            r["auroc_b"],
            r["difference"],
            "–" if pd.isna(r["delong_p"]) else f"{r['delong_p']:.4f}",
            _ci(r["delong_ci_low"], r["delong_ci_high"]),
            _ci(r["bootstrap_ci_low"], r["bootstrap_ci_high"]),
        ]
        for _, r in comparisons.iterrows()
    ]
    return (
        '<h3 id="comparisons">Paired comparisons on the same test images</h3><p class="note">AUROC of a minus '
        "AUROC of b. DeLong's test per class (two-sided p, asymptotic 95% interval); for the macro AUROC the "
        "patient-bootstrap interval only. An interval that excludes 0 is a difference the test set "
        'supports.</p><div class="scroll">'
        + table(
            ["a", "b", "class", "AUROC a", "AUROC b", "difference", "DeLong p", "DeLong 95% CI", "bootstrap 95% CI"],
            rows,
            left=3,
        )
        + "</div>"
    )


def _figure(path, draw) -> str:
    """A figure the rule already wrote as PNG, embedded as it is; drawn here (SVG) without one."""
    if path and Path(path).is_file():
        data = base64.b64encode(Path(path).read_bytes()).decode()
        return f'<img style="max-width:100%" alt="{esc(Path(path).name)}" src="data:image/png;base64,{data}">'
    return svg(draw())


def clinical_section(name: str, record: dict, is_open: bool, figures: dict | None = None) -> str:
    """Subgroups (table and forest plot), calibration, operating points and patient-level
    results of one experiment, from its clinical.json, in a collapsible block."""
    from . import clinical

    if not record or record.get("skipped"):
        return f'<p class="note">Clinical evaluation: {esc((record or {}).get("skipped", "not available"))}.</p>'
    parts = [
        f'<p class="note">Evaluated on the held-out test set: {esc(record["test_source"])}; intervals: '
        f"{record['bootstrap']['resamples']} bootstrap resamples of patients.</p>"
    ]
    subgroups = pd.DataFrame(record.get("subgroups") or [])
    if len(subgroups):
        classes = [m.split(".", 1)[1] for m in dict.fromkeys(subgroups["metric"]) if m.startswith("auroc.")]
        rows = []
        for (column, group), part in subgroups.groupby(["subgroup", "group"], sort=False):
            first = part.iloc[0]
            by = part.set_index("metric")
            if first["too_small"]:
                rows.append(
                    [
                        column,
                        group,
                        int(first["images"]),
                        int(first["patients"]),
                        "too small",
                        *["" for _ in classes],
                        "",
                        "",
                    ]
                )
                continue
            cell = lambda m: _with_ci(*by.loc[m, ["value", "ci_low", "ci_high"]]) if m in by.index else "–"  # noqa: E731
            sens = [by.loc[f"sensitivity.{c}", "value"] for c in classes if f"sensitivity.{c}" in by.index]
            spec = [by.loc[f"specificity.{c}", "value"] for c in classes if f"specificity.{c}" in by.index]
            rows.append(
                [
                    column,
                    group,
                    int(first["images"]),
                    int(first["patients"]),
                    cell("auroc_macro"),
                    *[by.loc[f"auroc.{c}", "value"] if f"auroc.{c}" in by.index else None for c in classes],
                    _mean(sens),
                    _mean(spec),
                ]
            )
        parts.append(
            "<h4>Subgroups</h4>"
            + '<div class="scroll">'
            + table(
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
            + "</div>"
        )
        forest = _figure((figures or {}).get("forest"), lambda: clinical.forest_figure(name, subgroups))
        parts.append('<div class="figs">' + forest + "</div>")
    calib = record.get("calibration") or {}
    if calib.get("before"):
        after = calib.get("after") or {}
        temps = calib.get("temperatures") or {}
        rows = [
            [c, r["ece"], (after.get(c) or {}).get("ece"), r["brier"], (after.get(c) or {}).get("brier")]
            for c, r in calib["before"].items()
        ]
        parts.append(
            "<h4>Calibration</h4>"
            + (
                f'<p class="note">Temperature per fold (fitted on its validation predictions): '
                f"{esc(', '.join(f'fold {k}: {v:.2f}' for k, v in temps.items()))}.</p>"
                if temps
                else ""
            )
            + table(["class", "ECE", "ECE, temperature-scaled", "Brier", "Brier, temperature-scaled"], rows)
            + '<div class="figs">'
            + _figure((figures or {}).get("reliability"), lambda: clinical.reliability_figure(name, calib))
            + "</div>"
        )
    points = pd.DataFrame(record.get("operating_points") or [])
    if len(points):
        rows = []
        for _, r in points.iterrows():
            target = "Youden" if r["target"] == "youden" else f"{r['target']} ≥ {r['target_value']:.2f}"
            best = r.get("test_roc.sensitivity") if r["target"] == "specificity" else r.get("test_roc.specificity")
            best_ci = (
                _ci(r.get("test_roc.sensitivity.ci_low"), r.get("test_roc.sensitivity.ci_high"))
                if r["target"] == "specificity"
                else _ci(r.get("test_roc.specificity.ci_low"), r.get("test_roc.specificity.ci_high"))
            )
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
        parts.append(
            '<h4>Operating points</h4><p class="note">Thresholds chosen on the pooled out-of-fold '
            "(validation) predictions, then applied unchanged to the test set; the last column is the best "
            "the test set's own ROC curve allows at the target (chosen on the test set: optimistic).</p>"
            + '<div class="scroll">'
            + table(
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
            + "</div>"
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
        parts.append(
            f'<h4>Per patient</h4><p class="note">A patient\'s score: the {esc(level["aggregate"])} of their '
            "images' probabilities; a patient is positive for a class when any image is. Thresholds chosen on "
            "out-of-fold predictions of the same unit.</p>"
            + table(["unit", "rows", "patients", "macro AUROC [95% CI]", "balanced accuracy", "F1 macro"], rows)
        )
    return (
        f"<details{' open' if is_open else ''}><summary><b>Clinical evaluation of {esc(name)}</b>: subgroups, "
        f"calibration, operating points, per patient</summary>{''.join(parts)}</details>"
    )


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not pd.isna(v)]
    return float(np.mean(values)) if values else None


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


def curves_figure(name: str, histories: dict[int, pd.DataFrame]) -> str:
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for k, (fold, h) in enumerate(sorted(histories.items())):
        color = PALETTE[k % len(PALETTE)]
        loss_ax.plot(h["epoch"], h["train_loss"], color=color, lw=1.2, label=f"fold {fold} train")
        loss_ax.plot(h["epoch"], h["val_loss"], color=color, lw=1.2, ls="--", label=f"fold {fold} validation")
        auc_ax.plot(h["epoch"], h["val_auroc_macro"], color=color, lw=1.2, label=f"fold {fold}")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss (solid: train, dashed: validation)")
    auc_ax.set(xlabel="epoch", ylabel="macro AUROC", title="validation macro AUROC")
    loss_ax.legend(fontsize=7, ncol=2)
    auc_ax.legend(fontsize=7)
    fig.suptitle(f"{name}: training curves")
    return svg(fig)


def experiment_section(
    name: str,
    per_fold: pd.DataFrame,
    summary: dict,
    ensemble: dict | None,
    predictions: pd.DataFrame,
    ensemble_predictions: pd.DataFrame | None,
    histories: dict[int, pd.DataFrame],
    clinical: dict | None = None,
    best: bool = False,
    clinical_figures: dict | None = None,
) -> str:
    classes, task = summary["classes"], summary["task"]
    parts = [f'<h2 id="exp-{esc(name)}">Experiment: {esc(name)}</h2>']
    headline = [
        f"{part}.{m}"
        for part in ("val", "test")
        for m in ("auroc_macro", "accuracy", "balanced_accuracy", "f1_macro")
        if f"{part}.{m}" in per_fold.columns
    ]
    parts.append(
        "<h3>Per fold</h3>"
        + table(
            ["fold", *headline, "best epoch", "train s"],
            [
                [int(r["fold"]), *[r[c] for c in headline], _count(r["best_epoch"]), r["train_seconds"]]
                for _, r in per_fold.iterrows()
            ],
        )
    )
    shown = [c for c in per_fold.columns if c.startswith(("val.", "test.")) and ".auroc." not in c]
    stats = summary["statistics"]
    order = ["count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    parts.append(
        "<h3>Across folds</h3>" + table(["metric", *order], [[c, *[stats[c][s] for s in order]] for c in shown])
    )
    reference = set(classes) <= set(CHEXNET_AUROC) and len(classes) >= 10
    heads = ["class", "validation AUROC (mean ± std)", "test AUROC (mean ± std)", "ensemble test AUROC", "95% CI"]
    if reference:
        heads.append("CheXNet (Rajpurkar 2017)")
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
        if reference:
            row.append(CHEXNET_AUROC.get(c))
        rows.append(row)
    parts.append("<h3>AUROC per class</h3>" + table(heads, rows, left=3))
    if ensemble:
        ci = ensemble["ci95"]
        parts.append(
            f"<h3>Ensemble of the {ensemble['models']} fold models on the held-out test set</h3>"
            + table(
                ["metric", "value", "95% CI (patient bootstrap)"],
                [
                    [m, ensemble.get(m), f"[{ci[m][0]:.3f}, {ci[m][1]:.3f}]" if ci.get(m) else "–"]
                    for m in ("auroc_macro", "accuracy", "balanced_accuracy")
                ]
                + [[m, ensemble.get(m), "–"] for m in ("f1_macro", "f1_weighted", "precision_macro", "recall_macro")],
            )
        )
        parts.append(
            "<h4>Classification report</h4>"
            + table(
                ["class", "precision", "recall", "f1-score", "support"],
                [
                    [
                        c,
                        *[ensemble["per_class"][c][k] for k in ("precision", "recall", "f1-score")],
                        int(ensemble["per_class"][c]["support"]),
                    ]
                    for c in classes
                ],
            )
        )
        parts.append(
            "<h4>Confusion matrices (rows: truth, columns: prediction)</h4>" + confusion_tables(ensemble, classes, task)
        )
    parts.append(
        '<div class="figs">'
        + roc_figure(
            name,
            predictions,
            ensemble_predictions if ensemble_predictions is not None else predictions.iloc[:0],
            classes,
            task,
        )
        + "</div>"
    )
    if histories:
        parts.append('<div class="figs">' + curves_figure(name, histories) + "</div>")
    if clinical is not None:
        parts.append(clinical_section(name, clinical, is_open=best, figures=clinical_figures))
    return "".join(parts)


def _count(value) -> str | None:
    return None if value is None or pd.isna(value) else str(int(value))


def grid_section(name: str, ranked: pd.DataFrame, rank_by: str, top_k: int) -> str:
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
    return (
        f'<h3 id="grid-{esc(name)}">Grid: {esc(name)}</h3><p class="note">{len(ranked)} combinations, ranked by '
        f"the mean validation {esc(rank_by.split('.', 1)[1])} across folds; the test column is shown, never used "
        f"to rank. The top {min(top_k, len(ranked))}:</p>"
        + table(
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
            classes=["best" if i == 0 else "" for i in range(len(rows))],
        )
    )


def explanation_section(name: str, records: list[str]) -> str:
    """Each fold's explained test images: the overlay PNGs with what they explain."""
    parts = [
        f'<h3 id="explain-{esc(name)}">Explanations: {esc(name)}</h3><p class="note">For test images of each '
        "class: Grad-CAM on the last convolutional block (warm colours: regions that raise the class's score) "
        "and LIME on superpixels (blue: superpixels that raise it, red: that lower it).</p>"
    ]
    for path in records:
        record = json.loads(Path(path).read_text())
        figures = []
        for item in record["images"]:
            data = base64.b64encode((Path(path).parent / item["overlay"]).read_bytes()).decode()
            caption = (
                f"{esc(item['image_id'])}: explains <b>{esc(item['explained_class'])}</b> "
                f"(p = {item['probabilities'][item['explained_class']]:.2f}); true: "
                f"{esc(', '.join(item['true_labels']) or 'no finding')}; predicted: "
                f"{esc(', '.join(item['predicted_labels']) or 'no finding')}"
            )
            figures.append(
                f'<figure style="margin:4px;width:560px"><img style="width:100%" alt="{esc(item["image_id"])}" '
                f'src="data:image/png;base64,{data}"><figcaption class="note">{caption}</figcaption></figure>'
            )
        parts.append(f'<h4>Fold {int(record["fold"])}</h4><div class="figs">{"".join(figures)}</div>')
    return "".join(parts)


def _mean_pm(row: pd.Series, column: str, digits: int = 3, scale: float = 1.0) -> str:
    mean, std = row.get(f"{column}.mean"), row.get(f"{column}.std")
    if mean is None or pd.isna(mean):
        return "–"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


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


def compression_section(variants: dict[str, tuple[pd.DataFrame, pd.DataFrame]], config: dict) -> str:
    """``variants``: experiment -> (per-fold table, summary) of its compressed variants."""
    latency = config.get("compression", {}).get("latency", {})
    largest = max(latency.get("batch_sizes", [32]))
    parts = [
        '<h2 id="compression">Compression</h2>',
        f'<p class="note">Every variant is saved, loaded back from its file and evaluated on the CPU '
        f"beside its base model in the same job ({esc(config.get('compression', {}).get('threads', '?'))} "
        f"threads). Latency: median of {esc(latency.get('repeats', '?'))} passes after "
        f"{esc(latency.get('warmup', '?'))} warm-up passes. The base model runs in fp32 eager mode; "
        f"int8 variants run compiled by inductor with freezing, and are also compared with the base "
        f"model compiled the same way. Sizes are bytes on disk (the variant file holds its graph too; "
        f'"tensors" counts the weights alone). Values are mean ± std over folds.</p>',
    ]
    for name, (per_fold, summary) in variants.items():
        rows = []
        for _, r in summary.iterrows():
            rows.append(
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
            )
        isas = sorted({str(v) for v in per_fold.get("cpu.isa", pd.Series(dtype=str)).dropna()})
        models = sorted({str(v) for v in per_fold.get("cpu.model", pd.Series(dtype=str)).dropna()})
        parts.append(
            f'<h3>{esc(name)}</h3><p class="note">Measured on {esc(", ".join(models) or "?")}, '
            f"ISA {esc(', '.join(isas) or '?')}: int8 kernels differ per ISA (AVX2, AVX-512 VNNI, AMX).</p>"
            + table(
                [
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
                ],
                rows,
                left=2,
            )
        )
        parts.append('<div class="figs">' + compression_figure(name, per_fold) + "</div>")
    return "".join(parts)


def _pm(stat: dict) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat.get("std") is not None else f"{stat['mean']:.3f}"


def confusion_tables(result: dict, classes: list[str], task: str) -> str:
    if task == "multilabel":
        return (
            '<div class="figs">'
            + "".join(
                f"<div><b>{esc(c)}</b>"
                + table(
                    ["", "predicted no", "predicted yes"],
                    [["no", *result["confusion"][c][0]], ["yes", *result["confusion"][c][1]]],
                )
                + "</div>"
                for c in classes
            )
            + "</div>"
        )
    return table(["truth \\ prediction", *classes], [[c, *row] for c, row in zip(classes, result["confusion"])])


def provenance_section(config: dict, timings: pd.DataFrame, repo: Path | None) -> str:
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
    rows = [
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
    parts = ['<h2 id="provenance">Provenance</h2>', table(["", ""], rows, left=2)]
    if len(timings):
        parts.append(
            "<h3>Wall time per job</h3>"
            + table(["job", "seconds", "max RSS (MB)"], timings[["job", "s", "max_rss"]].values.tolist())
        )
    parts.append("<h3>Resolved configuration</h3><pre>" + esc(yaml.safe_dump(config, sort_keys=False)) + "</pre>")
    return "".join(parts)


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


def render(inputs: dict, config: dict, repo: Path | None = None) -> str:
    """``inputs``: paths of index, index_report, split_summary, split_check, cache (optional),
    comparison, and per experiment its per_fold, summary, ensemble, predictions (per fold),
    ensemble_predictions, histories (per fold), plus benchmark files."""
    from .index import read_index

    index, _ = read_index(inputs["index"])
    index_report = json.loads(Path(inputs["index_report"]).read_text())
    split_summary = json.loads(Path(inputs["split_summary"]).read_text())
    check = json.loads(Path(inputs["split_check"]).read_text())
    cache = np.load(inputs["cache"], mmap_mode="r") if inputs.get("cache") else None
    body = [dataset_section(index_report, split_summary, index, cache), split_section(split_summary, check)]
    nav = ['<a href="#dataset">Dataset</a>', '<a href="#split">Split</a>']
    best = set()
    if inputs.get("comparison"):
        comparison = pd.read_csv(inputs["comparison"])
        best = set(comparison.loc[comparison["best"], "experiment"])
        body.append(experiments_section(comparison))
        if inputs.get("comparisons"):
            body.append(comparisons_section(pd.read_csv(inputs["comparisons"])))
        nav.append('<a href="#experiments">Experiments</a>')
    # ensembles across experiments are shown as experiments are, without training curves
    for name, files in {**inputs.get("experiments", {}), **inputs.get("ensembles", {})}.items():
        summary = json.loads(Path(files["summary"]).read_text())
        ensemble = json.loads(Path(files["ensemble"]).read_text())
        predictions = pd.concat([pd.read_parquet(p) for p in files["predictions"]], ignore_index=True)
        ens_pred = pd.read_parquet(files["ensemble_predictions"]) if files.get("ensemble_predictions") else None
        ens_pred = ens_pred if ens_pred is not None and len(ens_pred) else None
        histories = {int(Path(p).parent.name.split("_")[1]): pd.read_csv(p) for p in files["histories"]}
        record = json.loads(Path(files["clinical"]).read_text()) if files.get("clinical") else None
        body.append(
            experiment_section(
                name,
                pd.read_csv(files["per_fold"]),
                summary,
                ensemble,
                predictions,
                ens_pred,
                histories,
                record,
                best=name in best,
                clinical_figures={k: files[k] for k in ("forest", "reliability") if files.get(k)},
            )
        )
        nav.append(f'<a href="#exp-{esc(name)}">{esc(name)}</a>')
    if inputs.get("grids"):
        body.append(
            '<h2 id="grids">Hyperparameter grids</h2>'
            + "".join(
                grid_section(name, pd.read_csv(path), config["grids"]["rank_by"], config["grids"]["top_k"])
                for name, path in inputs["grids"].items()
            )
        )
        nav.append('<a href="#grids">Grids</a>')
    explained = {
        name: files["explanations"]
        for name, files in inputs.get("experiments", {}).items()
        if files.get("explanations")
    }
    if explained:
        body.append(
            '<h2 id="explanations">Explanations</h2>'
            + "".join(explanation_section(name, records) for name, records in explained.items())
        )
        nav.append('<a href="#explanations">Explanations</a>')
    variants = {
        name: (pd.read_csv(files["variants"]["table"]), pd.read_csv(files["variants"]["summary"]))
        for name, files in inputs.get("experiments", {}).items()
        if files.get("variants")
    }
    if variants:
        body.append(compression_section(variants, config))
        nav.append('<a href="#compression">Compression</a>')
    body.append(provenance_section(config, read_timings(inputs.get("benchmarks", [])), repo))
    nav.append('<a href="#provenance">Provenance</a>')
    title = f"medfold report: {esc(index_report['dataset'])}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" '
        f"content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body><h1>{title}</h1><nav>{''.join(nav)}</nav>{''.join(body)}</body></html>\n"
    )
