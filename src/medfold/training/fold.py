"""The fold machinery every stage that loads or evaluates a fold model shares: a fold's rows and
data, the device, the loss, the runner that batches images through a model, the model file
(saved with what it needs to be rebuilt, loaded back) and the evaluation of a fold's model on its
validation and test images. Training (medfold.training.train), compression, explanation and prediction
build on it; it imports none of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from medfold.core import files
from medfold.core.errors import ConfigError, DataError
from medfold.core.progress import Progress
from medfold.data.cache import open_cache
from medfold.data.index.io import read_index
from medfold.data.index.labels import targets_for
from medfold.evaluation.metrics import YOUDEN, choose_thresholds, describe_decision, evaluate
from medfold.settings.training import AugmentConfig, EvalOptions, Oversample, TrainSettings
from medfold.split import fold_members
from medfold.training import fakequant
from medfold.training.models import build_model, input_stats
from medfold.training.transforms import CachedBatches, augment_batch, normalize, scale_inputs

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


@dataclasses.dataclass(frozen=True)
class FoldOutputs(files.Outputs):
    """Where a fold's training writes (the train rule's outputs). The checkpoint, and a
    distributed run's settings and job files, are work files beside the model."""

    model: Path
    history: Path
    predictions: Path
    metrics: Path
    tensorboard: Path
    NAMES: ClassVar[dict[str, str]] = {
        "model": "model.pt",
        "history": "history.csv",
        "predictions": "predictions.parquet",
        "metrics": "metrics.json",
        "tensorboard": "tensorboard",
    }

    @property
    def checkpoint(self) -> Path:
        return self.model.with_name(CHECKPOINT)

    @property
    def work(self) -> Path:
        return self.model.parent


def fold_rows(splits: pd.DataFrame, index: pd.DataFrame, fold: int) -> dict[str, np.ndarray]:
    position = pd.Series(np.arange(len(index)), index=index["image_id"].to_numpy())
    by_set = fold_members(splits, fold)
    return {name: np.sort(position.loc[ids].to_numpy()) for name, ids in by_set.items()}


def check_fold(rows: dict[str, np.ndarray], targets: np.ndarray, classes: list[str], task: str, fold: int) -> None:
    for name in ("train", "val"):
        if len(rows[name]) == 0:
            raise DataError(f"fold {fold}: the {name} set is empty; use fewer split.folds or more data")
    train = targets[rows["train"]]
    present = train.sum(0) > 0 if task == "multilabel" else np.bincount(train, minlength=len(classes)) > 0
    missing = [c for c, ok in zip(classes, present) if not ok]
    if missing:
        raise DataError(
            f"fold {fold}: class(es) {missing} have no image in the training set, so the model cannot "
            f"learn them; use fewer split.folds, drop the class from dataset.labels, or add data"
        )


def sample_weights(
    targets: np.ndarray, task: str, classes: list[str], mode: str, target: dict, key: str = "training.oversample"
) -> np.ndarray | None:
    """Per-image weights for oversampling: 'balanced' gives every class (and, for multi-label,
    'no finding') the same expected share; 'target' matches the given class fractions (``key``
    names the setting in errors)."""
    if mode == "none":
        return None
    if task == "multilabel":
        member = np.hstack([targets, (targets.sum(1) == 0)[:, None]]).astype(bool)
        names = [*classes, "no finding"]
    else:
        member = np.eye(len(classes), dtype=bool)[targets]
        names = list(classes)
    counts = np.maximum(member.sum(0), 1)
    if mode == "balanced":
        share = np.ones(len(names)) / len(names)
    else:
        unknown = sorted(set(target) - set(names))
        if unknown:
            raise ConfigError(f"{key}.target: {unknown} are not classes ({names})")
        share = np.array([target.get(n, 0.0) for n in names], dtype=np.float64)
    per_class = share / counts
    return np.array([per_class[m].mean() for m in member])


def oversampled_validation(
    rows: np.ndarray, targets: np.ndarray, task: str, classes: list[str], setting: Oversample | dict, seed: int
) -> np.ndarray | None:
    """The validation fold drawn with replacement to the class shares ``setting`` states
    (``training.val_oversample``), as many images as the fold has, in row order; None for mode
    none. Study 000 oversampled its validation set to the test set's class ratio this way. Only
    the epochs' monitored scores use it: the fold's thresholds and out-of-fold predictions stay
    on the validation images, once each."""
    setting = Oversample.of(setting)
    weights = sample_weights(targets[rows], task, classes, setting.mode, setting.target, key="training.val_oversample")
    if weights is None or not len(rows):
        return None
    drawn = np.random.default_rng(seed).choice(len(rows), size=len(rows), replace=True, p=weights / weights.sum())
    return rows[np.sort(drawn)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"training.device is {name!r} but no CUDA device is visible")
    return torch.device(name)


class Criterion:
    """Cross-entropy for single-label tasks; BCE for multi-label. With class weights: CE weights
    N / (C * N_c); BCE weighs positives by w+ = |N| / (|P| + |N|) and negatives by
    w- = |P| / (|P| + |N|) per class, as in CheXNet (Rajpurkar et al. 2017)."""

    def __init__(
        self,
        task: str,
        train_targets: np.ndarray,
        n_classes: int,
        class_weights: bool,
        device,
        label_smoothing: float = 0.0,
    ):
        self.task, self.smoothing = task, label_smoothing
        self.weight = self.pos = self.neg = None
        if class_weights and task == "multilabel":
            p = train_targets.mean(0)
            self.pos = torch.tensor(1 - p, dtype=torch.float32, device=device)
            self.neg = torch.tensor(p, dtype=torch.float32, device=device)
        elif class_weights:
            counts = np.bincount(train_targets, minlength=n_classes).astype(np.float64)
            self.weight = torch.tensor(
                len(train_targets) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device
            )

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.task == "multilabel":
            weight = None if self.pos is None else y * self.pos + (1 - y) * self.neg
            return F.binary_cross_entropy_with_logits(logits, y, weight=weight)
        return F.cross_entropy(logits, y, weight=self.weight)

    def training(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss training minimises: with label smoothing when configured (cross-entropy's own
        ``label_smoothing``; for BCE each target moved toward 0.5 by half the smoothing). Validation
        and test losses stay the plain ones, comparable across settings."""
        if not self.smoothing:
            return self(logits, y)
        if self.task == "multilabel":
            return self(logits, y * (1 - self.smoothing) + 0.5 * self.smoothing)
        return F.cross_entropy(logits.float(), y, weight=self.weight, label_smoothing=self.smoothing)


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    return torch.sigmoid(logits.float()) if task == "multilabel" else torch.softmax(logits.float(), 1)


class Runner:
    """What a fold's training needs at hand: model, data, device switches."""

    def __init__(self, options, cache: np.ndarray, targets: np.ndarray, task: str, device: torch.device, model):
        """``options``: the experiment's ``TrainSettings``, an ``EvalOptions``, or a dict of its keys."""
        self.options = o = EvalOptions.of(options)
        self.cache, self.targets, self.task, self.device, self.model = cache, targets, task, device, model
        self.cuda = device.type == "cuda"
        self.amp = self.cuda and o.amp
        self.tta = o.tta
        self.channels_last = self.cuda and o.channels_last
        # a model's own statistics (ImageNet's for ImageNet weights); no model named: the fixed ones
        self.stats = input_stats(o.normalize, o.pretrained, o.model, cache.shape[1])
        shape = (1, cache.shape[1], 1, 1)
        self.mean = torch.tensor(self.stats["mean"], device=device).view(shape)
        self.std = torch.tensor(self.stats["std"], device=device).view(shape)
        self.scale = self.stats.get("scale", "255")

    def prepare(self, images: torch.Tensor, augment: AugmentConfig | None, gen) -> torch.Tensor:
        x = scale_inputs(images.to(self.device, non_blocking=True).float().div_(255), self.scale)
        if augment is not None:
            x = augment_batch(x, augment, gen)
        x = normalize(x, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: torch.Tensor, model=None) -> torch.Tensor:
        """``model`` defaults to the plain model; training passes the compiled one when compiling."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return (self.model if model is None else model)(x)

    def target(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.targets[rows.numpy()], device=self.device)

    @torch.no_grad()
    def predict(
        self, rows: np.ndarray, criterion: Criterion | None = None, model=None
    ) -> tuple[np.ndarray, float | None]:
        """Probabilities for ``rows``; ``model`` (any callable, e.g. a quantized graph) defaults to
        the runner's model. The caller puts the model in eval mode."""
        probs, total, seen = [], 0.0, 0
        batches = CachedBatches(self.cache, rows, self.options.eval_batch_size, shuffle=False)
        progress = Progress("evaluate", len(rows))
        for images, batch_rows in batches:
            x = self.prepare(images, None, None)
            logits = self.forward(x, model)
            if criterion is not None:
                total += float(criterion(logits, self.target(batch_rows))) * len(batch_rows)
                seen += len(batch_rows)
            p = probabilities(logits, self.task)
            if self.tta == "hflip":  # test-time augmentation: the mean with the mirrored image's
                p = (p + probabilities(self.forward(x.flip(-1), model), self.task)) / 2
            probs.append(p.cpu().numpy())
            progress.update(len(batch_rows))
        progress.close()
        return np.concatenate(probs), (total / seen if seen else None)


class FoldData:
    """One fold's images and targets: the index, its classes and task, the cache, and the rows
    of the training folds, the validation fold and the held-out test set."""

    def __init__(self, index_path, splits_path, cache_dir, fold: int):
        self.fold = fold
        self.index, meta = read_index(index_path)
        self.classes, self.task = meta["classes"], meta["task"]
        self.cache = open_cache(cache_dir, self.index)
        self.targets = targets_for(self.index["labels"], self.classes, self.task)
        self.rows = fold_rows(pd.read_parquet(splits_path), self.index, fold)
        check_fold(self.rows, self.targets, self.classes, self.task, fold)


def evaluate_fold(
    runner: Runner, criterion: Criterion | None, data: FoldData, model=None, decision: dict | None = None
) -> tuple[dict, pd.DataFrame]:
    """Validation and test metrics of ``model`` (default: the runner's), with the decision rule
    ``decision`` (``training.decision``; default: thresholds by Youden's J on validation), and
    the probabilities of both sets as one table."""
    y, rows, task, classes = data.targets, data.rows, data.task, data.classes
    val_probs, val_loss = runner.predict(rows["val"], criterion, model)
    thresholds = choose_thresholds(task, y[rows["val"]], val_probs, decision)
    result = {
        "fold": data.fold,
        "task": task,
        "classes": classes,
        "decision": describe_decision(decision),
        "decision_rule": decision or YOUDEN,
        "val": evaluate(task, classes, y[rows["val"]], val_probs, thresholds),
    }
    result["val"]["loss"] = val_loss
    frames = [_prediction_frame(data.index, rows["val"], val_probs, classes, "val", data.fold)]
    if len(rows["test"]):
        test_probs, test_loss = runner.predict(rows["test"], criterion, model)
        result["test"] = evaluate(task, classes, y[rows["test"]], test_probs, thresholds)
        result["test"]["loss"] = test_loss
        frames.append(_prediction_frame(data.index, rows["test"], test_probs, classes, "test", data.fold))
    return result, pd.concat(frames, ignore_index=True)


def write_evaluation(result: dict, predictions: pd.DataFrame, history: list[dict], outputs) -> None:
    """The predictions, history and metrics files (``outputs``: anything with those three paths,
    or a folder for the usual names)."""
    out = FoldOutputs.of(outputs) if isinstance(outputs, str | Path) else outputs
    with files.writing(out.metrics.parent, "writing the fold's results"):
        predictions.to_parquet(out.predictions, index=False)
        pd.DataFrame(history).to_csv(out.history, index=False)
        out.metrics.write_text(json.dumps(result, indent=2) + "\n")


def save_model(model: torch.nn.Module, training, data: FoldData, thresholds, path: Path, stats: dict) -> None:
    """``training``: the experiment's ``TrainSettings`` (or its dict); model.pt records them."""
    s = TrainSettings.of(training)
    files.save_torch_atomic(
        {
            "state_dict": model.state_dict(),
            "model": s.model,
            "in_channels": data.cache.shape[1],
            "num_classes": len(data.classes),
            "classes": data.classes,
            "task": data.task,
            "image_size": s.image_size,
            "batch_norm": s.batch_norm,
            "dropout": s.dropout,
            "network": json.dumps(s.network) if s.network else "",  # a config-described CNN's layers
            "head": json.dumps(s.head) if s.head else "",  # a torchvision backbone's own head
            "qat": s.qat.layers if s.qat.enabled else "",  # fake quantization in the model
            "thresholds": thresholds,
            "input_mean": stats["mean"],  # what every user of the model normalises inputs with
            "input_std": stats["std"],
            "input_scale": stats.get("scale", "255"),
            "settings": json.dumps(s.raw),
        },
        path,
    )


def _prediction_frame(index, rows, probs, classes, set_name, fold) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            # what outputs meant to be shared show (medfold.core.privacy)
            "image_id": index["shared_image_id"].to_numpy()[rows],
            "patient_id": index["shared_patient_id"].to_numpy()[rows],
            "labels": index["labels"].iloc[rows].to_list(),
            "set": set_name,
            "fold": fold,
        }
    )
    for j, c in enumerate(classes):
        frame[f"prob:{c}"] = probs[:, j]
    return frame


def load_model(path) -> tuple[torch.nn.Module, dict]:
    """A fold's model.pt back as a model in eval mode (weights_only: never unpickles code)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(
        saved["model"],
        saved["in_channels"],
        saved["num_classes"],
        batch_norm=saved["batch_norm"],
        dropout=saved["dropout"],
        network=json.loads(saved["network"]) if saved.get("network") else None,
        image_size=saved["image_size"],
        head=json.loads(saved["head"]) if saved.get("head") else None,
    )
    if saved.get("qat"):  # trained quantization-aware: the same fake quantization, its ranges in the weights
        fakequant.prepare(model, saved["qat"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved
