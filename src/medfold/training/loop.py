"""The training loop, once: typed settings, the state a run carries (which is the checkpoint
format), early stopping, one epoch, and ``fit``. Fold training (every stage of a staged
fine-tuning) and the fine-tuning of a compressed variant both run through ``fit``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medfold.core import seeds
from medfold.core.errors import DataError
from medfold.core.progress import Progress, tracked
from medfold.evaluation.metrics import epoch_scores
from medfold.settings.training import (
    AugmentConfig,
    LrSchedule,
    Mixing,
    Stopping,
    TrainSettings,
)
from medfold.training.distributed import Single
from medfold.training.models import AUX_WEIGHT, main_and_aux
from medfold.training.transforms import CachedBatches

log = logging.getLogger(__name__)


def make_optimizer(params, s: TrainSettings, lr: float, name: str | None = None) -> torch.optim.Optimizer:
    """The optimiser ``name`` (default ``s.optimizer``; a stage may name its own) over ``params``."""
    name, wd, o = name or s.optimizer, s.weight_decay, s.optimizer_options
    eps = {} if o.epsilon is None else {"eps": o.epsilon}
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, **eps)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **eps)
    # the optimisers the source studies also tried (Keras names: Adadelta, Adagrad, RMSprop)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=wd, rho=0.9 if o.rho is None else o.rho, **eps)
    if name == "adagrad":
        accumulator = 0.0 if o.initial_accumulator is None else o.initial_accumulator
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd, initial_accumulator_value=accumulator, **eps)
    if name == "rmsprop":
        alpha = 0.9 if o.rho is None else o.rho
        return torch.optim.RMSprop(params, lr=lr, alpha=alpha, momentum=s.momentum, weight_decay=wd, **eps)
    nesterov = o.nesterov and s.momentum > 0
    return torch.optim.SGD(params, lr=lr, momentum=s.momentum, weight_decay=wd, nesterov=nesterov)


def step_schedule(optimizer, schedule: LrSchedule, epochs: int, steps_per_epoch: int):
    """A per-step LR schedule over one stage (``cosine`` or ``onecycle``); None for ``plateau``
    and ``constant``."""
    if schedule.name in ("plateau", "constant"):
        return None
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, round(schedule.warmup_epochs * steps_per_epoch))
    if schedule.name == "onecycle":
        warmup = warmup or round(0.3 * total)  # OneCycleLR's default pct_start

    def factor(step: int) -> float:
        if step < warmup:
            start = 1 / 25 if schedule.name == "onecycle" else 0.0
            return start + (1 - start) * (step + 1) / warmup
        progress = (step - warmup + 1) / max(1, total - warmup)  # the last step ends the decay
        end = 1e-4 if schedule.name == "onecycle" else 0.0
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def ema_model(model: torch.nn.Module, decay: float):
    """An exponential moving average of the weights (batch-norm statistics included), updated
    after every step; validation, selection and the saved model use it. None when ``decay`` is 0."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


# ----------------------------------------------------------------------------- state
def weights_copy(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class EarlyStopping:
    """The best value of the monitored metric in one stage, the weights that reached it, and the
    epochs since: ``stop`` once ``patience`` epochs passed without an improvement of
    ``min_delta`` (when enabled)."""

    def __init__(self, rule: Stopping):
        self.rule = rule
        self.best: float | None = None
        self.weights: dict | None = None
        self.bad_epochs = 0

    def better(self, value: float, than: float | None) -> bool:
        if than is None:
            return True
        delta = self.rule.min_delta
        return value > than + delta if self.rule.mode == "max" else value < than - delta

    def update(self, value: float, model: torch.nn.Module) -> bool:
        """Record one epoch's value; True (and the weights kept) when it improved."""
        if self.better(value, self.best):
            self.best, self.weights, self.bad_epochs = value, weights_copy(model), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def stop(self) -> bool:
        return self.rule.enabled and self.bad_epochs >= self.rule.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "weights": self.weights, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.weights, self.bad_epochs = state["best"], state["weights"], state["bad_epochs"]


@dataclass
class TrainState:
    """Everything a run has done, as plain values and tensors: with the model, optimizer, scheduler
    and RNG state it is the checkpoint (``torch.load(weights_only=True)`` reads it back)."""

    epoch: int = 0  # epochs finished, over all stages
    best: float | None = None  # the best monitored value over all stages, and where
    best_epoch: int = -1
    best_state: dict | None = None
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    stage: int = 0
    stage_epoch: int = 0
    stopper: dict | None = None  # the current stage's EarlyStopping
    stages: list[dict] = field(default_factory=list)  # finished stages

    @property
    def stopped_early(self) -> bool:
        """Whether the last finished stage ended by early stopping."""
        return bool(self.stages) and self.stages[-1]["stopped_early"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> TrainState | None:
        """The state back from a checkpoint; None when it was written by a version that kept other fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**state) if set(state) == names else None


# ----------------------------------------------------------------------------- one epoch
def seed_epoch(seed: int, fold: int, epoch: int, device, rank: int = 0) -> torch.Generator:
    """Dropout and the like, and augmentation draws: the same after a resume; each rank its own."""
    torch.manual_seed(seeds.torch_global(seed, epoch, rank))
    return torch.Generator(device=device).manual_seed(seeds.augmentation(seed, fold, epoch, rank))


def train_metric_rows(rows: np.ndarray, images: int, seed: int, fold: int) -> np.ndarray:
    """The fixed subsample of training images scored every epoch for train-set metrics (all of
    them when there are no more than ``images``; none when ``images`` is 0)."""
    if images <= 0 or len(rows) <= images:
        return rows if images > 0 else rows[:0]
    rng = np.random.default_rng(seeds.train_metrics(seed, fold))
    return np.sort(rng.choice(rows, size=images, replace=False))


def train_epoch(
    runner,
    step_model,
    batches: CachedBatches,
    augment: AugmentConfig,
    criterion,
    optimizer: torch.optim.Optimizer,
    gen,
    fold: int,
    epoch: int,
    after_step=None,
    mixing: Mixing | None = None,
) -> tuple[float, int, float]:
    """One pass over the training batches; ``after_step(step, steps)`` runs after each optimizer
    step (pruning's masks, a per-step LR schedule, the weights' average). Returns mean loss,
    images seen and seconds."""
    start, seen, loss_sum = time.perf_counter(), 0, 0.0
    steps = batches.steps()
    progress = Progress(f"fold {fold} epoch {epoch + 1}", steps, "batches")
    for step, (images, batch_rows) in enumerate(tracked(batches, progress)):
        x = runner.prepare(images, augment, gen)
        target = runner.target(batch_rows)
        mixed = mixing.draw(x, gen) if mixing is not None and mixing.enabled else None
        if mixed is not None:
            x, partner, lam = mixed

            def loss_of(out):
                return lam * criterion.training(out, target) + (1 - lam) * criterion.training(out, target[partner])
        else:

            def loss_of(out):
                return criterion.training(out, target)

        logits, aux = main_and_aux(runner.forward(x, step_model))
        loss = loss_of(logits)
        for extra in aux:  # Inception-v3's and GoogLeNet's auxiliary classifiers, in training only
            loss = loss + AUX_WEIGHT * loss_of(extra)
        if not torch.isfinite(loss):
            raise DataError(
                f"fold {fold}: the training loss became {float(loss.detach())} at epoch {epoch + 1}, batch "
                f"{step + 1} (lr {optimizer.param_groups[0]['lr']:.3g}); lower the learning rate or check "
                f"the inputs"
            )
        optimizer.zero_grad()  # set_to_none by default; Horovod's optimizer takes no argument
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step, steps)
        loss_sum += float(loss.detach()) * len(batch_rows)
        seen += len(batch_rows)
    progress.close()
    return loss_sum / max(seen, 1), seen, time.perf_counter() - start


@dataclass
class Epochs:
    """What every epoch of one fit uses: the fold's data and its runner, the loss, the batches,
    augmentation, and where its epochs' random streams start."""

    runner: Any  # fold.Runner
    data: Any  # train.FoldData
    criterion: Any  # train.Criterion
    batches: Any  # transforms.CachedBatches
    augment: AugmentConfig
    seed: int
    ctx: Single = field(default_factory=Single)
    epoch_offset: int = 0  # compression fine-tuning numbers its epochs apart from training's
    train_rows: np.ndarray | None = None  # scored after each epoch for train-set metrics
    mixing: Mixing | None = None
    val_rows: np.ndarray | None = None  # the monitored validation images (oversampled), else the fold's

    def run(self, step_model, model, optimizer, epoch: int, set_training, after_step=None, scored_model=None) -> dict:
        """Train one epoch, then score the training subsample and the validation fold in eval
        mode with ``scored_model`` (default ``model``; the weights' average when there is one).
        Returns the history row, with the validation loss and metrics under ``val_``."""
        scored_model = model if scored_model is None else scored_model
        numbered = self.epoch_offset + epoch
        gen = seed_epoch(self.seed, self.data.fold, numbered, self.runner.device, self.ctx.rank)
        self.batches.set_epoch(numbered)
        set_training(True)
        loss, seen, seconds = train_epoch(
            self.runner,
            step_model,
            self.batches,
            self.augment,
            self.criterion,
            optimizer,
            gen,
            self.data.fold,
            epoch,
            after_step,
            self.mixing,
        )
        loss, seen = self.ctx.mean(loss), round(self.ctx.mean(seen) * self.ctx.world)
        self.ctx.average_buffers(model)
        set_training(False)
        if scored_model is not model:  # the weights' average (an exported QAT graph takes no .eval())
            scored_model.eval()
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss}
        if self.train_rows is not None and len(self.train_rows):
            row["train_eval_loss"], scores = self._score(self.train_rows, scored_model)
            row.update({f"train_{k}": v for k, v in scores.items()})
        val_rows = self.data.rows["val"] if self.val_rows is None else self.val_rows
        row["val_loss"], scores = self._score(val_rows, scored_model)
        row.update({f"val_{k}": v for k, v in scores.items()})
        row.update(images_per_s=seen / seconds, seconds=seconds)
        return row

    def _score(self, rows: np.ndarray, model) -> tuple[float | None, dict]:
        probs, loss = self.runner.predict(rows, self.criterion, model)
        return loss, epoch_scores(self.data.task, self.data.classes, self.data.targets[rows], probs)


# ----------------------------------------------------------------------------- the loop
def monitored(row: dict, metric: str, mode: str) -> float:
    """The validation value early stopping and the LR schedule watch (undefined or NaN: the worst)."""
    value = row[f"val_{metric}"]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -math.inf if mode == "max" else math.inf
    return value


@dataclass
class Fit:
    """One stretch of training on fixed trainable parameters: up to ``epochs`` epochs of
    ``Epochs.run``, each followed by the schedule, early stopping and the run's best weights (when
    ``stopping`` is given), the history row, and ``after_epoch`` (logging, checkpointing)."""

    epochs: int
    stopping: Stopping | None = None
    scheduler: Any = None  # ReduceLROnPlateau: per epoch on the monitored value; any other: per step
    set_training: Callable[[bool], None] | None = None
    after_step: Callable[[int], Callable] | None = None  # by epoch, what runs after each optimizer step (pruning)
    describe: Callable[[], dict] | None = None  # extra columns for each history row
    after_epoch: Callable[[dict, bool], None] | None = None  # (row, improved)
    ema: Any = None  # AveragedModel: scored, selected and kept instead of the raw weights
    select_from: int = 0  # the first epoch (1-based) that may be chosen and counts for early stopping
    keep: str = "best"  # which weights the stretch ends with and the run keeps: the best epoch's, or the last


def fit(loop: Epochs, model, step_model, optimizer, state: TrainState, plan: Fit) -> EarlyStopping | None:
    """Train until ``plan.epochs`` epochs of this stretch ran (``state.stage_epoch``) or early
    stopping says stop; resumes from ``state`` as a checkpoint left it. Returns the stopper."""
    stopper = None
    if plan.stopping is not None:
        stopper = EarlyStopping(plan.stopping)
        if state.stopper is not None:
            stopper.load_state_dict(state.stopper)
    set_training = plan.set_training or (lambda on: model.train(on))
    scored = plan.ema.module if plan.ema is not None else model
    while state.stage_epoch < plan.epochs and not (stopper is not None and stopper.stop):
        epoch = state.epoch
        row = loop.run(step_model, model, optimizer, epoch, set_training, _after_step(plan, state, model), scored)
        if plan.describe is not None:
            row.update(plan.describe())
        improved = False
        if stopper is not None:
            value = monitored(row, plan.stopping.metric, plan.stopping.mode)
            if isinstance(plan.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                plan.scheduler.step(value)
            # before ``select_from`` (pruning still on its way to the final sparsity) no epoch can be chosen
            stage_improved = epoch + 1 >= plan.select_from and stopper.update(value, scored)
            # a new best of the run is a new best of its stage too, so the stage's copy is this epoch's
            improved = stage_improved and stopper.better(value, state.best)
            if improved:
                state.best, state.best_epoch, state.best_state = value, epoch + 1, stopper.weights
            state.stopper = stopper.state_dict()
        state.history.append(row)
        state.train_seconds += row["seconds"]
        state.epoch, state.stage_epoch = epoch + 1, state.stage_epoch + 1
        if plan.after_epoch is not None:
            plan.after_epoch(row, improved)
    if plan.keep == "last" and state.history:  # also after a resume that found this stretch finished
        state.best_state, state.best_epoch = weights_copy(scored), state.epoch
        if plan.stopping is not None:
            state.best = monitored(state.history[-1], plan.stopping.metric, plan.stopping.mode)
    return stopper


def _after_step(plan: Fit, state: TrainState, model):
    """What runs after each optimizer step this epoch: the caller's hook (pruning), a per-step LR
    schedule, the weights' average."""
    hooks = [plan.after_step(state.epoch)] if plan.after_step is not None else []
    if plan.scheduler is not None and not isinstance(plan.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        hooks.append(lambda step, steps: plan.scheduler.step())
    if plan.ema is not None:
        hooks.append(lambda step, steps: plan.ema.update_parameters(model))

    def run(step: int, steps: int) -> None:
        for hook in hooks:
            hook(step, steps)

    return run if hooks else None
