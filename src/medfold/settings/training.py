"""An experiment's training settings, typed: ``TrainSettings.from_config`` turns the merged,
schema-checked ``training`` dict of an experiment (``resolve.experiment_settings``) into one
frozen object, its parts (plateau, early stopping, the LR schedule, mixing, distribution, the
stages, augmentation, pruning, QAT, oversampling) each a frozen dataclass of its own. ``raw``
keeps the dict: checkpoints compare it, metrics.json and model.pt record it.

No torch at import: the workflow imports this package to plan, before any job runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from medfold.settings.sections import PruningSettings, coerce, section_defaults, with_defaults

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class AugmentConfig:
    """``training.augment``: the batch augmentations (medfold.training.transforms applies them)."""

    hflip: float = 0.0  # probability
    rotation: float = 0.0  # max degrees, uniform in [-rotation, rotation]
    brightness: float = 0.0  # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.0  # factor uniform in [1 - c, 1 + c]
    erasing: float = 0.0  # probability of erasing one rectangle (2-33 % of the area)
    perspective: float = 0.0  # probability of a random perspective warp
    rotation_prob: float = 1.0  # probability that an image is rotated at all
    perspective_distortion: float = 0.3  # how far the warp moves each corner (torchvision's distortion_scale)
    brightness_range: tuple[float, float] | None = None  # the factor's [low, high], instead of 1 -+ brightness
    contrast_range: tuple[float, float] | None = None
    clamp: bool = True  # intensities back into [0, 1] after brightness and contrast

    @property
    def intensity(self) -> bool:
        return (
            self.brightness > 0
            or self.contrast > 0
            or self.brightness_range is not None
            or self.contrast_range is not None
        )

    @classmethod
    def from_config(cls, cfg: dict) -> AugmentConfig:
        def value(key, v):
            if key.endswith("_range"):
                return None if v is None else (float(v[0]), float(v[1]))
            return bool(v) if key == "clamp" else float(v)

        return cls(**{k: value(k, v) for k, v in cfg.items()})


@dataclass(frozen=True)
class Plateau:
    factor: float
    patience: int
    min_lr: float


@dataclass(frozen=True)
class Stopping:
    enabled: bool
    metric: str
    patience: int
    min_delta: float

    @property
    def mode(self) -> str:
        return "min" if self.metric == "loss" else "max"


@dataclass(frozen=True)
class LrSchedule:
    """``plateau``: ReduceLROnPlateau on the monitored metric each epoch (``training.plateau``);
    ``constant``: the stage's LR throughout; ``cosine``: linear warm-up then cosine decay to 0
    over each stage, per step; ``onecycle``: Smith's one-cycle, warm-up from lr/25 then cosine
    down to lr/1e4, per step."""

    name: str = "plateau"
    warmup_epochs: float = 0.0


@dataclass(frozen=True)
class Mixing:
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), one draw per batch: with probability
    ``prob`` the batch is mixed with a shuffled copy of itself, by mixup or (half the time when
    both are on) CutMix, and the loss is the same mix of the two targets' losses."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    def draw(self, x: torch.Tensor, gen: torch.Generator):
        """The mixed batch, the partner of each image and the first image's weight; or None."""
        import numpy as np
        import torch

        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
        rng = np.random.default_rng(seed)
        if rng.random() >= self.prob:
            return None
        perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < 0.5)
        if not use_cutmix:
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            return x * lam + x[perm] * (1 - lam), perm, lam
        lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        h, w = x.shape[-2:]
        ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        mixed = x.clone()
        mixed[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        return mixed, perm, 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the weight of the area actually kept


@dataclass(frozen=True)
class DistributedSettings:
    """``training.distributed``: how many processes train one fold, on how many nodes, by which backend."""

    backend: str
    gpus: int
    scale_lr: bool
    launcher: str
    nodes: int = 1


@dataclass(frozen=True)
class Stage:
    epochs: int
    lr: float
    train: str = "all"
    blocks: int = 1
    freeze_batch_norm: bool = True
    batch_size: int | None = None  # None: training.batch_size
    optimizer: str | None = None  # None: training.optimizer


@dataclass(frozen=True)
class QatSettings:
    """``training.qat``: fake quantization of ``layers`` from the first epoch."""

    enabled: bool = False
    layers: str = "all"


@dataclass(frozen=True)
class Oversample:
    """``training.oversample`` / ``val_oversample``: ``none``, ``balanced`` or ``target`` class shares."""

    mode: str = "none"
    target: dict = field(default_factory=dict)

    @classmethod
    def of(cls, value) -> Oversample:
        return coerce(cls, value)


@dataclass(frozen=True)
class EvalOptions:
    """What evaluating a model needs of an experiment's settings (``fold.Runner``): the batch size,
    the device switches, test-time augmentation and how inputs are normalised. ``of`` takes
    ``TrainSettings``, or a dict of these keys (the rest default as the schema does)."""

    eval_batch_size: int = 128
    amp: bool = False
    channels_last: bool = False
    tta: str = "none"
    normalize: str = "auto"
    pretrained: str | None = None
    model: str | None = None

    @classmethod
    def of(cls, value) -> EvalOptions:
        if isinstance(value, TrainSettings):
            return cls(**{f.name: getattr(value, f.name) for f in dataclasses.fields(cls)})
        return coerce(cls, value)


@dataclass(frozen=True)
class TrainSettings:
    """An experiment's resolved ``training`` settings (schema-checked), typed. ``raw`` keeps the
    dictionary they came from: it is what checkpoints compare and what metrics.json records."""

    model: str
    pretrained: str | None
    pretrained_partial: bool
    normalize: str
    init_seed: int
    batch_norm: bool
    dropout: float
    image_size: int
    epochs: int
    batch_size: int
    eval_batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    momentum: float
    class_weights: bool
    plateau: Plateau
    early_stopping: Stopping
    augment: AugmentConfig
    oversample: Oversample
    val_oversample: Oversample  # the validation fold drawn to stated class shares for the epochs' scores
    device: str
    amp: bool
    channels_last: bool
    compile: bool
    seed: int
    distributed: DistributedSettings
    stages: tuple[Stage, ...]
    train_metrics_images: int
    schedule: LrSchedule
    label_smoothing: float
    mixing: Mixing
    ema_decay: float
    tta: str
    pruning: PruningSettings  # pruning while training (``training.pruning``)
    qat: QatSettings  # quantization-aware training from the first epoch (``training.qat``)
    keep: str  # "best" or "last": the weights each stage hands on and the run keeps
    decision: dict  # the decision rule for accuracy, F1 and the confusion matrix (``training.decision``)
    optimizer_options: OptimizerOptions
    network: dict | None  # the layers of a CNN described in config (``networks``), else None
    head: dict | None  # a torchvision backbone's head in place of its own (``training.head``), else None
    read_ahead: int  # training batches read ahead in threads (``training.read_ahead``; 0: none)
    gpus: int = 0  # GPUs of one process's job (``training.gpus``; distributed.gpus for several)
    threads: int = 1  # CPU threads a training job uses and asks for
    mem_mb: int = 4000  # memory a training job asks for
    runtime: int = 60  # minutes a training job asks for
    repeat: int = 0  # which seed of the fold (``experiments.<name>.repeats``; 0: the experiment's own)
    staged: bool = False  # whether training.stages were given (else one stage trains everything)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, value) -> TrainSettings:
        """``value`` as settings: itself when it is, else built from its dict (``from_config``)."""
        return value if isinstance(value, cls) else cls.from_config(value)

    @classmethod
    def from_config(cls, given: dict) -> TrainSettings:
        """From an experiment's settings dict; a key it lacks takes the schema's default (a partial
        dict from a test or a bench gets what the workflow would). ``raw`` is ``given`` itself:
        checkpoints and tracking runs compare it, metrics.json records it."""
        cfg = with_defaults(given, section_defaults(("training",)))
        nested = {
            "plateau": Plateau(**cfg["plateau"]),
            "early_stopping": Stopping(**cfg["early_stopping"]),
            "augment": AugmentConfig.from_config(cfg["augment"]),
            "distributed": DistributedSettings(**cfg["distributed"]),
            "stages": _stages(cfg),
            "train_metrics_images": cfg["train_metrics"]["images"],
            "network": cfg.get("network"),  # present only for a network described in config
            "schedule": LrSchedule(**cfg["schedule"]),
            "mixing": Mixing(**cfg["mixup"]),
            "ema_decay": cfg["ema"]["decay"],
            "optimizer_options": OptimizerOptions(**cfg["optimizer_options"]),
            "read_ahead": cfg.get("read_ahead", 0),
            "pruning": PruningSettings.from_config(cfg.get("pruning") or {}),
            "qat": QatSettings(**(cfg.get("qat") or {})),
            "oversample": Oversample(**cfg["oversample"]),
            "val_oversample": Oversample(**cfg["val_oversample"]),
            "repeat": cfg.get("repeat", 0),
            "staged": bool(cfg["stages"]),
        }
        plain = {
            f.name: cfg[f.name]
            for f in dataclasses.fields(cls)
            if f.name not in nested and f.name != "raw" and (f.name in cfg or f.default is dataclasses.MISSING)
        }
        return cls(**plain, **nested, raw=given)


def _stages(cfg: dict) -> tuple[Stage, ...]:
    """The training stages: the configured ones, or one stage training everything."""
    if not cfg["stages"]:
        return (Stage(epochs=cfg["epochs"], lr=cfg["lr"]),)
    return tuple(
        Stage(**{**stage, "lr": stage.get("lr") or cfg["lr"], "epochs": stage.get("epochs") or cfg["epochs"]})
        for stage in cfg["stages"]
    )


@dataclass(frozen=True)
class OptimizerOptions:
    """``training.optimizer_options``: None keeps torch's default (Keras's differ: Adam and
    Adadelta epsilon 1e-7, Adadelta rho 0.95, Adagrad initial accumulator 0.1)."""

    epsilon: float | None = None
    rho: float | None = None  # Adadelta's rho, RMSprop's alpha
    initial_accumulator: float | None = None  # Adagrad
    nesterov: bool = True  # SGD with momentum: Nesterov's (False: plain momentum)
