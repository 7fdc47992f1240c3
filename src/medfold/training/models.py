"""Models by name, for any number of input channels and classes.

torchvision: ``densenet121`` (CheXNet: DenseNet121 with a new linear head, Rajpurkar et al.
2017), ``resnet18``, ``resnet50``, ``efficientnet_b0``, ``vgg16``. The coursework models of the
source studies: ``lenet`` (two conv-pool blocks and two dense layers), ``lenet_wide`` (the same,
four times the filters, and a third block), ``vgg16_dws`` (VGG16's layout with depthwise-separable
convolutions, as in the pneumonia study). Small models take ``batch_norm`` and ``dropout``.

Pretrained weights (``pretrained``): ``imagenet`` (the architecture's default torchvision
weights), a torchvision weights name (``DenseNet121_Weights.IMAGENET1K_V1`` or just
``IMAGENET1K_V1``), or a local file. torchvision's files are read from the torch hub cache
(``$TORCH_HOME/hub/checkpoints``), downloaded there when the machine is online; offline without
the file, the error names the file and the folder to put it in. Every file loads with
``weights_only=True``; DenseNet's old key names (``norm.1``, ``conv.2``) are mapped to the current
ones; the classifier is skipped when its shape differs, and a 3-channel first convolution is summed
over its input channels for grayscale input. A backbone tensor left at its random value is an
error (unless ``pretrained_partial``): a "pretrained" model that trains mostly from scratch should
not pass unnoticed.

Input statistics (``normalize``): ImageNet-initialised models see inputs normalised as in
ImageNet training (per-channel mean and std; for grayscale input the mean of the three, since the
first convolution sums the three channels' filters: a gray image given as three equal channels
would meet the same filters); other models mean 0.5, std 0.25. The statistics are saved with the
model and used by everything that runs it.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import torch
from torch import nn

from medfold.core.errors import ConfigError

log = logging.getLogger(__name__)


def _conv_block(cin: int, cout: int, batch_norm: bool, convs: int = 1, separable: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(convs):
        c = cin if i == 0 else cout
        if separable:
            layers += [nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.Conv2d(c, cout, 1, bias=not batch_norm)]
        else:
            layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return layers + [nn.MaxPool2d(2)]


class SmallCNN(nn.Module):
    """Conv blocks, pooling to a 4x4 grid, a dense hidden layer, the classifier.

    The 4x4 grid (rather than global pooling) keeps where a feature is, which is what several
    findings are about (a wide heart shadow, fluid at a lung's base), at any input size."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: list[int],
        convs_per_block: int = 1,
        hidden: int = 64,
        batch_norm: bool = False,
        dropout: float = 0.0,
        separable: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, width in enumerate(widths):
            # the first convolution stays a plain one: a depthwise conv over 1-3 channels learns little
            layers += _conv_block(cin, width, batch_norm, convs_per_block, separable and i > 0)
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * 16, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class LayerCNN(SmallCNN):
    """A CNN described in config (``networks:``), layer by layer, as the source studies describe
    theirs (study 000's Table II, study 004's LeNet-5). Convolutions: conv -> batch norm ->
    activation -> dropout (``batch_norm_position: after_activation``: conv -> activation -> batch
    norm -> dropout, as study 000's table has it; ``conv_dropout: element``: element-wise dropout
    instead of channel dropout, as study 001's Keras Dropout); a depthwise-separable one is a k x k
    depthwise convolution (one filter per input channel) and a 1 x 1 pointwise one, both with
    bias, as in study 000. Then the feature map is flattened (its size follows from
    ``image_size``), or averaged to an n x n grid first (``pooling: n``); then the dense layers,
    each linear -> batch norm -> activation -> dropout (batch norm placed as for convolutions);
    then the linear classifier (no activation on the logits)."""

    def __init__(self, in_channels: int, num_classes: int, spec: dict, image_size: int):
        nn.Module.__init__(self)
        layers: list[nn.Module] = []
        cin, size = in_channels, image_size
        after = spec.get("batch_norm_position", "before_activation") == "after_activation"
        conv_dropout = nn.Dropout if spec.get("conv_dropout", "channel") == "element" else nn.Dropout2d
        for i, layer in enumerate(spec["layers"]):
            if "pool" in layer:
                k = layer.get("size", 2)
                stride = layer.get("stride", k)
                layers.append(nn.MaxPool2d(k, stride) if layer["pool"] == "max" else nn.AvgPool2d(k, stride))
                size = (size - k) // stride + 1
            else:
                cout, k, stride = layer["conv"], layer.get("kernel", 3), layer.get("stride", 1)
                pad = layer.get("padding", k // 2)
                if layer.get("separable", False):
                    layers += [
                        nn.Conv2d(cin, cin, k, stride, pad, groups=cin),
                        nn.Conv2d(cin, cout, 1),
                    ]
                else:
                    layers.append(nn.Conv2d(cin, cout, k, stride, pad))
                norm = [nn.BatchNorm2d(cout)] if layer.get("batch_norm", False) else []
                activation = _activation(layer.get("activation", "relu"))
                layers += activation + norm if after else norm + activation
                if layer.get("dropout", 0.0):
                    layers.append(conv_dropout(layer["dropout"]))
                cin, size = cout, (size + 2 * pad - k) // stride + 1
            if size < 1:
                raise ConfigError(
                    f"networks: layer {i + 1} ({layer}) shrinks a {image_size} px image to nothing; use larger "
                    f"images or fewer pooling layers"
                )
        self.features = nn.Sequential(*layers)
        grid = spec.get("pooling", "flatten")
        self.pool = nn.Identity() if grid == "flatten" else nn.AdaptiveAvgPool2d(grid)
        width = cin * (size * size if grid == "flatten" else grid * grid)
        head: list[nn.Module] = [nn.Flatten()]
        for dense in spec.get("head", []):
            head.append(nn.Linear(width, dense["dense"]))
            norm = [nn.BatchNorm1d(dense["dense"])] if dense.get("batch_norm", False) else []
            activation = _activation(dense.get("activation", "relu"))
            head += activation + norm if after else norm + activation
            if dense.get("dropout", 0.0):
                head.append(nn.Dropout(dense["dropout"]))
            width = dense["dense"]
        head.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*head)


def _activation(name: str) -> list[nn.Module]:
    return {"relu": [nn.ReLU(inplace=True)], "tanh": [nn.Tanh()], "sigmoid": [nn.Sigmoid()], "none": []}[name]


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _small(widths, convs=1, hidden=64, separable=False):
    def build(in_channels, num_classes, batch_norm=False, dropout=0.0):
        return SmallCNN(in_channels, num_classes, widths, convs, hidden, batch_norm, dropout, separable)

    return build


def _tv():
    """torchvision's models, imported when first needed (it costs a second at every job's start,
    and the small CNNs do not use it)."""
    from torchvision import models

    return models


def _replace(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, leaf = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


IMAGENET_CLASSES = 1000
# built without ImageNet's input transform (inputs are normalised by medfold) and with their
# auxiliary classifiers, which training adds to the loss (AUX_WEIGHT)
_TORCHVISION_OPTIONS = {
    "inception_v3": {"aux_logits": True, "transform_input": False, "init_weights": True},
    "googlenet": {"aux_logits": True, "transform_input": False, "init_weights": True},
}
AUX_WEIGHT = 0.3  # GoogLeNet's weight of its auxiliary classifiers' losses (Szegedy et al. 2015)


def is_torchvision(name: str) -> bool:
    """A torchvision classification model (``torchvision.models.list_models``)."""
    return name not in SMALL and name in _tv().list_models(module=_tv())


def _torchvision(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ``name`` with its first convolution taking ``in_channels`` and every
    ImageNet head (the classifier and any auxiliary one) giving ``num_classes``."""
    model = _tv().get_model(name, weights=None, **_TORCHVISION_OPTIONS.get(name, {}))
    first, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels != in_channels:
        _replace(
            model,
            first,
            nn.Conv2d(
                in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
            ),
        )
    heads = [
        n
        for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) and m.out_features == IMAGENET_CLASSES)
        or (isinstance(m, nn.Conv2d) and m.out_channels == IMAGENET_CLASSES)  # SqueezeNet's 1x1 classifier
    ]
    for n in heads:
        old = model.get_submodule(n)
        new = (
            nn.Linear(old.in_features, num_classes)
            if isinstance(old, nn.Linear)
            else nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        )
        _replace(model, n, new)
    model.medfold_head = heads[-1]  # the main classifier comes last in every family
    return model


def replace_head(model: nn.Module, spec: dict, num_classes: int, name: str) -> nn.Module:
    """A torchvision backbone with the head ``spec`` (``training.head``) in place of its own: a
    global ``pool`` (avg or max), then batch norm, dropout and dense layers as given, then the
    linear classifier. For the families whose forward pools with a module and flattens before its
    head (ResNet, ResNeXt, Wide ResNet, RegNet; EfficientNet, MobileNet, VGG): study 002's Keras
    GlobalMaxPooling2D -> BatchNormalization -> Dropout -> Dense. The model keeps its class, so
    its blocks, Grad-CAM layer and stages are found as for the stock model."""
    tv = _tv()
    pooled = {tv.ResNet: "fc", tv.RegNet: "fc", tv.EfficientNet: "classifier", tv.MobileNetV2: "classifier"}
    pooled |= {tv.MobileNetV3: "classifier", tv.VGG: "classifier"}
    head_name = next((h for family, h in pooled.items() if isinstance(model, family)), None)
    if head_name is None or not isinstance(getattr(model, "avgpool", None), nn.AdaptiveAvgPool2d):
        raise ConfigError(
            f"training.head: {name} keeps its own head (a custom head fits ResNet, ResNeXt, Wide ResNet, RegNet, "
            f"EfficientNet, MobileNet and VGG backbones); leave training.head null for {name}"
        )
    width = _pooled_width(model, head_name)
    model.avgpool = nn.AdaptiveMaxPool2d(1) if spec.get("pool", "avg") == "max" else nn.AdaptiveAvgPool2d(1)
    layers: list[nn.Module] = []
    if spec.get("batch_norm", False):
        layers.append(nn.BatchNorm1d(width))
    if spec.get("dropout", 0.0):
        layers.append(nn.Dropout(spec["dropout"]))
    for dense in spec.get("dense", []):
        layers += [nn.Linear(width, dense), nn.ReLU(inplace=True)]
        width = dense
    layers.append(nn.Linear(width, num_classes))
    setattr(model, head_name, nn.Sequential(*layers))
    model.medfold_head = head_name
    return model


def _pooled_width(model: nn.Module, head_name: str) -> int:
    """Channels of the feature map the head pools: the input width of the first linear layer of
    the stock head (VGG's after its 7 x 7 pooling, so divided by 49)."""
    head = model.get_submodule(head_name)
    head = next(m for m in ([head] if isinstance(head, nn.Linear) else head.modules()) if isinstance(m, nn.Linear))
    tv = _tv()
    return head.in_features // 49 if isinstance(model, tv.VGG) else head.in_features


def main_and_aux(output) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits, and any auxiliary classifiers' logits (Inception-v3, GoogLeNet in training)."""
    if isinstance(output, torch.Tensor):
        return output, []
    return output[0], [aux for aux in output[1:] if aux is not None]


SMALL = {
    "lenet": _small([16, 32], hidden=64),
    "lenet_wide": _small([64, 128, 128], hidden=128),
    "vgg16_dws": _small([64, 128, 256, 512, 512], convs=2, hidden=256, separable=True),
}


def known_model(name: str) -> bool:
    return name in SMALL or is_torchvision(name)


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    init_seed: int = 0,
    pretrained: str | None = None,
    batch_norm: bool = False,
    dropout: float = 0.0,
    pretrained_partial: bool = False,
    network: dict | None = None,
    image_size: int | None = None,
    head: dict | None = None,
) -> nn.Module:
    """``network``: the layers of a CNN described in config (``name`` is then its name there);
    such a network needs the ``image_size`` it will see when it flattens its feature map.
    ``head``: a torchvision backbone's own head replaced (``training.head``, ``replace_head``)."""
    if network is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = LayerCNN(in_channels, num_classes, network, image_size or 0)
        if pretrained:
            load_pretrained(model, name, pretrained, pretrained_partial)
        return model
    if not known_model(name):
        raise ConfigError(
            f"training.model: {name!r} is not a known model; choose one of {sorted(SMALL)} or any torchvision "
            f"classification model (torchvision.models.list_models(), e.g. densenet121, resnet152, efficientnet_b7)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)  # two experiments with one init_seed start from the same weights
        if name in SMALL:
            model = SMALL[name](in_channels, num_classes, batch_norm=batch_norm, dropout=dropout)
        else:
            model = _torchvision(name, in_channels, num_classes)
            if head is not None:
                model = replace_head(model, head, num_classes, name)
    if head is not None and name in SMALL:
        raise ConfigError(f"training.head: {name} is one of medfold's small CNNs; describe its head in networks")
    if pretrained:
        load_pretrained(model, name, pretrained, pretrained_partial)
    return model


# ----------------------------------------------------------------------------- pretrained weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet weights' preprocessing
IMAGENET_STD = (0.229, 0.224, 0.225)


def torchvision_weights(name: str, spec: str | None):
    """The torchvision weights ``spec`` names for architecture ``name`` (``imagenet``: its default
    weights; ``DenseNet121_Weights.IMAGENET1K_V1`` or ``IMAGENET1K_V1``), or None for a file path."""
    if not spec:
        return None
    enum_name = spec.split(".", 1)[1] if spec.split(".", 1)[0].endswith("_Weights") else spec
    if spec != "imagenet" and not re.fullmatch(r"[A-Z0-9_]+", enum_name):
        return None  # a path
    if not is_torchvision(name):
        raise ConfigError(
            f"training.pretrained: {spec!r} names torchvision weights, but {name!r} is not a torchvision "
            f"model; give a local file instead"
        )
    weights = _tv().get_model_weights(name)
    if spec == "imagenet":
        return weights.DEFAULT
    if spec.split(".", 1)[0].endswith("_Weights") and spec.split(".", 1)[0] != weights.__name__:
        raise ConfigError(f"training.pretrained: {spec!r} are not weights of {name} ({weights.__name__})")
    try:
        return weights[enum_name]
    except KeyError:
        raise ConfigError(
            f"training.pretrained: {name} has no weights {enum_name!r}; it has {[w.name for w in weights]}"
        ) from None


def weights_path(weights) -> Path:
    """Where torch keeps a torchvision weights file: $TORCH_HOME/hub/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def fetch_weights(weights, spec: str) -> Path:
    """The weights file from the hub cache, downloaded when missing and the machine is online."""
    path = weights_path(weights)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        torch.hub.download_url_to_file(weights.url, str(path), progress=False)
    except Exception as exc:  # offline, a proxy, a partial file: one clear stop
        path.unlink(missing_ok=True)
        raise ConfigError(
            f"training.pretrained: {spec} needs the file {path.name} in {path.parent} and it could not be "
            f"downloaded ({type(exc).__name__}: {exc}). On a machine without internet access, copy "
            f"{path.name} (from {weights.url}) into {path.parent}, or set TORCH_HOME to the folder whose "
            f"hub/checkpoints holds it"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return path


# torchvision's DenseNet files predate module names with no dots: denselayer1.norm.1 -> norm1
_DENSENET_OLD_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def _current_keys(state: dict) -> dict:
    return {_DENSENET_OLD_KEY.sub(r"\1\2.", key.removeprefix("module.")): value for key, value in state.items()}


def head_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of the classifier, the part a new task replaces."""
    head = classifier(model)
    prefix = next(name for name, module in model.named_modules() if module is head)
    return {f"{prefix}.{key}" for key in head.state_dict()}


def load_pretrained(model: nn.Module, name: str, spec: str, partial: bool = False) -> dict:
    """Load ``spec`` (torchvision weights or a local file) into ``model``; returns what loaded."""
    weights = torchvision_weights(name, spec)
    if weights is not None:
        file = fetch_weights(weights, spec)
    else:
        file = Path(spec)
        if not file.is_file():
            raise ConfigError(f"training.pretrained: {spec} is not a file, 'imagenet', nor a torchvision weights name")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a medfold model.pt
        state = state["state_dict"]
    state = _current_keys(state)
    own = model.state_dict()
    usable, skipped = {}, []
    for key, value in state.items():
        if key not in own:
            skipped.append(key)
        elif value.shape == own[key].shape:
            usable[key] = value
        elif (
            value.ndim == 4
            and own[key].ndim == 4
            and value.shape[1] == 3
            and own[key].shape[1] == 1
            and value.shape[0] == own[key].shape[0]
        ):
            usable[key] = value.sum(1, keepdim=True)  # RGB filters onto one gray channel
        else:
            skipped.append(key)
    if not usable:
        raise ConfigError(f"training.pretrained: {file} has no tensor that fits {name} (keys like {list(state)[:3]})")
    model.load_state_dict(usable, strict=False)
    backbone = [k for k in own if k not in head_keys(model) and not k.endswith("num_batches_tracked")]
    missing = [k for k in backbone if k not in usable]
    if missing and not partial:
        raise ConfigError(
            f"training.pretrained: {file} fills {len(backbone) - len(missing)} of {name}'s {len(backbone)} "
            f"backbone tensors; {len(missing)} would stay random (e.g. {missing[:3]}). Is it {name}'s file? "
            f"Set training.pretrained_partial: true to train with them from scratch"
        )
    if skipped:
        log.warning(
            "%d tensors of %s not loaded (no such name or another shape; the classifier's are expected): %s",
            len(skipped),
            file,
            skipped[:5],
        )
    log.info(
        "loaded %d tensors from %s; %d of %d backbone tensors left at their initial values",
        len(usable),
        file,
        len(missing),
        len(backbone),
    )
    return {"file": str(file), "loaded": len(usable), "skipped": len(skipped), "backbone_missing": len(missing)}


def resolved_normalize(normalize: str, pretrained: str | None, name: str) -> str:
    """``training.normalize`` with ``auto`` decided: imagenet for torchvision weights, else fixed."""
    if normalize != "auto":
        return normalize
    return "imagenet" if torchvision_weights(name, pretrained) is not None else "fixed"


def input_stats(normalize: str, pretrained: str | None, name: str, channels: int) -> dict:
    """Per-channel mean and std the model's inputs are normalised with (see the module's doc)."""
    normalize = resolved_normalize(normalize, pretrained, name)
    if normalize == "image_max":  # each image over its own maximum, to [0, 1]; no mean or std
        return {"mean": [0.0] * channels, "std": [1.0] * channels, "scale": "image_max"}
    if normalize == "fixed":
        return {"mean": [0.5] * channels, "std": [0.25] * channels}
    if channels == 3:
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if channels == 1:
        return {"mean": [sum(IMAGENET_MEAN) / 3], "std": [sum(IMAGENET_STD) / 3]}
    raise ConfigError(f"training.normalize: imagenet statistics need 1 or 3 channels, the cache has {channels}")


def _split_at_pools(features: nn.Sequential) -> list[list[nn.Module]]:
    """Blocks of a plain conv stack: each ends with its max-pooling."""
    blocks, current = [], []
    for layer in features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def feature_blocks(model: nn.Module) -> list[list[nn.Module]]:
    """The feature extractor as blocks, input side first: what "the last N blocks" counts. Per
    family: ResNet's stem and 4 stages, DenseNet's stem and 4 dense blocks, the stages of
    ``features`` (EfficientNet, MobileNet, ConvNeXt, Swin; VGG, AlexNet and SqueezeNet split at
    their pooling layers), RegNet's and MaxViT's stem and stages, ViT's patch embedding and encoder
    layers; otherwise the model's top-level layers up to its pooling (Inception, GoogLeNet,
    ShuffleNet, MNASNet)."""
    if isinstance(model, SmallCNN):
        return _split_at_pools(model.features)
    tv = _tv()
    if isinstance(model, tv.ResNet):
        return [[model.conv1, model.bn1], [model.layer1], [model.layer2], [model.layer3], [model.layer4]]
    if isinstance(model, tv.DenseNet):
        f = model.features
        return [
            [f.conv0, f.norm0],
            [f.denseblock1, f.transition1],
            [f.denseblock2, f.transition2],
            [f.denseblock3, f.transition3],
            [f.denseblock4, f.norm5],
        ]
    if isinstance(model, tv.VGG | tv.AlexNet | tv.SqueezeNet):
        return _split_at_pools(model.features)
    if isinstance(model, tv.RegNet):
        return [[model.stem], *[[stage] for stage in model.trunk_output]]
    if isinstance(model, tv.MaxVit):
        return [[model.stem], *[[block] for block in model.blocks]]
    if isinstance(model, tv.VisionTransformer):
        return [[model.conv_proj], *[[layer] for layer in model.encoder.layers], [model.encoder.ln]]
    if isinstance(getattr(model, "features", None), nn.Sequential):
        return [[block] for block in model.features]
    if isinstance(model, tv.MNASNet):
        return [[layer] for layer in model.layers]
    head = classifier(model)
    blocks = []
    for name, child in model.named_children():
        if child is head or name.startswith("aux") or name == "AuxLogits":
            continue
        if isinstance(child, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d | nn.Dropout | nn.Flatten):
            break  # the head side
        blocks.append([child])
    if not blocks:
        raise ConfigError(f"no block structure known for {type(model).__name__}")
    return blocks


def classifier(model: nn.Module) -> nn.Module:
    """The layers after the feature extractor (the head a new task replaces)."""
    if isinstance(model, SmallCNN):
        return model.head
    return model.get_submodule(model.medfold_head)


def last_conv_block(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM attributes to: the last convolutional block's output (a feature map;
    transformers' token outputs have none)."""
    if isinstance(model, SmallCNN):
        return model.features
    tv = _tv()
    if isinstance(model, tv.ResNet):
        return model.layer4
    if isinstance(model, tv.DenseNet):
        return model.features.norm5
    if isinstance(model, tv.VisionTransformer):
        raise ConfigError("Grad-CAM needs a convolutional feature map; a ViT has tokens (explain a CNN)")
    if isinstance(getattr(model, "features", None), nn.Module):
        return model.features
    return feature_blocks(model)[-1][-1]


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def set_trainable(model: nn.Module, train: str, blocks: int = 1, freeze_batch_norm: bool = True) -> list[nn.Module]:
    """Freeze all but the part ``train`` names: ``head`` (the classifier), ``last_blocks`` (the
    classifier and the last ``blocks`` feature blocks) or ``all``. Outside ``all``, batch-norm
    layers stay frozen when ``freeze_batch_norm``: no gradient, and no running-statistics updates
    (the caller keeps the returned layers in eval mode). Returns those frozen batch-norm layers."""
    parts = feature_blocks(model)
    if train == "all":
        chosen = [model]
    elif train == "head":
        chosen = [classifier(model)]
    elif train == "last_blocks":
        if not 1 <= blocks <= len(parts):
            raise ConfigError(f"stages: blocks is {blocks} but {type(model).__name__} has {len(parts)} feature blocks")
        chosen = [classifier(model)] + [m for block in parts[-blocks:] for m in block]
    else:
        raise ConfigError(f"stages: train is {train!r}; expected head, last_blocks or all")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in chosen:
        for p in module.parameters():
            p.requires_grad_(True)
    frozen_norms = []
    if train != "all" and freeze_batch_norm:
        for module in model.modules():
            if isinstance(module, BATCH_NORMS):
                for p in module.parameters():
                    p.requires_grad_(False)
                frozen_norms.append(module)
    return frozen_norms


def train_mode(model: nn.Module, frozen_norms: list[nn.Module]) -> None:
    """model.train(), except frozen batch-norm layers, which keep their running statistics."""
    model.train()
    for module in frozen_norms:
        module.eval()
