"""The statistics of the clinical evaluation: the patient bootstrap (resamples as per-image
weights), weighted AUROC and rates, DeLong's test with patient-clustered variance, reliability
bins and temperature scaling, and the helpers that turn predictions into decisions."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import optimize, stats
from sklearn import metrics as skm

from medfold.evaluation.clinical._constants import PROB


# ----------------------------------------------------------------------------- bootstrap
class PatientBootstrap:
    """``n`` resamples of the patients of a set of images, with replacement, as weights."""

    def __init__(self, patients, n: int, seed: int):
        # patients numbered in the order they first appear, never by their IDs' sort order: a
        # pseudonym differs between results folders, and the draws must not (medfold.core.privacy)
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
