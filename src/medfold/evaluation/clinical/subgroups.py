"""Subgroups of the held-out test set: metadata columns as they are or in configured bands, each
group's metrics with patient-bootstrap intervals, too-small groups marked."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pandas as pd

from medfold.core.errors import ConfigError
from medfold.data.dicom import number_or_age
from medfold.data.index.labels import targets_for
from medfold.evaluation.clinical._constants import PROB
from medfold.evaluation.clinical.stats import (
    PatientBootstrap,
    decisions,
    interval,
    onehot,
    scored_classes,
    weighted_auroc,
    weighted_rates,
)

# ----------------------------------------------------------------------------- subgroups

# one row per (subgroup, group, metric), the subgroups.csv the report reads
SUBGROUP_COLUMNS = [
    "subgroup",
    "column",
    "group",
    "images",
    "patients",
    "too_small",
    "metric",
    "value",
    "ci_low",
    "ci_high",
]


def _edge(value: float) -> str:
    return f"{value:g}"


def subgroup_of(values: pd.Series, spec: dict) -> pd.Series:
    """Each image's group in one subgroup definition: the value as it is (categorical), or the
    band it falls in (``bands``: cut points, e.g. [18, 40, 65] gives <18, 18-40, 40-65, 65+).
    Empty cells are "missing"; numbers outside ``valid`` are "out of range" (both shown)."""
    if not spec.get("bands"):
        text = values.astype("string").str.strip().fillna("")
        return text.mask(text == "", "missing").astype(str)
    cuts = sorted(float(v) for v in spec["bands"])
    labels = (
        [f"<{_edge(cuts[0])}"] + [f"{_edge(a)}-{_edge(b)}" for a, b in zip(cuts, cuts[1:])] + [f"{_edge(cuts[-1])}+"]
    )
    low, high = spec.get("valid") or [None, None]
    out = []
    for value in values:
        number = number_or_age(value)
        if number is None:
            out.append("missing")
        elif (low is not None and number < low) or (high is not None and number > high):
            out.append("out of range")
        else:
            out.append(labels[int(np.searchsorted(cuts, number, side="right"))])
    return pd.Series(out, index=values.index, dtype=object)


def group_order(spec: dict, present: list[str]) -> list[str]:
    """Bands in numeric order, categories alphabetically, then out of range and missing."""
    tail = [g for g in ("out of range", "missing") if g in present]
    if spec.get("bands"):
        cuts = sorted(float(v) for v in spec["bands"])
        order = (
            [f"<{_edge(cuts[0])}"]
            + [f"{_edge(a)}-{_edge(b)}" for a, b in zip(cuts, cuts[1:])]
            + [f"{_edge(cuts[-1])}+"]
        )
        return [g for g in order if g in present] + tail
    return sorted(g for g in present if g not in tail) + tail


def metadata_column(spec: dict) -> str:
    return f"meta:{spec['column']}"


def _metric_rows(task, classes, y1h, probs, decided, rows, boot: PatientBootstrap) -> dict:
    """AUROC per class and macro, sensitivity and specificity per class, with intervals, on ``rows``."""
    out: dict[str, tuple] = {}
    aurocs = []
    auroc_draws = []
    for j in scored_classes(task, classes):
        c = classes[j]
        col = y1h[rows, j].astype(bool)
        point = weighted_auroc(col, probs[rows, j], np.ones((1, len(rows))))[0]
        draws = boot.draws(lambda w: weighted_auroc(col, probs[rows, j], w), rows)
        out[f"auroc.{c}"] = (None if np.isnan(point) else float(point), interval(draws))
        aurocs.append(point)
        auroc_draws.append(draws)
        sens, spec = weighted_rates(col, decided[rows, j], np.ones((1, len(rows))))
        sens_draws = boot.draws(lambda w: weighted_rates(col, decided[rows, j], w)[0], rows)
        spec_draws = boot.draws(lambda w: weighted_rates(col, decided[rows, j], w)[1], rows)
        out[f"sensitivity.{c}"] = (None if np.isnan(sens[0]) else float(sens[0]), interval(sens_draws))
        out[f"specificity.{c}"] = (None if np.isnan(spec[0]) else float(spec[0]), interval(spec_draws))
    aurocs = np.asarray(aurocs)
    with _quiet():
        macro_draws = np.nanmean(np.vstack(auroc_draws), axis=0) if len(auroc_draws) > 1 else auroc_draws[0]
    macro = float(np.nanmean(aurocs)) if np.isfinite(aurocs).any() else None
    out = {"auroc_macro": (macro, interval(macro_draws)), **out}
    return out


@contextlib.contextmanager
def _quiet():
    """Silence numpy's mean-of-empty warning (a draw where no class is defined gives NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def subgroup_results(
    test: pd.DataFrame,
    index: pd.DataFrame,
    task: str,
    classes: list[str],
    thresholds,
    specs: list[dict],
    min_images: int,
    min_patients: int,
    boot: PatientBootstrap,
) -> pd.DataFrame:
    """One row per (subgroup column, group, metric): value, interval, images, patients, too_small.
    The group "all" (every test image) comes first in each column, as the reference."""
    cols = [f"{PROB}{c}" for c in classes]
    meta = index.set_index("image_id")
    probs = test[cols].to_numpy(np.float64)
    y1h = onehot(task, classes, targets_for(test["labels"], classes, task))
    decided = decisions(task, probs, thresholds)
    patients = test["patient_id"].astype(str).to_numpy()
    records = []
    for spec in specs:
        column = metadata_column(spec)
        if column not in meta.columns:
            raise ConfigError(
                f"evaluation.subgroups: column {spec['column']!r} is not in the index (the index carries "
                f"{sorted(c[5:] for c in meta.columns if c.startswith('meta:')) or 'no metadata columns'}); "
                f"it is read from dataset.table or, by its keyword, from DICOM headers (dataset.dicom_metadata)"
            )
        groups = subgroup_of(meta.loc[test["image_id"], column].reset_index(drop=True), spec).to_numpy()
        name = spec.get("name") or spec["column"]
        for group in ["all", *group_order(spec, sorted(set(groups)))]:
            rows = np.arange(len(test)) if group == "all" else np.flatnonzero(groups == group)
            n_images, n_patients = len(rows), len(set(patients[rows]))
            small = n_images < min_images or n_patients < min_patients
            base = {
                "subgroup": name,
                "column": spec["column"],
                "group": group,
                "images": n_images,
                "patients": n_patients,
                "too_small": bool(small and group != "all"),
            }
            if base["too_small"]:
                records.append({**base, "metric": "auroc_macro", "value": None, "ci_low": None, "ci_high": None})
                continue
            for metric, (value, ci) in _metric_rows(task, classes, y1h, probs, decided, rows, boot).items():
                records.append(
                    {
                        **base,
                        "metric": metric,
                        "value": value,
                        "ci_low": ci[0] if ci else None,
                        "ci_high": ci[1] if ci else None,
                    }
                )
    return pd.DataFrame(records, columns=SUBGROUP_COLUMNS)
