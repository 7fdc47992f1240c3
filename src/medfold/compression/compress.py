"""One compressed variant of one fold's model: make it, save it, load it back, evaluate it and
measure it beside its base model in the same process.

Every variant is saved as a ``torch.export`` archive (``model.pt2``) and evaluated from that file
on the CPU, so the numbers are those of the artifact a user would deploy. Its predictions and
metrics files have the base model's format, so aggregation and the report treat a variant like
any model; ``compression.json`` adds sizes, latencies, ratios and metric deltas against the base
model, measured in this job on the same machine and the same test images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from medfold.compression import quantize
from medfold.compression.quantize import FixedBatch
from medfold.core import files, hardware, seeds
from medfold.evaluation.metrics import predict as predicted_labels
from medfold.evaluation.metrics import scalar_metrics
from medfold.settings.sections import CompressionSettings, LatencySettings, VariantSettings
from medfold.settings.training import TrainSettings
from medfold.training import prune as pruning
from medfold.training.fold import (
    Criterion,
    FoldData,
    Runner,
    evaluate_fold,
    load_model,
    resolve_device,
    write_evaluation,
)
from medfold.training.loop import Epochs, Fit, TrainState, fit, make_optimizer
from medfold.training.transforms import CachedBatches

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- measurement
@torch.no_grad()
def latency_ms(model, x: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median wall time of one forward pass, after ``warmup`` passes (compilation happens there)."""
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(model, images: torch.Tensor, latency: LatencySettings | dict) -> dict:
    """Latency at each batch size in ``latency.batch_sizes`` (``compression.latency``) and
    images/s at the largest."""
    latency = LatencySettings.of(latency)
    out = {}
    for b in latency.batch_sizes:
        x = images[:b] if len(images) >= b else images.repeat(-(-b // len(images)), 1, 1, 1)[:b]
        out[f"latency_ms_b{b}"] = latency_ms(model, x, latency.warmup, latency.repeats)
    largest = max(latency.batch_sizes)
    out["images_per_s"] = 1000 * largest / out[f"latency_ms_b{largest}"]
    return out


def latency_inputs(runner: Runner, data: FoldData, n: int) -> torch.Tensor:
    rows = data.rows["test"] if len(data.rows["test"]) else data.rows["val"]
    return runner.prepare(torch.from_numpy(data.cache[np.sort(rows[:n])]), None, None)


# ----------------------------------------------------------------------------- fine-tuning
def finetune(
    runner: Runner,
    model,
    data: FoldData,
    training: TrainSettings | dict,
    epochs: int,
    lr: float,
    set_training,
    after_step=None,
    describe=None,
) -> tuple[list[dict], float]:
    """Fine-tune ``model`` on the fold's training images through training's own loop, for a fixed
    number of epochs (no early stopping: the variant is the last epoch's model); the validation
    fold is scored after every epoch for the history. Data order and augmentation are seeded
    apart from training's. ``training``: the experiment's settings."""
    s = TrainSettings.of(training)
    optimizer = make_optimizer(model.parameters(), s, lr)
    criterion = Criterion(
        data.task, data.targets[data.rows["train"]], len(data.classes), s.class_weights, runner.device
    )
    batches = CachedBatches(
        data.cache,
        data.rows["train"],
        s.batch_size,
        shuffle=True,
        seed=seeds.finetune_order(s.seed, data.fold),
    )
    loop = Epochs(runner, data, criterion, batches, s.augment, s.seed, epoch_offset=seeds.FINETUNE_EPOCHS)
    extra = list(describe()) if describe else []  # the columns ``describe`` adds, logged too

    def after_epoch(row: dict, improved: bool) -> None:
        log.info(
            "fine-tune epoch %d/%d  loss %.4f  val_auroc %s%s",
            row["epoch"],
            epochs,
            row["train_loss"],
            "n/a" if row["val_auroc_macro"] is None else f"{row['val_auroc_macro']:.4f}",
            "".join(f"  {k} {row[k]:.3f}" for k in extra),
        )

    state = TrainState()
    plan = Fit(
        epochs,
        set_training=set_training,
        after_step=after_step,
        describe=describe,
        after_epoch=after_epoch,
    )
    fit(loop, model, model, optimizer, state, plan)
    return state.history, state.train_seconds


# ----------------------------------------------------------------------------- the methods
def _prune(base, runner, data, s: TrainSettings, v: VariantSettings, example):
    model = base.to(runner.device)
    pruner = pruning.Pruner.from_config(model, v.pruning)
    history, seconds = finetune(
        runner,
        model,
        data,
        s,
        v.epochs,
        v.lr or s.lr * 0.1,
        lambda on: model.train(on),
        lambda epoch: pruner.after_step(epoch, v.pruning.update_every),
        lambda: {"sparsity": pruner.sparsity()["overall"]},
    )
    pruner.update(float(v.epochs))  # the schedule's value at the end (final if end_epoch <= epochs)
    achieved = pruner.sparsity()
    pruner.make_permanent()
    model = model.to(CPU).eval()
    return model, history, seconds, {"sparsity": achieved, "state_dict": model.state_dict()}


def _qat(base, runner, data, s: TrainSettings, v: VariantSettings, example):
    prepared = quantize.prepare_qat(base.to(runner.device), example.to(runner.device), v.quantize_layers)
    history, seconds = finetune(
        runner,
        prepared,
        data,
        s,
        v.epochs,
        v.lr or s.lr * 0.1,
        lambda on: quantize.set_training(prepared, on),
    )
    return quantize.convert_qat(prepared.to(CPU)), history, seconds, {}


def _post_training(base, runner, data, s: TrainSettings, v: VariantSettings, example):
    if v.method in quantize.FLOAT_METHODS:
        return quantize.reduced_precision(base, v.method), [], 0.0, {}
    rows = data.rows["train"][: v.calibration_images]
    calibration = (
        runner.prepare(images, None, None).to(CPU)
        for images, _ in CachedBatches(data.cache, rows, s.eval_batch_size, shuffle=False)
    )
    dynamic = v.method == "dynamic_int8"
    start = time.perf_counter()
    model = quantize.post_training_int8(base, calibration, example, dynamic=dynamic, layers=v.quantize_layers)
    return model, [], time.perf_counter() - start, {"calibration_images": 0 if dynamic else int(len(rows))}


METHODS = {
    "prune": _prune,
    "qat": _qat,
    "ptq": _post_training,
    "dynamic_int8": _post_training,
    "fp16": _post_training,
    "bf16": _post_training,
}


# ----------------------------------------------------------------------------- the job
@dataclasses.dataclass(frozen=True)
class VariantOutputs(files.Outputs):
    """Where one variant of one fold is written (the compress rule's outputs); a pruned variant's
    sparse file is a work file beside the model."""

    model: Path
    history: Path
    predictions: Path
    metrics: Path
    compression: Path
    NAMES: ClassVar[dict[str, str]] = {
        "model": "model.pt2",
        "history": "history.csv",
        "predictions": "predictions.parquet",
        "metrics": "metrics.json",
        "compression": "compression.json",
    }


def _speedups(base: dict, variant: dict, batch_sizes, prefix: str) -> dict:
    """The base model's latency over the variant's at each batch size."""
    return {f"{prefix}_b{b}": base[f"latency_ms_b{b}"] / variant[f"latency_ms_b{b}"] for b in batch_sizes}


def _sparse_file(state_dict: dict, model_path: Path, base_size: int, size: int) -> dict:
    """A pruned variant's weights in medfold's sparse format beside its model, and their sizes."""
    sparse_size = pruning.save_sparse(state_dict, model_path.with_name("model_sparse.pt"))
    record = {
        "format": pruning.FORMAT,
        "file": "model_sparse.pt",
        "size_bytes": sparse_size,
        "ratio": sparse_size / base_size,
        "dense_size_bytes": size,
        "gzip_of_dense_bytes": pruning.gzip_size(model_path),
    }
    record["gzip_ratio"] = record["gzip_of_dense_bytes"] / base_size
    return record


# One piece (70 lines, 13 of them its signature): compression.json's record is one literal, in the
# order the report and the tests read it; making, saving and measuring are the helpers below.
def compress_fold(
    name: str,
    variant: VariantSettings | dict,
    training: TrainSettings | dict,
    compression: CompressionSettings | dict,
    index_path,
    splits_path,
    cache_dir,
    fold: int,
    base_path,
    outputs,
    threads: int = 1,
) -> dict:
    """Make, save, reload, evaluate and measure one variant of one fold's model; writes the
    compress rule's outputs (``outputs``: a VariantOutputs, or a folder for the usual names).
    ``variant``, ``training`` (the experiment's) and ``compression``: settings or their dicts."""
    vs, c = VariantSettings.of(variant), CompressionSettings.of(compression)
    if vs.method not in METHODS:
        raise quantize.method_error(vs.method)
    out = VariantOutputs.of(outputs)
    out.create()
    torch.set_num_threads(max(1, threads))
    s = TrainSettings.of(training)
    torch.manual_seed(s.seed)
    data = FoldData(index_path, splits_path, cache_dir, fold)
    plain = {"amp": False, "compile": False, "channels_last": False}  # variants are measured as they are
    s = dataclasses.replace(s, **plain, raw={**s.raw, **plain})
    device = resolve_device(s.device) if vs.method in ("prune", "qat") else CPU
    base, saved = load_model(base_path)
    cpu_runner = Runner(s, data.cache, data.targets, data.task, CPU, base)
    images = latency_inputs(cpu_runner, data, max(c.latency.batch_sizes))
    example = images[:2]

    # the base model, evaluated and measured here, beside the variant
    base_result, base_predictions = evaluate_fold(cpu_runner, None, data, decision=s.decision)
    base_measured = measure(base, images, c.latency)

    # the variant is made from its own copy: pruning and QAT change the model they are given
    runner = Runner(s, data.cache, data.targets, data.task, device, load_model(base_path)[0])
    made = _make_variant(
        name, vs, runner, data, s, example, _artifact_metadata(name, vs, fold, data, saved, cpu_runner)
    )
    result, predictions, variant_stats = _saved_and_measured(made, example, out.model, cpu_runner, data, s, images, c)
    # compiled int8 against compiled fp32 too, so the gain of compiling alone is visible
    int8 = variant_stats["compiled"]
    base_compiled = measure(quantize.compiled(base), images, c.latency) if int8 else None
    base_stats = {
        "size_bytes": Path(base_path).stat().st_size,
        "tensor_bytes": quantize.tensor_bytes(saved["state_dict"].values()),
        **base_measured,
        **({f"compiled_{k}": v for k, v in base_compiled.items()} if base_compiled else {}),
    }
    record = {
        "variant": name,
        "method": vs.method,
        "fold": fold,
        "threads": threads,
        "cpu": hardware.cpu(),
        "torch": torch.__version__,
        "base": base_stats,
        "variant_measured": variant_stats,
        "finetune": {"epochs": len(made.history), "seconds": made.finetune_seconds},
        "make_seconds": made.seconds,
        "ratios": _ratios(base_stats, variant_stats, base_compiled, c.latency.batch_sizes),
        "deltas": metric_deltas(base_result, result),
        "agreement": agreement(base_result, base_predictions, result, predictions, data),
        **_method_record(made, out.model, base_stats["size_bytes"], variant_stats["size_bytes"]),
    }
    _write_variant(result, predictions, record, made, s, vs, out)
    return record


@dataclasses.dataclass
class _Made:
    """A variant as its method made it, before it is saved: the model, its fine-tuning history
    and time, what the method reports besides (sparsity, calibration images), and when it was
    done (``finished``, a perf_counter reading)."""

    model: object
    metadata: dict
    history: list
    finetune_seconds: float
    extra: dict
    seconds: float
    finished: float


def _make_variant(name: str, vs: VariantSettings, runner, data, s: TrainSettings, example, metadata: dict) -> _Made:
    start = time.perf_counter()
    model, history, finetune_seconds, extra = METHODS[vs.method](runner.model, runner, data, s, vs, example)
    finished = time.perf_counter()
    log.info("%s (%s) made in %.1f s", name, vs.method, finished - start)
    return _Made(model, metadata, history, finetune_seconds, extra, finished - start, finished)


def _write_variant(result: dict, predictions, record: dict, made: _Made, s: TrainSettings, vs, out) -> None:
    """The variant's metrics.json, predictions and history (as a fold's), and compression.json."""
    history, finetune_seconds = made.history, made.finetune_seconds
    name, fold = record["variant"], record["fold"]
    result.update(
        {
            "variant": name,
            "method": vs.method,
            "best_epoch": len(history),
            "epochs_trained": len(history),
            "train_seconds": finetune_seconds,
            "settings": s.raw,
            "variant_settings": vs.raw,
        }
    )
    write_evaluation(result, predictions, history, out)
    out.compression.write_text(json.dumps(record, indent=2) + "\n")
    log.info(
        "%s fold %d: size %.3fx, batch-1 speed-up %.2fx, test AUROC delta %s",
        name,
        fold,
        record["ratios"]["size"],
        record["ratios"].get("speedup_b1", float("nan")),
        record["deltas"].get("test.auroc_macro"),
    )


def _method_record(made: _Made, path, base_size: int, size: int) -> dict:
    """What the method reports besides: a pruned variant's sparsity and compressed file, the
    images a post-training quantisation was calibrated on."""
    extra = {}
    if made.metadata["method"] == "prune":
        extra["sparsity"] = made.extra["sparsity"]
        extra["compressed"] = _sparse_file(made.extra["state_dict"], path, base_size, size)
    if "calibration_images" in made.extra:
        extra["calibration_images"] = made.extra["calibration_images"]
    return extra


def _saved_and_measured(made: _Made, example, path, cpu_runner, data, s: TrainSettings, images, c):
    """Save the variant, load it back and evaluate and time what was saved (not what is in
    memory); int8 variants run compiled. Returns its result, predictions and measurements."""
    size = quantize.save_artifact(made.model, example, path, made.metadata)
    made.model = None
    loaded, loaded_meta = quantize.load_artifact(path)
    int8 = made.metadata["method"] in quantize.INT8_METHODS
    runnable = quantize.compiled(loaded) if int8 else loaded
    largest = max(c.latency.batch_sizes)
    result, predictions = evaluate_fold(
        cpu_runner, None, data, FixedBatch(runnable, largest) if int8 else runnable, decision=s.decision
    )
    log.info("saved, loaded back and evaluated in %.1f s", time.perf_counter() - made.finished)
    stats = {
        "size_bytes": size,
        "tensor_bytes": loaded_meta["tensor_bytes"],
        "format": "torch.export archive (.pt2)",
        "compiled": int8,
        **measure(runnable, images, c.latency),
    }
    return result, predictions, stats


def _artifact_metadata(name: str, vs: VariantSettings, fold: int, data, saved: dict, cpu_runner) -> dict:
    """What a variant's .pt2 carries to predict as its base model did."""
    return {
        "variant": name,
        "method": vs.method,
        "fold": fold,
        "classes": data.classes,
        "task": data.task,
        "model": saved["model"],
        "image_size": saved["image_size"],
        "in_channels": saved["in_channels"],
        "input_mean": cpu_runner.stats["mean"],
        "input_std": cpu_runner.stats["std"],
        "input_scale": cpu_runner.scale,
    }


def _ratios(base: dict, stats: dict, base_compiled: dict | None, batch_sizes) -> dict:
    """Size and speed of the variant against the base model (and against the compiled base)."""
    ratios = {
        "size": stats["size_bytes"] / base["size_bytes"],
        "tensor_size": stats["tensor_bytes"] / base["tensor_bytes"],
        **_speedups(base, stats, batch_sizes, "speedup"),
    }
    if base_compiled:
        ratios.update(_speedups(base_compiled, stats, batch_sizes, "speedup_vs_compiled"))
    return ratios


def metric_deltas(base: dict, compressed: dict) -> dict:
    """The variant's metrics minus the base model's (both metrics.json results)."""
    out = {}
    for part in ("val", "test"):
        if part in base and part in compressed:
            b, v = scalar_metrics(base[part]), scalar_metrics(compressed[part])
            out.update({f"{part}.{k}": v[k] - b[k] for k in b if b[k] is not None and v.get(k) is not None})
    return out


def agreement(base_result: dict, base_predictions, result: dict, predictions, data: FoldData) -> dict:
    """On the test images: the share whose predicted label(s) match the base model's (each with its
    own thresholds chosen on validation), and the largest probability difference."""
    part = "test" if "test" in result else "val"
    b = base_predictions[base_predictions["set"] == part].filter(like="prob:").to_numpy()
    v = predictions[predictions["set"] == part].filter(like="prob:").to_numpy()
    pb = predicted_labels(data.task, b, base_result[part].get("thresholds"))
    pv = predicted_labels(data.task, v, result[part].get("thresholds"))
    same = (pb == pv).all(1) if pb.ndim == 2 else pb == pv
    return {
        "set": part,
        "label_agreement": float(same.mean()),
        "max_abs_prob_diff": float(np.abs(b - v).max()),
        "mean_abs_prob_diff": float(np.abs(b - v).mean()),
    }


# ----------------------------------------------------------------------------- the table
def _flat(record: dict) -> dict:
    row = {"variant": record["variant"], "method": record["method"], "fold": record["fold"]}
    cpu = record.get("cpu") if isinstance(record.get("cpu"), dict) else {"model": record.get("cpu")}
    row.update({"cpu.model": cpu.get("model"), "cpu.isa": cpu.get("isa")})
    row.update({f"base.{k}": v for k, v in record["base"].items()})
    row.update({f"variant.{k}": v for k, v in record["variant_measured"].items() if k != "format"})
    row.update({f"ratio.{k}": v for k, v in record["ratios"].items()})
    row.update({f"delta.{k}": v for k, v in record["deltas"].items()})
    row.update({f"agreement.{k}": v for k, v in record["agreement"].items() if k != "set"})
    if "sparsity" in record:
        row["sparsity"] = record["sparsity"]["overall"]
    if "compressed" in record:
        row["compressed.format"] = record["compressed"]["format"]
        row["compressed.size_bytes"] = record["compressed"]["size_bytes"]
        row["compressed.ratio"] = record["compressed"]["ratio"]
        row["compressed.gzip_ratio"] = record["compressed"]["gzip_ratio"]
    row["finetune_seconds"] = record["finetune"]["seconds"]
    return row


SUMMARY_COLUMNS = (
    "ratio.size",
    "ratio.tensor_size",
    "compressed.ratio",
    "compressed.gzip_ratio",
    "sparsity",
    "ratio.speedup_b1",
    "ratio.speedup_b32",
    "ratio.speedup_vs_compiled_b1",
    "ratio.speedup_vs_compiled_b32",
    "variant.latency_ms_b1",
    "base.latency_ms_b1",
    "variant.images_per_s",
    "base.images_per_s",
    "delta.test.auroc_macro",
    "delta.test.accuracy",
    "delta.val.auroc_macro",
    "agreement.label_agreement",
    "agreement.max_abs_prob_diff",
    "finetune_seconds",
)


def variants_tables(record_paths, summary_paths: dict, base_summary_path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per fold: every measurement of every variant. Summary: per variant, the mean and std over
    folds of the ratios, latencies and metric deltas, and the pooled out-of-fold AUROC."""
    table = pd.DataFrame([_flat(json.loads(Path(p).read_text())) for p in record_paths])
    table = table.sort_values(["variant", "fold"]).reset_index(drop=True)
    rows = []
    base_oof = json.loads(Path(base_summary_path).read_text())["oof"].get("auroc_macro")
    for name, group in table.groupby("variant", sort=False):
        row = {"variant": name, "method": group["method"].iloc[0], "folds": len(group)}
        for column in SUMMARY_COLUMNS:
            if column in group and group[column].notna().any():
                row[f"{column}.mean"] = float(group[column].mean())
                # one fold compressed (compression.folds): no spread to state
                row[f"{column}.std"] = float(group[column].std(ddof=1)) if len(group) > 1 else float("nan")
        oof = json.loads(Path(summary_paths[name]).read_text())["oof"].get("auroc_macro")
        row["oof.auroc_macro"], row["base.oof.auroc_macro"] = oof, base_oof
        rows.append(row)
    return table, pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the variants table
@dataclasses.dataclass(frozen=True)
class VariantsTableOutputs(files.Outputs):
    """What the variants_table rule writes for one experiment."""

    table: Path
    summary: Path
    NAMES: ClassVar[dict[str, str]] = {"table": "variants.csv", "summary": "variants_summary.csv"}


def variants_table_job(records, variants: list[str], summaries, base_summary, outputs: VariantsTableOutputs) -> None:
    """The variants_table rule: every variant of every compressed fold beside its base model."""
    table, summary = variants_tables(records, dict(zip(variants, summaries)), base_summary)
    table.to_csv(outputs.table, index=False)
    summary.to_csv(outputs.summary, index=False)
