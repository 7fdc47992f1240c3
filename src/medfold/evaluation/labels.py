"""Likely label errors from the out-of-fold predictions (``<experiment>/cv/label_issues.csv``).

Every cross-validation image has one prediction from the fold model that never saw it; a
confident disagreement with its label is the cheapest place to look for a wrong label. The method
is confident learning (Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty in
Dataset Labels", JAIR 2021), written here from the paper:

1. per class j, the threshold t_j = the mean predicted probability of j over the images labelled j;
2. an image's confident class is the most probable of the classes whose probability reaches their
   threshold (none: it is not counted); the counts of (given label, confident class) are the
   confident joint, calibrated so each given label's row sums to its image count;
3. the images flagged are, for every pair (given i, other j), the n * Q[i, j] images labelled i
   with the largest margin p_j - p_i (prune by noise rate, the paper's default);
4. everything is ranked by self-confidence, the probability of the given label (lowest first).

Binary tasks are two classes; a multi-label task is one binary problem per label, so an image
can be listed once per label. Nothing is relabelled: ``dataset.exclude_images`` (a file of image
IDs, raw or shared) is how a user acts on the list.

Why not cleanlab (the maintained implementation of the same paper): it is AGPL-3.0, and medfold
is MIT and meant to run inside hospitals' own systems; the algorithm is short enough to own and
test (on the demo's planted flips, and by hand).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from medfold.data.index.labels import targets_for

PROB = "prob:"


def confident_learning(given: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``given``: labels 0..K-1 (N,); ``probs``: (N, K). Returns (flagged mask, suggested class)."""
    n, k = probs.shape
    counts = np.bincount(given, minlength=k)
    thresholds = np.array([probs[given == j, j].mean() if counts[j] else np.inf for j in range(k)])
    above = probs >= thresholds[None, :]
    masked = np.where(above, probs, -np.inf)
    confident = np.where(above.any(1), masked.argmax(1), -1)
    joint = np.zeros((k, k))
    for i, j in zip(given[confident >= 0], confident[confident >= 0]):
        joint[i, j] += 1
    rows = joint.sum(1, keepdims=True)
    calibrated = np.divide(joint, rows, out=np.zeros_like(joint), where=rows > 0) * counts[:, None]
    noise = calibrated / max(calibrated.sum(), 1e-12) * n  # images expected in each (given, true) cell
    flagged = np.zeros(n, bool)
    for i in range(k):
        labelled = np.flatnonzero(given == i)
        for j in range(k):
            take = int(round(noise[i, j])) if i != j else 0
            if take and len(labelled):
                margin = probs[labelled, j] - probs[labelled, i]
                flagged[labelled[np.argsort(-margin, kind="stable")[:take]]] = True
    suggested = probs.argmax(1)
    flagged &= suggested != given  # a flag the model itself does not back is no suggestion
    return flagged, suggested


def _rows(ids, patients, classes, given, probs, label: str | None) -> pd.DataFrame:
    flagged, suggested = confident_learning(given, probs)
    names = np.asarray(classes, dtype=object)
    idx = np.arange(len(given))
    return pd.DataFrame(
        {
            "image_id": ids,
            "patient_id": patients,
            "label": label,
            "given": names[given],
            "suggested": names[suggested],
            "confidence": probs[idx, suggested],
            "self_confidence": probs[idx, given],
            "flagged": flagged,
        }
    )


def label_issues(oof: pd.DataFrame, classes: list[str], task: str) -> pd.DataFrame:
    """Every out-of-fold image (per label for multi-label) with its given and suggested label, the
    model's confidence in each, and whether confident learning flags it; flagged ones first, each
    group by self-confidence (lowest first). ``oof``: the fold predictions' validation rows."""
    ids, patients = oof["image_id"].to_numpy(), oof["patient_id"].to_numpy()
    probs = oof[[f"{PROB}{c}" for c in classes]].to_numpy(np.float64)
    y = targets_for(oof["labels"], classes, task)
    if task == "multilabel":
        parts = [
            _rows(
                ids,
                patients,
                [f"no {c}", c],
                y[:, j].astype(int),
                np.stack([1 - probs[:, j], probs[:, j]], 1),
                c,
            )
            for j, c in enumerate(classes)
        ]
        frame = pd.concat(parts, ignore_index=True)
    else:
        frame = _rows(ids, patients, classes, np.asarray(y, int), probs, None)
    frame = frame.sort_values(["flagged", "self_confidence"], ascending=[False, True], kind="stable")
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame.reset_index(drop=True)


def audit(predictions: pd.DataFrame, classes: list[str], task: str) -> pd.DataFrame:
    """The label audit of an experiment's fold predictions (every fold; with repeats, each
    validation image once, its seeds averaged: ``medfold.evaluation.aggregate.combine_repeats``)."""
    return label_issues(predictions[predictions["set"] == "val"].reset_index(drop=True), classes, task)
