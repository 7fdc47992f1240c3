"""Gradual magnitude pruning during fine-tuning, and a compressed on-disk format for the result.

The schedule is Zhu & Gupta's (2017, "To prune, or not to prune"): no pruning before
``start_epoch``; from there the sparsity rises from ``initial_sparsity`` to ``final_sparsity`` at
``end_epoch`` as s(t) = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^exponent, and stays at s_f
after it. Time is counted in fractional epochs (step / steps per epoch), so "10 % at the middle
of epoch 1" is ``start_epoch: 0.5``.

Masks live in ``torch.nn.utils.prune``'s re-parametrisation (``weight = weight_orig * weight_mask``),
so a pruned weight is zero in every forward pass and gets no gradient. Magnitudes are taken of
the *effective* weight, so a weight once pruned has magnitude 0 and stays pruned while the
sparsity rises. Each update prunes exactly round(s * n) weights (ties broken by position), so
the achieved sparsity equals the schedule's up to one weight per tensor.

Scopes: ``global`` (one magnitude threshold over all pruned layers), ``per_layer`` (every layer
at the scheduled sparsity), ``adaptive`` (each layer's final sparsity looked up by its number of
output channels, e.g. ResNet50: 64 -> 25 %, 256 -> 40 %, ..., 2048 -> 85 %).

The compressed format ("bitmask+values"): every floating-point tensor with more than 1/32 of
its entries zero is stored as its shape, a packed bitmask of the non-zeros (1 bit per entry) and
the non-zero values; other tensors are stored dense. At 70 % sparsity a float32 weight costs
1 + 0.3 x 32 = 10.6 bits instead of 32. torch's own COO/CSR tensors store 64-bit indices and end
up larger than dense at that sparsity.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from medfold.core.errors import ConfigError
from medfold.settings.sections import PruningSettings, check_schedule

FORMAT = "bitmask+values"


@dataclass(frozen=True)
class SparsitySchedule:
    """The polynomial sparsity schedule of gradual pruning (Zhu and Gupta 2017), by fractional epoch."""

    initial_sparsity: float
    final_sparsity: float
    start_epoch: float
    end_epoch: float
    exponent: float = 3.0

    def __post_init__(self):
        check_schedule(self.initial_sparsity, self.final_sparsity, self.start_epoch, self.end_epoch)

    def at(self, t: float, final: float | None = None) -> float:
        """Scheduled sparsity at fractional epoch ``t`` (for a layer whose final sparsity is ``final``)."""
        final = self.final_sparsity if final is None else final
        initial = min(self.initial_sparsity, final)
        if t < self.start_epoch:
            return 0.0
        if t >= self.end_epoch:
            return final
        progress = (t - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return final + (initial - final) * (1.0 - progress) ** self.exponent


def prunable_layers(model: nn.Module, layers: str) -> list[tuple[str, nn.Module]]:
    """Convolutions (and, with ``conv_and_linear``, linear layers except the classifier, which is
    the last linear layer). Batch-norm is never pruned."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if layers == "conv":
        return convs
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if layers == "conv_and_linear":
        return convs + linears[:-1]
    if layers == "all":
        return convs + linears
    raise ConfigError(f"pruning.layers: {layers!r} is not one of conv, conv_and_linear, all")


def adaptive_target(out_channels: int, targets: list) -> float:
    """``targets``: [[channels, sparsity], ...]. The sparsity of the largest channel count not
    above the layer's (the smallest count's if none is)."""
    pairs = sorted((int(c), float(s)) for c, s in targets)
    below = [s for c, s in pairs if c <= out_channels]
    return below[-1] if below else pairs[0][1]


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask of exactly ``k`` smallest entries (ties broken by position)."""
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if k > 0:
        mask[torch.topk(values.flatten(), k, largest=False, sorted=False).indices] = True
    return mask.view_as(values)


class Pruner:
    """Holds the masks of one model's prunable layers and moves them along the schedule."""

    def __init__(
        self,
        model: nn.Module,
        schedule: SparsitySchedule,
        scope: str = "global",
        layers: str = "conv",
        adaptive_targets: list | None = None,
    ):
        if scope not in ("global", "per_layer", "adaptive"):
            raise ConfigError(f"pruning.scope: {scope!r} is not one of global, per_layer, adaptive")
        if scope == "adaptive" and not adaptive_targets:
            raise ConfigError("pruning.adaptive_targets: the adaptive scope needs [[output channels, sparsity], ...]")
        self.schedule, self.scope = schedule, scope
        self.layers = prunable_layers(model, layers)
        if not self.layers:
            raise ConfigError(f"pruning.layers: the model has no {layers} layers to prune")
        self.final = {
            name: (
                adaptive_target(m.weight.shape[0], adaptive_targets) if scope == "adaptive" else schedule.final_sparsity
            )
            for name, m in self.layers
        }
        for _, module in self.layers:
            torch_prune.identity(module, "weight")
        self.current = 0.0

    @classmethod
    def from_config(cls, model: nn.Module, pruning: PruningSettings | dict) -> Pruner:
        """From a ``pruning`` block (a variant's, or training's)."""
        p = PruningSettings.of(pruning)
        schedule = SparsitySchedule(p.initial_sparsity, p.final_sparsity, p.start_epoch, p.end_epoch, p.exponent)
        return cls(model, schedule, p.scope, p.layers, p.adaptive_targets)

    def update(self, t: float) -> None:
        """Recompute the masks for fractional epoch ``t``."""
        with torch.no_grad():
            if self.scope == "global":
                s = self.schedule.at(t)
                magnitudes = torch.cat([(m.weight_orig * m.weight_mask).abs().flatten() for _, m in self.layers])
                pruned = _smallest(magnitudes, round(s * magnitudes.numel()))
                offset = 0
                for _, m in self.layers:
                    n = m.weight_mask.numel()
                    m.weight_mask.copy_(~pruned[offset : offset + n].view_as(m.weight_mask))
                    offset += n
            else:
                for name, m in self.layers:
                    s = self.schedule.at(t, self.final[name])
                    magnitude = (m.weight_orig * m.weight_mask).abs()
                    m.weight_mask.copy_(~_smallest(magnitude, round(s * magnitude.numel())))
        self.current = t

    def after_step(self, epoch: int, every: int):
        """A ``train_epoch`` hook: update the masks every ``every`` steps and after the last one."""

        def hook(step: int, steps: int) -> None:
            if (step + 1) % every == 0 or step + 1 == steps:
                self.update(epoch + (step + 1) / steps)

        return hook

    def sparsity(self) -> dict:
        """Achieved sparsity overall (over the pruned layers) and per layer."""
        per_layer, zeros, total = {}, 0, 0
        for name, m in self.layers:
            w = m.weight_orig * m.weight_mask if hasattr(m, "weight_mask") else m.weight
            z = int((w == 0).sum())
            per_layer[name] = z / w.numel()
            zeros, total = zeros + z, total + w.numel()
        return {"overall": zeros / total, "per_layer": per_layer, "pruned_parameters": total}

    def make_permanent(self) -> None:
        for _, module in self.layers:
            torch_prune.remove(module, "weight")


# ----------------------------------------------------------------------------- compressed format
def _worth_packing(t: torch.Tensor) -> bool:
    # the bitmask costs 1 bit per entry: it pays once more than 1/32 (float32) of the entries are zero
    return t.is_floating_point() and t.numel() >= 64 and float((t == 0).float().mean()) > 1 / (8 * t.element_size())


def encode_sparse(state_dict: dict) -> dict:
    """``state_dict`` in the bitmask+values format (plain tensors and lists: loads with weights_only)."""
    packed, dense = {}, {}
    for name, t in state_dict.items():
        t = t.detach().cpu()
        if _worth_packing(t):
            nonzero = (t != 0).flatten().numpy()
            packed[name] = {
                "shape": list(t.shape),
                "bits": torch.from_numpy(np.packbits(nonzero)),
                "values": t.flatten()[torch.from_numpy(nonzero)].clone(),
            }
        else:
            dense[name] = t.clone()
    return {"format": FORMAT, "packed": packed, "dense": dense}


def decode_sparse(encoded: dict) -> dict:
    if encoded.get("format") != FORMAT:
        raise ConfigError(f"not a {FORMAT} file (format {encoded.get('format')!r})")
    out = dict(encoded["dense"])
    for name, item in encoded["packed"].items():
        n = math.prod(item["shape"])
        nonzero = torch.from_numpy(np.unpackbits(item["bits"].numpy(), count=n).astype(bool))
        flat = torch.zeros(n, dtype=item["values"].dtype)
        flat[nonzero] = item["values"]
        out[name] = flat.view(item["shape"])
    return out


def save_sparse(state_dict: dict, path) -> int:
    torch.save(encode_sparse(state_dict), path)
    return path.stat().st_size


def load_sparse(path) -> dict:
    return decode_sparse(torch.load(path, map_location="cpu", weights_only=True))


def gzip_size(path) -> int:
    """Size of the file gzip-compressed (level 6), without writing it."""
    with open(path, "rb") as fh:
        return len(gzip.compress(fh.read(), compresslevel=6))
