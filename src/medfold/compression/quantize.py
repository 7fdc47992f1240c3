"""Quantized and reduced-precision variants through torch.export and torchao's PT2E flow.

* ``ptq``: post-training static int8 for x86 CPUs: export, ``prepare_pt2e`` with
  ``X86InductorQuantizer``, calibration on training images, ``convert_pt2e``.
* ``qat``: quantization-aware training: ``prepare_qat_pt2e`` on the exported training graph,
  fine-tuning with fake quantization, then ``convert_pt2e``.
* ``dynamic_int8``: int8 weights, with each activation's scale chosen per batch at run time
  (no calibration; one forward pass records the weights' ranges).
* ``fp16`` / ``bf16``: the weights cast; inputs cast on the way in, outputs back to fp32.

``torch.ao.quantization`` only warns of its deprecation in torch 2.14; torchao's ``pt2e`` package
is the maintained home of the same flow. int8 kernels are only used after
``torch.compile`` with inductor's ``freezing`` on (measured here: ResNet18 ~6x faster at batch
1 with it, no faster without).

The artifact is a ``torch.export`` archive (``.pt2``) of the converted graph with a dynamic
batch dimension, its JSON (the graph) deflated. ``convert_pt2e`` leaves the float weights it
replaced as unused attributes; they are dropped before export, so the file holds only the
tensors the graph uses (ResNet18: 0.29x the fp32 file instead of 1.29x). ``torch.export.load``
falls back to unpickling when a weight is stored pickled; ``load_artifact`` refuses such files first.
"""

from __future__ import annotations

import json
import logging
import zipfile

import torch
from torch import nn

from medfold.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)
INT8_METHODS = ("ptq", "qat", "dynamic_int8")
FLOAT_METHODS = {"fp16": torch.float16, "bf16": torch.bfloat16}


class CastInput(nn.Module):
    """Runs ``model`` in ``dtype``: inputs cast on the way in, logits back to float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def _batch_dim():
    return ({0: torch.export.Dim("batch", min=1, max=65536)},)


def export(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``example`` should hold at least 2 images: a batch of 1 would be specialised."""
    if example.shape[0] < 2:
        example = example.repeat(2, 1, 1, 1)
    return torch.export.export(model, (example,), dynamic_shapes=_batch_dim(), strict=True)


def _quantizer(is_qat: bool = False, is_dynamic: bool = False, layers: str = "all"):
    """x86's int8 quantizer for the whole model, or (``layers: conv``) its convolutions only, as
    the thesis's conv-only QAT: linear layers (the classifier among them) stay float."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer()
    config = get_default_x86_inductor_quantization_config(is_qat=is_qat, is_dynamic=is_dynamic)
    if layers == "conv":
        quantizer.set_module_type_qconfig(torch.nn.Conv2d, config)
    else:
        quantizer.set_global(config)
    return quantizer


def drop_unused_tensors(graph_module: torch.fx.GraphModule) -> int:
    """Delete parameters and buffers the graph never reads (the float weights ``convert_pt2e``
    replaced with int8 ones); returns how many went."""
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    removed = 0
    for name, _ in [*graph_module.named_parameters(), *graph_module.named_buffers()]:
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            module = graph_module.get_submodule(owner) if owner else graph_module
            module._parameters.pop(leaf, None)
            module._buffers.pop(leaf, None)
            removed += 1
    return removed


@torch.no_grad()
def post_training_int8(
    model: nn.Module, calibration, example: torch.Tensor, dynamic: bool = False, layers: str = "all"
) -> torch.fx.GraphModule:
    """``calibration``: an iterable of input batches (dynamic quantization only runs ``example``)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(export(model.eval(), example).module(), _quantizer(is_dynamic=dynamic, layers=layers))
    # weight observers record their ranges in a forward pass, so even dynamic quantization needs one
    seen = 0
    for x in [example] if dynamic else calibration:
        prepared(x)
        seen += len(x)
    log.info("observed %d images", seen)
    converted = convert_pt2e(prepared)
    drop_unused_tensors(converted)
    return converted


def prepare_qat(model: nn.Module, example: torch.Tensor, layers: str = "all") -> torch.fx.GraphModule:
    """The training graph with fake quantization (of ``layers``: all, or conv), ready for fine-tuning."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    return prepare_qat_pt2e(export(model.train(), example).module(), _quantizer(is_qat=True, layers=layers))


def set_training(graph_module: torch.fx.GraphModule, training: bool) -> None:
    """Exported graphs do not take ``.train()``/``.eval()``; torchao swaps their batch-norm and
    dropout ops instead."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    (move_exported_model_to_train if training else move_exported_model_to_eval)(graph_module)


def convert_qat(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    set_training(prepared, False)
    converted = convert_pt2e(prepared)
    drop_unused_tensors(converted)
    return converted


def reduced_precision(model: nn.Module, method: str) -> nn.Module:
    return CastInput(model.eval(), FLOAT_METHODS[method]).eval()


def save_artifact(module: nn.Module, example: torch.Tensor, path, metadata: dict) -> int:
    """Export ``module`` (dynamic batch) to ``path``; ``metadata`` goes into the archive as JSON."""
    program = export(module, example)
    program.example_inputs = None  # else the archive carries a copy of the example batch
    torch.export.save(program, path, extra_files={"medfold.json": json.dumps(metadata)})
    _deflate_text(path)
    return path.stat().st_size


def _deflate_text(path) -> None:
    """Rewrite the archive with its JSON entries (the graph, ~1 MB for ResNet50) deflated;
    torch.export.save stores everything uncompressed. Tensors stay stored as they were."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as dst:
        for item in src.infolist():
            kind = zipfile.ZIP_DEFLATED if item.filename.endswith(".json") else zipfile.ZIP_STORED
            dst.writestr(item, src.read(item), compress_type=kind)
    tmp.replace(path)


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors alone (the file adds the graph, ~100 KB for a small CNN)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _check_archive(path) -> None:
    """Refuse archives whose loading would unpickle: pickled weights or constants."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith("_config.json") and "/data/" in name:
                    config = json.loads(archive.read(name)).get("config", {})
                    pickled = [k for k, v in config.items() if v.get("use_pickle")]
                    if pickled:
                        raise DataError(f"{path}: holds pickled tensors ({pickled[:3]}); refusing to load it")
    except zipfile.BadZipFile as err:
        raise DataError(f"{path}: not a torch.export archive ({err})") from err


def load_artifact(path) -> tuple[nn.Module, dict]:
    """A saved variant back as a callable module (on CPU) and its metadata."""
    import torchao.quantization.pt2e  # noqa: F401  (registers the quantized ops the graph calls)

    _check_archive(path)
    extra = {"medfold.json": ""}
    program = torch.export.load(path, extra_files=extra)
    metadata = json.loads(extra["medfold.json"] or "{}")
    metadata["tensor_bytes"] = tensor_bytes([*program.state_dict.values(), *program.constants.values()])
    return program.module(), metadata


def compiled(module: nn.Module) -> nn.Module:
    """Inductor with freezing: constant weights folded in, which is what makes int8 kernels fast.

    Static shapes (one compilation per batch size): with a dynamic batch dimension, torch 2.14's
    inductor mis-lays out the int8 convolution that follows a 1-channel input (a stride
    assertion fails at run time).

    Importing torchao's x86 quantizer registers inductor's int8 fusion passes. The job that made
    a variant had imported it; a process that only loads the archive had not, and compiled the
    same graph through another lowering: on an AVX2-only CPU its probabilities differed by up to
    0.008 from what compression.json reported. Importing it here makes every process compile the
    artifact alike (bit-identical predictions, measured across processes and thread counts)."""
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  (see above)

    inductor_config.freezing = True
    return torch.compile(module, dynamic=False)


def method_error(method: str) -> ConfigError:
    return ConfigError(
        f"variants: method {method!r} is not one of prune, {', '.join(INT8_METHODS)}, {', '.join(FLOAT_METHODS)}"
    )


class FixedBatch:
    """Calls ``model`` on batches of exactly ``size`` images (the last one zero-padded), so a
    model compiled for static shapes is compiled once for evaluation, not once per batch size."""

    def __init__(self, model, size: int):
        self.model, self.size = model, size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chunk in x.split(self.size):
            n = len(chunk)
            if n < self.size:
                chunk = torch.cat([chunk, chunk.new_zeros((self.size - n, *chunk.shape[1:]))])
            outputs.append(self.model(chunk)[:n])
        return torch.cat(outputs)
