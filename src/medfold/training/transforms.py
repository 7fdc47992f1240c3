"""The training data path: shuffled uint8 batches out of the cache, then augmentation and
normalisation done on whole batches on the training device, each image with its own random
parameters.

torchvision.transforms.v2 draws one set of parameters per call, so applied to a batch tensor it
would flip or rotate every image of the batch the same way; calling it per image costs a Python
loop per sample. The batched versions here give every image its own draw from one seeded
``torch.Generator`` (deterministic on CPU), and use v2's functional kernels where an operation
has no batched form (perspective).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from medfold.settings.training import AugmentConfig


def _factor_range(spread: float, fixed: tuple[float, float] | None) -> tuple[float, float] | None:
    """The range an intensity factor is drawn from: ``fixed``, else 1 -+ ``spread``; None: off."""
    if fixed is not None:
        return fixed
    return (1 - spread, 1 + spread) if spread > 0 else None


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def augment_batch(x: torch.Tensor, augment: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """``x``: float (B, C, H, W) in [0, 1] on any device; ``gen`` lives on the same device.

    Works in place where it can (the data path hands over a fresh batch): pass a copy to keep ``x``."""
    n, device = x.shape[0], x.device
    if augment.hflip > 0:
        flip = torch.nonzero(torch.rand(n, generator=gen, device=device) < augment.hflip).flatten()
        if len(flip):
            x[flip] = x[flip].flip(-1)
    if augment.rotation > 0:
        angle = _uniform(n, -augment.rotation, augment.rotation, gen, device) * (math.pi / 180)
        if augment.rotation_prob < 1:  # a draw only then: the stream of every other setting is as it was
            angle = angle * (torch.rand(n, generator=gen, device=device) < augment.rotation_prob)
        cos, sin = torch.cos(angle), torch.sin(angle)
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if augment.perspective > 0:
        chosen = torch.nonzero(torch.rand(n, generator=gen, device=device) < augment.perspective).flatten().tolist()
        if chosen:
            from torchvision.transforms.v2 import functional as TF  # only here: a second at import

            h, w = x.shape[-2:]
            for i in chosen:
                jitter = (
                    torch.rand(4, 2, generator=gen, device=device)
                    * augment.perspective_distortion
                    * torch.tensor([w, h], device=device)
                    / 2
                ).tolist()
                start = [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]
                sx, sy = [1, -1, -1, 1], [1, 1, -1, -1]
                end = [
                    [int(px + sx[k] * jitter[k][0]), int(py + sy[k] * jitter[k][1])] for k, (px, py) in enumerate(start)
                ]
                x[i] = TF.perspective(x[i], startpoints=start, endpoints=end)
    brightness = _factor_range(augment.brightness, augment.brightness_range)
    if brightness is not None:
        x = x * _uniform(n, *brightness, gen, device)[:, None, None, None]
    contrast = _factor_range(augment.contrast, augment.contrast_range)
    if contrast is not None:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * _uniform(n, *contrast, gen, device)[:, None, None, None] + mean
    if augment.intensity and augment.clamp:
        x = x.clamp(0, 1)
    if augment.erasing > 0:
        x = _erase(x, augment.erasing, gen)
    return x


def _erase(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020): one rectangle of 2-33 % of the area, aspect 0.3-3.3, set to 0."""
    n, _, h, w = x.shape
    device = x.device
    area = _uniform(n, 0.02, 0.33, gen, device) * h * w
    log_ratio = _uniform(n, math.log(0.3), math.log(3.3), gen, device)
    eh = torch.sqrt(area * torch.exp(log_ratio)).clamp(1, h)
    ew = torch.sqrt(area / torch.exp(log_ratio)).clamp(1, w)
    top = torch.rand(n, generator=gen, device=device) * (h - eh)
    left = torch.rand(n, generator=gen, device=device) * (w - ew)
    rows = torch.arange(h, device=device)[None, :, None]
    cols = torch.arange(w, device=device)[None, None, :]
    box = (
        (rows >= top[:, None, None])
        & (rows < (top + eh)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + ew)[:, None, None])
    )
    box &= (torch.rand(n, generator=gen, device=device) < p)[:, None, None]
    return x.masked_fill(box[:, None], 0.0)


def scale_inputs(x: torch.Tensor, scale: str = "255") -> torch.Tensor:
    """In place, on a batch already over 255: ``image_max`` divides each image by its own
    maximum (an all-black image stays black), before augmentation as study 000 scaled; ``255``
    leaves it."""
    if scale == "image_max":
        x.div_(x.amax(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-12))
    return x


def normalize(x: torch.Tensor, mean=0.5, std=0.25) -> torch.Tensor:
    """In place: the batch is a fresh float tensor made by the data path. ``mean`` and ``std``:
    one number, or one per channel (``medfold.training.models.input_stats``)."""
    if isinstance(mean, list | tuple):
        shape = (1, len(mean), 1, 1)
        mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return x.sub_(mean).div_(std)


class CachedBatches:
    """Batches of (uint8 images, row numbers) from the memory-mapped cache.

    Rows are drawn per epoch from a generator seeded by (seed, epoch), so epoch e's order is the
    same whether or not training was interrupted before it. ``weights`` (one per row) switch to
    sampling with replacement in proportion to them (oversampling).

    ``read_ahead`` > 0 reads that many batches ahead in background threads (the same batches in
    the same order): a cache larger than memory is read from disk at random, where one read at a
    time leaves the disk idle between them; several in flight keep it busy
    (bench/data_path.py --scale nih measured it).
    """

    def __init__(
        self,
        cache: np.ndarray,
        rows: np.ndarray,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        weights: np.ndarray | None = None,
        rank: int = 0,
        world: int = 1,
        read_ahead: int = 0,
    ):
        self.cache, self.rows, self.batch_size = cache, np.asarray(rows), batch_size
        self.shuffle, self.seed, self.weights = shuffle, seed, weights
        self.rank, self.world = rank, world
        self.read_ahead = read_ahead
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> int:
        """Batches per epoch (on this rank)."""
        n = math.ceil(len(self.rows) / self.world)
        return math.ceil(n / self.batch_size)

    def epoch_rows(self) -> np.ndarray:
        rows = self.rows
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            if self.weights is not None:
                p = self.weights / self.weights.sum()
                rows = rows[rng.choice(len(rows), size=len(rows), replace=True, p=p)]
            else:
                rows = rows[rng.permutation(len(rows))]
        if self.world > 1:  # every rank gets the same number of batches; the tail wraps around
            per_rank = math.ceil(len(rows) / self.world)
            rows = np.resize(rows, per_rank * self.world)[self.rank :: self.world]
        return rows

    def _batches(self):
        rows = self.epoch_rows()
        for start in range(0, len(rows), self.batch_size):
            # which images form a batch is random; their order inside it does not matter, and
            # sorted reads from the memory map are one sequential pass and one copy
            yield np.sort(rows[start : start + self.batch_size])

    def __iter__(self):
        if self.read_ahead <= 0:
            for batch_rows in self._batches():
                yield torch.from_numpy(self.cache[batch_rows]), torch.from_numpy(batch_rows)
            return
        import collections
        from concurrent.futures import ThreadPoolExecutor

        # numpy copies out of the memory map without the GIL: the page faults of several batches
        # are served by the disk together while training runs
        with ThreadPoolExecutor(max_workers=self.read_ahead) as pool:
            pending = collections.deque()
            for batch_rows in self._batches():
                pending.append((pool.submit(self.cache.__getitem__, batch_rows), batch_rows))
                if len(pending) > self.read_ahead:
                    images, ready = pending.popleft()
                    yield torch.from_numpy(images.result()), torch.from_numpy(ready)
            while pending:
                images, ready = pending.popleft()
                yield torch.from_numpy(images.result()), torch.from_numpy(ready)
