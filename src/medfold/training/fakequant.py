"""Quantization-aware training from the first epoch (``training.qat``): the fold model trains
with int8 fake quantization in place, as study 003 trained ResNet50 with TF-MOT's
``quantize_model`` from ImageNet weights.

Each quantized layer (every convolution; with ``layers: all`` every linear layer too):

* its **weight** is fake-quantized per output channel, symmetric int8 (scale = max |w| / 127,
  zero point 0), through a parametrization: the optimiser updates the float weight, the forward
  pass uses its int8-grid value, the gradient passes straight through (as
  ``torch.fake_quantize_per_channel_affine`` does, in plain ops that torch.export can trace);
* its **input** is fake-quantized per tensor, asymmetric uint8, over a range observed in training
  mode as a moving average of each batch's min and max (momentum 0.01, the first batch taken as
  it is; torch's ``MovingAverageMinMaxObserver`` does the same). The range lives in the layer's
  buffers ``qat_min``, ``qat_max``, ``qat_seen``: it is saved, resumed and (Horovod) averaged
  across ranks with the batch-norm statistics.

This is eager PyTorch, not an exported graph (``medfold.compression.quantize``'s PT2E flow), because a fold
trains in stages that freeze and unfreeze layers, keeps a weights' average, resumes from
checkpoints and runs under DDP/Horovod: all of these need the model's own modules. The saved
model.pt keeps the quantization (``load_model`` puts it back before loading the weights), so
every later stage (ensemble, predict, explain) scores the model that was trained and selected.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

MOMENTUM = 0.01
LAYERS = ("conv", "all")


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8 fake quantization of a weight."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.detach().reshape(w.shape[0], -1)
        scale = (flat.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        return _rounded(w, scale.reshape(-1, *([1] * (w.dim() - 1))), 0.0, -127.0, 127.0)


def _rounded(x: torch.Tensor, scale, zero, low: float, high: float) -> torch.Tensor:
    """``x`` on the integer grid ``scale * (q - zero)``, q in [low, high]; the gradient passes
    straight through inside the range and is zero outside it (as torch's fake_quantize ops do).
    Written in plain tensor ops so that torch.export can trace a trained model."""
    q = x / scale + zero
    clamped = torch.clamp(q, low, high)
    return (clamped + (torch.round(clamped) - clamped).detach() - zero) * scale


def _quantize_input(module: nn.Module, args: tuple):
    """Forward pre-hook: observe the input's range in training mode, then fake-quantize it to uint8."""
    (x, *rest) = args
    if module.training:
        with torch.no_grad():  # on the device, no .item(): a host sync per layer and step otherwise
            low, high = x.detach().amin().float(), x.detach().amax().float()
            rate = torch.where(module.qat_seen == 0, 1.0, MOMENTUM)  # the first batch as it is
            module.qat_min.lerp_(low, rate)
            module.qat_max.lerp_(high, rate)
            module.qat_seen.add_(1)
    # in eval mode no data-dependent branch (torch.export traces it): a trained layer has its range
    low, high = module.qat_min.clamp_max(0.0), module.qat_max.clamp_min(0.0)  # 0 must be exact
    scale = ((high - low) / 255.0).clamp_min(1e-12)
    zero = torch.clamp(torch.round(-low / scale), 0, 255)
    quantized = _rounded(x.float(), scale, zero, 0.0, 255.0).to(x.dtype)
    return (quantized, *rest)


def quantized_layers(model: nn.Module, layers: str) -> list[tuple[str, nn.Module]]:
    kinds = (nn.Conv2d, nn.Linear) if layers == "all" else (nn.Conv2d,)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def prepare(model: nn.Module, layers: str = "all") -> nn.Module:
    """Put fake quantization into ``model``'s layers, in place; returns the model."""
    if layers not in LAYERS:
        raise ValueError(f"qat layers: expected one of {LAYERS}, got {layers!r}")
    for _, module in quantized_layers(model, layers):
        device = module.weight.device
        module.register_buffer("qat_min", torch.zeros((), device=device))
        module.register_buffer("qat_max", torch.zeros((), device=device))
        module.register_buffer("qat_seen", torch.zeros((), dtype=torch.long, device=device))
        parametrize.register_parametrization(module, "weight", WeightFakeQuant())
        module.register_forward_pre_hook(_quantize_input)
    return model


def is_prepared(model: nn.Module) -> bool:
    return any(hasattr(m, "qat_seen") for m in model.modules())


def summary(model: nn.Module) -> dict:
    """What metrics.json records: how many layers are quantized and how many saw data."""
    observed = [m for m in model.modules() if hasattr(m, "qat_seen")]
    return {
        "quantized_layers": len(observed),
        "observed_layers": sum(int(m.qat_seen.item() > 0) for m in observed),
        "weights": "int8 per output channel, symmetric",
        "inputs": "uint8 per tensor, moving-average range",
    }
