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

from medfold import __version__
from medfold.core import files
from medfold.core.errors import ConfigError, MedfoldError
from medfold.deploy.predict import (
    load_predictor,
    session,
)
from medfold.training.fold import probabilities
from medfold.training.transforms import normalize, scale_inputs

log = logging.getLogger(__name__)
RESIZE = "PIL bilinear, reducing_gap=3.0, to the stated size without keeping the aspect ratio; grey by ITU-R 601 luma"
PARITY = 1e-4
# fp16 variants: onnxruntime's fp16 kernels round unlike PyTorch's (demo: 6.8e-4 at most)
LOW_PRECISION_PARITY = 1e-2
# int8 variants (ptq, qat): onnxruntime's integer kernels against PyTorch's int8 graph, with
# medfold's session (predict.session: u8u8 where the CPU has no VNNI). Measured on the demo's
# int8 variants, 32 random and 200 real test images: 1.1e-3 at most on an AVX2-only AMD EPYC,
# 8e-4 on VNNI/AMX Xeons; without the session option 0.040 on the EPYC. The bound leaves 4x.
INT8_PARITY = 5e-3
INT8_CHECK_IMAGES = 32


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
    """The predictor of ``path`` (medfold.deploy.predict's loading) and the modules to export."""

    if path.suffix == ".pt2":
        from medfold.compression.quantize import load_artifact

        module, meta = load_artifact(path)
        if meta.get("method") == "bf16":
            raise ConfigError(
                f"{path}: a bf16 variant cannot be exported: onnxruntime's CPU provider has no bfloat16 convolution "
                f"(it refuses the graph when loading it); the fp16 variant exports"
            )
        return load_predictor(path), [module], meta.get("method")
    predictor = load_predictor(path)
    return predictor, predictor.modules, None


def _base_model(path: Path, predictor) -> nn.Module | None:
    """The fp32 fold model a variant (``<experiment>/variants/<name>/fold_<k>/model.pt2``) was
    made from, as an inference path like the variant's; None when it is not beside it."""
    if path.suffix != ".pt2" or len(path.parents) < 4:
        return None
    base = path.parents[3] / path.parent.name / "model.pt"
    if not base.is_file():
        return None
    fp32 = load_predictor(base)
    module = InferencePath([m.eval() for m in fp32.modules], fp32.mean, fp32.std, fp32.scale, fp32.tta, fp32.task)
    return module.eval()


def _metadata(predictor, shape: tuple) -> dict:
    """What the ONNX file carries (as medfold.* metadata) to be used without medfold."""
    return {
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


def _stamp(path: Path, metadata: dict) -> None:
    """Write ``metadata`` into the ONNX file as its medfold.* properties (values as JSON)."""
    import onnx

    model = onnx.load(str(path))
    model.doc_string = "medfold: " + str(metadata["model"])
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"medfold.{key}", json.dumps(value)
    onnx.save(model, str(path))


def export_onnx(source, out_dir, name: str = "model.onnx", check_images: int = 8) -> dict:
    """Export ``source`` (experiment folder, model.pt or model.pt2) to ``out_dir/name``; returns
    (and writes beside it as ``export.json``) what was exported and the parity measured."""

    source, out = Path(source), Path(out_dir)
    predictor, modules, method = _source(source)
    # fold models go into eval mode; an exported graph (a variant) is already and takes no .eval()
    modules = [m if isinstance(m, torch.fx.GraphModule) else m.eval() for m in modules]
    module = InferencePath(modules, predictor.mean, predictor.std, predictor.scale, predictor.tta, predictor.task)
    module.training = False  # its own flag only (an exported graph refuses .eval())
    shape = (predictor.channels, predictor.image_size, predictor.image_size)
    quantized = method in ("ptq", "qat")  # static int8: QuantizeLinear / DequantizeLinear pairs
    count = max(2, check_images, INT8_CHECK_IMAGES if quantized else 0)
    example = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (count, *shape), np.uint8))
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    try:
        write_onnx(module, example, path)
    except Exception as exc:  # the exporter's own errors name the op it could not translate
        raise MedfoldError(f"{source}: torch.onnx could not export it: {str(exc).splitlines()[0][:300]}") from exc
    metadata = _metadata(predictor, shape)
    _stamp(path, metadata)
    if quantized:
        checked = int8_check(path, module, _base_model(source, predictor), example.numpy(), predictor.thresholds)
        difference, tolerance = checked["parity_max_abs_difference"], INT8_PARITY
    else:
        difference = parity(path, module, example.numpy())
        tolerance = PARITY if method in (None, "prune") else LOW_PRECISION_PARITY
        checked = {}
        if difference > tolerance:
            path.unlink()
            raise MedfoldError(
                f"{source}: the ONNX file's probabilities differ from PyTorch's by {difference:.2g} "
                f"(more than {tolerance})"
            )
    record = {
        **metadata,
        "file": path.name,
        "bytes": path.stat().st_size,
        "parity_max_abs_difference": difference,
        "parity_tolerance": tolerance,
        **checked,
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
    got, want = _both(path, module, images)
    return float(np.abs(got - want).max())


def _both(path, module: nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's probabilities for ``images`` from the file at ``path``, and ``module``'s."""
    try:
        got = session(path).run(None, {"images": images})[0]
    except Exception as exc:  # onnxruntime's own message says which node it cannot run
        Path(path).unlink(missing_ok=True)
        raise MedfoldError(f"{path}: onnxruntime cannot run the exported file: {str(exc)[:300]}") from exc
    with torch.no_grad():
        want = module(torch.from_numpy(images)).numpy()
    return got, want


def int8_check(path, module: nn.Module, base: nn.Module | None, images: np.ndarray, thresholds) -> dict:
    """What an int8 export must keep, on every x86-64 ISA: onnxruntime's probabilities within
    INT8_PARITY of PyTorch's int8 graph; no farther from the fp32 model the variant was made from
    than PyTorch's own int8 is (plus INT8_PARITY); and the same decision at every exported
    threshold wherever a probability is more than INT8_PARITY from it. Removes the file and
    raises when one fails; returns the figures (written to the export's record)."""
    from medfold.core.hardware import cpu

    got, want = _both(path, module, images)
    out = {"parity_max_abs_difference": float(np.abs(got - want).max()), "check_images": len(images)}
    out["host_isa"] = cpu()["isa"]
    failures = []
    if out["parity_max_abs_difference"] > INT8_PARITY:
        failures.append(
            f"its probabilities differ from PyTorch's int8 graph by {out['parity_max_abs_difference']:.2g} "
            f"(more than {INT8_PARITY})"
        )
    if base is not None:
        with torch.no_grad():
            fp32 = base(torch.from_numpy(images)).numpy()
        out["onnx_vs_fp32_max_abs_difference"] = float(np.abs(got - fp32).max())
        out["pytorch_int8_vs_fp32_max_abs_difference"] = float(np.abs(want - fp32).max())
        if out["onnx_vs_fp32_max_abs_difference"] > out["pytorch_int8_vs_fp32_max_abs_difference"] + INT8_PARITY:
            failures.append(
                f"it is {out['onnx_vs_fp32_max_abs_difference']:.2g} from the fp32 model, PyTorch's int8 graph "
                f"{out['pytorch_int8_vs_fp32_max_abs_difference']:.2g}"
            )
    if thresholds is not None:
        t = np.asarray(thresholds, np.float64)
        differ = (got >= t) != (want >= t)
        out["decisions_agreeing"] = float(1 - differ.mean())
        clear = np.abs(want - t) > INT8_PARITY
        if (differ & clear).any():
            failures.append(f"{int((differ & clear).sum())} decisions at the exported thresholds differ")
    if failures:
        Path(path).unlink(missing_ok=True)
        raise MedfoldError(f"{path}: the int8 export is refused: " + "; ".join(failures))
    return out


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
    from medfold.deploy import card

    record = export_onnx(experiment_dir, outputs.onnx.parent, outputs.onnx.name)
    card.write(card.build(experiment_dir, card_notes, record), outputs.card.parent)
    return record
