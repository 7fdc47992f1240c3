"""External validation: a finished experiment's frozen fold ensemble on another site's data
(``external.<name>`` in the config).

1. ``index_external``: the other dataset indexed with the same checks as the main one (bad images
   reported and skipped, patients, labels, copies within it) and cached at the experiment's
   image size. Its classes must be the experiment's.
2. ``find_leaks``: before any prediction, the external images are searched for copies of the
   main dataset's images, exact (the content hash of the decoded pixels) and near (medfold's
   matching: fingerprint and descriptor candidates, verified by registration), the signatures
   computed from both caches at the experiment's size. A copy is a leak into the "external" set:
   it is named in copies.csv (with the main image's set) and left out, or the run stops
   (``on_copy``).
3. ``validate``: the fold ensemble predicts the external images as ``medfold predict`` would; the
   metrics with patient-bootstrap intervals beside the internal test set's; the calibration
   drift (ECE and reliability per class, internal against external); sensitivity and specificity
   at the internal thresholds against thresholds re-chosen on the external data by the
   experiment's rule; and, with ``recalibrate``, temperature, Platt or isotonic recalibration
   fitted on a patient share of the external data and evaluated on the rest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from medfold.core import files
from medfold.core.errors import ConfigError, DataError
from medfold.data.index.io import read_index
from medfold.data.index.labels import targets_for
from medfold.deploy.predict import load_predictor
from medfold.settings.sections import ExternalSettings, RecalibrationSettings

log = logging.getLogger(__name__)
SCORED_METRICS = ("auroc_macro", "accuracy", "balanced_accuracy", "f1_macro")


@dataclasses.dataclass(frozen=True)
class ExternalOutputs(files.Outputs):
    """What the external_validate rule writes for one external dataset."""

    copies: Path
    predictions: Path
    record: Path
    reliability: Path
    NAMES: ClassVar[dict[str, str]] = {
        "copies": "copies.csv",
        "predictions": "predictions.parquet",
        "record": "external.json",
        "reliability": "reliability.png",
    }


@dataclasses.dataclass(frozen=True)
class ExternalIndexOutputs(files.Outputs):
    """What the external_index rule writes: the other dataset's index and its cache."""

    table: Path
    report: Path
    cache: Path
    NAMES: ClassVar[dict[str, str]] = {
        "table": "index.parquet",
        "report": "index_report.json",
        "cache": "cache/images.npy",
    }


# ----------------------------------------------------------------------------- 1. index
def index_external(
    dataset: dict, results, identifiers: str, table_path, report_path, cache_dir, size: int, channels: int, threads=1
):
    """Index the external dataset (its identifiers shared as the main one's are, with the results
    folder's key) and cache it at ``size``."""
    from medfold.core.privacy import Pseudonyms
    from medfold.data.cache import build_cache
    from medfold.data.index.build import build_index
    from medfold.data.index.io import write_index

    pseudonyms = Pseudonyms.for_results(results, identifiers)
    table, report = build_index(dataset, threads=threads, pseudonyms=pseudonyms)
    write_index(table, report, table_path, report_path)
    build_cache(table, cache_dir, size, channels, threads)


def external_index_job(
    dataset: dict, results, identifiers: str, size: int, channels: int, outputs: ExternalIndexOutputs, threads=1
) -> None:
    """The external_index rule (``index_external`` to the rule's paths)."""
    index_external(
        dataset, results, identifiers, outputs.table, outputs.report, outputs.cache.parent, size, channels, threads
    )


# ----------------------------------------------------------------------------- 2. leaks
def _grey(pixels: np.ndarray) -> np.ndarray:
    """A cached image (C, H, W) as decoded pixels are: (H, W) grey or (H, W, 3)."""
    return pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1)


def find_leaks(main: pd.DataFrame, main_cache, main_sets, external: pd.DataFrame, ext_cache, near, threads=1):
    """Pairs (external image, main image) that are copies: exact ones by content hash, near ones
    by medfold.data.matching on signatures of both caches. ``main_sets``: each main row's set (a fold
    or test) to name what leaked; ``near``: ``dataset.near_duplicates`` (settings or dict). Returns
    the copies table (shared IDs only)."""
    from medfold.settings.sections import NearDuplicateSettings

    near = NearDuplicateSettings.of(near)
    from medfold.data import fingerprint as fp
    from medfold.data import matching
    from medfold.data.images import signatures

    n_main = len(main)
    hashes = np.concatenate([main["content_hash"].to_numpy(object), external["content_hash"].to_numpy(object)])
    # every external image its own group: copies within the external set are its own index's business
    groups = np.concatenate([np.zeros(n_main, np.int64), 1 + np.arange(len(external))])
    rows = []
    by_hash = pd.Series(np.arange(n_main), index=main["content_hash"].to_numpy(object))
    by_hash = by_hash[~by_hash.index.duplicated()]
    for j, h in enumerate(external["content_hash"].to_numpy(object)):
        if h in by_hash.index:
            rows.append((j, int(by_hash[h]), "exact copy", 1.0))
    if near.enabled:
        sigs = [
            signatures(_grey(np.asarray(c[i])))
            for c, n in ((main_cache, n_main), (ext_cache, len(external)))
            for i in range(n)
        ]
        bits = fp.hex_to_bits(np.array([s[0] for s in sigs], dtype=object))
        pairs, _ = matching.find_copies(
            bits, [s[1] for s in sigs], hashes, groups.astype(str), matching.MatchSettings.from_config(near), threads
        )
        pairs = pairs[pairs["accepted"]]
        crossing = (pairs["a"] < n_main) != (pairs["b"] < n_main)
        for a, b, kind, score in pairs.loc[crossing, ["a", "b", "kind", "score"]].itertuples(index=False):
            m, e = (a, b - n_main) if a < n_main else (b, a - n_main)
            rows.append((int(e), int(m), str(kind), float(score)))
    found = pd.DataFrame(rows, columns=["external_row", "main_row", "kind", "score"])
    found = found.sort_values(["external_row", "score"], ascending=[True, False]).drop_duplicates("external_row")
    return pd.DataFrame(
        {
            "external_image": external["shared_image_id"].to_numpy()[found["external_row"]],
            "external_patient": external["shared_patient_id"].to_numpy()[found["external_row"]],
            "copy_of": main["shared_image_id"].to_numpy()[found["main_row"]],
            "copy_of_set": np.asarray(main_sets)[found["main_row"]],
            "kind": found["kind"].to_numpy(),
            "score": found["score"].round(4).to_numpy(),
            "external_row": found["external_row"].to_numpy(),
        }
    ).reset_index(drop=True)


# ----------------------------------------------------------------------------- 3. validate
def sensitivity_specificity(task: str, classes: list[str], y: np.ndarray, probs: np.ndarray, thresholds) -> dict:
    """Per scored class, sensitivity and specificity of the decisions at ``thresholds``."""
    from medfold.evaluation.clinical.stats import decisions, onehot, scored_classes

    truth, decided = onehot(task, classes, y), decisions(task, probs, thresholds)
    out = {}
    for j in scored_classes(task, classes):
        pos, neg = truth[:, j] == 1, truth[:, j] == 0
        out[classes[j]] = {
            "sensitivity": float(decided[pos, j].mean()) if pos.any() else None,
            "specificity": float(1 - decided[neg, j].mean()) if neg.any() else None,
        }
    return out


def _calibrated(method: str, task: str, fit_y, fit_p, probs) -> tuple[np.ndarray, dict]:
    """``probs`` recalibrated by ``method`` fitted on (fit_y, fit_p)."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    from medfold.evaluation.clinical.stats import _logits, apply_temperature, fit_temperature

    if method == "temperature":
        t = fit_temperature(task, fit_y, fit_p)
        return apply_temperature(task, probs, t), {"temperature": t}
    onehot = fit_y if task == "multilabel" else np.eye(probs.shape[1], dtype=int)[fit_y]
    out = np.array(probs, np.float64)
    fitted = {}
    for j in range(probs.shape[1]):
        yj = onehot[:, j]
        if yj.min() == yj.max():  # one class only in the fit share: left as it is
            continue
        if method == "platt":
            z_fit = _logits("multilabel", fit_p[:, j])[:, None]
            model = LogisticRegression(C=1e6, max_iter=1000).fit(z_fit, yj)
            out[:, j] = model.predict_proba(_logits("multilabel", probs[:, j])[:, None])[:, 1]
            fitted[j] = {"a": float(model.coef_[0, 0]), "b": float(model.intercept_[0])}
        else:
            model = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(fit_p[:, j], yj)
            out[:, j] = model.predict(probs[:, j])
            fitted[j] = {"knots": int(len(model.X_thresholds_))}
    if task != "multilabel":  # one distribution per image again
        out = out / np.maximum(out.sum(1, keepdims=True), 1e-12)
    return out, {"per_class": fitted}


def recalibration(task, classes, y, probs, patients, setting: RecalibrationSettings | dict, bins: int) -> dict:
    """Fit ``setting.method`` on a ``fraction`` of the patients, evaluate on the others."""
    from medfold.evaluation.clinical.stats import onehot, reliability, scored_classes
    from medfold.evaluation.metrics import evaluate

    setting = RecalibrationSettings.of(setting)
    unique = pd.unique(pd.Series(patients))
    rng = np.random.default_rng(setting.seed or 0)
    fit_patients = set(rng.permutation(unique)[: max(1, int(round(setting.fraction * len(unique))))])
    fit = np.array([p in fit_patients for p in patients])
    if fit.all() or not fit.any():
        raise ConfigError(f"recalibrate.fraction {setting.fraction}: leaves no patients to fit or to evaluate on")
    after, fitted = _calibrated(setting.method, task, y[fit], probs[fit], probs[~fit])
    truth = onehot(task, classes, y[~fit])
    scored = scored_classes(task, classes)
    return {
        "method": setting.method,
        "fraction": setting.fraction,
        "fit": {"images": int(fit.sum()), "patients": len(fit_patients)},
        "evaluated": {"images": int((~fit).sum()), "patients": int(len(unique) - len(fit_patients))},
        "fitted": fitted,
        "before": {classes[j]: reliability(truth[:, j], probs[~fit][:, j], bins) for j in scored},
        "after": {classes[j]: reliability(truth[:, j], after[:, j], bins) for j in scored},
        "auroc_macro_before": evaluate(task, classes, y[~fit], probs[~fit])["auroc_macro"],
        "auroc_macro_after": evaluate(task, classes, y[~fit], after)["auroc_macro"],
    }


def predict_cache(predictor, cache, rows: np.ndarray, batch: int = 64) -> np.ndarray:
    out = [
        predictor.probabilities(predictor.input(np.ascontiguousarray(cache[rows[i : i + batch]])))
        for i in range(0, len(rows), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, len(predictor.classes)))


def _copies_of_main(
    name: str,
    site: ExternalSettings,
    exp: Path,
    main_index_path,
    main_splits_path,
    main_cache_path,
    ext: pd.DataFrame,
    ext_cache,
    out,
    threads: int,
) -> pd.DataFrame:
    """The external images that are copies of the main dataset's (written to ``out.copies``);
    with ``on_copy: stop``, a DataError listing them."""
    from medfold.data.index.io import read_index

    main, _ = read_index(main_index_path)
    splits = pd.read_parquet(main_splits_path).set_index("image_id").loc[main["image_id"]]
    main_sets = np.where(splits["set"].to_numpy() == "test", "test", "fold " + splits["fold"].astype(str).to_numpy())
    main_cache = np.load(main_cache_path, mmap_mode="r")
    copies = find_leaks(main, main_cache, main_sets, ext, ext_cache, site.dataset.near_duplicates, threads)
    copies.drop(columns="external_row").to_csv(out.copies, index=False)
    if len(copies) and site.on_copy == "stop":
        listed = "; ".join(
            f"{a} is a {k} of {b} ({s})"
            for a, b, k, s in copies[["external_image", "copy_of", "kind", "copy_of_set"]].itertuples(index=False)
        )
        raise DataError(
            f"external.{name}: {len(copies)} of its images are copies of {exp.parent.name}'s images, so they are no "
            f"external data: {listed}; remove them, or set external.{name}.on_copy: exclude (listed in {out.copies})"
        )
    return copies


def _reliability_figure(title: str, name: str, drift: dict):
    """The internal test set's reliability against the external data's, in one figure."""
    from medfold.evaluation.clinical.figures import reliability_figure

    figure = reliability_figure(title, drift)
    for ax in figure.axes:  # the shared figure's legend says before/after: here internal/external
        for text in ax.get_legend().get_texts() if ax.get_legend() else []:
            text.set_text(text.get_text().replace("temperature-scaled", "external").replace("before", "internal test"))
    figure.suptitle(f"{name}: reliability, internal test set against the external data", fontsize=10)
    return figure


def _check_classes(name: str, experiment: str, ext_classes, classes) -> None:
    if list(ext_classes) != list(classes):
        raise ConfigError(
            f"external.{name}: its dataset's classes {ext_classes} are not experiment {experiment}'s {classes}; "
            f"set external.{name}.dataset.labels (or label_map) so that they match"
        )


def _scored(task, classes, y, probs, patients, thresholds, bootstrap: int, seed: int) -> dict:
    """The external images' metrics at the exported thresholds, with patient-bootstrap intervals."""
    from medfold.evaluation.aggregate import bootstrap_intervals
    from medfold.evaluation.metrics import evaluate

    external = evaluate(task, classes, y, probs, thresholds)
    external["ci95"] = bootstrap_intervals(task, classes, y, probs, patients, thresholds, bootstrap, seed)
    external.update(images=int(len(y)), patients=int(len(set(patients))))
    return external


def _internal_test(exp: Path, task: str, classes: list[str]) -> tuple[dict, tuple]:
    """The fold ensemble's own held-out test result, and its (targets, probabilities)."""
    from medfold.data.index.labels import targets_for

    internal = json.loads((exp / "cv" / "ensemble_test.json").read_text()) or {}
    predictions = pd.read_parquet(exp / "cv" / "ensemble_test_predictions.parquet")
    y = targets_for(predictions["labels"], classes, task)
    return internal, (y, predictions[[f"prob:{c}" for c in classes]].to_numpy(np.float64))


INDEXED = {"images": "images_indexed", "skipped": "images_skipped", "patients": "patients"}


def _calibration(reliability: dict) -> dict:
    return {c: {k: v[k] for k in ("ece", "max_gap", "brier")} for c, v in reliability.items()}


def _copies_record(copies: pd.DataFrame, on_copy: str) -> dict:
    """external.json's count of the external images that are copies of the main dataset's."""
    return {
        "found": int(len(copies)),
        "exact": int((copies["kind"] == "exact copy").sum()),
        "near": int((copies["kind"] != "exact copy").sum()),
        "on_copy": on_copy,
        "excluded": int(len(copies)),
        "of_sets": copies["copy_of_set"].value_counts().to_dict(),
    }


def _drift(task: str, classes: list[str], internal: tuple, external: tuple, bins: int) -> dict:
    """Reliability per scored class on the internal test set ("before") and the external one
    ("after"); ``internal`` and ``external``: (targets, probabilities)."""
    from medfold.evaluation.clinical.stats import onehot, reliability, scored_classes

    scored = scored_classes(task, classes)
    (y_int, p_int), (y, probs) = internal, external
    truth_int, truth_ext = onehot(task, classes, y_int), onehot(task, classes, y)
    return {
        "bins": bins,
        "before": {classes[j]: reliability(truth_int[:, j], p_int[:, j], bins) for j in scored},
        "after": {classes[j]: reliability(truth_ext[:, j], probs[:, j], bins) for j in scored},
    }


def _thresholds_record(task, classes, thresholds, decision, rule, internal: tuple, external: tuple) -> dict:
    """The exported thresholds on the external images, beside thresholds chosen again there by the
    same decision rule, and the internal test set at the exported ones."""
    from medfold.evaluation.metrics import choose_thresholds

    (y_int, p_int), (y, probs) = internal, external
    rechosen = choose_thresholds(task, y, probs, decision) if thresholds is not None else None
    return {
        "internal": thresholds,
        "rechosen": rechosen,
        "rule": rule,
        "at_internal": sensitivity_specificity(task, classes, y, probs, thresholds) if thresholds else None,
        "at_rechosen": sensitivity_specificity(task, classes, y, probs, rechosen) if rechosen else None,
        "internal_test_at_internal": sensitivity_specificity(task, classes, y_int, p_int, thresholds)
        if thresholds
        else None,
    }


def _predictions_frame(ext: pd.DataFrame, kept, patients, classes: list[str], probs) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "image_id": ext["shared_image_id"].to_numpy()[kept],
            "patient_id": patients,
            "labels": ext["labels"].iloc[kept].to_list(),
        }
    )
    for j, c in enumerate(classes):
        frame[f"prob:{c}"] = probs[:, j]
    return frame


# One piece (70 lines, 15 of them its signature): external.json's record is one literal, in the
# order the page and the tests read it; its parts are computed by the helpers above.
def validate(
    name: str,
    site: ExternalSettings | dict,
    experiment_dir,
    main_index_path,
    main_splits_path,
    main_cache_path,
    ext_index_path,
    ext_cache_path,
    outputs,
    bootstrap: int,
    seed: int,
    bins: int,
    threads: int = 1,
) -> dict:
    """Leaks, predictions, metrics, drift and recalibration of one external dataset; writes
    ``outputs`` (an ExternalOutputs) and returns external.json's record. ``site``: the resolved
    ``external.<name>`` block (``settings.external_settings``)."""
    site = ExternalSettings.of(site)
    out = ExternalOutputs.of(outputs)
    out.create()
    exp = Path(experiment_dir)
    predictor = load_predictor(exp)
    task, classes = predictor.task, predictor.classes
    ext, ext_meta = read_index(ext_index_path)
    ext_report = json.loads((Path(ext_index_path).parent / "index_report.json").read_text())
    _check_classes(name, exp.name, ext_meta.get("classes") or ext_report.get("classes") or [], classes)
    ext_cache = np.load(ext_cache_path, mmap_mode="r")
    copies = _copies_of_main(
        name, site, exp, main_index_path, main_splits_path, main_cache_path, ext, ext_cache, out, threads
    )
    kept = np.setdiff1d(np.arange(len(ext)), copies["external_row"].to_numpy())
    y = targets_for(ext["labels"].iloc[kept], classes, task)
    probs = predict_cache(predictor, ext_cache, kept)
    patients = ext["shared_patient_id"].to_numpy()[kept]
    thresholds = predictor.thresholds
    external = _scored(task, classes, y, probs, patients, thresholds, bootstrap, seed)
    internal, (y_int, p_int) = _internal_test(exp, task, classes)
    drift = _drift(task, classes, (y_int, p_int), (y, probs), bins)
    decision = json.loads(next(exp.glob("fold_*/metrics.json")).read_text()).get("decision_rule")
    record = {
        "name": name,
        "experiment": exp.name,
        "dataset": ext_report.get("dataset"),
        "task": task,
        "classes": classes,
        "indexed": {k: ext_report.get(f) for k, f in INDEXED.items()},
        "copies": _copies_record(copies, site.on_copy),
        "internal": {k: internal.get(k) for k in (*SCORED_METRICS, "auroc", "ci95", "images")},
        "external": {k: external.get(k) for k in (*SCORED_METRICS, "auroc", "ci95", "images", "patients")},
        "calibration": {"internal": _calibration(drift["before"]), "external": _calibration(drift["after"])},
        "thresholds": _thresholds_record(
            task, classes, thresholds, decision, internal.get("decision"), (y_int, p_int), (y, probs)
        ),
        "bootstrap": {"resamples": bootstrap, "unit": "patient", "seed": seed},
    }
    if site.recalibrate:
        record["recalibration"] = recalibration(task, classes, y, probs, patients, site.recalibrate, bins)
    _predictions_frame(ext, kept, patients, classes, probs).to_parquet(out.predictions, index=False)
    out.record.write_text(json.dumps(record, indent=2, default=float) + "\n")
    _reliability_figure(f"{name} ({exp.name})", name, drift).savefig(out.reliability, dpi=110)
    aurocs = [r.get("auroc_macro") or float("nan") for r in (external, internal)]
    log.info(
        "external %s: %d images (%d copies left out); AUROC %.3f external against %.3f internal",
        name,
        len(kept),
        len(copies),
        *aurocs,
    )
    return record
