"""Paired comparison of two experiments on the same test images: DeLong's test (clustered by
patient) and the patient-bootstrap interval of the AUROC difference; which pairs to compare."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medfold.data.index.labels import targets_for
from medfold.evaluation.clinical._constants import PROB
from medfold.evaluation.clinical.stats import PatientBootstrap, delong, interval, onehot, scored_classes, weighted_auroc
from medfold.evaluation.clinical.subgroups import _quiet
from medfold.settings.sections import ComparisonSettings


# ----------------------------------------------------------------------------- paired comparison
def compare_pair(
    a: pd.DataFrame, b: pd.DataFrame, task: str, classes: list[str], n_bootstrap: int, seed: int
) -> list[dict]:
    """Experiment a against b on the test images both predicted: per class DeLong's test (its
    variance clustered by patient, Obuchowski 1997; the unclustered p beside it) and the patient
    bootstrap interval of the AUROC difference; for the macro AUROC the bootstrap alone
    (DeLong's variance is per binary outcome; the classes of one image are not independent)."""
    cols = [f"{PROB}{c}" for c in classes]
    in_b = set(b["image_id"])
    shared = [i for i in a["image_id"] if i in in_b]  # in a's order: IDs may be pseudonyms
    a = a.set_index("image_id").loc[shared]
    b = b.set_index("image_id").loc[shared]
    y1h = onehot(task, classes, targets_for(a["labels"], classes, task))
    boot = PatientBootstrap(a["patient_id"].astype(str), n_bootstrap, seed)
    rows, diffs = [], []
    for j in scored_classes(task, classes):
        y01 = y1h[:, j].astype(bool)
        sa, sb = a[cols[j]].to_numpy(np.float64), b[cols[j]].to_numpy(np.float64)
        test = delong(y01, sa, sb, clusters=a["patient_id"].astype(str).to_numpy())
        plain = delong(y01, sa, sb)
        draws = boot.draws(lambda w: weighted_auroc(y01, sa, w) - weighted_auroc(y01, sb, w))
        diffs.append(draws)
        ci = interval(draws)
        rows.append(
            {
                "class": classes[j],
                "images": len(shared),
                "positives": test["positives"],
                "auroc_a": test["auroc_a"],
                "auroc_b": test["auroc_b"],
                "difference": test["difference"],
                "delong_z": test["z"],
                "delong_p": test["p"],
                "delong_ci_low": (test["ci95"] or [None])[0],
                "delong_ci_high": (test["ci95"] or [None, None])[1],
                "delong_p_unclustered": plain["p"],
                "bootstrap_ci_low": ci[0] if ci else None,
                "bootstrap_ci_high": ci[1] if ci else None,
            }
        )
    if len(rows) > 1:
        defined = [r for r in rows if r["auroc_a"] is not None]
        with _quiet():
            macro = np.nanmean(np.vstack(diffs), axis=0)
        ci = interval(macro)
        rows.insert(
            0,
            {
                "class": "macro",
                "images": len(shared),
                "positives": None,
                "auroc_a": float(np.mean([r["auroc_a"] for r in defined])) if defined else None,
                "auroc_b": float(np.mean([r["auroc_b"] for r in defined])) if defined else None,
                "difference": float(np.mean([r["difference"] for r in defined])) if defined else None,
                "delong_z": None,
                "delong_p": None,
                "delong_ci_low": None,
                "delong_ci_high": None,
                "delong_p_unclustered": None,
                "bootstrap_ci_low": ci[0] if ci else None,
                "bootstrap_ci_high": ci[1] if ci else None,
            },
        )
    return rows


COMPARISON_COLUMNS = [
    "a",
    "b",
    "class",
    "images",
    "positives",
    "auroc_a",
    "auroc_b",
    "difference",
    "delong_z",
    "delong_p",
    "delong_ci_low",
    "delong_ci_high",
    "delong_p_unclustered",
    "bootstrap_ci_low",
    "bootstrap_ci_high",
]


def pairs_to_compare(
    names: list[str], comparisons: ComparisonSettings | dict, best: str | None
) -> list[tuple[str, str]]:
    """The reference (configured, or the best by validation) against every other, then the
    configured pairs, each pair once. ``comparisons``: ``evaluation.comparisons``."""
    comparisons = ComparisonSettings.of(comparisons)
    reference = comparisons.reference or best
    pairs = [(reference, other) for other in names if reference and other != reference]
    for a, b in comparisons.pairs or []:
        if a != b and (a, b) not in pairs and (b, a) not in pairs:
            pairs.append((a, b))
    return pairs


def paired_comparisons(
    predictions: dict[str, pd.DataFrame],
    summary_path,
    comparisons: ComparisonSettings | dict,
    best: str | None,
    n_bootstrap: int,
    seed: int,
) -> pd.DataFrame:
    """``predictions``: experiment -> its evaluated test predictions (test_predictions.parquet)."""
    import json
    from pathlib import Path

    summary = json.loads(Path(summary_path).read_text())
    task, classes = summary["task"], summary["classes"]
    rows = []
    for a, b in pairs_to_compare(list(predictions), comparisons, best):
        if not len(predictions[a]) or not len(predictions[b]):
            continue
        rows += [
            {"a": a, "b": b, **row}
            for row in compare_pair(predictions[a], predictions[b], task, classes, n_bootstrap, seed)
        ]
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
