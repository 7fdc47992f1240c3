"""The index's labels: checked (every label a class of the dataset, every class present), and
encoded as the 0/1 matrix or the targets that splitting, training and evaluation read."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from medfold.core.errors import ConfigError
from medfold.settings.sections import DatasetSettings


def _check_labels(cand: pd.DataFrame, dataset: DatasetSettings, source: str) -> list[str]:
    task = dataset.task
    if task == "multilabel" and dataset.no_finding_label:
        nf = dataset.no_finding_label
        cand["labels"] = [[label for label in labels if label != nf] for labels in cand["labels"]]
    found = Counter(label for labels in cand["labels"] for label in labels)
    if dataset.labels:
        unknown = sorted(set(found) - set(dataset.labels))
        if unknown:
            first = unknown[0]
            example = cand.loc[[first in labels for labels in cand["labels"]], "image_id"].iloc[0]
            raise ConfigError(
                f"{source}: label {first!r} (image {example!r}) is not in dataset.labels {list(dataset.labels)}"
                + (f"; {len(unknown) - 1} more unknown labels: {unknown[1:6]}" if len(unknown) > 1 else "")
            )
        classes = list(dataset.labels)
    else:
        classes = sorted(found)
    if task != "multilabel":
        counts = cand["labels"].map(len)
        bad = counts != 1
        if bad.any():
            example = cand.loc[bad].iloc[0]
            raise ConfigError(
                f"{source}: dataset.task is {task!r}, so every image needs exactly one label, but "
                f"{int(bad.sum())} images have another number, e.g. {example['image_id']!r} with "
                f"{list(example['labels'])}"
            )
        if task == "binary" and len(classes) != 2:
            raise ConfigError(f"{source}: dataset.task is 'binary' but there are {len(classes)} classes: {classes}")
    if len(classes) < (1 if task == "multilabel" else 2):
        raise ConfigError(f"{source}: found classes {classes}; a {task} task needs more")
    return classes


# ----------------------------------------------------------------------------- main entry


def label_matrix(labels_per_image, classes: list[str]) -> np.ndarray:
    """(images, classes) 0/1 matrix in class order, from each image's list of labels."""
    position = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(labels_per_image), len(classes)), np.int64)
    for row, labels in enumerate(labels_per_image):
        for label in labels:
            matrix[row, position[label]] = 1
    return matrix


def targets_for(labels_per_image, classes: list[str], task: str) -> np.ndarray:
    """The ``y`` that medfold.evaluation.metrics scores from each image's label list: a class index per image (binary,
    multiclass) or a float 0/1 matrix (multilabel, ready for BCE)."""
    matrix = label_matrix(labels_per_image, classes)
    if task == "multilabel":
        return matrix.astype(np.float32)
    return matrix.argmax(1)
