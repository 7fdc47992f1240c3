"""The settings a study's protocol needs (issue 25), each shown to change what runs: a constant
learning rate, keeping the last epoch, per-stage batch size and optimiser, the optimisers' own
constants, the decision rule, the networks' layer order and dropout kind, and augmentation's
probabilities and one-sided ranges."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import prepare_demo, resolved_config
from sklearn.metrics import accuracy_score, f1_score

from medfold.core.errors import ConfigError
from medfold.evaluation.metrics import choose_thresholds, describe_decision, evaluate

FOLD = 0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, demo_dir):
    return prepare_demo(tmp_path_factory.mktemp("protocols"), demo_dir, size=32)


def training(**overrides) -> dict:
    base = {"batch_norm": True, "device": "cpu", "image_size": 32, "early_stopping": {"enabled": False}}
    return resolved_config({"training": {**base, **overrides}})["training"]


@pytest.fixture(scope="module")
def three_stages(prepared, tmp_path_factory):
    """Stage 1 learns; stage 2 cannot move the weights (lr 1e-9), so a plateau schedule would cut
    its lr after two epochs without improvement; stage 3 (SGD at lr 100) wrecks the head, so its
    last epoch is far worse than the best. With keep: last and a constant schedule."""
    from medfold.training.train import run_fold

    cfg = training(
        schedule={"name": "constant"},
        keep="last",
        plateau={"factor": 0.1, "patience": 1, "min_lr": 1e-12},
        early_stopping={"enabled": False, "metric": "loss"},
        decision={"rule": "argmax"},
        stages=[
            {"train": "head", "epochs": 3, "lr": 0.01},
            {"train": "head", "epochs": 4, "lr": 1e-9},
            {"train": "head", "epochs": 1, "lr": 100.0, "optimizer": "sgd", "batch_size": 7},
        ],
    )
    out = tmp_path_factory.mktemp("three_stages")
    result = run_fold(
        cfg, prepared / "index.parquet", prepared / "splits.parquet", prepared / "cache", FOLD, out, threads=2
    )
    return cfg, out, result


def test_a_constant_schedule_keeps_each_stages_lr(three_stages):
    _, out, _ = three_stages
    history = pd.read_csv(out / "history.csv")
    assert history["lr"].tolist() == [0.01] * 3 + [1e-9] * 4 + [100.0]


def test_keep_last_keeps_the_last_epoch_and_hands_it_on(three_stages):
    _, out, result = three_stages
    history = pd.read_csv(out / "history.csv")
    assert history["val_loss"].iloc[-1] > 2 * history["val_loss"].min()  # the last epoch is not the best
    assert result["best_epoch"] == result["epochs_trained"] == len(history) == 8
    # the saved model is the last epoch's: its validation loss is that epoch's, not the best's
    assert result["val"]["loss"] == pytest.approx(history["val_loss"].iloc[-1], rel=1e-5)
    # stage 2 (lr 1e-9) started from stage 1's last epoch: its validation loss is that epoch's
    assert history["val_loss"].iloc[3] == pytest.approx(history["val_loss"].iloc[2], rel=1e-4)


def test_the_decision_rule_is_applied_and_named_for_folds_and_the_ensemble(three_stages):
    from medfold.evaluation.aggregate import aggregate_experiment

    _, out, result = three_stages
    assert result["decision"] == "argmax" and result["val"]["thresholds"] == [0.5] * 4  # multi-label: 0.5 each
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["decision_rule"] == {"rule": "argmax", "threshold": 0.5}
    agg = aggregate_experiment([out / "metrics.json"], [out / "predictions.parquet"], 20, 0)
    assert agg["decision"] == "argmax" and agg["oof"]["thresholds"] == [0.5] * 4


def test_a_stage_trains_with_its_own_batch_size_and_optimizer(prepared, tmp_path):
    from medfold.settings.training import Stage
    from medfold.training.train import FoldRun, StageRun

    run = FoldRun(
        training(optimizer="adam"),
        prepared / "index.parquet",
        prepared / "splits.parquet",
        prepared / "cache",
        FOLD,
        tmp_path,
    )
    n = len(run.setup.batches.rows)
    own = StageRun.begin(run.setup, Stage(epochs=1, lr=0.01, batch_size=7, optimizer="sgd"))
    assert type(own.optimizer).__name__ == "SGD" and run.setup.batches.steps() == -(-n // 7)
    assert len(list(run.setup.batches)) == -(-n // 7)
    default = StageRun.begin(run.setup, Stage(epochs=1, lr=0.01))
    assert type(default.optimizer).__name__ == "Adam" and run.setup.batches.batch_size == run.setup.s.batch_size


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("adam", {"epsilon": 1e-7}, {"eps": 1e-7}),
        ("adadelta", {"epsilon": 1e-7, "rho": 0.95}, {"eps": 1e-7, "rho": 0.95}),
        ("adagrad", {"initial_accumulator": 0.1}, {"initial_accumulator_value": 0.1}),
        ("rmsprop", {"rho": 0.8}, {"alpha": 0.8}),
        ("sgd", {"nesterov": False}, {"nesterov": False, "momentum": 0.9}),
        ("sgd", {}, {"nesterov": True}),
    ],
)
def test_the_optimizers_own_constants_reach_the_optimizer(name, options, expected):
    from medfold.settings.training import TrainSettings
    from medfold.training.loop import make_optimizer

    cfg = resolved_config({"training": {"optimizer": name, "optimizer_options": options}})["training"]
    w = torch.zeros(3, requires_grad=True)
    group = make_optimizer([w], TrainSettings.from_config(cfg), 0.1).param_groups[0]
    assert {k: group[k] for k in expected} == expected
    if name == "adagrad":  # the accumulator starts where it was told
        optimizer = make_optimizer([w], TrainSettings.from_config(cfg), 0.1)
        assert torch.equal(optimizer.state[w]["sum"], torch.full((3,), 0.1))


def test_argmax_and_fixed_decisions_are_what_sklearn_computes():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 2)) + np.array([[0.0, 0.4]])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = (rng.random(300) < probs[:, 1]).astype(int)
    argmax = choose_thresholds("binary", y, probs, {"rule": "argmax", "threshold": 0.5})
    scores = evaluate("binary", ["no", "yes"], y, probs, argmax)
    assert argmax is None
    assert scores["accuracy"] == accuracy_score(y, probs.argmax(1))
    fixed = choose_thresholds("binary", y, probs, {"rule": "fixed", "threshold": 0.7})
    assert fixed == [0.7]
    decided = (probs[:, 1] >= 0.7).astype(int)
    assert evaluate("binary", ["no", "yes"], y, probs, fixed)["accuracy"] == accuracy_score(y, decided)
    youden = choose_thresholds("binary", y, probs)
    assert youden != [0.5] and evaluate("binary", ["no", "yes"], y, probs, youden)["accuracy"] != scores["accuracy"]
    assert f1_score(y, probs.argmax(1)) > 0  # the set has both classes
    assert describe_decision({"rule": "fixed", "threshold": 0.7}) == "threshold 0.7"


def test_batch_norm_after_the_activation_and_element_dropout_build_as_said():
    from torch import nn

    from medfold.training.models import LayerCNN

    layers = [{"conv": 8, "batch_norm": True, "dropout": 0.25}, {"pool": "max"}]
    usual = LayerCNN(1, 2, {"layers": layers}, 16)
    study = LayerCNN(1, 2, {"layers": layers, "batch_norm_position": "after_activation", "conv_dropout": "element"}, 16)
    kinds = [type(m) for m in usual.features]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout2d, nn.MaxPool2d]
    assert [type(m) for m in study.features] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.Dropout, nn.MaxPool2d]
    assert sum(p.numel() for p in usual.parameters()) == sum(p.numel() for p in study.parameters())
    # element-wise dropout zeroes single activations; channel dropout whole maps
    x = torch.ones(4, 8, 6, 6)
    torch.manual_seed(0)
    element = study.features[3].train()(x)
    per_map = (element == 0).flatten(2).float().mean(2)
    assert ((per_map > 0) & (per_map < 1)).any()
    channel = usual.features[3].train()(x)
    assert set((channel == 0).flatten(2).float().mean(2).unique().tolist()) <= {0.0, 1.0}


def test_rotation_probability_perspective_scale_and_one_sided_unclamped_intensity():
    from medfold.settings.training import AugmentConfig
    from medfold.training.transforms import augment_batch

    x = torch.rand(64, 1, 24, 24, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.1

    def run(**cfg):
        return augment_batch(x.clone(), AugmentConfig.from_config(cfg), torch.Generator().manual_seed(2))

    changed = lambda out: (out - x).abs().flatten(1).amax(1) > 1e-5  # noqa: E731
    assert not changed(run(rotation=30, rotation_prob=0.0)).any()
    assert changed(run(rotation=30, rotation_prob=1.0)).all()
    some = changed(run(rotation=30, rotation_prob=0.5)).float().mean()
    assert 0.3 < some < 0.7
    assert not changed(run(perspective=1.0, perspective_distortion=0.0)).any()
    assert changed(run(perspective=1.0, perspective_distortion=0.5)).any()
    bright = run(brightness_range=[1.2, 1.5], clamp=False)
    ratio = (bright / x).flatten(1)
    assert (ratio.amin(1) > 1.2 - 1e-4).all() and (ratio.amax(1) < 1.5 + 1e-4).all() and bright.max() > 1
    assert run(brightness_range=[1.2, 1.5]).max() <= 1  # clamped by default
    # the default draw streams are those of before: a config without the new keys is unchanged
    assert torch.equal(run(rotation=10, hflip=0.5), run(rotation=10, hflip=0.5, rotation_prob=1.0))


def test_a_range_with_low_above_high_is_refused_before_any_job():
    from medfold.study.resolve import experiment_settings

    config = resolved_config({"experiments": {"e": {"augment": {"brightness_range": [1.5, 1.2]}}}})
    with pytest.raises(ConfigError, match=r"experiments.e.augment.brightness_range: expected \[low, high\]"):
        experiment_settings(config, "e", "workflow/schemas/config.schema.yaml")


def test_each_stage_is_scored_on_test_and_the_report_shows_stages_and_the_studys_figures(three_stages, tmp_path):
    from medfold.evaluation.aggregate import aggregate_experiment, write_experiment
    from medfold.report.experiments import reference_view, stages_table
    from medfold.training.fold import load_model

    _, out, result = three_stages
    stages = result["stages"]
    assert [s["batch_size"] for s in stages] == [None, None, 7] and stages[2]["optimizer"] == "sgd"
    # stage 1's weights learned; stage 3's (SGD at lr 100) are wrecked: each stage has its own result
    assert stages[0]["test"]["auroc_macro"] > 0.6 and stages[0]["test"] != stages[2]["test"]
    model, _ = load_model(out / "model.pt")
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert "train" in result and result["train"]["images"] > 0 and "accuracy" in result["train"]
    table = stages_table({0: out / "metrics.json"})
    assert [r[0] for r in table.rows] == ["fold 0, stage 1", "fold 0, stage 2", "fold 0, stage 3"]
    assert table.rows[0][5] == stages[0]["test"]["auroc_macro"]
    agg = aggregate_experiment([out / "metrics.json"], [out / "predictions.parquet"], 20, 0)
    names = [("per_fold", "csv"), ("table", "csv"), ("summary", "json"), ("ensemble", "json"), ("preds", "parquet")]
    files = {k: tmp_path / f"{k}.{ext}" for k, ext in names}
    write_experiment(agg, files["per_fold"], files["table"], files["summary"], files["ensemble"], files["preds"])
    reference = {
        "study": "A study (2020)",
        "experiments": {"e": {"test.auroc_macro": 0.9, "parameters": 1000, "ensemble.auroc_macro": 0.95}},
    }
    view = reference_view(reference, {"e": {"summary": files["summary"], "ensemble": files["ensemble"]}})
    by_quantity = {r[1]: r for r in view.table.rows}
    assert by_quantity["test.auroc_macro"][3] == pytest.approx(result["test"]["auroc_macro"])
    assert by_quantity["test.auroc_macro"][4] == pytest.approx(result["test"]["auroc_macro"] - 0.9)
    assert by_quantity["parameters"][2:4] == ["1000", str(result["parameters"])]
    ensemble = json.loads(files["ensemble"].read_text())
    assert by_quantity["ensemble.auroc_macro"][3] == (ensemble or {}).get("auroc_macro")


def test_per_image_max_scaling_reaches_training_and_prediction_alike():
    from medfold.deploy.predict import Predictor
    from medfold.training.models import input_stats
    from medfold.training.transforms import scale_inputs

    stats = input_stats("image_max", None, "lenet", 1)
    assert stats == {"mean": [0.0], "std": [1.0], "scale": "image_max"}
    pixels = np.stack([np.full((1, 4, 4), 60, np.uint8), np.zeros((1, 4, 4), np.uint8)])
    pixels[0, 0, 0, 0] = 120
    x = scale_inputs(torch.from_numpy(pixels).float().div_(255), "image_max")
    assert x[0].max() == 1.0 and x[0, 0, 1, 1] == pytest.approx(0.5) and x[1].abs().max() == 0
    predictor = Predictor([], ["a", "b"], "binary", 4, 1, None, mean=0.0, std=1.0, scale="image_max")
    assert torch.equal(predictor.input(pixels), x)
    assert not torch.equal(Predictor([], ["a", "b"], "binary", 4, 1, None, mean=0.0, std=1.0).input(pixels), x)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenet_v3_small", "vgg11"])
def test_a_torchvision_backbone_takes_a_global_max_pool_batch_norm_dropout_head(name, tmp_path):
    from torch import nn

    from medfold.training.models import build_model, classifier, feature_blocks, head_keys, replace_head

    spec = {"pool": "max", "batch_norm": True, "dropout": 0.2, "dense": []}
    model = build_model(name, 3, 2, head=spec).eval()
    head = classifier(model)
    assert [type(m) for m in head] == [nn.BatchNorm1d, nn.Dropout, nn.Linear] and head[-1].out_features == 2
    assert isinstance(model.avgpool, nn.AdaptiveMaxPool2d) and feature_blocks(model)
    assert all(k.startswith(model.medfold_head + ".") for k in head_keys(model))
    x = torch.rand(2, 3, 64, 64)
    assert model(x).shape == (2, 2)
    # the max pool decides: features whose maximum moves while their mean stays change the output
    features = model.features if hasattr(model, "features") else None
    if features is not None:
        pooled = model.avgpool(features(x)).flatten(1)
        assert torch.allclose(head(pooled), model(x), atol=1e-5)
    del replace_head


def test_a_head_where_it_cannot_go_is_refused_before_any_job():
    from medfold.study.resolve import experiment_settings

    config = resolved_config({"experiments": {"d": {"model": "densenet121", "head": {"pool": "max"}}}})
    with pytest.raises(ConfigError, match=r"experiments.d.head: densenet121 keeps its own head"):
        experiment_settings(config, "d", "workflow/schemas/config.schema.yaml")


def test_an_experiment_starts_from_another_experiments_fold_model(three_stages):
    from medfold.study.resolve import resolve_init_from
    from medfold.training.models import build_model, load_pretrained

    def settings(**extra):
        return {"model": "efficientnet_b0", "pretrained": None, "normalize": "auto", "init_from": None, **extra}

    experiments = {
        "model2": settings(pretrained="imagenet"),
        "folds": settings(pretrained="imagenet", init_from={"experiment": "model2", "fold": 0}),
    }
    paths = resolve_init_from(experiments, {"model2": [0], "folds": [0, 1]}, lambda e, f: f"r/{e}/fold_{f}/model.pt")
    assert paths == {"folds": "r/model2/fold_0/model.pt"}
    # the start's file, and the statistics the start was trained with (ImageNet's, not "fixed")
    assert experiments["folds"]["pretrained"] == paths["folds"] and experiments["folds"]["normalize"] == "imagenet"
    bad = [
        ({"x": settings(init_from={"experiment": "nope", "fold": 0})}, {"x": [0]}, "'nope' is not an experiment"),
        (
            {"a": settings(), "x": settings(init_from={"experiment": "a", "fold": 3})},
            {"a": [0], "x": [0]},
            "'a' trains on folds \\[0\\], not fold 3",
        ),
        (
            {
                "a": settings(init_from={"experiment": "b", "fold": 0}),
                "b": settings(init_from={"experiment": "a", "fold": 0}),
            },
            {"a": [0], "b": [0]},
            "start from each other: a -> b -> a",
        ),
    ]
    for experiments, folds, message in bad:
        with pytest.raises(ConfigError, match=message):
            resolve_init_from(experiments, folds, lambda e, f: "m.pt")
    # a medfold model.pt is a pretrained file: every tensor of the same network loads
    cfg, out, _ = three_stages
    saved = torch.load(out / "model.pt", weights_only=True)
    model = build_model(cfg["model"], 1, 4, init_seed=99, batch_norm=True)
    loaded = load_pretrained(model, cfg["model"], str(out / "model.pt"))
    assert loaded["backbone_missing"] == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["state_dict"].items())


def test_lime_takes_the_studys_kernel_surrogate_and_kmeans_segments():
    """Study 000's LIME: exp(-d/sigma^2), a logistic surrogate on "same label", K-means segments on
    (x, y, intensity). Each changes the map; the segments are the clusters asked for."""
    from torch import nn

    from medfold.explain import kmeans_segments, lime, superpixels

    torch.manual_seed(0)
    image = np.zeros((1, 24, 24), np.uint8)
    image[0, 4:12, 4:12] = 200  # a bright patch the model below reads
    image[0, 14:22, 12:20] = 90
    model = nn.Sequential(nn.Flatten(), nn.Linear(24 * 24, 2)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1, :].view(24, 24)[4:12, 4:12] = 0.05  # class 1 rises with the bright patch
        model[1].bias[:] = torch.tensor([1.0, -1.0])
    x = torch.from_numpy(image).float()[None] / 255
    segments = kmeans_segments(image, 6, seed=3)
    assert segments.max() + 1 == 6 and np.array_equal(segments, kmeans_segments(image, 6, seed=3))
    assert not np.array_equal(segments, superpixels(image, 6, 0.1))

    def run(**kw):
        return lime(model, x, 1, "binary", segments, 200, 0.2, 7, **kw)

    ridge, exponential, same = run(), run(kernel="exponential"), run(surrogate="same_label")
    under = segments == np.bincount(segments[4:12, 4:12].ravel()).argmax()  # the bright patch's segment
    for weights in (ridge, exponential, same):
        assert weights.shape == (24, 24)
        assert weights[under].mean() == pytest.approx(weights.max(), rel=1e-5)  # it carries the most weight
    assert not np.allclose(ridge, exponential) and not np.allclose(ridge, same)


def test_qat_from_the_start_trains_with_int8_fake_quantization_in_every_step(prepared, tmp_path):
    """Study 003's QAT: fake quantization is in the model from the first training step (every
    step of every epoch passed each layer's observer), the kept weights lie on the int8 grid,
    model.pt keeps the quantization, and the saved predictions are the quantized model's."""
    from torch.nn.utils import parametrize

    from medfold.training import fakequant
    from medfold.training.fold import FoldData, Runner, load_model
    from medfold.training.train import run_fold
    from medfold.training.transforms import CachedBatches

    cfg = training(epochs=3, qat={"enabled": True, "layers": "all"}, train_metrics={"images": 0})
    data_paths = (prepared / "index.parquet", prepared / "splits.parquet", prepared / "cache")
    result = run_fold(cfg, *data_paths, FOLD, tmp_path, threads=2)
    assert result["val"]["auroc_macro"] > 0.65  # it learned (0.73 when measured; 0.77 without QAT)
    model, saved = load_model(tmp_path / "model.pt")
    layers = fakequant.quantized_layers(model, "all")
    assert saved["qat"] == "all"
    assert result["qat"]["quantized_layers"] == result["qat"]["observed_layers"] == len(layers)
    data = FoldData(*data_paths, FOLD)
    steps = CachedBatches(data.cache, data.rows["train"], cfg["batch_size"], shuffle=False).steps()
    assert {int(m.qat_seen) for _, m in layers} == {3 * steps}  # every training step, from epoch 1's first
    for _, layer in layers:
        w = layer.weight.detach().flatten(1)
        q = w / (w.abs().amax(dim=1, keepdim=True) / 127)
        assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 127 + 1e-3
    predictions = pd.read_parquet(tmp_path / "predictions.parquet")
    test = predictions[predictions["set"] == "test"]
    runner = Runner(cfg, data.cache, data.targets, data.task, torch.device("cpu"), model)
    probs, _ = runner.predict(data.rows["test"], None)
    assert np.allclose(probs, test[[f"prob:{c}" for c in data.classes]].to_numpy(), atol=1e-6)
    for _, layer in layers:  # the same float weights without the quantization score otherwise
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        layer._forward_pre_hooks.clear()
    plain, _ = runner.predict(data.rows["test"], None, model)
    assert np.abs(plain - probs).max() > 1e-4


def test_qat_and_pruning_while_training_are_refused_together_before_any_job():
    from medfold.study.resolve import experiment_settings

    config = resolved_config(
        {"experiments": {"q": {"qat": {"enabled": True}, "pruning": {"enabled": True, "end_epoch": 2}, "epochs": 3}}}
    )
    with pytest.raises(ConfigError, match=r"experiments.q: qat and pruning during training do not combine"):
        experiment_settings(config, "q", "workflow/schemas/config.schema.yaml")


def test_an_oversampled_validation_fold_is_what_the_epochs_monitor_and_nothing_else(prepared, tmp_path):
    """Study 000's validation set oversampled to the test set's class ratio: drawn to the stated
    shares, seeded; the epochs' validation scores use it, the fold's metrics and predictions do not."""
    from medfold.training.fold import oversampled_validation
    from medfold.training.train import run_fold

    rows = np.arange(100, 300)
    targets = np.zeros(400, int)
    targets[rows[:40]] = 1  # 20 % "b" among the validation rows
    setting = {"mode": "target", "target": {"a": 0.375, "b": 0.625}}
    drawn = oversampled_validation(rows, targets, "binary", ["a", "b"], setting, seed=3)
    assert len(drawn) == len(rows) and set(drawn) <= set(rows) and np.all(np.diff(drawn) >= 0)
    assert abs(targets[drawn].mean() - 0.625) < 0.08
    assert np.array_equal(drawn, oversampled_validation(rows, targets, "binary", ["a", "b"], setting, seed=3))
    assert oversampled_validation(rows, targets, "binary", ["a", "b"], {"mode": "none", "target": {}}, 3) is None
    with pytest.raises(ConfigError, match=r"training.val_oversample.target: \['c'\] are not classes"):
        oversampled_validation(rows, targets, "binary", ["a", "b"], {"mode": "target", "target": {"c": 1}}, 3)

    paths = (prepared / "index.parquet", prepared / "splits.parquet", prepared / "cache")
    runs = {}
    for mode in ("none", "balanced"):
        cfg = training(epochs=1, val_oversample={"mode": mode}, train_metrics={"images": 0})
        result = run_fold(cfg, *paths, FOLD, tmp_path / mode, threads=2)
        runs[mode] = (result, pd.read_csv(tmp_path / mode / "history.csv"))
    (plain, plain_history), (over, over_history) = runs["none"], runs["balanced"]
    assert plain_history["val_loss"].iloc[0] == pytest.approx(plain["val"]["loss"], rel=1e-6)
    assert abs(over_history["val_loss"].iloc[0] - over["val"]["loss"]) > 1e-3  # it monitored other images
    assert over["val"]["loss"] == pytest.approx(plain["val"]["loss"], rel=1e-6)  # the same model, the same fold
    assert pd.read_parquet(tmp_path / "balanced" / "predictions.parquet").equals(
        pd.read_parquet(tmp_path / "none" / "predictions.parquet")
    )
