"""Explanations of a fold model's predictions on held-out test images, with captum.

* Grad-CAM (Selvaraju et al. 2017) on the last convolutional block: the block's activations
  weighted by their pooled gradients for the explained class, rectified and upsampled to the
  input's size (captum ``LayerGradCam`` and ``LayerAttribution.interpolate``).
* LIME (Ribeiro et al. 2016) on superpixels: the image is cut into about ``superpixels`` SLIC
  segments (scikit-image); captum's ``Lime`` switches segments off with Bernoulli(0.5) draws
  (an off segment takes the normalised mean, 0), weighs each sample by an exponential kernel
  on its cosine distance to the image, and fits a weighted ridge surrogate whose coefficients
  are the segments' attributions.

For each class, ``images_per_class`` test images that carry it are drawn with a seeded
generator, so the same config explains the same images. The class explained is the image's
true class; the predicted labels are shown beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from medfold.core import files, seeds
from medfold.core.progress import Progress, tracked
from medfold.evaluation.metrics import predict
from medfold.settings.sections import ExplainSettings, LimeSettings
from medfold.training.fold import FoldData, load_model, probabilities
from medfold.training.models import last_conv_block
from medfold.training.transforms import normalize, scale_inputs

log = logging.getLogger(__name__)


def choose_images(
    targets: np.ndarray, test_rows: np.ndarray, task: str, n_classes: int, per_class: int, seed: int
) -> list[tuple[int, int]]:
    """(index row, class) pairs: up to ``per_class`` test images per class, drawn without
    replacement by a generator seeded with ``seed``; an image is explained once per class."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(n_classes):
        has = targets[test_rows, c] > 0 if task == "multilabel" else targets[test_rows] == c
        candidates = np.sort(test_rows[has])
        take = rng.choice(candidates, size=min(per_class, len(candidates)), replace=False) if len(candidates) else []
        chosen += [(int(row), c) for row in sorted(take)]
    return chosen


def model_input(images: np.ndarray, saved: dict | None = None) -> torch.Tensor:
    """The tensor a fold model takes, from cached uint8 images (N, C, H, W), normalised with the
    statistics saved with the model (``saved``: its model.pt contents)."""
    saved = saved or {}
    x = scale_inputs(torch.from_numpy(np.array(images)).float().div_(255), saved.get("input_scale", "255"))
    return normalize(x, saved.get("input_mean", 0.5), saved.get("input_std", 0.25))


def grad_cam(model: torch.nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM map of one image (1, C, H, W) for class ``target``, at the input's (H, W)."""
    from captum.attr import LayerAttribution, LayerGradCam

    cam = LayerGradCam(model, last_conv_block(model)).attribute(x, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")[0, 0].detach().numpy()


def superpixels(image: np.ndarray, count: int, compactness: float) -> np.ndarray:
    """SLIC segments of one uint8 image (C, H, W), numbered from 0."""
    from skimage.segmentation import slic

    pixels = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    segments = slic(
        pixels.astype(np.float64) / 255.0,
        n_segments=count,
        compactness=compactness,
        channel_axis=None if image.shape[0] == 1 else -1,
        start_label=0,
    )
    return np.unique(segments, return_inverse=True)[1].reshape(segments.shape)  # consecutive numbers


def kmeans_segments(image: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """Segments of one uint8 image (C, H, W) by K-means on each pixel's (x, y, intensity), each in
    [0, 1], as study 000 clustered (its 38 clusters); numbered from 0."""
    from sklearn.cluster import KMeans

    _, h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w]
    features = np.stack([xx.ravel() / max(w - 1, 1), yy.ravel() / max(h - 1, 1), image.mean(0).ravel() / 255.0], 1)
    labels = KMeans(n_clusters=min(clusters, h * w), n_init=3, random_state=seed % 2**32).fit_predict(features)
    return np.unique(labels, return_inverse=True)[1].reshape(h, w)


def segment(image: np.ndarray, options: LimeSettings | dict, seed: int) -> np.ndarray:
    """The image's LIME features: SLIC superpixels, or K-means clusters (``explain.lime``)."""
    options = LimeSettings.of(options)
    if options.segmentation == "kmeans":
        return kmeans_segments(image, options.clusters, seed)
    return superpixels(image, options.superpixels, options.compactness)


def lime(
    model: torch.nn.Module,
    x: torch.Tensor,
    target: int,
    task: str,
    segments: np.ndarray,
    samples: int,
    kernel_width: float,
    seed: int,
    kernel: str = "squared",
    surrogate: str = "ridge",
) -> np.ndarray:
    """LIME map of one image for class ``target``: each pixel carries its segment's weight.
    ``kernel``: squared - exp(-d^2 / (2 w^2)) on cosine distance (captum's), or exponential -
    exp(-d / w^2) (study 000's). ``surrogate``: ridge on the class probability, or same_label - a
    logistic regression on whether the perturbed image keeps the label the model gives the image
    (study 000's); when every perturbation keeps it (or none does) the surrogate is undefined and
    the map is flat (logged)."""
    from captum._utils.models.linear_model import SkLearnRidge
    from captum._utils.models.linear_model.model import SkLearnLogisticRegression
    from captum.attr import Lime
    from captum.attr._core.lime import get_exp_kernel_similarity_function

    if kernel == "exponential":

        def similarity(original, perturbed, _, **kwargs) -> float:
            a, b = original.flatten().float(), perturbed.flatten().float()
            distance = 1 - torch.nn.functional.cosine_similarity(a, b, dim=0)
            return math.exp(-float(distance) / kernel_width**2)
    else:
        similarity = get_exp_kernel_similarity_function("cosine", kernel_width)
    with torch.no_grad():
        own = probabilities(model(x), task)[0]

    def label_of(p: torch.Tensor) -> torch.Tensor:  # the decision for the explained class
        return p[:, target] >= 0.5 if task == "multilabel" else p.argmax(1) == target

    def forward(batch: torch.Tensor) -> torch.Tensor:
        p = probabilities(model(batch), task)
        if surrogate == "same_label":
            return (label_of(p) == label_of(own[None])[0]).float()
        return p

    interpretable = SkLearnLogisticRegression(C=1.0) if surrogate == "same_label" else SkLearnRidge(alpha=1.0)
    explainer = Lime(forward, interpretable_model=interpretable, similarity_func=similarity)
    mask = torch.as_tensor(segments, dtype=torch.long)[None, None].expand_as(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the Bernoulli draws
        try:
            weights = explainer.attribute(
                x,
                target=None if surrogate == "same_label" else target,
                feature_mask=mask,
                n_samples=samples,
                baselines=0.0,
                perturbations_per_eval=min(64, samples),
            )
        except ValueError as exc:  # one class among the perturbations: no logistic fit
            log.warning("LIME: %s; every perturbation gave the same answer, the map is flat", exc)
            return np.zeros(segments.shape, np.float32)
    return weights[0].mean(0).detach().numpy()


def _figure(image: np.ndarray, panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gray = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    cmap = "gray" if image.shape[0] == 1 else None
    fig, axes = plt.subplots(1, panels, figsize=(2.4 * panels, 2.75))
    for ax in axes:
        ax.imshow(gray, cmap=cmap)
        ax.axis("off")
    axes[0].set_title("image", fontsize=9)
    return fig, axes


def _save(fig, title: str, path) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def overlay_cam(image: np.ndarray, cam: np.ndarray, title: str, path) -> None:
    """Image and Grad-CAM over it (predictions on new images)."""
    fig, axes = _figure(image, 2)
    axes[1].imshow(cam, cmap="jet", alpha=0.45)
    axes[1].set_title("Grad-CAM", fontsize=9)
    _save(fig, title, path)


def overlay(image: np.ndarray, cam: np.ndarray, lime_map: np.ndarray, segments: np.ndarray, title: str, path) -> None:
    """Image, Grad-CAM over it, LIME's segment weights over it (blue for, red against)."""
    from skimage.segmentation import find_boundaries

    fig, axes = _figure(image, 3)
    axes[1].imshow(cam, cmap="jet", alpha=0.45)
    axes[1].set_title("Grad-CAM", fontsize=9)
    bound = float(np.abs(lime_map).max()) or 1.0
    axes[2].imshow(lime_map, cmap="RdBu", vmin=-bound, vmax=bound, alpha=0.55)
    edges = np.ma.masked_where(~find_boundaries(segments), np.ones_like(segments))
    axes[2].imshow(edges, cmap="gray", alpha=0.5, vmin=0, vmax=1)
    axes[2].set_title("LIME (superpixels)", fontsize=9)
    _save(fig, title, path)


@dataclasses.dataclass(frozen=True)
class ExplainOutputs(files.Outputs):
    """Where a fold's explanations are written (the explain rule's outputs)."""

    record: Path
    maps: Path
    overlays: Path
    NAMES: ClassVar[dict[str, str]] = {"record": "explanations.json", "maps": "maps.npz", "overlays": "overlays"}


def _explain_one(model, saved: dict, image: np.ndarray, c: int, task: str, classes, thresholds, options, seed: int):
    """One image explained for class ``c``: its probabilities, predicted labels, Grad-CAM map,
    LIME segments and LIME weights (``options``: ``explain.lime``; ``seed``: the image's)."""
    x = model_input(image[None], saved)
    with torch.no_grad():
        probs = probabilities(model(x), task)[0].numpy()
    predicted = predict(task, probs[None], thresholds)[0]
    predicted_labels = (
        [classes[j] for j in np.flatnonzero(predicted)] if task == "multilabel" else [classes[int(predicted)]]
    )
    cam = grad_cam(model, x.clone().requires_grad_(True), c)
    segments = segment(image, options, seed)
    weights = lime(
        model, x, c, task, segments, options.samples, options.kernel_width, seed, options.kernel, options.surrogate
    )
    return probs, predicted_labels, cam, segments, weights


GRADCAM_METHOD = {"layer": "last convolutional block", "relu": True, "upsampling": "bilinear"}
LIME_METHOD = {
    "perturbation": "Bernoulli(0.5) per superpixel, off = 0 (the mean)",
    "kernel": "exp(-d^2 / width^2), d = cosine distance",
    "surrogate": "ridge, alpha 1",
}


def _save_maps(path, items: list, cams: list, limes: list, size: tuple) -> None:
    """maps.npz: the explained images' IDs and classes, their Grad-CAM and LIME maps."""
    np.savez_compressed(
        path,
        image_ids=np.array([i["image_id"] for i in items], dtype=str),
        classes=np.array([i["explained_class"] for i in items], dtype=str),
        gradcam=np.array(cams, np.float32).reshape(-1, *size),
        lime=np.array(limes, np.float32).reshape(-1, *size),
    )


def _explain_image(model, saved, data, row: int, c: int, k: int, thresholds, options, seed: int, out):
    """Image ``row`` (the ``k``-th explained) for class ``c``: Grad-CAM and LIME, its overlay
    written; returns explanations.json's entry for it and the two maps."""
    index, classes = data.index, data.classes
    image = np.asarray(data.cache[row])
    probs, predicted_labels, cam, segments, weights = _explain_one(
        model, saved, image, c, data.task, classes, thresholds, options, seed
    )
    image_id = index["shared_image_id"].iloc[row]  # what outputs meant to be shared show
    file = f"{k:03d}_{classes[c]}.png".replace("/", "_").replace(" ", "_")
    true_labels = list(index["labels"].iloc[row])
    title = (
        f"{image_id}  explains: {classes[c]} (p={probs[c]:.2f})\n"
        f"true: {', '.join(true_labels) or 'no finding'}   predicted: {', '.join(predicted_labels) or 'no finding'}"
    )
    overlay(image, cam, weights, segments, title, out.overlays / file)
    item = {
        "image_id": image_id,
        "patient_id": index["shared_patient_id"].iloc[row],
        "explained_class": classes[c],
        "true_labels": true_labels,
        "predicted_labels": predicted_labels,
        "probabilities": {cls: float(p) for cls, p in zip(classes, probs)},
        "superpixels": int(segments.max() + 1),
        "overlay": os.path.relpath(out.overlays / file, out.record.parent),  # beside the record
    }
    log.info(
        "fold %d: explained %s for %s (p=%.3f, %d superpixels)",
        data.fold,
        image_id,
        classes[c],
        probs[c],
        segments.max() + 1,
    )
    return item, cam, weights


def explain_fold(
    model_path,
    index_path,
    splits_path,
    cache_dir,
    fold: int,
    outputs,
    explain: ExplainSettings | dict,
    threads: int = 1,
) -> dict:
    """Explain ``explain.images_per_class`` test images per class with Grad-CAM and LIME. Writes
    ``explanations.json`` (what was explained, true and predicted labels, probabilities, overlay
    file), ``maps.npz`` (image_ids, classes, gradcam and lime maps at the input's size) and
    ``overlays/*.png`` to ``outputs`` (an ExplainOutputs, or a folder for the usual names);
    returns the JSON's content. ``explain``: the ``explain`` settings (or their dict)."""
    explain = ExplainSettings.of(explain)
    options = explain.lime
    torch.set_num_threads(max(1, threads))
    out = ExplainOutputs.of(outputs)
    out.create()
    out.overlays.mkdir(parents=True, exist_ok=True)
    data = FoldData(index_path, splits_path, cache_dir, fold)
    classes, task, cache = data.classes, data.task, data.cache
    model, saved = load_model(model_path)
    for p in model.parameters():
        p.requires_grad_(False)  # gradients flow to the activations Grad-CAM needs, not to weights
    thresholds = saved.get("thresholds")
    chosen = choose_images(
        data.targets,
        data.rows["test"],
        task,
        len(classes),
        explain.images_per_class,
        seeds.explained_images(explain.seed, fold),
    )
    items, cams, limes = [], [], []
    progress = Progress(f"explain fold {fold}", len(chosen))
    for k, (row, c) in enumerate(tracked(chosen, progress)):
        item, cam, weights = _explain_image(
            model, saved, data, row, c, k, thresholds, options, seeds.lime(explain.seed, fold, k), out
        )
        items.append(item)
        cams.append(cam)
        limes.append(weights)
    progress.close()
    _save_maps(out.maps, items, cams, limes, tuple(cache.shape[-2:]))
    result = {
        "fold": fold,
        "task": task,
        "classes": classes,
        "model": str(model_path),
        "methods": {"gradcam": GRADCAM_METHOD, "lime": {**options.raw, **LIME_METHOD}},
        "images": items,
    }
    out.record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def signal_ratio(maps: np.ndarray, masks: np.ndarray) -> float:
    """Mean positive attribution inside the signal masks over the mean outside them, each map
    scaled to a maximum of 1 first (a measure for the demo data, whose masks are known)."""
    inside, outside = [], []
    for m, mask in zip(maps, masks):
        positive = np.clip(m, 0, None)
        top = positive.max()
        if top <= 0 or not mask.any() or mask.all():
            continue
        positive = positive / top
        inside.append(positive[mask].mean())
        outside.append(positive[~mask].mean())
    return float(np.mean(inside) / max(np.mean(outside), 1e-12))
