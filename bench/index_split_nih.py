"""Index + split the real NIH ChestX-ray14 metadata (112,120 images, 30,805 patients) in
metadata-only mode; print wall time and the worst per-label prevalence deviation of any fold.

Targets (issue 2): under 10 s on 2 cores; for the 13 labels with more than 1,000 images, worst
deviation of a fold's prevalence (by image) from the whole dataset under 0.5 percentage point
absolute and under 8 % relative. Baseline in the same run: plain iterative stratification on
per-patient 0/1 label vectors (what most multi-label splitters do).

The table ships inside the PyPI package torchxrayvision (data/Data_Entry_2017_v2020.csv.gz);
this script fetches that wheel once with pip (no code from it runs) into bench/.cache/.
Run: .venv/bin/python bench/index_split_nih.py
Quick mode (the test suite): --quick indexes a generated NIH-shaped table of 3,000 images, no download.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from medfold.data.index.build import build_index
from medfold.data.index.labels import label_matrix
from medfold.settings.sections import deep_merge, schema_defaults
from medfold.split import iterative_stratification, make_splits

CACHE = Path(__file__).parent / ".cache"
WHEEL_VERSION = "1.5.7"
NIH_LABELS = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
]


def nih_table() -> Path:
    target = CACHE / "Data_Entry_2017_v2020.csv.gz"
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "-d",
            str(CACHE),
            f"torchxrayvision=={WHEEL_VERSION}",
        ],
        check=True,
    )
    wheel = next(CACHE.glob(f"torchxrayvision-{WHEEL_VERSION}-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        target.write_bytes(zf.read("torchxrayvision/data/Data_Entry_2017_v2020.csv.gz"))
    wheel.unlink()
    return target


SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def config_defaults(section: str) -> dict:
    """A config section as the workflow resolves it: every schema default (a key added later
    gets its default here too, instead of a KeyError)."""
    return schema_defaults(yaml.safe_load(SCHEMA.read_text())["properties"][section])


def nih_dataset(table: Path) -> dict:
    return deep_merge(
        config_defaults("dataset"),
        {
            "name": "nih_cxr14",
            "format": "csv",
            "task": "multilabel",
            "root": "images",
            "table": str(table),
            "path_column": "Image Index",
            "label_column": "Finding Labels",
            "label_separator": "|",
            "no_finding_label": "No Finding",
            "patient_column": "Patient ID",
            "labels": NIH_LABELS,
            "image_extensions": [".png"],
            "metadata_only": True,
            "metadata_width_column": "OriginalImage[Width",
            "metadata_height_column": "Height]",
        },
    )


def synthetic_table(folder: Path, images: int, seed: int = 0) -> Path:
    """An NIH-shaped table (the real columns, 1-5 follow-ups per patient, NIH-like prevalences)."""
    rng = np.random.default_rng(seed)
    prevalence = rng.uniform(0.01, 0.18, len(NIH_LABELS))
    rows, patient = [], 0
    while len(rows) < images:
        patient += 1
        for k in range(int(rng.integers(1, 6))):
            found = [n for n, p in zip(NIH_LABELS, prevalence) if rng.random() < p]
            rows.append((f"{patient:08d}_{k:03d}.png", "|".join(found) or "No Finding", k, patient, 1024, 1024))
    path = folder / "Data_Entry_synthetic.csv"
    pd.DataFrame(
        rows[:images],
        columns=["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "OriginalImage[Width", "Height]"],
    ).to_csv(path, index=False)
    return path


def worst_deviation(labels: np.ndarray, fold: np.ndarray, eligible: np.ndarray) -> tuple[float, float]:
    overall = labels[:, eligible].mean(0)
    worst_abs = worst_rel = 0.0
    for k in np.unique(fold[fold >= 0]):
        prevalence = labels[fold == k][:, eligible].mean(0)
        worst_abs = max(worst_abs, float(np.max(np.abs(prevalence - overall))))
        worst_rel = max(worst_rel, float(np.max(np.abs(prevalence - overall) / overall)))
    return 100 * worst_abs, 100 * worst_rel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a generated 3,000-image table instead of NIH's")
    args = parser.parse_args()
    from medfold.core.hardware import describe

    print(f"host: {describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        run(synthetic_table(Path(tmp), 3000) if args.quick else nih_table())


def run(table: Path) -> None:
    split_cfg = deep_merge(config_defaults("split"), {"seed": 0, "folds": 5, "test_fraction": 0.2})
    start = time.perf_counter()
    index, report = build_index(nih_dataset(table), threads=2)
    indexed = time.perf_counter()
    splits, _ = make_splits(index, report["classes"], split_cfg)
    done = time.perf_counter()
    labels = label_matrix(index["labels"], report["classes"])
    floor = min(1000, len(index) // 30)  # NIH: labels with more than 1,000 images
    eligible = labels.sum(0) > floor
    fold = splits["fold"].to_numpy()
    ours = worst_deviation(labels, fold, eligible)

    # baseline: per-patient 0/1 vectors, same algorithm, same folds count, on the same cv patients
    cv = fold >= 0
    patients, codes = np.unique(index["patient_id"].to_numpy()[cv], return_inverse=True)
    binary = np.zeros((len(patients), labels.shape[1] + 1), np.int64)
    np.maximum.at(binary, codes, np.hstack([labels[cv], (labels[cv].sum(1) == 0)[:, None]]))
    base_start = time.perf_counter()
    base_fold_patient = iterative_stratification(binary, [1.0] * 5, 1)
    base_time = time.perf_counter() - base_start
    base_fold = np.full(len(index), -1)
    base_fold[cv] = base_fold_patient[codes]
    base = worst_deviation(labels, base_fold, eligible)

    print(
        f"images {len(index):,}  patients {index['patient_id'].nunique():,}  "
        f"labels with >{floor} images {int(eligible.sum())}"
    )
    sizes = {("test" if k < 0 else f"fold_{k}"): int((fold == k).sum()) for k in np.unique(fold)}
    print(f"images per set: {sizes}")
    print(f"index {indexed - start:.2f} s + split {done - indexed:.2f} s = {done - start:.2f} s   (target < 10 s)")
    print(
        f"worst fold deviation, image-count vectors: {ours[0]:.3f} pp abs, {ours[1]:.2f} % rel  "
        "(targets < 0.5 pp, < 8 %)"
    )
    print(
        f"worst fold deviation, baseline 0/1 patient vectors: {base[0]:.3f} pp abs, {base[1]:.2f} % rel "
        f"({base_time:.2f} s)"
    )
    print(f"ratio ours/baseline: abs {ours[0] / base[0]:.2f}x  rel {ours[1] / base[1]:.2f}x")
    ok = done - start < 10 and ours[0] < 0.5 and ours[1] < 8
    print(
        "TARGETS MET" if ok else "TARGETS MISSED",
        "(the targets are for the real NIH table)" if len(index) < 100_000 else "",
    )


if __name__ == "__main__":
    main()
