"""One experiment's clinical evaluation from its prediction files, and its summary record."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medfold.core.errors import ConfigError
from medfold.data.index.labels import targets_for
from medfold.evaluation.clinical._constants import PROB
from medfold.evaluation.clinical.operating import calibration, operating_points, patient_level
from medfold.evaluation.clinical.stats import PatientBootstrap, test_predictions
from medfold.evaluation.clinical.subgroups import subgroup_results
from medfold.evaluation.metrics import choose_thresholds
from medfold.settings.sections import EvaluationSettings


# ----------------------------------------------------------------------------- one experiment
def evaluate_experiment(
    predictions: pd.DataFrame,
    index: pd.DataFrame | None,
    task: str,
    classes: list[str],
    evaluation: EvaluationSettings | dict,
    n_bootstrap: int,
    seed: int,
) -> dict:
    """Everything above for one experiment's fold predictions (every fold, validation and
    test rows). ``evaluation``: the ``evaluation`` settings (or the section's dict)."""
    evaluation = EvaluationSettings.of(evaluation)
    cols = [f"{PROB}{c}" for c in classes]
    oof = predictions[predictions["set"] == "val"]
    test, how = test_predictions(predictions, classes)
    out: dict = {
        "task": task,
        "classes": classes,
        "test_predictions": test,
        "test_source": how,
        "bootstrap": {"resamples": n_bootstrap, "unit": "patient", "seed": seed},
    }
    if not len(test):
        out["skipped"] = "no held-out test predictions"
        return out
    thresholds = choose_thresholds(task, targets_for(oof["labels"], classes, task), oof[cols].to_numpy(np.float64))
    out["thresholds"] = thresholds
    boot = PatientBootstrap(test["patient_id"], n_bootstrap, seed)
    specs = evaluation.subgroups or []
    if specs:
        if index is None:
            raise ConfigError("evaluation.subgroups needs the index table")
        out["subgroups"] = subgroup_results(
            test,
            index,
            task,
            classes,
            thresholds,
            specs,
            evaluation.min_subgroup_images,
            evaluation.min_subgroup_patients,
            boot,
        )
    out["operating_points"] = operating_points(oof, test, task, classes, evaluation.operating_points, thresholds, boot)
    bins, scaling = evaluation.calibration.bins, evaluation.calibration.temperature_scaling
    out["calibration"] = calibration(predictions, test, task, classes, bins, scaling)
    if evaluation.patient_level.enabled:
        out["patient_level"] = patient_level(
            oof, test, task, classes, evaluation.patient_level.aggregate, n_bootstrap, seed
        )
    return out


def calibration_table(measured: dict) -> pd.DataFrame:
    rows = []
    for stage in ("before", "after"):
        for c, r in (measured.get(stage) or {}).items():
            rows.append(
                {
                    "class": c,
                    "temperature_scaling": stage,
                    "ece": r["ece"],
                    "max_gap": r["max_gap"],
                    "brier": r["brier"],
                }
            )
    return pd.DataFrame(rows, columns=["class", "temperature_scaling", "ece", "max_gap", "brier"])


def summary_record(result: dict) -> dict:
    """The JSON-able part of ``evaluate_experiment``'s result (frames as lists of records)."""
    out = {k: v for k, v in result.items() if k != "test_predictions"}
    for key in ("subgroups", "operating_points"):
        if key in out:
            out[key] = _records(out[key])
    return out


def _records(frame: pd.DataFrame) -> list[dict]:
    return [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        for row in frame.astype(object).to_dict("records")
    ]
