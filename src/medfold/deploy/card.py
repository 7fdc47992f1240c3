"""The model card of an exported experiment (``model_card.json`` and ``model_card.md``), with the
sections of Mitchell et al., "Model Cards for Model Reporting" (FAT* 2019): model details,
intended use, factors, metrics, evaluation data, training data, quantitative analyses, ethical
considerations, caveats and recommendations.

Built from result files alone: the fold models' metrics.json, the experiment's cv/ files (the
fold ensemble on the held-out test set with patient-bootstrap intervals, subgroups, calibration,
operating points), the index and split reports, the split manifest's digest, and the export's own
record. The texts a workflow cannot know (intended use and users, out-of-scope uses, ethical
considerations, limitations) come from ``export.card`` in the config; where one is not given the
card says so instead of inventing it. Counts only: no image or patient identifier is written.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

NOT_GIVEN = "not stated in the config (export.card)"
CARD_FIELDS = ("intended_use", "intended_users", "out_of_scope", "ethical_considerations", "limitations")
SOFTWARE = ("torch", "torchvision", "onnx", "onnxruntime", "numpy", "scikit-learn", "pydicom", "snakemake")


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _software() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from medfold import __version__

    # the medfold that ran (a module's own src/ may differ from an installed one)
    found = {"python": platform.python_version(), "medfold": __version__}
    for name in SOFTWARE:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def split_digest(manifest: Path) -> str | None:
    """The ``# split_digest:`` line of the split manifest (medfold.split.write_manifest)."""
    if not manifest.exists():
        return None
    with manifest.open() as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            if line.startswith("# split_digest:"):
                return line.split(":", 1)[1].strip()
    return None


def read_notes(path) -> dict:
    """The card's texts from a YAML file (``medfold export --card``), checked like export.card."""
    import yaml

    from medfold.core.errors import ConfigError

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--card {path}: no such file")
    notes = yaml.safe_load(path.read_text()) or {}
    if not isinstance(notes, dict):
        raise ConfigError(f"--card {path}: expected a mapping of {', '.join(CARD_FIELDS)}")
    unknown = sorted(set(notes) - set(CARD_FIELDS))
    if unknown:
        raise ConfigError(f"--card {path}: {unknown} are not card fields (expected {', '.join(CARD_FIELDS)})")
    wrong = sorted(k for k, v in notes.items() if not isinstance(v, str))
    if wrong:
        raise ConfigError(f"--card {path}: {wrong} must be text")
    return notes


@dataclass(frozen=True)
class _Sources:
    """The result files a card is read from: the fold models' metrics, the fold ensemble's test
    result, the index and split reports, the clinical evaluation and the cross-validation summary."""

    exp: Path
    metrics: list
    ensemble: dict
    index: dict
    split_summary: dict
    clinical: dict
    summary: dict

    @classmethod
    def read(cls, exp: Path) -> _Sources:
        folds = sorted(exp.glob("fold_*/metrics.json"), key=lambda p: int(p.parent.name.split("_")[1]))
        if not folds:
            from medfold.core.errors import ConfigError

            raise ConfigError(f"{exp}: no fold_*/metrics.json; a model card needs a trained experiment")
        ensemble = _read(exp / "cv" / "ensemble_test.json") or {}
        if ensemble.get("members"):  # every seed of every fold the fold ensemble averages
            folds = [exp / member / "metrics.json" for member in ensemble["members"]]
        dataset_dir = exp.parent
        return cls(
            exp,
            [json.loads(p.read_text()) for p in folds],
            ensemble,
            _read(dataset_dir / "index_report.json") or {},
            _read(dataset_dir / "split_summary.json") or {},
            _read(exp / "cv" / "clinical.json") or {},
            _read(exp / "cv" / "summary.json") or {},
        )


def build(experiment_dir, notes: dict | None = None, export: dict | None = None) -> dict:
    """The card of the experiment in ``experiment_dir`` (results/<dataset>/<experiment>)."""
    src = _Sources.read(Path(experiment_dir))
    notes = {k: (notes or {}).get(k) or NOT_GIVEN for k in CARD_FIELDS}
    return {
        "model_details": _model_details(src, export),
        "intended_use": {k: notes[k] for k in ("intended_use", "intended_users", "out_of_scope")},
        "factors": {
            "subgroups": sorted({row["subgroup"] for row in src.clinical.get("subgroups", [])}),
            "note": "subgroups are the dataset table's own columns named in evaluation.subgroups",
        },
        "metrics": {
            "measures": ["AUROC (macro and per class)", "accuracy", "balanced accuracy", "macro F1"],
            "decision": src.ensemble.get("decision") or src.metrics[0].get("decision"),
            "thresholds": dict(zip(src.metrics[0]["classes"], src.ensemble.get("thresholds") or [])) or None,
            "thresholds_from": src.ensemble.get("threshold_source"),
            "intervals": "95 % patient-level bootstrap ({} resamples)".format(
                (src.ensemble.get("bootstrap") or {}).get("resamples")
            ),
        },
        "evaluation_data": {"held_out_test_set": _test_set(src.split_summary)},
        "training_data": _training_data(src),
        "quantitative_analyses": _quantitative_analyses(src),
        "ethical_considerations": notes["ethical_considerations"],
        "caveats_and_recommendations": notes["limitations"],
        "software": _software(),
        "split_digest": split_digest(src.exp.parent / "split_manifest.csv"),
    }


def _model_details(src: _Sources, export: dict | None) -> dict:
    metrics = src.metrics
    recorded = metrics[0]["settings"]  # the training settings metrics.json records (a result file)
    folds = len(set(m["fold"] for m in metrics))
    what = "one fold model"
    if len(metrics) > 1:
        what = f"fold ensemble: the mean of {len(metrics)} models' probabilities"
        if folds < len(metrics):
            what += f" ({folds} folds, each trained with several seeds)"
    return {
        "name": src.exp.name,
        "dataset": src.index.get("dataset", src.exp.parent.name),
        "architecture": recorded["model"],
        "parameters_per_model": metrics[0].get("parameters"),
        "models": len(metrics),
        "what": what,
        "task": metrics[0]["task"],
        "classes": metrics[0]["classes"],
        "input": (export or {}).get("input") or f"{recorded['image_size']} x {recorded['image_size']} px",
        "training": {
            "optimizer": recorded["optimizer"],
            "lr": recorded["lr"],
            "batch_size": recorded["batch_size"],
            "epochs_max": recorded["epochs"],
            "epochs_trained": [m.get("epochs_trained") for m in metrics],
            "pretrained": recorded.get("pretrained"),
            "seed": recorded["seed"],
        },
        "export": {k: export.get(k) for k in ("file", "bytes", "parity_max_abs_difference", "resize")}
        if export
        else None,
    }


def _test_set(split_summary: dict) -> dict:
    test = split_summary.get("sets", {}).get("test", {})
    return {
        "images": test.get("images"),
        "patients": test.get("patients"),
        "images_per_class": test.get("images_per_class"),
        "method": split_summary.get("test_method"),
    }


def _training_data(src: _Sources) -> dict:
    index, split_summary = src.index, src.split_summary
    near, duplicates = index.get("near_duplicates") or {}, index.get("duplicates") or {}
    cv_sets = {k: v for k, v in split_summary.get("sets", {}).items() if k.startswith("fold_")}
    return {
        "dataset": index.get("dataset", src.exp.parent.name),
        "format": index.get("format"),
        "images_indexed": index.get("images_indexed"),
        "images_excluded": index.get("images_skipped"),
        "patients": index.get("patients"),
        "classes": index.get("classes"),
        "images_per_class": index.get("images_per_class"),
        "cross_validation": {
            "folds": len(cv_sets),
            "images": sum(v.get("images", 0) for v in cv_sets.values()),
            "patients": sum(v.get("patients", 0) for v in cv_sets.values()),
        },
        "split": "by patient: every patient's images (and every group of exact or near-duplicate copies) "
        "lie in one fold or in the test set",
        "exact_duplicate_groups": duplicates.get("groups"),
        "near_duplicate_clusters": near.get("clusters"),
        "near_duplicate_images": near.get("images"),
        "left_out_for_crossing_the_test_set": (split_summary.get("dropped_for_source_leak") or {}).get("count", 0),
        "identifiers": index.get("identifiers"),
    }


OPERATING_POINT_KEYS = (
    "class",
    "target",
    "target_value",
    "threshold",
    "test.sensitivity",
    "test.sensitivity.ci_low",
    "test.sensitivity.ci_high",
    "test.specificity",
    "test.specificity.ci_low",
    "test.specificity.ci_high",
)


def _quantitative_analyses(src: _Sources) -> dict:
    clinical = src.clinical
    calibration = (clinical.get("calibration") or {}).get("before", {})
    return {
        "test": _test_metrics(src.ensemble) if src.ensemble else None,
        "cross_validation_mean": {
            k: (src.summary.get("statistics", {}).get(f"test.{k}") or {}).get("mean")
            for k in ("auroc_macro", "accuracy", "balanced_accuracy", "f1_macro")
        },
        "subgroups": [
            {k: row.get(k) for k in ("subgroup", "group", "images", "patients", "value", "ci_low", "ci_high")}
            for row in clinical.get("subgroups", [])
            if row.get("metric") == "auroc_macro" and not row.get("too_small") and row.get("group") != "all"
        ],
        "calibration": {c: {k: v.get(k) for k in ("ece", "max_gap", "brier")} for c, v in calibration.items()},
        "operating_points": [
            {k: row.get(k) for k in OPERATING_POINT_KEYS} for row in clinical.get("operating_points", [])
        ],
    }


def _test_metrics(ensemble: dict) -> dict:
    ci = ensemble.get("ci95") or {}
    keys = ["auroc_macro", "accuracy", "balanced_accuracy", "f1_macro"]
    keys += [f"auroc.{c}" for c in (ensemble.get("auroc") or {})]
    out = {}
    for key in keys:
        value = ensemble.get(key) if "." not in key else ensemble["auroc"][key.split(".", 1)[1]]
        out[key] = {"value": value, "ci95": ci.get(key)}
    out["images"] = ensemble.get("images")
    return out


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _interval(entry: dict) -> str:
    ci = entry.get("ci95")
    return _fmt(entry.get("value")) + (f" ({_fmt(ci[0])} to {_fmt(ci[1])})" if ci else "")


def markdown(card: dict) -> str:
    """The card as Markdown, section by section."""
    lines = _details_markdown(card) + _data_markdown(card) + _analyses_markdown(card["quantitative_analyses"])
    lines += [
        "",
        "## Ethical considerations",
        "",
        card["ethical_considerations"],
        "",
        "## Caveats and recommendations",
        "",
        card["caveats_and_recommendations"],
        "",
        "## Software and provenance",
        "",
        "- " + ", ".join(f"{k} {v}" for k, v in card["software"].items()),
        f"- split digest: {card['split_digest'] or 'n/a'}",
        "",
    ]
    return "\n".join(lines)


def _details_markdown(card: dict) -> list[str]:
    """Model details, intended use, factors and metrics."""
    d, use, m = card["model_details"], card["intended_use"], card["metrics"]
    lines = [
        f"# Model card: {d['name']} ({d['dataset']})",
        "",
        "## Model details",
        "",
        f"- {d['what']}; architecture {d['architecture']}, {_fmt(d['parameters_per_model'])} parameters per model",
        f"- task: {d['task']}; classes: {', '.join(d['classes'])}",
        f"- input: {d['input']}",
        "- training: " + ", ".join(f"{k} {_fmt(v)}" for k, v in d["training"].items()),
    ]
    if d.get("export"):
        x = d["export"]
        lines.append(
            f"- exported as {x['file']} ({_fmt(x['bytes'])} bytes; onnxruntime within "
            f"{x['parity_max_abs_difference']:.1g} of PyTorch); resize: {x['resize']}"
        )
    lines += [
        "",
        "## Intended use",
        "",
        f"- intended use: {use['intended_use']}",
        f"- intended users: {use['intended_users']}",
        f"- out of scope: {use['out_of_scope']}",
        "",
        "## Factors",
        "",
        f"- subgroups evaluated: {', '.join(card['factors']['subgroups']) or 'none configured'}",
        "",
        "## Metrics",
        "",
        f"- measures: {', '.join(m['measures'])}; intervals: {m['intervals']}",
        f"- decision rule: {m['decision']}; thresholds from {m['thresholds_from']}",
    ]
    if m["thresholds"]:
        lines.append("- thresholds: " + ", ".join(f"{c} {_fmt(t)}" for c, t in m["thresholds"].items()))
    return lines


def _data_markdown(card: dict) -> list[str]:
    """The evaluation and training data."""
    train, e = card["training_data"], card["evaluation_data"]["held_out_test_set"]
    lines: list[str] = []
    lines += [
        "",
        "## Evaluation data",
        "",
        f"- held-out test set: {_fmt(e['images'])} images of {_fmt(e['patients'])} patients ({e['method']})",
        "",
        "## Training data",
        "",
        f"- {train['dataset']} ({train['format']}): {_fmt(train['images_indexed'])} images of "
        f"{_fmt(train['patients'])} patients indexed, {_fmt(train['images_excluded'])} excluded",
        "- cross-validation: {folds} folds, {images} images, {patients} patients".format(**train["cross_validation"]),
        f"- split: {train['split']}",
        f"- exact-duplicate groups {_fmt(train['exact_duplicate_groups'])}; near-duplicate clusters "
        f"{_fmt(train['near_duplicate_clusters'])} ({_fmt(train['near_duplicate_images'])} images); "
        f"set aside for crossing the test set: {train['left_out_for_crossing_the_test_set']}",
        f"- identifiers in shared outputs: {train['identifiers']}",
        "",
        "## Quantitative analyses",
        "",
    ]
    return lines


def _analyses_markdown(q: dict) -> list[str]:
    """The quantitative analyses' tables: test metrics, subgroups, calibration, operating points."""
    lines: list[str] = []
    if q["test"]:
        lines += ["| metric (held-out test set) | value (95 % CI) |", "| --- | --- |"]
        lines += [f"| {k} | {_interval(v)} |" for k, v in q["test"].items() if isinstance(v, dict)]
    if q["subgroups"]:
        lines += ["", "| subgroup | group | images | patients | AUROC (95 % CI) |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {r['subgroup']} | {r['group']} | {r['images']} | {r['patients']} | "
            f"{_interval({'value': r['value'], 'ci95': [r['ci_low'], r['ci_high']]})} |"
            for r in q["subgroups"]
        ]
    if q["calibration"]:
        lines += ["", "| class | ECE | largest gap | Brier |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {c} | {_fmt(v['ece'])} | {_fmt(v['max_gap'])} | {_fmt(v['brier'])} |"
            for c, v in q["calibration"].items()
        ]
    if q["operating_points"]:
        lines += [
            "",
            "| class | operating point | threshold | sensitivity | specificity |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in q["operating_points"]:
            sens = {
                "value": r["test.sensitivity"],
                "ci95": [r["test.sensitivity.ci_low"], r["test.sensitivity.ci_high"]],
            }
            spec = {
                "value": r["test.specificity"],
                "ci95": [r["test.specificity.ci_low"], r["test.specificity.ci_high"]],
            }
            point = r["target"] + (f" {_fmt(r['target_value'])}" if r.get("target_value") is not None else "")
            lines.append(f"| {r['class']} | {point} | {_fmt(r['threshold'])} | {_interval(sens)} | {_interval(spec)} |")
    return lines


def write(card: dict, out_dir) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "model_card.md").write_text(markdown(card))
    return out / "model_card.json", out / "model_card.md"
