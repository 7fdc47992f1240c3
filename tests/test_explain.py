"""Explanations (Grad-CAM and LIME through captum) of a trained demo model: maps have the input's
size and point at the pixels that carry the demo's findings more than at the rest."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import planted_label_errors, prepare_demo, resolved_config, visible_test_metrics
from PIL import Image

from medfold.data.demo import WEAK_SUBGROUP_AGE, _patient_anatomy, render_radiograph
from medfold.explain import choose_images, explain_fold, signal_ratio, superpixels
from medfold.training.train import run_fold

FOLD = 0


@pytest.fixture(scope="module")
def explained(tmp_path_factory, demo_dir):
    """A batch-norm LeNet trained on fold 0 of the demo, and its explanations."""
    root = prepare_demo(tmp_path_factory.mktemp("explain"), demo_dir)
    config = resolved_config()
    training = resolved_config({"training": {"batch_norm": True, "device": "cpu"}})["training"]
    result = run_fold(
        training, root / "index.parquet", root / "splits.parquet", root / "cache", FOLD, root / "fold", threads=2
    )
    # explanations of a model that learned nothing say nothing
    assert visible_test_metrics(root / "fold" / "predictions.parquet", demo_dir, result["classes"])["auroc_macro"] > 0.9
    cfg = {**config["explain"], "images_per_class": 6}
    out = explain_fold(
        root / "fold" / "model.pt",
        root / "index.parquet",
        root / "splits.parquet",
        root / "cache",
        FOLD,
        root / "explanations",
        cfg,
        threads=2,
    )
    return root, out


def _masks(demo_dir: Path, image_ids, size: int) -> np.ndarray:
    masks = []
    for image_id in image_ids:
        mask = Image.open(demo_dir / "cxr14" / "signal_masks" / image_id).convert("L")
        masks.append(np.asarray(mask.resize((size, size), Image.Resampling.BILINEAR)) >= 128)
    return np.array(masks)


def test_maps_have_the_input_size_and_every_class_is_explained(explained):
    root, result = explained
    maps = np.load(root / "explanations" / "maps.npz")
    assert maps["gradcam"].shape == maps["lime"].shape == (len(result["images"]), 64, 64)
    assert {i["explained_class"] for i in result["images"]} == set(result["classes"])
    for item in result["images"]:
        assert item["explained_class"] in item["true_labels"]  # the class explained is one the image has
        assert (root / "explanations" / item["overlay"]).stat().st_size > 5000
        assert 30 <= item["superpixels"] <= 120
    assert np.isfinite(maps["gradcam"]).all() and (maps["gradcam"] >= 0).all()  # rectified
    assert (np.abs(maps["lime"]).reshape(len(maps["lime"]), -1).max(1) > 0).all()


def test_grad_cam_and_lime_highlight_the_signal_more_than_the_background(explained, demo_dir):
    root, result = explained
    maps = np.load(root / "explanations" / "maps.npz")
    # the demo draws the findings of patients aged 65+ faint (its planted weaker subgroup): a
    # model that cannot see them has nothing there to point at, so those images are left out
    ages = pd.read_csv(demo_dir / "cxr14" / "Data_Entry.csv").drop_duplicates("Image Index")
    ages = ages.set_index("Image Index")["Patient Age"]
    wrong = planted_label_errors(demo_dir)  # listed findings the film does not show: no mask to compare
    visible = np.array([ages[i] < WEAK_SUBGROUP_AGE and i not in wrong for i in maps["image_ids"]])
    assert visible.sum() >= 12 and (~visible).any()
    masks = _masks(demo_dir, maps["image_ids"][visible], 64)
    assert masks.any(axis=(1, 2)).all()
    # Mean positive attribution inside the drawn findings over the mean outside them; 1 means
    # no preference. The measured figures are in the closing note of issue 7.
    gradcam, lime_maps = maps["gradcam"][visible], maps["lime"][visible]
    cam, lime = signal_ratio(gradcam, masks), signal_ratio(lime_maps, masks)
    print(f"signal/background attribution ratio: Grad-CAM {cam:.2f}, LIME {lime:.2f}")
    assert cam > 1.5
    assert lime > 1.5
    # a map that ignores the image (the same map for every image) must not pass: shuffle masks
    shuffled = masks[np.roll(np.arange(len(masks)), 1)]
    assert signal_ratio(gradcam, shuffled) < cam


def test_the_same_config_explains_the_same_images_with_the_same_maps(explained):
    root, result = explained
    again = explain_fold(
        root / "fold" / "model.pt",
        root / "index.parquet",
        root / "splits.parquet",
        root / "cache",
        FOLD,
        root / "again",
        {**resolved_config()["explain"], "images_per_class": 6},
        threads=2,
    )
    assert [i["image_id"] for i in again["images"]] == [i["image_id"] for i in result["images"]]
    first, second = np.load(root / "explanations" / "maps.npz"), np.load(root / "again" / "maps.npz")
    np.testing.assert_allclose(first["gradcam"], second["gradcam"], atol=1e-6)
    np.testing.assert_allclose(first["lime"], second["lime"], atol=1e-6)


def test_images_are_chosen_from_the_test_set_per_class():
    targets = np.array([0, 1, 1, 2, 0, 1, 2, 2])
    test_rows = np.array([1, 2, 3, 5, 6])
    chosen = choose_images(targets, test_rows, "multiclass", 3, 2, seed=0)
    assert all(row in test_rows and targets[row] == c for row, c in chosen)
    assert [c for _, c in chosen] == [1, 1, 2, 2]  # class 0 has no test image
    assert choose_images(targets, test_rows, "multiclass", 3, 2, seed=0) == chosen


def test_superpixels_follow_the_requested_count():
    rng = np.random.default_rng(0)
    image = (render_radiograph(_patient_anatomy(rng), {"Effusion"}, rng) * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(image).resize((64, 64)))[None]
    for count in (50, 100):
        segments = superpixels(image, count, 0.1)
        assert segments.shape == (64, 64) and segments.min() == 0
        assert 0.5 * count <= segments.max() + 1 <= 1.5 * count
