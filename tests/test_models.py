"""Any torchvision classification model by name: built for the cache's channels and the task's
classes, trained one step (auxiliary heads included), with its feature blocks for staged
fine-tuning and a head that is replaced, one model of each family."""

import pytest
import torch
from conftest import resolved_config

from medfold.core.errors import ConfigError
from medfold.study.resolve import experiment_settings
from medfold.training.models import (
    build_model,
    classifier,
    feature_blocks,
    last_conv_block,
    main_and_aux,
    set_trainable,
)

# one per family, at the smallest input each accepts (ViT and MaxViT fix their input size)
FAMILIES = [
    ("resnet152", 64),
    ("densenet121", 64),
    ("efficientnet_b0", 64),
    ("mobilenet_v3_small", 64),
    ("vgg11", 64),
    ("alexnet", 64),
    ("squeezenet1_1", 64),
    ("convnext_tiny", 64),
    ("regnet_y_400mf", 64),
    ("shufflenet_v2_x0_5", 64),
    ("mnasnet0_5", 64),
    ("googlenet", 64),
    ("inception_v3", 299),  # its auxiliary classifier needs the 17x17 grid of 299 px
    ("swin_t", 64),
    ("vit_b_32", 224),
    ("maxvit_t", 224),
]


@pytest.mark.parametrize(("name", "size"), FAMILIES)
def test_each_family_builds_trains_a_step_and_has_blocks_and_a_head(name, size):
    torch.manual_seed(0)
    model = build_model(name, 1, 3, init_seed=0).train()
    x, y = torch.randn(2, 1, size, size), torch.tensor([0, 2])
    logits, aux = main_and_aux(model(x))
    assert logits.shape == (2, 3) and all(a.shape == (2, 3) for a in aux)
    assert bool(aux) == (name in ("googlenet", "inception_v3"))  # their auxiliary classifiers, in training
    loss = torch.nn.functional.cross_entropy(logits, y) + sum(
        0.3 * torch.nn.functional.cross_entropy(a, y) for a in aux
    )
    loss.backward()
    head = classifier(model)
    assert all(p.grad is not None for p in head.parameters())
    blocks = feature_blocks(model)
    assert len(blocks) >= 3
    in_blocks = {id(p) for block in blocks for module in block for p in module.parameters()}
    assert not in_blocks & {id(p) for p in head.parameters()}  # the head is not a feature block
    # staged fine-tuning: the head and the last block train, the rest is frozen
    set_trainable(model, "last_blocks", 1, freeze_batch_norm=False)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    last = {id(p) for module in blocks[-1] for p in module.parameters()}
    assert trainable >= {id(p) for p in head.parameters()} | last
    assert not trainable & {id(p) for module in blocks[0] for p in module.parameters()}
    if name not in ("vit_b_32",):
        assert isinstance(last_conv_block(model), torch.nn.Module)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3)  # in evaluation, one output


def test_the_models_named_before_build_the_same_weights_as_before():
    import torchvision

    # what medfold built for densenet121 before the generic builder: torchvision's model, a new
    # first convolution, a new classifier, in that order under the init seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        reference = torchvision.models.densenet121(weights=None)
        conv = reference.features.conv0
        reference.features.conv0 = torch.nn.Conv2d(
            1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False
        )
        reference.classifier = torch.nn.Linear(1024, 4)
    model = build_model("densenet121", 1, 4, init_seed=3)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_an_unknown_model_is_refused_before_any_job(tmp_path):
    config = resolved_config({"experiments": {"big": {"model": "resnet9000"}}})
    from conftest import SCHEMA

    with pytest.raises(ConfigError, match="resnet9000.*torchvision classification model"):
        experiment_settings(config, "big", SCHEMA)
    assert (
        experiment_settings(resolved_config({"experiments": {"e": {"model": "resnet101"}}}), "e", SCHEMA)["model"]
        == "resnet101"
    )
