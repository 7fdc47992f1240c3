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

import torch

from medfold.core import files, hardware, seeds
from medfold.core.errors import MedfoldError
from medfold.evaluation.metrics import evaluate
from medfold.settings.sections import settings_digest
from medfold.settings.training import Stage, TrainSettings
from medfold.training import distributed, fakequant
from medfold.training.fold import (
    Criterion,
    FoldData,
    FoldOutputs,
    Runner,
    evaluate_fold,
    oversampled_validation,
    resolve_device,
    sample_weights,
    save_model,
    write_evaluation,
)
from medfold.training.loop import (
    Epochs,
    Fit,
    TrainState,
    ema_model,
    fit,
    make_optimizer,
    step_schedule,
    train_metric_rows,
)
from medfold.training.models import build_model, set_trainable, train_mode
from medfold.training.transforms import CachedBatches

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- set-up
@dataclasses.dataclass
class FoldSetup:
    """Everything one fold trains with, built once before its first epoch: settings, data,
    device and backend, model, runner and loss, the weights' average, pruning while training,
    the training batches and the epoch loop over them."""

    fold: int
    s: TrainSettings
    out: FoldOutputs
    data: FoldData
    ctx: object  # the distributed backend (medfold.training.distributed)
    device: torch.device
    model: torch.nn.Module
    runner: Runner
    criterion: Criterion
    ema: object
    pruner: object
    select_from: int
    batches: CachedBatches
    loop: Epochs
    lr_scale: float

    @classmethod
    def build(cls, training, index_path, splits_path, cache_dir, fold: int, outputs, threads: int = 1) -> FoldSetup:
        """``training``: the experiment's ``TrainSettings``, or its merged settings dict. The parts
        are made in a fixed order (model, quantisation, runner, loss, average, pruning, batches):
        the seeded ones draw in that order, so a run is the same run every time."""
        s = TrainSettings.of(training)
        out = FoldOutputs.of(outputs)
        out.create()
        torch.set_num_threads(max(1, threads))
        data = FoldData(index_path, splits_path, cache_dir, fold)
        device = resolve_device(s.device)
        ctx = distributed.init(s.distributed.backend, device)
        device = ctx.device_for(device)
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        model = _fold_model(s, data, device)
        runner = Runner(s, data.cache, data.targets, data.task, device, model)
        if runner.channels_last:
            model.to(memory_format=torch.channels_last)
        train = data.rows["train"]
        criterion = Criterion(
            data.task, data.targets[train], len(data.classes), s.class_weights, device, s.label_smoothing
        )
        ema = ema_model(model, s.ema_decay)
        pruner, select_from = None, 0
        if s.pruning.enabled:  # gradual pruning from the start, as the thesis did
            from medfold.training.prune import Pruner

            pruner = Pruner.from_config(model, s.pruning)
            select_from = math.ceil(s.pruning.end_epoch)  # the chosen model has the final sparsity
        batches = _train_batches(s, data, fold, ctx)
        loop = Epochs(
            runner,
            data,
            criterion,
            batches,
            s.augment,
            s.seed,
            ctx,
            train_rows=train_metric_rows(train, s.train_metrics_images, s.seed, fold),
            mixing=s.mixing,
            val_rows=oversampled_validation(
                data.rows["val"],
                data.targets,
                data.task,
                data.classes,
                s.val_oversample,
                seeds.val_oversample(s.seed, fold),
            ),
        )
        lr_scale = ctx.world if s.distributed.scale_lr else 1
        return cls(
            fold, s, out, data, ctx, device, model, runner, criterion, ema, pruner, select_from, batches, loop, lr_scale
        )


def _fold_model(s: TrainSettings, data: FoldData, device) -> torch.nn.Module:
    """The fold's model on its device, fake-quantised from the first epoch when QAT is on (the
    model every later stage reads)."""
    model = build_model(
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
    if s.qat.enabled:
        fakequant.prepare(model, s.qat.layers)
    return model


def _train_batches(s: TrainSettings, data: FoldData, fold: int, ctx) -> CachedBatches:
    """The training rows in batches: this fold's data order, oversampled as configured, this
    rank's share of each batch."""
    train = data.rows["train"]
    weights = sample_weights(data.targets[train], data.task, data.classes, s.oversample.mode, s.oversample.target)
    return CachedBatches(
        data.cache,
        train,
        s.batch_size,
        shuffle=True,
        seed=seeds.data_order(s.seed, fold),
        weights=weights,
        rank=ctx.rank,
        world=ctx.world,
        read_ahead=s.read_ahead,
    )


# ----------------------------------------------------------------------------- the checkpoint
class FoldCheckpoint:
    """The checkpoint written after every epoch (model, optimiser, schedule, state, the weights'
    average, RNG), read back only under the settings and fold it was written with."""

    def __init__(self, path: Path, settings: dict, fold: int):
        self.path, self.digest, self.fold = Path(path), settings_digest(settings), fold

    def read(self, device) -> dict | None:
        """The checkpoint with its ``TrainState`` under "resumed", or None to start afresh: none
        there, unreadable (a truncated or altered file is set aside as ``<name>.unreadable``),
        or written with other settings, for another fold or by another version."""
        path = self.path
        if not path.exists():
            return None
        try:
            ckpt = torch.load(path, map_location=device, weights_only=True)
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
        resumed = TrainState.from_dict(ckpt["state"])
        if ckpt["settings"] != self.digest or ckpt["fold"] != self.fold or resumed is None:
            log.warning(
                "%s was written with other settings or by another version; training fold %d from the start",
                path,
                self.fold,
            )
            return None
        return {**ckpt, "resumed": resumed}

    def write(self, model, optimizer, scheduler, state: TrainState, ema) -> None:
        files.save_torch_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "state": state.to_dict(),
                **({"ema": ema.state_dict()} if ema is not None else {}),
                "rng_cpu": torch.get_rng_state(),
                "settings": self.digest,
                "fold": self.fold,
            },
            self.path,
        )

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the epochs
@dataclasses.dataclass
class StageRun:
    """What one stage trains with: the optimiser over its trainable weights, the model a step
    runs (wrapped for the backend, compiled), its LR schedule, the batch norms it keeps fixed."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    step_model: torch.nn.Module
    frozen_norms: set
    trainable: int

    @classmethod
    def begin(cls, u: FoldSetup, stage: Stage) -> StageRun:
        """Freeze what the stage keeps fixed; a fresh optimizer and LR schedule over the rest."""
        s, model = u.s, u.model
        frozen_norms = set_trainable(model, stage.train, stage.blocks, stage.freeze_batch_norm)
        for p in model.parameters():
            p.grad = None  # a gradient left from the previous stage must not move a frozen weight
        trainable = [p for p in model.parameters() if p.requires_grad]
        u.batches.batch_size = stage.batch_size or s.batch_size  # before the schedule counts its steps
        optimizer = make_optimizer(trainable, s, stage.lr * u.lr_scale, stage.optimizer)
        # every rank starts from rank 0's weights; a resume loads the same file on every rank
        step_model, optimizer = u.ctx.wrap(model, optimizer, u.device)
        if s.compile:
            step_model = torch.compile(step_model)
        # the LR schedule: per epoch on the monitored metric, or per step (cosine, one-cycle)
        scheduler = step_schedule(optimizer, s.schedule, stage.epochs, u.batches.steps())
        if s.schedule.name == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode=s.early_stopping.mode,
                factor=s.plateau.factor,
                patience=s.plateau.patience,
                min_lr=s.plateau.min_lr,
            )
        return cls(optimizer, scheduler, step_model, frozen_norms, sum(p.numel() for p in trainable))


class FoldRun:
    """One fold's training run over a ``FoldSetup``. ``run`` resumes from the checkpoint when
    there is one, runs one ``fit`` per stage (writing the checkpoint after every epoch), then
    checks the replicas agree and evaluates and writes the chosen weights (``finish``)."""

    def __init__(self, training, index_path, splits_path, cache_dir, fold: int, outputs, threads: int = 1):
        """``training``: the experiment's ``TrainSettings``, or its merged settings dict."""
        self.setup = FoldSetup.build(training, index_path, splits_path, cache_dir, fold, outputs, threads)
        s = self.setup.s
        self.checkpoint = FoldCheckpoint(self.setup.out.checkpoint, s.raw, fold)
        self.state = TrainState()
        self.total = sum(stage.epochs for stage in s.stages)
        self.staged = s.staged
        self.writer = None
        self.tracker = None

    def run(self) -> dict | None:
        """Train every stage left, then evaluate; the metrics on rank 0, None on the others."""
        u = self.setup
        s, rows = u.s, u.data.rows
        ckpt = self.resume()
        if u.ctx.main:
            from torch.utils.tensorboard import SummaryWriter

            from medfold.training.tracking import FoldTracker

            self.tracker = FoldTracker.of_work_dir(u.out.work)  # the run its job opened (tracking.mlflow)
            self.writer = SummaryWriter(str(u.out.tensorboard))
            for row in self.state.history:  # a resumed run's event files hold the whole run
                _log_scalars(self.writer, row)
        log.info(
            "fold %d: %d train, %d val, %d test images; %s on %s; %d epochs max%s",
            u.fold,
            len(rows["train"]),
            len(rows["val"]),
            len(rows["test"]),
            s.model,
            u.device,
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
        u = self.setup
        ckpt = self.checkpoint.read(u.device)
        if ckpt is None:
            return None
        u.model.load_state_dict(ckpt["model"])
        if u.ema is not None:
            u.ema.load_state_dict(ckpt["ema"])
        self.state = ckpt["resumed"]
        torch.set_rng_state(ckpt["rng_cpu"])
        log.info("resumed fold %d from %s after epoch %d", u.fold, self.checkpoint.path, self.state.epoch)
        return ckpt

    def run_stage(self, stage: Stage, ckpt: dict | None) -> None:
        """One ``fit`` over the stage; the next stage starts from this one's best weights."""
        u = self.setup
        s, state, model = u.s, self.state, u.model
        run = StageRun.begin(u, stage)
        if ckpt is not None:
            run.optimizer.load_state_dict(ckpt["optimizer"])
            if run.scheduler is not None:
                run.scheduler.load_state_dict(ckpt["scheduler"])
        pruner = u.pruner
        plan = Fit(
            stage.epochs,
            s.early_stopping,
            run.scheduler,
            set_training=lambda on: train_mode(model, run.frozen_norms) if on else model.eval(),
            after_epoch=lambda row, improved: self.after_epoch(row, improved, run),
            ema=u.ema,
            after_step=(lambda epoch: pruner.after_step(epoch, s.pruning.update_every)) if pruner else None,
            select_from=u.select_from,
            keep=s.keep,
        )
        stopper = fit(u.loop, model, run.step_model, run.optimizer, state, plan)
        if stopper.stop:
            log.info(
                "fold %d: early stop after epoch %d (no %s improvement for %d epochs)",
                u.fold,
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
                **({"test": _stage_test(u, stopper)} if self.staged and u.ctx.main else {}),
            }
        )
        state.stage, state.stage_epoch, state.stopper = state.stage + 1, 0, None
        if state.stage < len(s.stages):
            if s.keep == "best":  # else the model is at the stage's last epoch already
                model.load_state_dict(stopper.weights)
                if u.ema is not None:
                    u.ema.module.load_state_dict(stopper.weights)
            log.info(
                "fold %d: stage %d/%d (%s) starts from the previous stage's %s weights",
                u.fold,
                state.stage + 1,
                len(s.stages),
                s.stages[state.stage].train,
                s.keep,
            )

    def after_epoch(self, row: dict, improved: bool, run: StageRun) -> None:
        """Log the epoch (TensorBoard, the job log) and write the checkpoint."""
        u = self.setup
        if self.staged:
            row.update(stage=self.state.stage + 1, trainable_parameters=run.trainable)
        if self.writer is not None:
            _log_scalars(self.writer, row)
        log.info(
            "fold %d epoch %d/%d  loss %.4f  val_loss %.4f  val_auroc %s  lr %.2g  %.0f img/s%s",
            u.fold,
            row["epoch"],
            self.total,
            row["train_loss"],
            row["val_loss"],
            _fmt(row["val_auroc_macro"]),
            row["lr"],
            row["images_per_s"],
            "  *best*" if improved else "",
        )
        if u.ctx.main:
            self.checkpoint.write(u.model, run.optimizer, run.scheduler, self.state, u.ema)
            if self.tracker is not None:  # after the checkpoint: a resumed run never logs an epoch twice
                self.tracker.log_epoch(row)

    def finish(self) -> dict | None:
        """Check the replicas agree, load the chosen weights, evaluate and write on rank 0."""
        u = self.setup
        identical = u.ctx.replicas_identical(u.model)
        nodes = u.ctx.nodes()
        if not identical:
            raise MedfoldError(
                f"fold {u.fold}: the {u.ctx.world} {u.ctx.backend} replicas ended with different weights"
            )
        u.model.load_state_dict(self.state.best_state)
        result = None
        if u.ctx.main:
            distributed_summary = {
                "backend": u.ctx.backend,
                "world_size": u.ctx.world,
                "nodes": nodes,
                "lr": u.s.stages[0].lr * u.lr_scale,
                "replicas_identical": identical,
            }
            result = _evaluate_and_write(u, self.state, distributed_summary, _made_permanent(u.pruner, u.model, u.fold))
            self.checkpoint.remove()  # the run is complete; model.pt holds the chosen weights
        u.ctx.barrier()
        u.ctx.shutdown()
        return result


# ----------------------------------------------------------------------------- evaluation
def _stage_test(u: FoldSetup, stopper) -> dict | None:
    """The weights this stage hands on (its best, or its last), scored on the test set with
    the decision rule's thresholds from validation: each stage's own result, as staged studies
    report Model 1, 2, 3 (on a copy: training goes on undisturbed)."""
    import copy

    if not len(u.data.rows["test"]):
        return None
    scored = copy.deepcopy(u.ema.module if u.ema is not None else u.model)
    if u.s.keep == "best":
        scored.load_state_dict(stopper.weights)
    scores = evaluate_fold(u.runner, None, u.data, scored.eval(), u.s.decision)[0]["test"]
    return {k: scores.get(k) for k in ("auroc_macro", "accuracy", "balanced_accuracy", "f1_macro")}


def _made_permanent(pruner, model, fold: int) -> dict | None:
    """Pruning while training: the chosen weights with their zeros made plain (what every later
    stage reads) and their sparsity and storage; None without pruning."""
    if pruner is None:
        return None
    pruned = pruner.sparsity()
    pruner.make_permanent()
    pruned["storage"] = pruned_storage(model.state_dict())
    log.info("fold %d: the chosen model is %.1f %% sparse in its pruned layers", fold, 100 * pruned["overall"])
    return pruned


def pruned_storage(state_dict: dict) -> dict:
    """What the pruned model takes to store, as the thesis measured it (its Fig. 15): the dense
    file, medfold's bitmask-and-values file (medfold.training.prune's compressed format) and that file
    gzip-compressed, in bytes."""
    import gzip
    import io

    from medfold.training.prune import encode_sparse

    def saved(obj) -> bytes:  # what torch.save writes, in memory
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    dense, sparse = saved(state_dict), saved(encode_sparse(state_dict))
    return {"dense_bytes": len(dense), "sparse_bytes": len(sparse), "sparse_gzip_bytes": len(gzip.compress(sparse, 6))}


def run_fold(training, index_path, splits_path, cache_dir, fold: int, outputs, threads: int = 1) -> dict:
    """Train on the fold's training folds, select on its validation fold, evaluate on both and
    on the held-out test set. Writes the model, history, predictions, metrics and TensorBoard
    events to ``outputs`` (a FoldOutputs, or a folder for the usual names); returns the metrics.
    ``training``: the experiment's ``TrainSettings`` or settings dict."""
    return FoldRun(training, index_path, splits_path, cache_dir, fold, outputs, threads).run()


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _log_scalars(writer, row: dict) -> None:
    for key, value in row.items():
        if key != "epoch" and value is not None:
            writer.add_scalar(key.replace("val_", "val/").replace("train_", "train/"), value, row["epoch"])


def _evaluate_and_write(u: FoldSetup, state: TrainState, parallel: dict, pruned: dict | None) -> dict:
    """The chosen weights evaluated on the validation, test and training-subsample images,
    written with the run's record (metrics.json, predictions, history, model.pt)."""
    runner, criterion, data, s, out, train_rows = u.runner, u.criterion, u.data, u.s, u.out, u.loop.train_rows
    runner.model.eval()
    result, predictions = evaluate_fold(runner, criterion, data, decision=s.decision)
    if train_rows is not None and len(train_rows):  # the kept model on the training subsample, as studies report
        probs, loss = runner.predict(train_rows, criterion)
        thresholds = result["val"].get("thresholds")
        result["train"] = evaluate(data.task, data.classes, data.targets[train_rows], probs, thresholds)
        result["train"].update(loss=loss, images=len(train_rows))
    result.update(
        {
            "parameters": sum(p.numel() for p in runner.model.parameters()),
            "repeat": s.repeat,  # which seed of the fold (experiments.<name>.repeats)
            "seed": s.seed,
            "best_epoch": state.best_epoch,
            "epochs_trained": state.epoch,
            "stopped_early": state.stopped_early,
            "train_seconds": state.train_seconds,
            "monitor": s.early_stopping.metric,
            "settings": s.raw,
            "distributed": parallel,
            **({"pruning": pruned} if pruned is not None else {}),
            **({"qat": fakequant.summary(runner.model)} if fakequant.is_prepared(runner.model) else {}),
            "hardware": hardware.cpu() | {"device": str(runner.device)},
        }
    )
    if s.staged:
        result["stages"] = state.stages
    write_evaluation(result, predictions, state.history, out)
    save_model(runner.model, s, data, result["val"].get("thresholds"), out.model, runner.stats)
    log.info(
        "fold %d: best epoch %d; val AUROC %s, test AUROC %s",
        data.fold,
        state.best_epoch,
        _fmt(result["val"]["auroc_macro"]),
        _fmt(result.get("test", {}).get("auroc_macro")),
    )
    return result


def train_fold_job(
    training, index_path, splits_path, cache_dir, fold: int, outputs, threads: int, log_path: str | None
) -> None:
    """A training job: one process in this one, or a distributed run through its launcher, each
    process running ``main`` below with the settings written next to the outputs. ``training``:
    the experiment's ``TrainSettings`` or settings dict."""
    s = TrainSettings.of(training)
    parallel = s.distributed
    if parallel.backend == "none":
        run_fold(s, index_path, splits_path, cache_dir, fold, outputs, threads)
        return
    outs = FoldOutputs.of(outputs)
    outs.create()
    out = outs.work
    settings_file = out / "settings.json"
    settings_file.write_text(json.dumps(s.raw, indent=2))
    n = parallel.gpus
    gpus_per_process = 0 if s.device == "cpu" else 1
    # one positional job file: launchers (torchrun's argparse) would take a prefix of their own
    # options, such as --log for --log-dir, out of the training command's flags
    job = out / "job.json"
    job.write_text(
        json.dumps(
            {
                "settings": str(settings_file),
                "index": str(index_path),
                "splits": str(splits_path),
                "cache": str(cache_dir),
                "fold": fold,
                "out": outs.as_dict(),
                "threads": max(1, threads // (n // parallel.nodes)),  # the processes on one node share it
                "log": str(log_path) if log_path else None,
            }
        )
    )
    module = ["medfold.training.train", str(job)]
    code = distributed.launch(parallel.backend, n, parallel.launcher, gpus_per_process, module, parallel.nodes)
    if code != 0:
        raise MedfoldError(
            f"fold {fold}: distributed training ({parallel.backend}, {n} processes) exited with "
            f"status {code}; its messages are above{' and in ' + str(log_path) if log_path else ''}"
        )


def main(argv: list[str] | None = None) -> None:
    """Command line for launchers (torchrun, horovodrun, srun) and for tests. Only rank 0 logs
    to the file; other ranks print warnings and errors only."""
    from medfold.core.step import guarded

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
