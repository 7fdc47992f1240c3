"""Operating points (thresholds at a target specificity or sensitivity, from the pooled
out-of-fold predictions), calibration per class, and patient-level results."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medfold.data.index.labels import targets_for
from medfold.evaluation.clinical._constants import PROB
from medfold.evaluation.clinical.stats import (
    PatientBootstrap,
    apply_temperature,
    fit_temperature,
    interval,
    onehot,
    reliability,
    scored_classes,
    test_predictions,
    weighted_auroc,
    weighted_rates,
)
from medfold.evaluation.clinical.subgroups import _quiet
from medfold.evaluation.metrics import choose_thresholds, evaluate
from medfold.settings.sections import OperatingPointSettings


# ----------------------------------------------------------------------------- operating points
def threshold_for(y01: np.ndarray, score: np.ndarray, target: str, value: float) -> float | None:
    """On these (validation) predictions, the threshold (positive: score >= threshold) that
    reaches ``value`` of the ``target`` rate with the most of the other: the lowest threshold
    with specificity >= value, or the highest with sensitivity >= value."""
    y01 = np.asarray(y01).astype(bool)
    if y01.all() or not y01.any():
        return None
    candidates = np.r_[np.unique(score), np.inf]
    neg, pos = np.sort(score[~y01]), np.sort(score[y01])
    spec = np.searchsorted(neg, candidates, side="left") / len(neg)  # negatives below the threshold
    sens = 1.0 - np.searchsorted(pos, candidates, side="left") / len(pos)
    if target == "specificity":
        ok = np.flatnonzero(spec >= value - 1e-12)
        return float(candidates[ok[0]])
    ok = np.flatnonzero(sens >= value - 1e-12)
    return float(candidates[ok[-1]])


def _best_at(y01: np.ndarray, score: np.ndarray, weights: np.ndarray, target: str, value: float) -> np.ndarray:
    """Per weight row: the most sensitivity with specificity >= value (or the reverse) that any
    threshold on these scores gives (the test set's own ROC curve, an optimistic bound)."""
    y01 = np.asarray(y01).astype(bool)
    order = np.argsort(score, kind="stable")
    s, pos, w = score[order], y01[order], np.atleast_2d(weights)[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    cum_neg = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(np.where(pos, 0, w), 1)], 1)[:, starts]
    cum_pos = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(np.where(pos, w, 0), 1)], 1)[:, starts]
    total_neg = np.where(pos, 0, w).sum(1, keepdims=True)
    total_pos = np.where(pos, w, 0).sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        # threshold at each distinct score, and above them all
        spec = np.concatenate([cum_neg, total_neg], 1) / total_neg
        sens = 1.0 - np.concatenate([cum_pos, total_pos], 1) / total_pos
    if target == "specificity":
        return np.where(spec >= value - 1e-12, sens, -np.inf).max(1)
    return np.where(sens >= value - 1e-12, spec, -np.inf).max(1)


def operating_points(
    oof: pd.DataFrame,
    test: pd.DataFrame,
    task: str,
    classes: list[str],
    targets: OperatingPointSettings | dict,
    youden,
    boot: PatientBootstrap,
) -> pd.DataFrame:
    """Per class and target: the threshold chosen on the pooled out-of-fold predictions, the
    validation sensitivity/specificity it gives, the test outcome with intervals, and the best
    the test ROC curve allows at that target. Youden's threshold (the one used elsewhere) first.
    ``targets``: ``evaluation.operating_points`` (settings or dict)."""
    targets = OperatingPointSettings.of(targets)
    y_oof = onehot(task, classes, targets_for(oof["labels"], classes, task))
    y_test = onehot(task, classes, targets_for(test["labels"], classes, task))
    records = []
    for j in scored_classes(task, classes):
        c = classes[j]
        s_oof, s_test = oof[f"{PROB}{c}"].to_numpy(np.float64), test[f"{PROB}{c}"].to_numpy(np.float64)
        yo, yt = y_oof[:, j].astype(bool), y_test[:, j].astype(bool)
        chosen = [("youden", None, (youden[0] if task == "binary" else youden[j]) if youden else None)]
        chosen += [
            (target, value, threshold_for(yo, s_oof, target, value))
            for target in ("specificity", "sensitivity")
            for value in getattr(targets, target)
        ]
        for target, value, threshold in chosen:
            row = {"class": c, "target": target, "target_value": value, "threshold": threshold}
            if threshold is not None:
                vs, vp = weighted_rates(yo, s_oof >= threshold, np.ones((1, len(yo))))
                ts, tp = weighted_rates(yt, s_test >= threshold, np.ones((1, len(yt))))
                row.update(
                    {
                        "val.sensitivity": _f(vs[0]),
                        "val.specificity": _f(vp[0]),
                        "test.sensitivity": _f(ts[0]),
                        "test.specificity": _f(tp[0]),
                    }
                )
                for which, k in (("sensitivity", 0), ("specificity", 1)):
                    ci = interval(boot.draws(lambda w: weighted_rates(yt, s_test >= threshold, w)[k]))
                    row[f"test.{which}.ci_low"], row[f"test.{which}.ci_high"] = ci or (None, None)
            if value is not None and yt.any() and not yt.all():
                other = "sensitivity" if target == "specificity" else "specificity"
                best = _best_at(yt, s_test, np.ones((1, len(yt))), target, value)[0]
                ci = interval(boot.draws(lambda w: _best_at(yt, s_test, w, target, value)))
                row[f"test_roc.{other}"] = _f(best)
                row[f"test_roc.{other}.ci_low"], row[f"test_roc.{other}.ci_high"] = ci or (None, None)
            records.append(row)
    return pd.DataFrame(records)


def _f(value) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


# ----------------------------------------------------------------------------- calibration
def calibration(
    folds: pd.DataFrame, test: pd.DataFrame, task: str, classes: list[str], bins: int, temperature_scaling: bool
) -> dict:
    """Reliability, ECE and Brier per class of the evaluated test predictions; with temperature
    scaling, each fold model's temperature (fitted on its validation predictions) applied to its
    test predictions, combined as the test predictions are, and evaluated again."""
    cols = [f"{PROB}{c}" for c in classes]
    scored = scored_classes(task, classes)
    y_test = onehot(task, classes, targets_for(test["labels"], classes, task))
    out = {"bins": bins, "before": {classes[j]: reliability(y_test[:, j], test[cols[j]], bins) for j in scored}}
    if not temperature_scaling:
        return out
    temperatures = {}
    calibrated = []
    for fold, part in folds.groupby("fold", sort=True):
        val = part[part["set"] == "val"]
        y_val = targets_for(val["labels"], classes, task)
        t = fit_temperature(task, y_val, val[cols].to_numpy(np.float64))
        temperatures[int(fold)] = t
        scaled = part[part["set"] == "test"].copy()
        scaled[cols] = apply_temperature(task, scaled[cols].to_numpy(np.float64), t)
        calibrated.append(scaled.assign(set="test"))
    if calibrated:
        after, _ = test_predictions(pd.concat(calibrated, ignore_index=True), classes)
        after = after.set_index("image_id").loc[test["image_id"]].reset_index()
        out["after"] = {classes[j]: reliability(y_test[:, j], after[cols[j]], bins) for j in scored}
    out["temperatures"] = temperatures
    return out


# ----------------------------------------------------------------------------- patient level
def per_patient(frame: pd.DataFrame, task: str, classes: list[str], how: str) -> tuple[pd.DataFrame, int]:
    """One row per patient: the max or mean of their images' probabilities; labels: any image
    positive (binary, multi-label), the class all images share (multi-class; patients whose
    images disagree are left out and counted). Returns (frame, patients left out)."""
    cols = [f"{PROB}{c}" for c in classes]
    y = targets_for(frame["labels"], classes, task)
    y1h = onehot(task, classes, y)
    work = frame[["patient_id", *cols]].copy()
    work[[f"y:{c}" for c in classes]] = y1h
    grouped = work.groupby("patient_id", sort=False)
    scores = grouped[cols].max() if how == "max" else grouped[cols].mean()
    labels = grouped[[f"y:{c}" for c in classes]].max()
    left_out = 0
    if task == "multiclass":
        agree = labels.sum(axis=1) == 1
        left_out = int((~agree).sum())
        scores, labels = scores[agree], labels[agree]
    if task in ("multiclass", "binary") and how == "max":  # rows sum to one again (softmax tasks)
        scores = scores.div(scores.sum(axis=1), axis=0)
    names = [[c for c, v in zip(classes, row) if v] for row in labels.to_numpy()]
    if task == "binary":  # a binary label list names the one class
        names = [[classes[1]] if row[1] else [classes[0]] for row in labels.to_numpy()]
    out = scores.reset_index().assign(labels=names)
    out["image_id"] = out["patient_id"]
    return out, left_out


def patient_level(
    oof: pd.DataFrame, test: pd.DataFrame, task: str, classes: list[str], how: str, n_bootstrap: int, seed: int
) -> dict:
    """Per-image and per-patient results side by side, thresholds chosen on out-of-fold
    predictions of the same unit, with patient-bootstrap intervals of the macro AUROC."""
    cols = [f"{PROB}{c}" for c in classes]
    out = {"aggregate": how}
    for unit in ("image", "patient"):
        o, t, left = (oof, test, 0)
        if unit == "patient":
            o, _ = per_patient(oof, task, classes, how)
            t, left = per_patient(test, task, classes, how)
        y_o, y_t = targets_for(o["labels"], classes, task), targets_for(t["labels"], classes, task)
        thresholds = choose_thresholds(task, y_o, o[cols].to_numpy(np.float64))
        result = evaluate(task, classes, y_t, t[cols].to_numpy(np.float64), thresholds)
        boot = PatientBootstrap(t["patient_id"], n_bootstrap, seed)
        y1h = onehot(task, classes, y_t)
        draws = np.vstack(
            [
                boot.draws(lambda w: weighted_auroc(y1h[:, j], t[cols[j]].to_numpy(np.float64), w))
                for j in scored_classes(task, classes)
            ]
        )
        with _quiet():
            macro = np.nanmean(draws, axis=0)
        keep = (
            "images",
            "auroc_macro",
            "auroc",
            "accuracy",
            "balanced_accuracy",
            "f1_macro",
            "sensitivity",
            "specificity",
            "thresholds",
        )
        out[unit] = {k: result[k] for k in keep if k in result}
        out[unit]["auroc_macro_ci95"] = interval(macro)
        out[unit]["patients"] = int(t["patient_id"].nunique())
        if unit == "patient":
            out[unit]["rows"] = out[unit].pop("images")
            out[unit]["patients_left_out"] = left
    return out
