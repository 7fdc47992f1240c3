"""ImageNet transfer learning: torchvision's weights files found where torch keeps them (written
here under the names torchvision expects, in a temporary TORCH_HOME: no download), DenseNet's
old key names, partial loads refused, and the input statistics that go with the weights."""

import re

import numpy as np
import pytest
import torch
from conftest import resolved_config

from medfold.core.errors import ConfigError
from medfold.training.fold import Runner
from medfold.training.models import build_model, input_stats, weights_path


def _old_densenet_keys(state: dict) -> dict:
    """torchvision's published densenet121 file names its layers norm.1, conv.2, ... (pre-0.4)."""
    return {re.sub(r"(denselayer\d+\.)(norm|relu|conv)([12])\.", r"\1\2.\3.", k): v for k, v in state.items()}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _publish(name: str, state: dict) -> None:
    """Write ``state`` where torchvision's default weights of ``name`` are looked for."""
    import torchvision

    path = weights_path(torchvision.models.get_model_weights(name).DEFAULT)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def test_imagenet_densenet121_loads_every_backbone_tensor_from_the_old_key_names(torch_home):
    import torchvision

    torch.manual_seed(5)
    published = torchvision.models.densenet121(weights=None)  # 3 channels, 1000 classes
    state = _old_densenet_keys(published.state_dict())
    assert sum("norm.1" in k for k in state) > 50  # the published file's layout
    _publish("densenet121", state)
    model = build_model("densenet121", 1, 14, pretrained="imagenet")
    own = model.state_dict()
    # before the key mapping only these would have loaded: no dense layer at all
    direct = [k for k in state if k in own and state[k].shape == own[k].shape]
    assert len(direct) < 0.1 * len(own)
    reference = published.state_dict()
    for key in ("features.denseblock3.denselayer7.norm2.running_var", "features.denseblock4.denselayer16.conv2.weight"):
        assert torch.equal(own[key], reference[key])
    assert torch.allclose(own["features.conv0.weight"], reference["features.conv0.weight"].sum(1, keepdim=True))
    assert model.classifier.weight.shape == (14, 1024)  # a new head for the 14 findings
    # by its enum name too, with the same result
    again = build_model("densenet121", 1, 14, pretrained="DenseNet121_Weights.IMAGENET1K_V1")
    assert torch.equal(again.state_dict()["features.norm5.weight"], reference["features.norm5.weight"])


def test_offline_without_the_file_names_the_file_and_the_folder(torch_home):
    with pytest.raises(ConfigError) as err:
        build_model("resnet18", 3, 2, pretrained="imagenet")
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message and str(torch_home / "hub" / "checkpoints") in message
    assert not (torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth").exists()  # no partial file left


def test_another_architectures_weights_are_refused_unless_allowed(torch_home, tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(ConfigError, match=r"fills \d+ of resnet50's \d+ backbone tensors"):
        build_model("resnet50", 1, 2, pretrained=str(tmp_path / "resnet18.pt"))
    model = build_model("resnet50", 1, 2, pretrained=str(tmp_path / "resnet18.pt"), pretrained_partial=True)
    assert model.fc.weight.shape == (2, 2048)
    with pytest.raises(ConfigError, match="no weights 'IMAGENET9K'"):
        build_model("resnet18", 1, 2, pretrained="IMAGENET9K")
    with pytest.raises(ConfigError, match="not a torchvision model"):
        build_model("lenet", 1, 2, pretrained="imagenet")


def test_imagenet_weights_bring_imagenet_statistics_into_every_use_of_the_model(torch_home, tmp_path):
    import torchvision

    from medfold.deploy.predict import Predictor

    assert input_stats("auto", None, "resnet18", 1) == {"mean": [0.5], "std": [0.25]}
    rgb = input_stats("auto", "imagenet", "resnet18", 3)
    assert rgb == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    gray = input_stats("auto", "imagenet", "resnet18", 1)
    assert gray["mean"][0] == pytest.approx(0.449) and gray["std"][0] == pytest.approx(0.226)
    _publish("resnet18", torchvision.models.resnet18(weights=None).state_dict())
    cfg = resolved_config({"training": {"model": "resnet18", "pretrained": "imagenet"}})["training"]
    cache = np.random.default_rng(0).integers(0, 256, (4, 1, 32, 32), dtype=np.uint8)
    runner = Runner(cfg, cache, np.zeros(4, np.int64), "binary", torch.device("cpu"), None)
    batch = runner.prepare(torch.from_numpy(cache), None, None)
    expected = (torch.from_numpy(cache).float() / 255 - gray["mean"][0]) / gray["std"][0]
    assert torch.allclose(batch, expected, atol=1e-6)
    # prediction (and explanations, through the same saved keys) normalise as training did
    predictor = Predictor([], ["a", "b"], "binary", 32, 1, None, mean=runner.stats["mean"], std=runner.stats["std"])
    assert torch.allclose(predictor.input(cache), expected, atol=1e-6)
