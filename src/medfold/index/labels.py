"""The index's label checks: every label a class of the dataset, every class present."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from ..errors import ConfigError
from ..settings import DatasetSettings


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
