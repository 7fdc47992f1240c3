"""Classification metrics from scikit-learn, for binary, multi-class and multi-label tasks.

``y`` is a class index per image (binary, multiclass) or a 0/1 matrix (multilabel); ``probs``
is (images, classes). Binary tasks score the second class as positive. The decision rule for
accuracy, F1 and the confusion matrix (``training.decision``): ``youden`` (the default) chooses
binary and multi-label thresholds on validation by Youden's J (max TPR - FPR) and applies them
unchanged to test; ``argmax`` takes the most probable class (multi-label: each label at 0.5);
``fixed`` one stated threshold. Multi-class decisions are always the argmax.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm


def youden_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity - 1; 0.5 if y has one class."""
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thresholds = skm.roc_curve(y, score)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


YOUDEN = {"rule": "youden", "threshold": 0.5}


def choose_thresholds(task: str, y: np.ndarray, probs: np.ndarray, decision: dict | None = None) -> list[float] | None:
    """The decision thresholds ``decision`` (a ``training.decision`` block; default Youden) gives
    on these labelled predictions: one for binary, one per label for multi-label; None when
    decisions are the argmax (multi-class always)."""
    rule = (decision or YOUDEN)["rule"]
    if task == "multiclass" or (rule == "argmax" and task == "binary"):
        return None
    if rule == "argmax":  # multi-label: each label's own two-way argmax
        return [0.5] * probs.shape[1]
    if rule == "fixed":
        return [float(decision["threshold"])] * (1 if task == "binary" else probs.shape[1])
    if task == "binary":
        return [youden_threshold(y, probs[:, 1])]
    return [youden_threshold(y[:, j], probs[:, j]) for j in range(probs.shape[1])]


def describe_decision(decision: dict | None) -> str:
    """The rule in words, for metrics.json and the report."""
    decision = decision or YOUDEN
    if decision["rule"] == "fixed":
        return f"threshold {decision['threshold']:g}"
    return "argmax" if decision["rule"] == "argmax" else "Youden's J on validation"


def _auroc(y01: np.ndarray, score: np.ndarray) -> float | None:
    if len(np.unique(y01)) < 2:
        return None  # undefined with one class present
    return float(skm.roc_auc_score(y01, score))


def predict(task: str, probs: np.ndarray, thresholds: list[float] | None) -> np.ndarray:
    if task == "binary":
        return probs.argmax(1) if thresholds is None else (probs[:, 1] >= thresholds[0]).astype(int)
    if task == "multilabel":
        return (probs >= np.asarray(thresholds if thresholds else [0.5] * probs.shape[1])[None, :]).astype(int)
    return probs.argmax(1)


def _aurocs(task: str, classes: list[str], y: np.ndarray, probs: np.ndarray) -> tuple[dict, float | None]:
    """AUROC per reported class (binary: the positive class only) and their macro mean."""
    onehot = y if task == "multilabel" else np.eye(len(classes), dtype=int)[y]
    scored = [1] if task == "binary" else range(len(classes))
    per_class = {classes[j]: _auroc(onehot[:, j], probs[:, j]) for j in scored}
    defined = [v for v in per_class.values() if v is not None]
    return per_class, (float(np.mean(defined)) if defined else None)


def _decisions(task: str, classes: list[str], y: np.ndarray, pred: np.ndarray) -> dict:
    """Accuracy (multi-label: the whole label set exact) and balanced accuracy (multi-label: the
    mean over labels) of hard decisions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if task == "multilabel":
            balanced = np.mean([skm.balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(len(classes))])
        else:
            balanced = skm.balanced_accuracy_score(y, pred)
    return {"accuracy": float(skm.accuracy_score(y, pred)), "balanced_accuracy": float(balanced)}


def _labels(task: str, classes: list[str]) -> list[int] | None:
    return None if task == "multilabel" else list(range(len(classes)))


def epoch_scores(task: str, classes: list[str], y: np.ndarray, probs: np.ndarray) -> dict:
    """The metrics an epoch logs and early stopping may watch (macro AUROC, accuracy, balanced
    accuracy, macro F1), equal to ``evaluate``'s without its reports: about a fifth of its time,
    which matters when a small model's epoch takes a second."""
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    pred = predict(task, probs, None)
    out = {"auroc_macro": _aurocs(task, classes, y, probs)[1], **_decisions(task, classes, y, pred)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["f1_macro"] = float(skm.f1_score(y, pred, average="macro", zero_division=0, labels=_labels(task, classes)))
    return out


def evaluate(
    task: str, classes: list[str], y: np.ndarray, probs: np.ndarray, thresholds: list[float] | None = None
) -> dict:
    """Every metric of one set of predictions; None where a metric is undefined."""
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    out: dict = {"images": int(len(probs))}
    pred = predict(task, probs, thresholds)
    out["auroc"], out["auroc_macro"] = _aurocs(task, classes, y, probs)
    out.update(_decisions(task, classes, y, pred))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero_division is set; undefined cases report 0
        if task == "multilabel":
            out["label_accuracy"] = float((y == pred).mean())
            out["confusion"] = {
                c: skm.confusion_matrix(y[:, j], pred[:, j], labels=[0, 1]).tolist() for j, c in enumerate(classes)
            }
        else:
            out["confusion"] = skm.confusion_matrix(y, pred, labels=_labels(task, classes)).tolist()
        for average in ("macro", "weighted"):
            p, r, f, _ = skm.precision_recall_fscore_support(
                y,
                pred,
                average=average,
                zero_division=0,
                labels=_labels(task, classes),
            )
            out[f"precision_{average}"], out[f"recall_{average}"], out[f"f1_{average}"] = float(p), float(r), float(f)
        report = skm.classification_report(
            y,
            pred,
            target_names=classes,
            zero_division=0,
            output_dict=True,
            labels=_labels(task, classes),
        )
    out["per_class"] = {c: {k: float(v) for k, v in report[c].items()} for c in classes}
    if task == "binary":
        tn, fp, fn, tp = np.asarray(out["confusion"]).ravel()
        out["sensitivity"] = float(tp / (tp + fn)) if tp + fn else None
        out["specificity"] = float(tn / (tn + fp)) if tn + fp else None
    if thresholds is not None:
        out["thresholds"] = thresholds
    return out


SCALARS = (
    "auroc_macro",
    "accuracy",
    "balanced_accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
)


def scalar_metrics(result: dict) -> dict:
    """The single-number metrics of an ``evaluate`` result, per-class AUROC as ``auroc.<class>``."""
    out = {k: result[k] for k in SCALARS if k in result}
    out.update({f"auroc.{c}": v for c, v in result["auroc"].items()})
    for key in ("sensitivity", "specificity", "label_accuracy"):
        if key in result:
            out[key] = result[key]
    return out
