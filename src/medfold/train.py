"""Train and evaluate one model on one cross-validation fold.

One function, ``run_fold`` (a ``FoldRun``), driven by the resolved experiment settings (``training``
defaults with the experiment's overrides), which are stored in every checkpoint and in metrics.json.
A checkpoint written after every epoch holds model, optimizer, scheduler, epoch, early-stopping
state, best weights, history and RNG state, so a killed run continues where it stopped and, on
CPU, ends with the same numbers as one that was never interrupted: every epoch draws its data
order and augmentation from generators seeded by (seed, epoch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import distributed, fakequant, files, hardware, seeds
from .cache import open_cache
from .errors import ConfigError, DataError, MedfoldError
from .index import read_index
from .loop import (
    Epochs,
    Fit,
    Stage,
    TrainSettings,
    TrainState,
    ema_model,
    fit,
    make_optimizer,
    step_schedule,
    train_metric_rows,
)
from .metrics import YOUDEN, choose_thresholds, describe_decision, evaluate, targets_for
from .models import build_model, input_stats, set_trainable, train_mode
from .progress import Progress
from .settings import settings_digest
from .split import fold_members
from .transforms import AugmentConfig, CachedBatches, augment_batch, normalize, scale_inputs

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


# ----------------------------------------------------------------------------- data
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
    rows: np.ndarray, targets: np.ndarray, task: str, classes: list[str], setting: dict, seed: int
) -> np.ndarray | None:
    """The validation fold drawn with replacement to the class shares ``setting`` states
    (``training.val_oversample``), as many images as the fold has, in row order; None for mode
    none. Study 000 oversampled its validation set to the test set's class ratio this way. Only
    the epochs' monitored scores use it: the fold's thresholds and out-of-fold predictions stay
    on the validation images, once each."""
    weights = sample_weights(
        targets[rows], task, classes, setting["mode"], setting["target"], key="training.val_oversample"
    )
    if weights is None or not len(rows):
        return None
    drawn = np.random.default_rng(seed).choice(len(rows), size=len(rows), replace=True, p=weights / weights.sum())
    return rows[np.sort(drawn)]


# ----------------------------------------------------------------------------- model pieces
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

    def __init__(self, cfg: dict, cache: np.ndarray, targets: np.ndarray, task: str, device: torch.device, model):
        self.cfg, self.cache, self.targets, self.task, self.device, self.model = (
            cfg,
            cache,
            targets,
            task,
            device,
            model,
        )
        self.cuda = device.type == "cuda"
        self.amp = self.cuda and cfg["amp"]
        self.tta = cfg.get("tta", "none")
        self.channels_last = self.cuda and cfg["channels_last"]
        # a model's own statistics (ImageNet's for ImageNet weights); a bare cfg: the fixed ones
        self.stats = input_stats(cfg.get("normalize", "fixed"), cfg.get("pretrained"), cfg.get("model"), cache.shape[1])
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
        batches = CachedBatches(self.cache, rows, self.cfg["eval_batch_size"], shuffle=False)
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


# ----------------------------------------------------------------------------- the run
def _read_checkpoint(path: Path, device):
    """The checkpoint, or None when there is none or it cannot be read (a truncated or altered
    file is set aside as ``<name>.unreadable`` and the fold trains from the start)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, CRC: any of torch's many ways to say it
        aside = path.with_name(path.name + ".unreadable")
        os.replace(path, aside)
        log.warning(
            "%s cannot be read (%s: %s); set aside as %s, training from the start",
            path,
            type(exc).__name__,
            str(exc)[:200],
            aside.name,
        )
        return None


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


@dataclasses.dataclass
class StageRun:
    """What one stage trains with: the optimiser over its trainable weights, the model a step
    runs (wrapped for the backend, compiled), its LR schedule, the batch norms it keeps fixed."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    step_model: torch.nn.Module
    frozen_norms: set
    trainable: int


class FoldRun:
    """One fold's training run. Built once: settings, data, device and backend, model, loss,
    batches, the weights' average and pruning while training. ``run`` resumes from the checkpoint
    when there is one, runs one ``fit`` per stage (writing the checkpoint after every epoch) and
    evaluates and writes the chosen weights."""

    def __init__(self, cfg: dict, index_path, splits_path, cache_dir, fold: int, outputs, threads: int = 1):
        self.cfg, self.fold = cfg, fold
        self.s = s = TrainSettings.from_config(cfg)
        self.out = FoldOutputs.of(outputs)
        self.out.create()
        torch.set_num_threads(max(1, threads))
        self.data = data = FoldData(index_path, splits_path, cache_dir, fold)
        rows, targets = data.rows, data.targets
        device = resolve_device(s.device)
        self.ctx = distributed.init(s.distributed.backend, device)
        self.device = device = self.ctx.device_for(device)
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.model = build_model(
            s.model,
            data.cache.shape[1],
            len(data.classes),
            s.init_seed,
            s.pretrained,
            s.batch_norm,
            s.dropout,
            s.pretrained_partial,
            s.network,
            s.image_size,
            s.head,
        ).to(device)
        if s.qat["enabled"]:  # fake quantization from the first epoch, in the model every later stage reads
            fakequant.prepare(self.model, s.qat["layers"])
        self.runner = Runner(cfg, data.cache, targets, data.task, device, self.model)
        if self.runner.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.lr_scale = self.ctx.world if s.distributed.scale_lr else 1
        self.criterion = Criterion(
            data.task, targets[rows["train"]], len(data.classes), s.class_weights, device, s.label_smoothing
        )
        self.ema = ema_model(self.model, s.ema_decay)
        self.pruner, self.select_from = None, 0
        if s.pruning["enabled"]:  # gradual pruning from the start, as the thesis did
            from .prune import Pruner

            self.pruner = Pruner.from_config(self.model, s.pruning)
            self.select_from = math.ceil(s.pruning["end_epoch"])  # the chosen model has the final sparsity
        weights = sample_weights(
            targets[rows["train"]], data.task, data.classes, s.oversample["mode"], s.oversample["target"]
        )
        self.batches = CachedBatches(
            data.cache,
            rows["train"],
            s.batch_size,
            shuffle=True,
            seed=seeds.data_order(s.seed, fold),
            weights=weights,
            rank=self.ctx.rank,
            world=self.ctx.world,
            read_ahead=s.read_ahead,
        )
        self.loop = Epochs(
            self.runner,
            data,
            self.criterion,
            self.batches,
            s.augment,
            s.seed,
            self.ctx,
            train_rows=train_metric_rows(rows["train"], s.train_metrics_images, s.seed, fold),
            mixing=s.mixing,
            val_rows=oversampled_validation(
                rows["val"], targets, data.task, data.classes, s.val_oversample, seeds.val_oversample(s.seed, fold)
            ),
        )
        self.state = TrainState()
        self.total = sum(stage.epochs for stage in s.stages)
        self.staged = len(cfg["stages"]) > 0
        self.writer = None
        self.tracker = None

    # ------------------------------------------------------------------ the run
    def run(self) -> dict | None:
        """Train every stage left, then evaluate; the metrics on rank 0, None on the others."""
        s, rows = self.s, self.data.rows
        ckpt = self.resume()
        if self.ctx.main:
            from torch.utils.tensorboard import SummaryWriter

            from .tracking import FoldTracker

            self.tracker = FoldTracker.of_work_dir(self.out.work)  # the run its job opened (tracking.mlflow)
            self.writer = SummaryWriter(str(self.out.tensorboard))
            for row in self.state.history:  # a resumed run's event files hold the whole run
                _log_scalars(self.writer, row)
        log.info(
            "fold %d: %d train, %d val, %d test images; %s on %s; %d epochs max%s",
            self.fold,
            len(rows["train"]),
            len(rows["val"]),
            len(rows["test"]),
            s.model,
            self.device,
            self.total,
            f" in {len(s.stages)} stages" if self.staged else "",
        )
        while self.state.stage < len(s.stages):
            self.run_stage(s.stages[self.state.stage], ckpt)
            ckpt = None  # only the stage the checkpoint was written in resumes its optimiser
        if self.writer is not None:
            self.writer.close()
        return self.finish()

    def resume(self) -> dict | None:
        """Load the checkpoint into the model, the weights' average, the state and the RNG; the
        checkpoint (for the optimiser and schedule of its stage), or None to start afresh."""
        path = self.out.checkpoint
        ckpt = _read_checkpoint(path, self.device)
        if ckpt is None:
            return None
        resumed = TrainState.from_dict(ckpt["state"])
        if ckpt["settings"] != settings_digest(self.cfg) or ckpt["fold"] != self.fold or resumed is None:
            log.warning(
                "%s was written with other settings or by another version; training fold %d from the start",
                path,
                self.fold,
            )
            return None
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.state = resumed
        torch.set_rng_state(ckpt["rng_cpu"])
        log.info("resumed fold %d from %s after epoch %d", self.fold, path, resumed.epoch)
        return ckpt

    def begin_stage(self, stage: Stage) -> StageRun:
        """Freeze what the stage keeps fixed; a fresh optimizer and LR schedule over the rest."""
        s, model = self.s, self.model
        frozen_norms = set_trainable(model, stage.train, stage.blocks, stage.freeze_batch_norm)
        for p in model.parameters():
            p.grad = None  # a gradient left from the previous stage must not move a frozen weight
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.batches.batch_size = stage.batch_size or s.batch_size  # before the schedule counts its steps
        optimizer = make_optimizer(trainable, s, stage.lr * self.lr_scale, stage.optimizer)
        # every rank starts from rank 0's weights; a resume loads the same file on every rank
        step_model, optimizer = self.ctx.wrap(model, optimizer, self.device)
        if s.compile:
            step_model = torch.compile(step_model)
        # the LR schedule: per epoch on the monitored metric, or per step (cosine, one-cycle)
        scheduler = step_schedule(optimizer, s.schedule, stage.epochs, self.batches.steps())
        if s.schedule.name == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode=s.early_stopping.mode,
                factor=s.plateau.factor,
                patience=s.plateau.patience,
                min_lr=s.plateau.min_lr,
            )
        return StageRun(optimizer, scheduler, step_model, frozen_norms, sum(p.numel() for p in trainable))

    def run_stage(self, stage: Stage, ckpt: dict | None) -> None:
        """One ``fit`` over the stage; the next stage starts from this one's best weights."""
        s, state, model = self.s, self.state, self.model
        run = self.begin_stage(stage)
        if ckpt is not None:
            run.optimizer.load_state_dict(ckpt["optimizer"])
            if run.scheduler is not None:
                run.scheduler.load_state_dict(ckpt["scheduler"])
        pruner = self.pruner
        plan = Fit(
            stage.epochs,
            s.early_stopping,
            run.scheduler,
            set_training=lambda on: train_mode(model, run.frozen_norms) if on else model.eval(),
            after_epoch=lambda row, improved: self.after_epoch(row, improved, run),
            ema=self.ema,
            after_step=(lambda epoch: pruner.after_step(epoch, s.pruning["update_every"])) if pruner else None,
            select_from=self.select_from,
            keep=s.keep,
        )
        stopper = fit(self.loop, model, run.step_model, run.optimizer, state, plan)
        if stopper.stop:
            log.info(
                "fold %d: early stop after epoch %d (no %s improvement for %d epochs)",
                self.fold,
                state.epoch,
                s.early_stopping.metric,
                stopper.bad_epochs,
            )
        state.stages.append(
            {
                **dataclasses.asdict(stage),
                "epochs_run": state.stage_epoch,
                "stopped_early": stopper.stop,
                "best_value": stopper.best,
                "trainable_parameters": run.trainable,
                **({"test": self.stage_test(stopper)} if self.staged and self.ctx.main else {}),
            }
        )
        state.stage, state.stage_epoch, state.stopper = state.stage + 1, 0, None
        if state.stage < len(s.stages):
            if s.keep == "best":  # else the model is at the stage's last epoch already
                model.load_state_dict(stopper.weights)
                if self.ema is not None:
                    self.ema.module.load_state_dict(stopper.weights)
            log.info(
                "fold %d: stage %d/%d (%s) starts from the previous stage's %s weights",
                self.fold,
                state.stage + 1,
                len(s.stages),
                s.stages[state.stage].train,
                s.keep,
            )

    def stage_test(self, stopper) -> dict | None:
        """The weights this stage hands on (its best, or its last), scored on the test set with
        the decision rule's thresholds from validation: each stage's own result, as staged studies
        report Model 1, 2, 3 (on a copy: training goes on undisturbed)."""
        import copy

        if not len(self.data.rows["test"]):
            return None
        scored = copy.deepcopy(self.ema.module if self.ema is not None else self.model)
        if self.s.keep == "best":
            scored.load_state_dict(stopper.weights)
        scores = evaluate_fold(self.runner, None, self.data, scored.eval(), self.s.decision)[0]["test"]
        return {k: scores.get(k) for k in ("auroc_macro", "accuracy", "balanced_accuracy", "f1_macro")}

    def after_epoch(self, row: dict, improved: bool, run: StageRun) -> None:
        """Log the epoch (TensorBoard, the job log) and write the checkpoint."""
        if self.staged:
            row.update(stage=self.state.stage + 1, trainable_parameters=run.trainable)
        if self.writer is not None:
            _log_scalars(self.writer, row)
        log.info(
            "fold %d epoch %d/%d  loss %.4f  val_loss %.4f  val_auroc %s  lr %.2g  %.0f img/s%s",
            self.fold,
            row["epoch"],
            self.total,
            row["train_loss"],
            row["val_loss"],
            _fmt(row["val_auroc_macro"]),
            row["lr"],
            row["images_per_s"],
            "  *best*" if improved else "",
        )
        if self.ctx.main:
            files.save_torch_atomic(
                {
                    "model": self.model.state_dict(),
                    "optimizer": run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict() if run.scheduler is not None else {},
                    "state": self.state.to_dict(),
                    **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                    "rng_cpu": torch.get_rng_state(),
                    "settings": settings_digest(self.cfg),
                    "fold": self.fold,
                },
                self.out.checkpoint,
            )
            if self.tracker is not None:  # after the checkpoint: a resumed run never logs an epoch twice
                self.tracker.log_epoch(row)

    def finish(self) -> dict | None:
        """Check the replicas agree, load the chosen weights, evaluate and write on rank 0."""
        ctx, fold = self.ctx, self.fold
        identical = ctx.replicas_identical(self.model)
        nodes = ctx.nodes()
        if not identical:
            raise MedfoldError(f"fold {fold}: the {ctx.world} {ctx.backend} replicas ended with different weights")
        self.model.load_state_dict(self.state.best_state)
        result = None
        if ctx.main:
            distributed_summary = {
                "backend": ctx.backend,
                "world_size": ctx.world,
                "nodes": nodes,
                "lr": self.s.stages[0].lr * self.lr_scale,
                "replicas_identical": identical,
            }
            pruned = None
            if self.pruner is not None:
                pruned = self.pruner.sparsity()
                self.pruner.make_permanent()  # plain weights with zeros: what every later stage reads
                pruned["storage"] = pruned_storage(self.model.state_dict())
                log.info(
                    "fold %d: the chosen model is %.1f %% sparse in its pruned layers", fold, 100 * pruned["overall"]
                )
            result = _evaluate_and_write(
                self.runner,
                self.criterion,
                self.data,
                self.cfg,
                self.state,
                distributed_summary,
                self.out,
                pruned,
                self.loop.train_rows,
            )
            self.out.checkpoint.unlink(missing_ok=True)  # the run is complete; model.pt holds the chosen weights
        ctx.barrier()
        ctx.shutdown()
        return result


def pruned_storage(state_dict: dict) -> dict:
    """What the pruned model takes to store, as the thesis measured it (its Fig. 15): the dense
    file, medfold's bitmask-and-values file (medfold.prune's compressed format) and that file
    gzip-compressed, in bytes."""
    import gzip
    import io

    from .prune import encode_sparse

    def saved(obj) -> bytes:  # what torch.save writes, in memory
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    dense, sparse = saved(state_dict), saved(encode_sparse(state_dict))
    return {"dense_bytes": len(dense), "sparse_bytes": len(sparse), "sparse_gzip_bytes": len(gzip.compress(sparse, 6))}


def run_fold(cfg: dict, index_path, splits_path, cache_dir, fold: int, outputs, threads: int = 1) -> dict:
    """Train on the fold's training folds, select on its validation fold, evaluate on both and
    on the held-out test set. Writes the model, history, predictions, metrics and TensorBoard
    events to ``outputs`` (a FoldOutputs, or a folder for the usual names); returns the metrics."""
    return FoldRun(cfg, index_path, splits_path, cache_dir, fold, outputs, threads).run()


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _log_scalars(writer, row: dict) -> None:
    for key, value in row.items():
        if key != "epoch" and value is not None:
            writer.add_scalar(key.replace("val_", "val/").replace("train_", "train/"), value, row["epoch"])


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


def save_model(model: torch.nn.Module, cfg: dict, data: FoldData, thresholds, path: Path, stats: dict) -> None:
    files.save_torch_atomic(
        {
            "state_dict": model.state_dict(),
            "model": cfg["model"],
            "in_channels": data.cache.shape[1],
            "num_classes": len(data.classes),
            "classes": data.classes,
            "task": data.task,
            "image_size": cfg["image_size"],
            "batch_norm": cfg["batch_norm"],
            "dropout": cfg["dropout"],
            "network": json.dumps(cfg["network"]) if cfg.get("network") else "",  # a config-described CNN's layers
            "head": json.dumps(cfg["head"]) if cfg.get("head") else "",  # a torchvision backbone's own head
            "qat": cfg["qat"]["layers"] if cfg.get("qat", {}).get("enabled") else "",  # fake quantization in the model
            "thresholds": thresholds,
            "input_mean": stats["mean"],  # what every user of the model normalises inputs with
            "input_std": stats["std"],
            "input_scale": stats.get("scale", "255"),
            "settings": json.dumps(cfg),
        },
        path,
    )


def _evaluate_and_write(
    runner,
    criterion,
    data: FoldData,
    cfg,
    state: TrainState,
    parallel: dict,
    out: FoldOutputs,
    pruned=None,
    train_rows=None,
) -> dict:
    runner.model.eval()
    result, predictions = evaluate_fold(runner, criterion, data, decision=cfg["decision"])
    if train_rows is not None and len(train_rows):  # the kept model on the training subsample, as studies report
        probs, loss = runner.predict(train_rows, criterion)
        thresholds = result["val"].get("thresholds")
        result["train"] = evaluate(data.task, data.classes, data.targets[train_rows], probs, thresholds)
        result["train"].update(loss=loss, images=len(train_rows))
    result.update(
        {
            "parameters": sum(p.numel() for p in runner.model.parameters()),
            "repeat": cfg.get("repeat", 0),  # which seed of the fold (experiments.<name>.repeats)
            "seed": cfg["seed"],
            "best_epoch": state.best_epoch,
            "epochs_trained": state.epoch,
            "stopped_early": state.stopped_early,
            "train_seconds": state.train_seconds,
            "monitor": cfg["early_stopping"]["metric"],
            "settings": cfg,
            "distributed": parallel,
            **({"pruning": pruned} if pruned is not None else {}),
            **({"qat": fakequant.summary(runner.model)} if fakequant.is_prepared(runner.model) else {}),
            "hardware": hardware.cpu() | {"device": str(runner.device)},
        }
    )
    if cfg["stages"]:
        result["stages"] = state.stages
    write_evaluation(result, predictions, state.history, out)
    save_model(runner.model, cfg, data, result["val"].get("thresholds"), out.model, runner.stats)
    log.info(
        "fold %d: best epoch %d; val AUROC %s, test AUROC %s",
        data.fold,
        state.best_epoch,
        _fmt(result["val"]["auroc_macro"]),
        _fmt(result.get("test", {}).get("auroc_macro")),
    )
    return result


def _prediction_frame(index, rows, probs, classes, set_name, fold) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            # what outputs meant to be shared show (medfold.privacy)
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


def train_fold_job(
    cfg: dict, index_path, splits_path, cache_dir, fold: int, outputs, threads: int, log_path: str | None
) -> None:
    """A training job: one process in this one, or a distributed run through its launcher, each
    process running ``main`` below with the settings written next to the outputs."""
    parallel = cfg["distributed"]
    if parallel["backend"] == "none":
        run_fold(cfg, index_path, splits_path, cache_dir, fold, outputs, threads)
        return
    outs = FoldOutputs.of(outputs)
    outs.create()
    out = outs.work
    settings = out / "settings.json"
    settings.write_text(json.dumps(cfg, indent=2))
    n = parallel["gpus"]
    gpus_per_process = 0 if cfg["device"] == "cpu" else 1
    # one positional job file: launchers (torchrun's argparse) would take a prefix of their own
    # options, such as --log for --log-dir, out of the training command's flags
    job = out / "job.json"
    job.write_text(
        json.dumps(
            {
                "settings": str(settings),
                "index": str(index_path),
                "splits": str(splits_path),
                "cache": str(cache_dir),
                "fold": fold,
                "out": outs.as_dict(),
                "threads": max(1, threads // (n // parallel["nodes"])),  # the processes on one node share it
                "log": str(log_path) if log_path else None,
            }
        )
    )
    module = ["medfold.train", str(job)]
    code = distributed.launch(parallel["backend"], n, parallel["launcher"], gpus_per_process, module, parallel["nodes"])
    if code != 0:
        raise MedfoldError(
            f"fold {fold}: distributed training ({parallel['backend']}, {n} processes) exited with "
            f"status {code}; its messages are above{' and in ' + str(log_path) if log_path else ''}"
        )


def main(argv: list[str] | None = None) -> None:
    """Command line for launchers (torchrun, horovodrun, srun) and for tests. Only rank 0 logs
    to the file; other ranks print warnings and errors only."""
    from .step import guarded

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", help="a JSON file holding the options below (what launchers pass)")
    parser.add_argument("--settings", help="JSON file with the resolved experiment settings")
    parser.add_argument("--index")
    parser.add_argument("--splits")
    parser.add_argument("--cache")
    parser.add_argument("--fold", type=int)
    parser.add_argument("--out")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", help="log file (appended to; rank 0 only)")
    args = parser.parse_args(argv)
    if args.job:
        for key, value in json.loads(Path(args.job).read_text()).items():
            setattr(args, key, value)
    missing = [k for k in ("settings", "index", "splits", "cache", "fold", "out") if getattr(args, k) is None]
    if missing:
        parser.error(f"missing {', '.join('--' + k for k in missing)}")
    main_rank = distributed.launcher_rank() == 0
    guarded(
        "training",
        args.log if main_rank else None,
        lambda: run_fold(
            json.loads(Path(args.settings).read_text()),
            args.index,
            args.splits,
            args.cache,
            args.fold,
            args.out,
            args.threads,
        ),
        append=True,
        level=logging.INFO if main_rank else logging.WARNING,
    )


if __name__ == "__main__":
    main()
