"""A trained experiment as one ONNX file holding its whole inference path (``medfold export``
and the workflow's ``<experiment>/export/`` target).

In: ``images``, uint8 (N, C, H, W) at the model's input size, resized as medfold's cache resizes
(PIL bilinear with ``reducing_gap=3.0``, to H x W without keeping the aspect ratio, grey by ITU-R
601 luma after resizing). Inside: /255, the per-image maximum scaling when the model was trained
with it, the normalisation statistics it was trained with, each fold model (with the mirrored
image when the experiment uses flip TTA, averaged per model as evaluation does), sigmoid or
softmax, the mean over the fold models (the workflow's fold ensemble averages probabilities the
same way). Out: ``probabilities``, float32 (N, classes). The ONNX metadata carries the class
names, the thresholds (for a fold ensemble those chosen on the pooled out-of-fold predictions),
where they came from, the decision rule, the input size and channels, and how to resize.

Sources: an experiment's folder (the fold ensemble), one fold's ``model.pt``, or a compression
variant's ``model.pt2``. A pruned variant is a float graph with zeros and exports as it is; an
int8 variant (ptq, qat) becomes ONNX's QuantizeLinear/DequantizeLinear form and an fp16 one
casts inside the graph; onnxruntime runs both (within ``LOW_PRECISION_PARITY`` of PyTorch, not
``PARITY``: its low-precision kernels round otherwise). A bf16 variant cannot be carried:
onnxruntime's CPU provider has no bfloat16 convolution.

The exported file is checked before it is kept: onnxruntime runs it on a batch of the export's
own random images and its probabilities must equal PyTorch's within 1e-4 (``export.json``
records the largest difference).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from . import __version__, files
from .errors import ConfigError, MedfoldError
from .fold import probabilities
from .predict import load_predictor, session
from .predict import read_metadata as read_metadata  # read where predict reads them; the name stays here too
from .transforms import normalize, scale_inputs

log = logging.getLogger(__name__)
RESIZE = "PIL bilinear, reducing_gap=3.0, to the stated size without keeping the aspect ratio; grey by ITU-R 601 luma"
PARITY = 1e-4
# fp16 and int8 variants: onnxruntime's fp16 kernels and its int8 kernels for QuantizeLinear /
# DequantizeLinear pairs round unlike PyTorch's (demo: fp16 6.8e-4 at most)
LOW_PRECISION_PARITY = 1e-2


class InferencePath(nn.Module):
    """uint8 images in, the fold ensemble's probabilities out: what ``medfold predict`` computes."""

    def __init__(self, models: list, mean, std, scale: str, tta: str, task: str):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.mean, self.std, self.scale, self.tta, self.task = mean, std, scale, tta, task

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(scale_inputs(images.to(torch.float32).div(255.0), self.scale), self.mean, self.std)
        total = None
        for model in self.models:
            p = probabilities(model(x), self.task)
            if self.tta == "hflip":
                p = (p + probabilities(model(x.flip(-1)), self.task)) / 2
            total = p if total is None else total + p
        return total / len(self.models)


def _source(path: Path):
    """The predictor of ``path`` (medfold.predict's loading) and the modules to export."""

    if path.suffix == ".pt2":
        from .quantize import load_artifact

        module, meta = load_artifact(path)
        if meta.get("method") == "bf16":
            raise ConfigError(
                f"{path}: a bf16 variant cannot be exported: onnxruntime's CPU provider has no bfloat16 convolution "
                f"(it refuses the graph when loading it); the fp16 variant exports"
            )
        return load_predictor(path), [module], meta.get("method")
    predictor = load_predictor(path)
    return predictor, predictor.modules, None


def export_onnx(source, out_dir, name: str = "model.onnx", check_images: int = 8) -> dict:
    """Export ``source`` (experiment folder, model.pt or model.pt2) to ``out_dir/name``; returns
    (and writes beside it as ``export.json``) what was exported and the parity measured."""
    import onnx

    source, out = Path(source), Path(out_dir)
    predictor, modules, method = _source(source)
    # fold models go into eval mode; an exported graph (a variant) is already and takes no .eval()
    modules = [m if isinstance(m, torch.fx.GraphModule) else m.eval() for m in modules]
    module = InferencePath(modules, predictor.mean, predictor.std, predictor.scale, predictor.tta, predictor.task)
    module.training = False  # its own flag only (an exported graph refuses .eval())
    shape = (predictor.channels, predictor.image_size, predictor.image_size)
    example = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (max(2, check_images), *shape), np.uint8))
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    try:
        write_onnx(module, example, path)
    except Exception as exc:  # the exporter's own errors name the op it could not translate
        raise MedfoldError(f"{source}: torch.onnx could not export it: {str(exc).splitlines()[0][:300]}") from exc
    metadata = {
        "classes": predictor.classes,
        "task": predictor.task,
        "thresholds": predictor.thresholds,
        "thresholds_from": predictor.description.get("thresholds_from"),
        "model": predictor.description.get("model"),
        "input": f"uint8 (N, {shape[0]}, {shape[1]}, {shape[2]})",
        "image_size": predictor.image_size,
        "channels": predictor.channels,
        "resize": RESIZE,
        "normalisation": {"mean": predictor.mean, "std": predictor.std, "scale": predictor.scale},
        "tta": predictor.tta,
        "output": "probabilities, float32 (N, classes): "
        + ("sigmoid per class" if predictor.task == "multilabel" else "softmax over classes"),
        "medfold_version": __version__,
        "torch_version": torch.__version__,
    }
    model = onnx.load(str(path))
    model.doc_string = "medfold: " + str(metadata["model"])
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"medfold.{key}", json.dumps(value)
    onnx.save(model, str(path))
    difference = parity(path, module, example.numpy())
    tolerance = PARITY if method in (None, "prune") else LOW_PRECISION_PARITY
    if difference > tolerance:
        path.unlink()
        raise MedfoldError(
            f"{source}: the ONNX file's probabilities differ from PyTorch's by {difference:.2g} (more than {tolerance})"
        )
    record = {
        **metadata,
        "file": path.name,
        "bytes": path.stat().st_size,
        "parity_max_abs_difference": difference,
        "parity_tolerance": tolerance,
    }
    (out / f"{path.stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info(
        "exported %s to %s (%d bytes; onnxruntime within %.1g of PyTorch)", source, path, record["bytes"], difference
    )
    return record


def write_onnx(module: nn.Module, example: torch.Tensor, path) -> None:
    """``module`` (uint8 images in, probabilities out) to ONNX at ``path``, batch size free."""
    program = torch.onnx.export(
        module,
        (example,),
        input_names=["images"],
        output_names=["probabilities"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
        dynamo=True,
        verbose=False,
    )
    program.save(str(path))


def parity(path, module: nn.Module, images: np.ndarray) -> float:
    """The largest absolute difference between onnxruntime's and PyTorch's probabilities."""
    try:
        got = session(path).run(None, {"images": images})[0]
    except Exception as exc:  # onnxruntime's own message says which node it cannot run
        Path(path).unlink(missing_ok=True)
        raise MedfoldError(f"{path}: onnxruntime cannot run the exported file: {str(exc)[:300]}") from exc
    with torch.no_grad():
        want = module(torch.from_numpy(images)).numpy()
    return float(np.abs(got - want).max())


# ----------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class ExportOutputs(files.Outputs):
    """What the export rule writes, all in one folder."""

    onnx: Path
    record: Path
    card: Path
    card_md: Path
    NAMES: ClassVar[dict[str, str]] = {
        "onnx": "model.onnx",
        "record": "model.json",
        "card": "model_card.json",
        "card_md": "model_card.md",
    }


def export_job(experiment_dir, card_notes: dict, outputs: ExportOutputs) -> dict:
    """The export rule: the fold ensemble of ``experiment_dir`` as one ONNX file, and its model card."""
    from . import card

    record = export_onnx(experiment_dir, outputs.onnx.parent, outputs.onnx.name)
    card.write(card.build(experiment_dir, card_notes, record), outputs.card.parent)
    return record
