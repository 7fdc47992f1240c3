"""CNNs described in config (``networks:``): the source studies' own networks built from their
presets, study 000's published parameter counts, the saved model rebuilt from model.pt, and a
network the schema or the image size refuses."""

import copy
import json

import pytest
import torch
import yaml
from conftest import REPO, SCHEMA, resolved_config

from medfold.core.errors import ConfigError
from medfold.study.resolve import expand_grids, experiment_settings
from medfold.training.models import build_model, feature_blocks, last_conv_block, trainable_parameters

EXAMPLES = REPO / "config" / "examples"


def network(preset: str, name: str) -> dict:
    return yaml.safe_load((EXAMPLES / f"{preset}.yaml").read_text())["networks"][name]


def test_study_000_vgg16dwsep_parameter_counts_against_the_published_ones():
    """Table II as printed, on the study's 3-channel 224 px input, and the network the study
    counted: the published 103,927,746 (separable) and 108,564,802 (plain convolutions) are both
    met exactly once one batch-normalised 512-channel DWSep layer is left out."""
    spec = network("kermany_pneumonia", "vgg16dwsep")
    printed = trainable_parameters(build_model("vgg16dwsep", 3, 2, network=spec, image_size=224))
    counted = copy.deepcopy(spec)
    second_512 = [i for i, layer in enumerate(counted["layers"]) if layer.get("conv") == 512][1]
    assert counted["layers"][second_512].get("batch_norm")
    del counted["layers"][second_512]
    separable = trainable_parameters(build_model("counted", 3, 2, network=counted, image_size=224))
    for layer in counted["layers"]:
        layer.pop("separable", None)
    plain = trainable_parameters(build_model("counted", 3, 2, network=counted, image_size=224))
    assert separable == 103_927_746
    assert plain == 108_564_802
    # the layer left out: depthwise 3x3 + bias, pointwise 512x512 + bias, batch norm's scale and shift
    assert printed - separable == (512 * 9 + 512) + (512 * 512 + 512) + 2 * 512


@pytest.mark.parametrize("preset", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_every_preset_experiment_builds_its_model_and_runs_it(preset):
    """Each experiment of each preset (grid combinations included) resolves, builds its model for
    the preset's channels and image size, and maps a batch to one logit per class."""
    config = resolved_config(yaml.safe_load((EXAMPLES / f"{preset}.yaml").read_text()), base=None)
    experiments, _ = expand_grids(config["experiments"], SCHEMA)
    channels = 3 if config["images"].get("channels") == 3 else 1
    classes = max(2, len(config["dataset"].get("labels") or []))
    built = {}
    for name in experiments:
        s = experiment_settings(config, name, SCHEMA, experiments)
        key = (s["model"], s["image_size"], json.dumps(s.get("network"), sort_keys=True))
        if key in built:
            continue
        model = build_model(
            s["model"],
            channels,
            classes,
            0,
            None,
            s["batch_norm"],
            s["dropout"],
            False,
            s.get("network"),
            s["image_size"],
        ).eval()
        with torch.no_grad():
            out = model(torch.zeros(2, channels, s["image_size"], s["image_size"]))
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape == (2, classes), (preset, name)
        built[key] = model
    assert built


@pytest.mark.parametrize(
    "name, published", [("lenet5", 106_239), ("lenet5_big", 1_662_939), ("lenet5_big_bn", 1_664_555)]
)
def test_study_004_networks_have_the_published_parameter_counts(name, published):
    """Study 004's three networks at 28 px and 11 classes: the counts its sections 1.4 and 2.3 print."""
    model = build_model(name, 1, 11, network=network("organsmnist", name), image_size=28)
    assert trainable_parameters(model) == published


def test_study_004_lenet5_has_lenet5s_size_and_trains_like_a_built_in_model(tmp_path):
    """LeNet-5 on 28 px OrganSMNIST (11 classes): the study's published count, feature blocks split
    at its pooling layers, a Grad-CAM layer, and a model.pt that load_model rebuilds to the same outputs."""
    from medfold.training.fold import load_model

    spec = network("organsmnist", "lenet5")
    model = build_model("lenet5", 1, 11, init_seed=3, network=spec, image_size=28)
    assert trainable_parameters(model) == 106_239  # study 004, section 1.4
    assert len(feature_blocks(model)) == 2 and last_conv_block(model) is model.features
    torch.save(
        {
            "state_dict": model.state_dict(),
            "model": "lenet5",
            "in_channels": 1,
            "num_classes": 11,
            "batch_norm": False,
            "dropout": 0.0,
            "network": json.dumps(spec),
            "image_size": 28,
        },
        tmp_path / "model.pt",
    )
    loaded, _ = load_model(tmp_path / "model.pt")
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))


def test_a_network_is_checked_before_any_job(tmp_path):
    bad = {"networks": {"tiny": {"layers": [{"conv": 0}]}}, "training": {"model": "tiny"}}
    with pytest.raises(Exception, match="0 is less than the minimum of 1"):
        resolved_config(bad)
    both = {"networks": {"tiny": {"layers": [{"conv": 4, "pool": "max"}]}}}
    with pytest.raises(Exception, match="is valid under each of|should not be valid"):
        resolved_config(both)
    shrinking = {
        "networks": {"tiny": {"layers": [{"conv": 4}, *[{"pool": "max"}] * 5]}},
        "training": {"model": "tiny", "image_size": 16},
        "experiments": {"a": {}},
    }
    config = resolved_config(shrinking)
    with pytest.raises(ConfigError, match="layer 6 .* shrinks a 16 px image to nothing"):
        experiment_settings(config, "a", SCHEMA)
