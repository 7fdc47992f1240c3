"""Evaluation a clinical reviewer asks for, from prediction files alone (no model is loaded).

On the held-out test set of an experiment (its fold ensemble, or, where folds have test sets of
their own, each image's prediction averaged over the fold models that predicted it):

* subgroups: per metadata column (categorical as it is, numeric in configured bands) AUROC per
  class and macro, sensitivity and specificity at the thresholds chosen on validation, counts of
  images and patients, each with a patient-bootstrap 95 % interval; groups below a minimum size
  are marked too small instead of given numbers;
* calibration: reliability bins, expected calibration error (ECE) and Brier score per class,
  before and after temperature scaling fitted on each fold's validation predictions;
* operating points: thresholds reaching a target specificity (or sensitivity) on the pooled
  out-of-fold predictions, and what they give on the test set, beside the best the test set's own
  ROC curve allows;
* patient-level results: one score per patient (max or mean of their images) beside per-image;
* paired comparison of two experiments on the same test images: DeLong's test for the AUROC
  difference and the patient-bootstrap interval of the difference.

Where scikit-learn or SciPy have the metric, it is theirs, or checked against theirs in the
tests (the vectorised weighted AUROC below against ``roc_auc_score`` with ``sample_weight``,
the reliability bins against ``calibration_curve``). DeLong's test and ECE exist in neither
and are written here from their definitions (DeLong, DeLong & Clarke-Pearson 1988,
Biometrics 44:837; the midrank form of Sun & Xu 2014, IEEE SPL 21:1389; ECE: Naeini et al.
2015, AAAI; temperature scaling: Guo et al. 2017, ICML).

A bootstrap resample of patients is represented as per-image weights (an image of a patient
drawn k times counts k times: the same as concatenating the draws), so every metric, subgroup
and experiment on the same images is evaluated on the same draws, vectorised over draws.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pandas as pd
from scipy import optimize, stats
from sklearn import metrics as skm

from .dicom import number_or_age
from .errors import ConfigError
from .metrics import choose_thresholds, evaluate, targets_for

PROB = "prob:"


# ----------------------------------------------------------------------------- bootstrap
class PatientBootstrap:
    """``n`` resamples of the patients of a set of images, with replacement, as weights."""

    def __init__(self, patients, n: int, seed: int):
        # patients numbered in the order they first appear, never by their IDs' sort order: a
        # pseudonym differs between results folders, and the draws must not (medfold.privacy)
        self.inverse, codes = pd.factorize(pd.Series(np.asarray(patients).astype(str)))
        k = len(codes)
        rng = np.random.default_rng(seed)
        # k draws with replacement among k patients: each patient's count is multinomial
        self.counts = rng.multinomial(k, np.full(k, 1.0 / k), size=n).astype(np.float64)
        self.n = n

    def weights(self, rows: np.ndarray | None = None, chunk: slice = slice(None)) -> np.ndarray:
        """(draws, images) weights of the images ``rows`` (all when None)."""
        inverse = self.inverse if rows is None else self.inverse[rows]
        return self.counts[chunk][:, inverse]

    def draws(self, metric, rows: np.ndarray | None = None, chunk_size: int = 200) -> np.ndarray:
        """``metric(weights)`` over every draw, in chunks (bounded memory on large test sets)."""
        parts = [metric(self.weights(rows, slice(start, start + chunk_size))) for start in range(0, self.n, chunk_size)]
        return np.concatenate(parts, axis=-1)


def interval(draws: np.ndarray, min_defined: float = 0.5) -> list[float] | None:
    """The 95 % percentile interval of the defined draws; None when fewer than ``min_defined``
    of them are defined (a group so small that most resamples lack a positive or a negative)."""
    draws = np.asarray(draws, np.float64)
    defined = draws[np.isfinite(draws)]
    if len(defined) < min_defined * len(draws) or not len(defined):
        return None
    return [float(np.percentile(defined, 2.5)), float(np.percentile(defined, 97.5))]


# ----------------------------------------------------------------------------- weighted metrics
def weighted_auroc(y01: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC for each row of ``weights`` (draws, images): the weighted probability that a
    positive scores above a negative, ties counting half (the trapezoidal ROC area). NaN where a
    row has no positive or no negative weight. One weight row of ones is the plain AUROC."""
    y01 = np.asarray(y01).astype(bool)
    score = np.asarray(score, np.float64)
    w = np.atleast_2d(np.asarray(weights, np.float64))
    order = np.argsort(score, kind="stable")
    s, pos, w = score[order], y01[order], w[:, order]
    neg_w = np.where(pos, 0.0, w)
    pos_w = np.where(pos, w, 0.0)
    starts_mask = np.r_[True, s[1:] != s[:-1]] if len(s) else np.zeros(0, bool)
    group = np.cumsum(starts_mask) - 1
    starts = np.flatnonzero(starts_mask)
    ends = np.r_[starts[1:], len(s)]
    below_all = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(neg_w, axis=1)], axis=1)
    below = below_all[:, starts]  # negative weight scoring strictly lower than the group
    tied = below_all[:, ends] - below
    numerator = (pos_w * (below + 0.5 * tied)[:, group]).sum(1)
    denominator = pos_w.sum(1) * neg_w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def weighted_rates(y01: np.ndarray, decision: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sensitivity, specificity) for each row of weights; NaN where undefined."""
    y01 = np.asarray(y01).astype(bool)
    decision = np.asarray(decision).astype(bool)
    w = np.atleast_2d(np.asarray(weights, np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (w * (y01 & decision)).sum(1) / (w * y01).sum(1)
        spec = (w * (~y01 & ~decision)).sum(1) / (w * ~y01).sum(1)
    return sens, spec


# ----------------------------------------------------------------------------- DeLong
def _midrank_components(y01: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROC, V10 (per positive) and V01 (per negative) structural components of each row of
    ``scores`` (models, images), from midranks (Sun & Xu 2014)."""
    pos, neg = scores[:, y01], scores[:, ~y01]
    m, n = pos.shape[1], neg.shape[1]
    rank_all = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    rank_pos = stats.rankdata(pos, axis=1)
    rank_neg = stats.rankdata(neg, axis=1)
    v10 = (rank_all[:, :m] - rank_pos) / n  # share of negatives each positive beats (ties half)
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m  # share of positives that beat each negative
    return v10.mean(1), v10, v01


def _clustered_covariance(y01: np.ndarray, v10: np.ndarray, v01: np.ndarray, auc: np.ndarray, clusters) -> np.ndarray:
    """Obuchowski's (1997) covariance of the AUROCs of the rows of v10/v01 when images come in
    clusters (several images per patient): the structural components summed per cluster, so
    that a patient's correlated images count once in the variance. With one image per cluster
    it is DeLong's up to the factor I(M-1)/((I-1)M) (I clusters, M positives)."""
    codes = pd.factorize(pd.Series(np.asarray(clusters)).astype(str))[0]
    count = int(codes.max()) + 1
    pos, neg = codes[y01], codes[~y01]
    m, n = len(pos), len(neg)
    m_i, n_i = np.bincount(pos, minlength=count), np.bincount(neg, minlength=count)
    d10 = np.stack([np.bincount(pos, weights=row, minlength=count) for row in v10]) - m_i * auc[:, None]
    d01 = np.stack([np.bincount(neg, weights=row, minlength=count) for row in v01]) - n_i * auc[:, None]
    k = count / (count - 1)
    s10, s01, s11 = k / m * d10 @ d10.T, k / n * d01 @ d01.T, k * d10 @ d01.T
    return s10 / m + s01 / n + (s11 + s11.T) / (m * n)


def delong(y01, score_a, score_b, clusters=None) -> dict:
    """DeLong's test of AUROC(a) = AUROC(b) for two scores of the same images (paired), with
    the asymptotic 95 % interval of the difference a - b. With ``clusters`` (each image's
    patient), the variance is Obuchowski's clustered one: several images of one patient are not
    independent, and DeLong's own variance understates the uncertainty then (the AUROCs are the
    same image-level ones either way)."""
    y01 = np.asarray(y01).astype(bool)
    m, n = int(y01.sum()), int((~y01).sum())
    if m < 2 or n < 2:
        return {
            "auroc_a": None,
            "auroc_b": None,
            "difference": None,
            "z": None,
            "p": None,
            "ci95": None,
            "positives": m,
            "negatives": n,
            "why": "needs at least 2 positives and 2 negatives",
        }
    auc, v10, v01 = _midrank_components(y01, np.vstack([score_a, score_b]).astype(np.float64))
    clustered = clusters is not None and len(pd.unique(pd.Series(np.asarray(clusters)).astype(str))) > 1
    if clustered:
        covariance = _clustered_covariance(y01, v10, v01, auc, clusters)
    else:
        covariance = np.cov(v10) / m + np.cov(v01) / n
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    difference = float(auc[0] - auc[1])
    if variance <= 1e-15:  # identical rankings: no difference and nothing to test
        z, p = 0.0, 1.0
        half = 0.0
    else:
        z = difference / math.sqrt(variance)
        p = float(2 * stats.norm.sf(abs(z)))
        half = 1.959963984540054 * math.sqrt(variance)
    return {
        "auroc_a": float(auc[0]),
        "auroc_b": float(auc[1]),
        "difference": difference,
        "z": float(z),
        "p": p,
        "variance": variance,
        "variance_method": "Obuchowski 1997, clustered by patient" if clustered else "DeLong 1988",
        "ci95": [difference - half, difference + half],
        "positives": m,
        "negatives": n,
    }


def delong_variance(y01, score, clusters=None) -> float:
    """DeLong's variance of one AUROC (Obuchowski's clustered one with ``clusters``)."""
    y01 = np.asarray(y01).astype(bool)
    auc, v10, v01 = _midrank_components(y01, np.asarray(score, np.float64)[None, :])
    if clusters is not None:
        return float(_clustered_covariance(y01, v10, v01, auc, clusters)[0, 0])
    return float(np.var(v10, ddof=1) / y01.sum() + np.var(v01, ddof=1) / (~y01).sum())


# ----------------------------------------------------------------------------- calibration
def reliability(y01, prob, bins: int = 10) -> dict:
    """Equal-width bins of predicted probability: count, mean predicted and observed fraction
    per bin (empty bins have None), the expected calibration error (count-weighted mean gap),
    the maximum gap and the Brier score."""
    y01 = np.asarray(y01, np.float64)
    prob = np.asarray(prob, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], prob)  # the binning of sklearn's calibration_curve
    count = np.bincount(which, minlength=bins)
    total_prob = np.bincount(which, weights=prob, minlength=bins)
    total_pos = np.bincount(which, weights=y01, minlength=bins)
    filled = count > 0
    mean_prob = np.where(filled, total_prob / np.maximum(count, 1), np.nan)
    observed = np.where(filled, total_pos / np.maximum(count, 1), np.nan)
    gaps = np.abs(observed - mean_prob)
    return {
        "edges": edges.tolist(),
        "count": count.tolist(),
        "mean_predicted": [None if np.isnan(v) else float(v) for v in mean_prob],
        "observed": [None if np.isnan(v) else float(v) for v in observed],
        "ece": float(np.nansum(gaps * count) / max(len(prob), 1)),
        "max_gap": float(np.nanmax(gaps)) if filled.any() else None,
        "brier": float(skm.brier_score_loss(y01, prob)) if len(prob) else None,
    }


def _logits(task: str, probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p)) if task == "multilabel" else np.log(p)


def apply_temperature(task: str, probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities with the logits divided by ``temperature`` (softmax tasks: the log
    probabilities are the logits up to a constant, which softmax ignores)."""
    z = _logits(task, probs) / temperature
    if task == "multilabel":
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _nll(task: str, y: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs, 1e-12, 1 - 1e-12)
    if task == "multilabel":
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def fit_temperature(task: str, y: np.ndarray, probs: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``y`` (one for the model, as
    Guo et al. 2017), searched on log T in [-3, 3] (T from 0.05 to 20)."""
    result = optimize.minimize_scalar(
        lambda log_t: _nll(task, y, apply_temperature(task, probs, math.exp(log_t))),
        bounds=(-3.0, 3.0),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(math.exp(result.x))


# ----------------------------------------------------------------------------- helpers
def scored_classes(task: str, classes: list[str]) -> list[int]:
    """The classes scored one against the rest: the positive class of a binary task, every class otherwise."""
    return [1] if task == "binary" else list(range(len(classes)))


def onehot(task: str, classes: list[str], y: np.ndarray) -> np.ndarray:
    return np.asarray(y) if task == "multilabel" else np.eye(len(classes), dtype=int)[np.asarray(y)]


def decisions(task: str, probs: np.ndarray, thresholds) -> np.ndarray:
    """0/1 decision per image and class (one against the rest for multi-class: the argmax)."""
    if task == "multiclass":
        return np.eye(probs.shape[1], dtype=int)[probs.argmax(1)]
    out = np.zeros_like(probs, dtype=int)
    if task == "binary":
        out[:, 1] = probs[:, 1] >= thresholds[0]
        out[:, 0] = 1 - out[:, 1]
        return out
    return (probs >= np.asarray(thresholds)[None, :]).astype(int)


def test_predictions(predictions: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, str]:
    """The held-out test predictions evaluated for an experiment, one row per image in the order
    the predictions list them (never by ID: IDs may be pseudonyms, which differ per results
    folder): the mean of the fold models (the fold ensemble) where every fold predicted the same
    test set; otherwise each image's mean over the folds that predicted it. Returns (frame, how)."""
    cols = [f"{PROB}{c}" for c in classes]
    test = predictions[predictions["set"] == "test"]
    if not len(test):
        return pd.DataFrame(columns=["image_id", "patient_id", "labels", *cols]), "no test set"
    folds_per_image = test.groupby("image_id")["fold"].nunique()
    shared = bool((folds_per_image == test["fold"].nunique()).all())
    mean = test.groupby("image_id", sort=False)[cols].mean()  # in the order of the predictions
    first = test.drop_duplicates("image_id").set_index("image_id").loc[mean.index]
    frame = mean.reset_index().assign(
        patient_id=first["patient_id"].astype(str).to_numpy(), labels=first["labels"].to_list()
    )
    folds, models = test["fold"].nunique(), int(test.groupby("image_id").size().max())
    seeds = f" ({folds} folds x {models // folds} seeds)" if models > folds else ""
    how = (
        f"fold ensemble: mean of {models if seeds else folds} {'models' if seeds else 'fold models'}{seeds}"
        if shared
        else "each fold model on its own test images (mean where several predicted an image)"
    )
    return frame[["image_id", "patient_id", "labels", *cols]], how


# ----------------------------------------------------------------------------- subgroups
def _edge(value: float) -> str:
    return f"{value:g}"


def subgroup_of(values: pd.Series, spec: dict) -> pd.Series:
    """Each image's group in one subgroup definition: the value as it is (categorical), or the
    band it falls in (``bands``: cut points, e.g. [18, 40, 65] gives <18, 18-40, 40-65, 65+).
    Empty cells are "missing"; numbers outside ``valid`` are "out of range" (both shown)."""
    if not spec.get("bands"):
        text = values.astype("string").str.strip().fillna("")
        return text.mask(text == "", "missing").astype(str)
    cuts = sorted(float(v) for v in spec["bands"])
    labels = (
        [f"<{_edge(cuts[0])}"] + [f"{_edge(a)}-{_edge(b)}" for a, b in zip(cuts, cuts[1:])] + [f"{_edge(cuts[-1])}+"]
    )
    low, high = spec.get("valid") or [None, None]
    out = []
    for value in values:
        number = number_or_age(value)
        if number is None:
            out.append("missing")
        elif (low is not None and number < low) or (high is not None and number > high):
            out.append("out of range")
        else:
            out.append(labels[int(np.searchsorted(cuts, number, side="right"))])
    return pd.Series(out, index=values.index, dtype=object)


def group_order(spec: dict, present: list[str]) -> list[str]:
    """Bands in numeric order, categories alphabetically, then out of range and missing."""
    tail = [g for g in ("out of range", "missing") if g in present]
    if spec.get("bands"):
        cuts = sorted(float(v) for v in spec["bands"])
        order = (
            [f"<{_edge(cuts[0])}"]
            + [f"{_edge(a)}-{_edge(b)}" for a, b in zip(cuts, cuts[1:])]
            + [f"{_edge(cuts[-1])}+"]
        )
        return [g for g in order if g in present] + tail
    return sorted(g for g in present if g not in tail) + tail


def metadata_column(spec: dict) -> str:
    return f"meta:{spec['column']}"


def _metric_rows(task, classes, y1h, probs, decided, rows, boot: PatientBootstrap) -> dict:
    """AUROC per class and macro, sensitivity and specificity per class, with intervals, on ``rows``."""
    out: dict[str, tuple] = {}
    aurocs = []
    auroc_draws = []
    for j in scored_classes(task, classes):
        c = classes[j]
        col = y1h[rows, j].astype(bool)
        point = weighted_auroc(col, probs[rows, j], np.ones((1, len(rows))))[0]
        draws = boot.draws(lambda w: weighted_auroc(col, probs[rows, j], w), rows)
        out[f"auroc.{c}"] = (None if np.isnan(point) else float(point), interval(draws))
        aurocs.append(point)
        auroc_draws.append(draws)
        sens, spec = weighted_rates(col, decided[rows, j], np.ones((1, len(rows))))
        sens_draws = boot.draws(lambda w: weighted_rates(col, decided[rows, j], w)[0], rows)
        spec_draws = boot.draws(lambda w: weighted_rates(col, decided[rows, j], w)[1], rows)
        out[f"sensitivity.{c}"] = (None if np.isnan(sens[0]) else float(sens[0]), interval(sens_draws))
        out[f"specificity.{c}"] = (None if np.isnan(spec[0]) else float(spec[0]), interval(spec_draws))
    aurocs = np.asarray(aurocs)
    with _quiet():
        macro_draws = np.nanmean(np.vstack(auroc_draws), axis=0) if len(auroc_draws) > 1 else auroc_draws[0]
    macro = float(np.nanmean(aurocs)) if np.isfinite(aurocs).any() else None
    out = {"auroc_macro": (macro, interval(macro_draws)), **out}
    return out


@contextlib.contextmanager
def _quiet():
    """Silence numpy's mean-of-empty warning (a draw where no class is defined gives NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def subgroup_results(
    test: pd.DataFrame,
    index: pd.DataFrame,
    task: str,
    classes: list[str],
    thresholds,
    specs: list[dict],
    min_images: int,
    min_patients: int,
    boot: PatientBootstrap,
) -> pd.DataFrame:
    """One row per (subgroup column, group, metric): value, interval, images, patients, too_small.
    The group "all" (every test image) comes first in each column, as the reference."""
    cols = [f"{PROB}{c}" for c in classes]
    meta = index.set_index("image_id")
    probs = test[cols].to_numpy(np.float64)
    y1h = onehot(task, classes, targets_for(test["labels"], classes, task))
    decided = decisions(task, probs, thresholds)
    patients = test["patient_id"].astype(str).to_numpy()
    records = []
    for spec in specs:
        column = metadata_column(spec)
        if column not in meta.columns:
            raise ConfigError(
                f"evaluation.subgroups: column {spec['column']!r} is not in the index (the index carries "
                f"{sorted(c[5:] for c in meta.columns if c.startswith('meta:')) or 'no metadata columns'}); "
                f"it is read from dataset.table or, by its keyword, from DICOM headers (dataset.dicom_metadata)"
            )
        groups = subgroup_of(meta.loc[test["image_id"], column].reset_index(drop=True), spec).to_numpy()
        name = spec.get("name") or spec["column"]
        for group in ["all", *group_order(spec, sorted(set(groups)))]:
            rows = np.arange(len(test)) if group == "all" else np.flatnonzero(groups == group)
            n_images, n_patients = len(rows), len(set(patients[rows]))
            small = n_images < min_images or n_patients < min_patients
            base = {
                "subgroup": name,
                "column": spec["column"],
                "group": group,
                "images": n_images,
                "patients": n_patients,
                "too_small": bool(small and group != "all"),
            }
            if base["too_small"]:
                records.append({**base, "metric": "auroc_macro", "value": None, "ci_low": None, "ci_high": None})
                continue
            for metric, (value, ci) in _metric_rows(task, classes, y1h, probs, decided, rows, boot).items():
                records.append(
                    {
                        **base,
                        "metric": metric,
                        "value": value,
                        "ci_low": ci[0] if ci else None,
                        "ci_high": ci[1] if ci else None,
                    }
                )
    return pd.DataFrame(
        records,
        columns=[
            "subgroup",
            "column",
            "group",
            "images",
            "patients",
            "too_small",
            "metric",
            "value",
            "ci_low",
            "ci_high",
        ],
    )


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
    oof: pd.DataFrame, test: pd.DataFrame, task: str, classes: list[str], targets: dict, youden, boot: PatientBootstrap
) -> pd.DataFrame:
    """Per class and target: the threshold chosen on the pooled out-of-fold predictions, the
    validation sensitivity/specificity it gives, the test outcome with intervals, and the best
    the test ROC curve allows at that target. Youden's threshold (the one used elsewhere) first."""
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
            for value in targets.get(target, [])
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


# ----------------------------------------------------------------------------- paired comparison
def compare_pair(
    a: pd.DataFrame, b: pd.DataFrame, task: str, classes: list[str], n_bootstrap: int, seed: int
) -> list[dict]:
    """Experiment a against b on the test images both predicted: per class DeLong's test (its
    variance clustered by patient, Obuchowski 1997; the unclustered p beside it) and the patient
    bootstrap interval of the AUROC difference; for the macro AUROC the bootstrap alone
    (DeLong's variance is per binary outcome; the classes of one image are not independent)."""
    cols = [f"{PROB}{c}" for c in classes]
    in_b = set(b["image_id"])
    shared = [i for i in a["image_id"] if i in in_b]  # in a's order: IDs may be pseudonyms
    a = a.set_index("image_id").loc[shared]
    b = b.set_index("image_id").loc[shared]
    y1h = onehot(task, classes, targets_for(a["labels"], classes, task))
    boot = PatientBootstrap(a["patient_id"].astype(str), n_bootstrap, seed)
    rows, diffs = [], []
    for j in scored_classes(task, classes):
        y01 = y1h[:, j].astype(bool)
        sa, sb = a[cols[j]].to_numpy(np.float64), b[cols[j]].to_numpy(np.float64)
        test = delong(y01, sa, sb, clusters=a["patient_id"].astype(str).to_numpy())
        plain = delong(y01, sa, sb)
        draws = boot.draws(lambda w: weighted_auroc(y01, sa, w) - weighted_auroc(y01, sb, w))
        diffs.append(draws)
        ci = interval(draws)
        rows.append(
            {
                "class": classes[j],
                "images": len(shared),
                "positives": test["positives"],
                "auroc_a": test["auroc_a"],
                "auroc_b": test["auroc_b"],
                "difference": test["difference"],
                "delong_z": test["z"],
                "delong_p": test["p"],
                "delong_ci_low": (test["ci95"] or [None])[0],
                "delong_ci_high": (test["ci95"] or [None, None])[1],
                "delong_p_unclustered": plain["p"],
                "bootstrap_ci_low": ci[0] if ci else None,
                "bootstrap_ci_high": ci[1] if ci else None,
            }
        )
    if len(rows) > 1:
        defined = [r for r in rows if r["auroc_a"] is not None]
        with _quiet():
            macro = np.nanmean(np.vstack(diffs), axis=0)
        ci = interval(macro)
        rows.insert(
            0,
            {
                "class": "macro",
                "images": len(shared),
                "positives": None,
                "auroc_a": float(np.mean([r["auroc_a"] for r in defined])) if defined else None,
                "auroc_b": float(np.mean([r["auroc_b"] for r in defined])) if defined else None,
                "difference": float(np.mean([r["difference"] for r in defined])) if defined else None,
                "delong_z": None,
                "delong_p": None,
                "delong_ci_low": None,
                "delong_ci_high": None,
                "delong_p_unclustered": None,
                "bootstrap_ci_low": ci[0] if ci else None,
                "bootstrap_ci_high": ci[1] if ci else None,
            },
        )
    return rows


# ----------------------------------------------------------------------------- one experiment
def evaluate_experiment(
    predictions: pd.DataFrame,
    index: pd.DataFrame | None,
    task: str,
    classes: list[str],
    settings: dict,
    n_bootstrap: int,
    seed: int,
) -> dict:
    """Everything above for one experiment's fold predictions (every fold, validation and
    test rows). ``settings`` is the validated ``evaluation`` config section."""
    cols = [f"{PROB}{c}" for c in classes]
    oof = predictions[predictions["set"] == "val"]
    test, how = test_predictions(predictions, classes)
    out: dict = {
        "task": task,
        "classes": classes,
        "test_predictions": test,
        "test_source": how,
        "bootstrap": {"resamples": n_bootstrap, "unit": "patient", "seed": seed},
    }
    if not len(test):
        out["skipped"] = "no held-out test predictions"
        return out
    thresholds = choose_thresholds(task, targets_for(oof["labels"], classes, task), oof[cols].to_numpy(np.float64))
    out["thresholds"] = thresholds
    boot = PatientBootstrap(test["patient_id"], n_bootstrap, seed)
    specs = settings.get("subgroups") or []
    if specs:
        if index is None:
            raise ConfigError("evaluation.subgroups needs the index table")
        out["subgroups"] = subgroup_results(
            test,
            index,
            task,
            classes,
            thresholds,
            specs,
            settings["min_subgroup_images"],
            settings["min_subgroup_patients"],
            boot,
        )
    out["operating_points"] = operating_points(oof, test, task, classes, settings["operating_points"], thresholds, boot)
    calib = settings["calibration"]
    out["calibration"] = calibration(predictions, test, task, classes, calib["bins"], calib["temperature_scaling"])
    if settings["patient_level"]["enabled"]:
        out["patient_level"] = patient_level(
            oof, test, task, classes, settings["patient_level"]["aggregate"], n_bootstrap, seed
        )
    return out


def calibration_table(calib: dict) -> pd.DataFrame:
    rows = []
    for stage in ("before", "after"):
        for c, r in (calib.get(stage) or {}).items():
            rows.append(
                {
                    "class": c,
                    "temperature_scaling": stage,
                    "ece": r["ece"],
                    "max_gap": r["max_gap"],
                    "brier": r["brier"],
                }
            )
    return pd.DataFrame(rows, columns=["class", "temperature_scaling", "ece", "max_gap", "brier"])


def summary_record(result: dict) -> dict:
    """The JSON-able part of ``evaluate_experiment``'s result (frames as lists of records)."""
    out = {k: v for k, v in result.items() if k != "test_predictions"}
    for key in ("subgroups", "operating_points"):
        if key in out:
            out[key] = _records(out[key])
    return out


def _records(frame: pd.DataFrame) -> list[dict]:
    return [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        for row in frame.astype(object).to_dict("records")
    ]


# ----------------------------------------------------------------------------- figures
def forest_figure(name: str, subgroups: pd.DataFrame):
    """One panel per subgroup column: macro AUROC and its interval per group, the whole test
    set's as a dashed line; groups too small are named, not plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    macro = subgroups[subgroups["metric"] == "auroc_macro"]
    columns = list(dict.fromkeys(macro["subgroup"]))
    heights = [max(1, macro[macro["subgroup"] == c]["group"].nunique()) for c in columns]
    fig, axes = plt.subplots(
        len(columns),
        1,
        figsize=(6.4, 0.9 + 0.34 * sum(heights) + 0.5 * len(columns)),
        squeeze=False,
        height_ratios=heights,
        layout="constrained",
    )
    for ax, column in zip(axes[:, 0], columns):
        part = macro[macro["subgroup"] == column].reset_index(drop=True)
        overall = part.loc[part["group"] == "all", "value"]
        y = np.arange(len(part))[::-1]
        for yi, (_, r) in zip(y, part.iterrows()):
            label = f"{r['group']} ({r['images']} images, {r['patients']} patients)"
            if r["too_small"] or r["value"] is None or pd.isna(r["value"]):
                ax.text(
                    0.505, yi, "too small" if r["too_small"] else "undefined", va="center", fontsize=8, color="#777"
                )
            else:
                if pd.notna(r["ci_low"]):
                    ax.plot([r["ci_low"], r["ci_high"]], [yi, yi], color="#0072B2", lw=1.6)
                ax.plot([r["value"]], [yi], "s", color="black" if r["group"] == "all" else "#0072B2", ms=5)
            ax.annotate(
                label,
                (0, yi),
                xycoords=("axes fraction", "data"),
                xytext=(-6, 0),
                textcoords="offset points",
                ha="right",
                va="center",
                fontsize=8,
            )
        if len(overall) and pd.notna(overall.iloc[0]):
            ax.axvline(float(overall.iloc[0]), color="#555", ls="--", lw=0.8)
        ax.set_yticks([])
        lows = pd.to_numeric(part["ci_low"], errors="coerce").dropna()
        ax.set_xlim(max(0.0, min(0.5, float(lows.min()) - 0.02)) if len(lows) else 0.5, 1.0)
        ax.set_ylim(-0.7, len(part) - 0.3)
        ax.set_title(f"{column}", fontsize=9, loc="left")
        ax.set_xlabel("macro AUROC (95% CI, patient bootstrap)", fontsize=8)
    fig.suptitle(f"{name}: subgroups of the held-out test set", fontsize=10)
    return fig


def reliability_figure(name: str, calib: dict):
    """Reliability diagram per class: observed fraction against mean predicted probability per
    bin, before (and after) temperature scaling, bin sizes as marker areas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(calib["before"])
    cols = min(4, len(classes))
    nrows = int(np.ceil(len(classes) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.1 * cols, 3.2 * nrows), squeeze=False, layout="constrained")
    for ax, c in zip(axes.ravel(), classes):
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        for stage, color in (("before", "#D55E00"), ("after", "#0072B2")):
            r = (calib.get(stage) or {}).get(c)
            if not r:
                continue
            pts = [(p, o, n) for p, o, n in zip(r["mean_predicted"], r["observed"], r["count"]) if n]
            if pts:
                p, o, n = map(np.asarray, zip(*pts))
                t = calib.get("temperatures") or {}
                label = (
                    f"before, ECE {r['ece']:.3f}"
                    if stage == "before"
                    else f"temperature-scaled, ECE {r['ece']:.3f}"
                    + (f" (T {np.mean(list(t.values())):.2f})" if t else "")
                )
                ax.plot(p, o, "-", color=color, lw=1.2, label=label)
                ax.scatter(p, o, s=8 + 60 * n / n.max(), color=color, zorder=3)
        ax.set(title=c, xlabel="mean predicted probability", ylabel="observed fraction", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes.ravel()[len(classes) :]:
        ax.axis("off")
    fig.suptitle(f"{name}: reliability on the held-out test set", fontsize=10)
    return fig


def write(result: dict, name: str, output) -> None:
    """Every file of the clinical evaluation, to the paths the rule names (``output`` has
    test_predictions, clinical, subgroups, forest, calibration, reliability, operating_points)."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result["test_predictions"].to_parquet(output.test_predictions, index=False)
    Path(output.clinical).write_text(json.dumps(summary_record(result), indent=2) + "\n")
    subgroups = result.get(
        "subgroups",
        pd.DataFrame(
            columns=[
                "subgroup",
                "column",
                "group",
                "images",
                "patients",
                "too_small",
                "metric",
                "value",
                "ci_low",
                "ci_high",
            ]
        ),
    )
    subgroups.to_csv(output.subgroups, index=False)
    result.get("operating_points", pd.DataFrame()).to_csv(output.operating_points, index=False)
    calibration_table(result.get("calibration", {})).to_csv(output.calibration, index=False)
    figures = (
        (
            output.forest,
            lambda: forest_figure(name, subgroups),
            len(subgroups),
            "no subgroups configured (evaluation.subgroups)",
        ),
        (
            output.reliability,
            lambda: reliability_figure(name, result["calibration"]),
            "calibration" in result,
            result.get("skipped", ""),
        ),
    )
    for path, draw, available, why in figures:
        if available:
            fig = draw()
        else:  # a placeholder saying why, so the rule's outputs always exist
            fig, ax = plt.subplots(figsize=(5, 1))
            ax.axis("off")
            ax.text(0.5, 0.5, f"{name}: {why}", ha="center", va="center")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)


COMPARISON_COLUMNS = [
    "a",
    "b",
    "class",
    "images",
    "positives",
    "auroc_a",
    "auroc_b",
    "difference",
    "delong_z",
    "delong_p",
    "delong_ci_low",
    "delong_ci_high",
    "delong_p_unclustered",
    "bootstrap_ci_low",
    "bootstrap_ci_high",
]


def pairs_to_compare(names: list[str], settings: dict, best: str | None) -> list[tuple[str, str]]:
    """The reference (configured, or the best by validation) against every other, then the
    configured pairs, each pair once."""
    reference = settings.get("reference") or best
    pairs = [(reference, other) for other in names if reference and other != reference]
    for a, b in settings.get("pairs") or []:
        if a != b and (a, b) not in pairs and (b, a) not in pairs:
            pairs.append((a, b))
    return pairs


def paired_comparisons(
    predictions: dict[str, pd.DataFrame], summary_path, settings: dict, best: str | None, n_bootstrap: int, seed: int
) -> pd.DataFrame:
    """``predictions``: experiment -> its evaluated test predictions (test_predictions.parquet)."""
    import json
    from pathlib import Path

    summary = json.loads(Path(summary_path).read_text())
    task, classes = summary["task"], summary["classes"]
    rows = []
    for a, b in pairs_to_compare(list(predictions), settings, best):
        if not len(predictions[a]) or not len(predictions[b]):
            continue
        rows += [
            {"a": a, "b": b, **row}
            for row in compare_pair(predictions[a], predictions[b], task, classes, n_bootstrap, seed)
        ]
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
