"""The report page: ``gather`` reads the result files into views, ``render`` lays them out with
the Jinja2 templates (autoescaping on), and the report rule's job."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, in jobs and tests alike
import jinja2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from medfold.core.files import Outputs  # noqa: E402
from medfold.report._constants import TEMPLATES  # noqa: E402
from medfold.report.dataset import dataset_view, plan_view, split_view  # noqa: E402
from medfold.report.experiments import (
    comparisons_table,
    compression_view,
    cv_tests_table,
    experiment_view,
    experiments_table,
    explanations_view,
    grid_view,
    provenance_view,
    recipe_table,
    reference_view,
)
from medfold.report.figures import read_timings  # noqa: E402
from medfold.report.helpers import _ci, _count, _pixels, _with_ci, file_data_url, fmt, png_data_url  # noqa: E402
from medfold.report.inputs import ReportInputs  # noqa: E402
from medfold.report.views import CardView, ExternalView, LabelAuditView, Picture, Report, Table  # noqa: E402
from medfold.settings.sections import ReportSettings  # noqa: E402


# ----------------------------------------------------------------------------- the page
def gather(inputs: ReportInputs | dict, config: ReportSettings | dict, repo: Path | None = None) -> Report:
    """Every view of the page from the result files ``inputs`` names (a ``ReportInputs``, or a
    dict of its shape); ``config``: the whole config (or its ``ReportSettings``)."""
    from medfold.core.privacy import shareable_view
    from medfold.data.index.io import read_index

    inputs = ReportInputs.of(inputs)
    config = ReportSettings.of(config)
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
            config.grids.rank_by,
            config.grids.top_k,
            config.chosen_folds.get(name),
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
        split=split_view(split_summary, check, index_report),
        explanations=explanations,
        compression=compression_view(variants, config.compression) if variants else None,
        provenance=provenance_view(config.raw, read_timings(inputs.benchmarks), repo, recipe_table(inputs.experiments)),
        reference=reference_view(config.reference, every),
        externals=[external_view(name, files) for name, files in inputs.externals.items()],
        cards=[card_view(name, files.model_card) for name, files in inputs.experiments.items() if files.model_card],
        plan=plan_view(inputs.plan) if inputs.plan else None,
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


def _card_facts(c: dict) -> list[list[str]]:
    """The card's text sections, one row per field: (section, field, text)."""
    d, use, m, train = c["model_details"], c["intended_use"], c["metrics"], c["training_data"]
    held = c["evaluation_data"]["held_out_test_set"]
    export = d.get("export") or {}
    return [
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


def card_view(name: str, path) -> CardView:
    """The model card's sections as tables; every text is escaped by the template."""
    c = json.loads(Path(path).read_text())
    q = c["quantitative_analyses"]
    facts = _card_facts(c)
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


def _threshold_rows(r: dict) -> list[list]:
    """Per class: the internal threshold on the internal test set and on the external data, and
    the threshold re-chosen on the external data."""
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
    return thr_rows


def _external_note(r: dict, external: dict, recal: dict) -> str:
    """What was validated, the copies found and what became of them, and the recalibration."""
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
    return note


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
    measured = r["calibration"]
    recal = r.get("recalibration") or {}
    cal_rows = [
        [
            c,
            measured["internal"][c]["ece"],
            measured["external"][c]["ece"],
            (recal.get("before") or {}).get(c, {}).get("ece"),
            (recal.get("after") or {}).get(c, {}).get("ece"),
        ]
        for c in measured["internal"]
    ]
    thr_rows = _threshold_rows(r)
    note = _external_note(r, external, recal)
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
