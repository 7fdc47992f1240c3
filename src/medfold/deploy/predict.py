"""Apply a trained experiment to new images: its fold ensemble, one fold model, a compressed
variant's ``.pt2`` or an exported ``.onnx`` (medfold.deploy.export), with exactly the preprocessing of
training (the cache's decoding, resizing and channel conversion, then the same normalisation),
labels at the thresholds chosen on validation. A file that cannot be read is listed with its
reason; it never stops the run.

Outputs in ``out_dir``: ``predictions.csv`` and ``predictions.parquet`` (image, path, one
``prob:<class>`` column per class, ``predicted``), ``unreadable.csv`` (path, reason),
``prediction.json`` (the model used, its thresholds and where they came from, counts) and, when
asked, ``gradcam/<n>.png`` overlays of the predicted class.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from medfold.core import files
from medfold.core.errors import ConfigError
from medfold.core.progress import Progress
from medfold.data.cache import load_file
from medfold.data.images import IMAGE_EXTENSIONS
from medfold.evaluation.metrics import predict as predicted_labels
from medfold.settings.sections import PredictSettings
from medfold.training.fold import load_model, probabilities
from medfold.training.transforms import normalize, scale_inputs

log = logging.getLogger(__name__)
PATH_COLUMNS = ("path", "file", "filename", "image", "Image Index")


@dataclass
class Predictor:
    models: list  # callables taking a normalised batch
    classes: list[str]
    task: str
    image_size: int
    channels: int
    thresholds: list[float] | None
    description: dict = field(default_factory=dict)
    modules: list = field(default_factory=list)  # the nn.Modules, for Grad-CAM (not for .pt2 graphs)
    mean: list | float = 0.5  # input statistics saved with the model (medfold.training.models.input_stats)
    std: list | float = 0.25
    tta: str = "none"  # the training settings' test-time augmentation, applied here alike
    scale: str = "255"  # per-image max scaling (training.normalize: image_max) or none

    def input(self, pixels: np.ndarray) -> torch.Tensor:
        """The normalised batch the models take, from uint8 images (N, C, H, W)."""
        x = scale_inputs(torch.from_numpy(pixels).float().div_(255), self.scale)
        return normalize(x, self.mean, self.std)

    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            per_model = [probabilities(m(x), self.task).numpy() for m in self.models]
            if self.tta == "hflip":  # each model's mean with the mirrored image, as in evaluation
                mirrored = [probabilities(m(x.flip(-1)), self.task).numpy() for m in self.models]
                per_model = [(a + b) / 2 for a, b in zip(per_model, mirrored)]
            return np.mean(per_model, axis=0)


class OnnxPredictor(Predictor):
    """An exported file (``medfold export``): its graph holds the preprocessing, so it takes the
    uint8 images themselves; onnxruntime runs it."""

    def input(self, pixels: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(pixels, dtype=np.uint8)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return self.models[0].run(None, {"images": x})[0]


def _from_onnx(path: Path) -> OnnxPredictor:
    meta = read_metadata(path)
    missing = [k for k in ("classes", "task", "image_size", "channels") if k not in meta]
    if missing:
        raise ConfigError(
            f"{path}: not a medfold export (its ONNX metadata lacks medfold.{', medfold.'.join(missing)})"
        )
    return OnnxPredictor(
        [session(path, torch.get_num_threads())],
        meta["classes"],
        meta["task"],
        meta["image_size"],
        meta["channels"],
        meta.get("thresholds"),
        {
            "model": f"ONNX export: {meta.get('model')}",
            "files": [str(path)],
            "thresholds_from": meta.get("thresholds_from"),
        },
    )


def _from_fold_models(paths: list[Path], thresholds, source: str, what: str) -> Predictor:
    loaded = [load_model(p) for p in paths]
    saved = loaded[0][1]
    for path, (_, other) in zip(paths, loaded):
        if other["classes"] != saved["classes"] or other["image_size"] != saved["image_size"]:
            raise ConfigError(f"{path}: classes or image size differ from {paths[0]}'s; not one experiment's folds")
    models = [m for m, _ in loaded]
    return Predictor(
        models,
        saved["classes"],
        saved["task"],
        saved["image_size"],
        saved["in_channels"],
        thresholds if thresholds is not None else saved.get("thresholds"),
        {"model": what, "files": [str(p) for p in paths], "thresholds_from": source},
        models,
        saved.get("input_mean", 0.5),
        saved.get("input_std", 0.25),
        json.loads(saved.get("settings") or "{}").get("tta", "none"),
        saved.get("input_scale", "255"),
    )


def load_predictor(path) -> Predictor:
    """``path``: an experiment's folder (its fold ensemble, thresholds from its pooled
    out-of-fold predictions), a fold's ``model.pt`` (its validation thresholds), a variant's
    ``model.pt2`` (the thresholds in its metrics.json), or an exported ``.onnx`` (the thresholds
    in its metadata)."""
    path = Path(path)
    if path.is_dir():
        ensemble = path / "cv" / "ensemble_test.json"
        # null when the folds share no test set (no fold ensemble was evaluated)
        record = (json.loads(ensemble.read_text()) or {}) if ensemble.exists() else {}
        thresholds = record.get("thresholds")
        if record.get("members"):  # the models the fold ensemble averaged (every seed of every fold)
            folds = [path / member / "model.pt" for member in record["members"]]
            missing = [str(p) for p in folds if not p.is_file()]
            if missing:
                raise ConfigError(f"{ensemble} names fold models that are not there: {missing}")
        else:
            folds = sorted(path.glob("fold_*/model.pt"), key=lambda p: int(p.parent.name.split("_")[1]))
        if not folds:
            raise ConfigError(
                f"{path}: no fold_*/model.pt below it; give an experiment's folder, a model.pt or a model.pt2"
            )
        source = f"{ensemble} (pooled out-of-fold predictions)" if thresholds is not None else "each fold's validation"
        return _from_fold_models(folds, thresholds, source, f"fold ensemble of {len(folds)} models")
    if not path.exists():
        raise ConfigError(f"{path}: no such model file or experiment folder")
    if path.suffix == ".onnx":
        return _from_onnx(path)
    if path.suffix == ".pt2":
        from medfold.compression.quantize import INT8_METHODS, FixedBatch, compiled, load_artifact

        module, meta = load_artifact(path)
        metrics = path.parent / "metrics.json"
        thresholds = json.loads(metrics.read_text())["val"].get("thresholds") if metrics.exists() else None
        run = FixedBatch(compiled(module), 32) if meta.get("method") in INT8_METHODS else module
        return Predictor(
            [run],
            meta["classes"],
            meta["task"],
            meta["image_size"],
            meta["in_channels"],
            thresholds,
            {
                "model": f"variant {meta.get('variant')} ({meta.get('method')})",
                "files": [str(path)],
                "thresholds_from": str(metrics),
            },
            mean=meta.get("input_mean", 0.5),
            std=meta.get("input_std", 0.25),
            scale=meta.get("input_scale", "255"),
        )
    return _from_fold_models([path], None, f"{path} (its validation set)", "one fold model")


def list_images(source, column: str | None = None) -> pd.DataFrame:
    """image, path for every image under a folder, or every row of a CSV (``column``, else the
    first of path/file/filename/image/Image Index; relative paths from the CSV's folder)."""
    from medfold.data.dicom import looks_like_dicom

    source = Path(source)
    if source.is_dir():
        files = sorted(
            p
            for p in source.rglob("*")
            if p.is_file()
            and not p.name.startswith(".")
            and (p.suffix.lower() in IMAGE_EXTENSIONS or (not p.suffix and looks_like_dicom(p)))
        )
        return pd.DataFrame(
            {"image": [p.relative_to(source).as_posix() for p in files], "path": [str(p) for p in files]}
        )
    if source.suffix.lower() in (".csv", ".gz"):
        table = pd.read_csv(source, dtype=str, keep_default_na=False)
        column = column or next((c for c in PATH_COLUMNS if c in table.columns), None)
        if column not in table.columns:
            raise ConfigError(f"{source}: no column {column!r}; give --column (the table has {list(table.columns)})")
        names = table[column].str.strip()
        paths = [str(p if Path(p).is_absolute() else source.parent / p) for p in names]
        return pd.DataFrame({"image": names, "path": paths})
    if source.is_file():
        return pd.DataFrame({"image": [source.name], "path": [str(source)]})
    raise ConfigError(f"{source}: not a folder, a CSV or an image")


def predict_images(
    predictor: Predictor, images: pd.DataFrame, out_dir, batch_size: int = 64, gradcam: bool = False
) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, unreadable, done = [], [], []
    probs_all = []
    with Progress("predict", len(images)) as progress:
        for start in range(0, len(images), batch_size):
            chunk = images.iloc[start : start + batch_size]
            pixels, kept = [], []
            for image, path in zip(chunk["image"], chunk["path"]):
                try:
                    pixels.append(load_file(path, predictor.image_size, predictor.channels))
                    kept.append((image, path))
                except Exception as exc:  # a bad file is listed, never fatal
                    unreadable.append({"image": image, "path": path, "reason": f"{type(exc).__name__}: {exc}"})
            progress.update(len(chunk))
            if not kept:
                continue
            batch = np.stack(pixels)
            x = predictor.input(batch)
            probs_all.append(predictor.probabilities(x))
            done.extend(kept)
            rows.append(batch if gradcam else None)
    columns = [f"prob:{c}" for c in predictor.classes]
    probs = np.concatenate(probs_all) if probs_all else np.zeros((0, len(columns)))
    labels = predicted_labels(predictor.task, probs, predictor.thresholds) if len(probs) else np.zeros(0)
    table = pd.DataFrame({"image": [i for i, _ in done], "path": [p for _, p in done]})
    for j, column in enumerate(columns):
        table[column] = probs[:, j]
    if predictor.task == "multilabel":
        table["predicted"] = ["|".join(c for c, on in zip(predictor.classes, row) if on) for row in labels]
    else:
        table["predicted"] = [predictor.classes[int(k)] for k in labels]
    table.to_parquet(out / "predictions.parquet", index=False)
    table.to_csv(out / "predictions.csv", index=False)
    pd.DataFrame(unreadable, columns=["image", "path", "reason"]).to_csv(out / "unreadable.csv", index=False)
    for item in unreadable:
        log.warning("unreadable, left out: %s: %s", item["path"], item["reason"])
    if gradcam and done:
        _gradcam(predictor, np.concatenate([r for r in rows if r is not None]), table, out / "gradcam")
    summary = {
        **predictor.description,
        "classes": predictor.classes,
        "task": predictor.task,
        "image_size": predictor.image_size,
        "thresholds": predictor.thresholds,
        "images": len(images),
        "predicted": len(table),
        "unreadable": len(unreadable),
    }
    (out / "prediction.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("predicted %d images (%d unreadable) into %s", len(table), len(unreadable), out)
    return summary


def _gradcam(predictor: Predictor, pixels: np.ndarray, table: pd.DataFrame, out: Path) -> None:
    """Grad-CAM of the most probable class, averaged over the fold models (not for .pt2 graphs)."""
    if not predictor.modules:
        log.warning("Grad-CAM needs the fold models' modules; a compiled .pt2 graph has none: no overlays")
        return
    from medfold.explain import grad_cam, overlay_cam

    out.mkdir(parents=True, exist_ok=True)
    probs = table.filter(like="prob:").to_numpy()
    for k, image in enumerate(pixels):
        target = int(probs[k].argmax())
        x = predictor.input(image[None])
        cam = np.mean([grad_cam(m, x.clone().requires_grad_(True), target) for m in predictor.modules], axis=0)
        title = f"{table['image'].iat[k]}: {predictor.classes[target]} (p={probs[k, target]:.2f})"
        overlay_cam(image, cam, title, out / f"{k:05d}.png")


# ----------------------------------------------------------------------------- exported files
def session(path, threads: int | None = None):
    """An onnxruntime CPU session for an exported file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # int8 files: on x86-64 without VNNI (AVX2, AVX-512F) onnxruntime's fast u8s8 kernels let
    # 16-bit sums of products saturate; this converts them to u8u8 there (no effect elsewhere).
    # Measured on an AVX2-only EPYC, demo int8 variants: 0.030-0.040 from PyTorch's int8 graph
    # without it, 8e-4-1.1e-3 with it (VNNI/AMX hosts: 8e-4 either way).
    options.add_session_config_entry("session.x64quantprecision", "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def read_metadata(path) -> dict:
    """The ``medfold.*`` metadata of an exported file, decoded."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        p.key.removeprefix("medfold."): json.loads(p.value)
        for p in model.metadata_props
        if p.key.startswith("medfold.")
    }


# ----------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class PredictOutputs(files.Outputs):
    """What the predict rule (and ``medfold predict``) writes, all in one folder."""

    table: Path
    csv: Path
    unreadable: Path
    record: Path
    NAMES: ClassVar[dict[str, str]] = {
        "table": "predictions.parquet",
        "csv": "predictions.csv",
        "unreadable": "unreadable.csv",
        "record": "prediction.json",
    }


def predict_job(predict: PredictSettings | dict, experiment_dir, outputs: PredictOutputs) -> dict:
    """The predict rule: ``predict.images`` through the fold ensemble of ``experiment_dir``
    (``predict``: the ``predict`` settings, or the section's dict)."""
    predict = PredictSettings.of(predict)
    if not predict.images:
        raise ConfigError(
            "predict.images: not set; give the folder or CSV of new images, e.g. "
            "--config 'predict={images: new_images/}'"
        )
    return predict_images(
        load_predictor(experiment_dir),
        list_images(predict.images, predict.column),
        outputs.table.parent,
        gradcam=predict.gradcam,
    )
