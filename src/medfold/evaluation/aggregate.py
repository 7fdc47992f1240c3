"""Cross-validation aggregation of one experiment's folds, and the comparison of experiments.

* per-fold table of every scalar metric (validation and test), and its summary: count, mean,
  std, min, quartiles, max;
* per-class AUROC, mean and std across folds;
* metrics of the pooled out-of-fold (validation) predictions, thresholds chosen on them;
* the fold ensemble on the held-out test set (mean probability of the K models), with those
  out-of-fold thresholds and bootstrap 95 % intervals. The bootstrap resamples *patients*, not
  images: a patient's follow-ups are correlated, and resampling images would give intervals
  that are too narrow.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from medfold.core import files
from medfold.core.errors import ConfigError
from medfold.data.index.labels import targets_for
from medfold.evaluation.clinical.stats import PatientBootstrap, interval, weighted_auroc
from medfold.evaluation.metrics import (
    choose_thresholds,
    describe_decision,
    evaluate,
    predict,
    scalar_metrics,
)


def _load(metrics_paths) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in metrics_paths]


def per_fold_table(results: list[dict]) -> pd.DataFrame:
    rows = []
    for r in results:
        row = {
            "fold": r["fold"],
            "seed": r.get("repeat", 0),  # the repeat (experiments.<name>.repeats), 0 without repeats
            "best_epoch": r["best_epoch"],
            "epochs_trained": r["epochs_trained"],
            "train_seconds": r["train_seconds"],
            "seconds_per_epoch": r["train_seconds"] / r["epochs_trained"] if r.get("epochs_trained") else None,
            "parameters": r.get("parameters"),
        }
        for part in ("train", "val", "test"):
            if part in r:
                row.update({f"{part}.{k}": v for k, v in scalar_metrics(r[part]).items()})
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["fold", "seed"], kind="stable").reset_index(drop=True)


def summary_table(per_fold: pd.DataFrame) -> pd.DataFrame:
    """count, mean, std, min, 25%, 50%, 75%, max of every metric column over every trained model
    (rows: statistics; with repeats, over folds and seeds together)."""
    return per_fold.drop(columns=[c for c in ("fold", "seed") if c in per_fold]).astype(float).describe()


def variance_split(per_fold: pd.DataFrame) -> dict | None:
    """With repeats (R seeds of each of K folds), each metric's mean and spread over folds (of
    each fold's mean over its seeds), over seeds (of each seed's mean over the folds) and over
    both, and its variance split into a fold part and a seed part that add up to the whole:

        var_total = var_fold + var_seed,  var_fold = Var_k(mean_r s[k, r]),  var_seed = mean_k Var_r s[k, r]

    (the law of total variance, population variances over the K x R scores). The seed part is
    what retraining the same fold changes, the fold part what the data of the fold does. None
    without repeats (one seed per fold: the seed part cannot be seen)."""
    seeds_per_fold = per_fold.groupby("fold")["seed"].nunique()
    if seeds_per_fold.max() < 2:
        return None
    if seeds_per_fold.nunique() != 1:
        raise ConfigError(f"repeats: folds have different numbers of seeds {seeds_per_fold.to_dict()}")
    out = {"folds": int(len(seeds_per_fold)), "seeds": int(seeds_per_fold.iloc[0]), "metrics": {}}
    columns = [c for c in per_fold.columns if c.split(".")[0] in ("val", "test") and per_fold[c].notna().all()]
    for column in columns:
        scores = per_fold.pivot(index="fold", columns="seed", values=column).astype(float).to_numpy()
        fold_means, seed_means = scores.mean(axis=1), scores.mean(axis=0)
        var_fold = float(np.var(fold_means))
        var_seed = float(np.mean(np.var(scores, axis=1)))
        out["metrics"][column] = {
            "mean": float(scores.mean()),
            "std_over_folds": float(np.std(fold_means, ddof=1)) if len(fold_means) > 1 else None,
            "std_over_seeds": float(np.std(seed_means, ddof=1)),
            "std_all": float(np.std(scores, ddof=1)),
            "var_total": float(np.var(scores)),
            "var_fold": var_fold,
            "var_seed": var_seed,
            "seed_share": var_seed / (var_fold + var_seed) if var_fold + var_seed > 0 else None,
        }
    return out


def combine_repeats(predictions: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Each validation (out-of-fold) image once: the mean of its fold's seeds where a fold was
    trained more than once, in the order the first seed listed them. Test rows stay one per model
    (the fold ensemble averages them all)."""
    val = predictions[predictions["set"] == "val"]
    if not len(val) or not val.duplicated(["image_id", "fold"]).any():
        return predictions
    cols = [f"prob:{c}" for c in classes]
    mean = val.groupby(["fold", "image_id"], sort=False)[cols].mean()
    first = val.drop_duplicates(["fold", "image_id"]).set_index(["fold", "image_id"]).loc[mean.index]
    combined = first.drop(columns=cols).join(mean).reset_index()[list(predictions.columns)]
    return pd.concat([combined, predictions[predictions["set"] != "val"]], ignore_index=True)


def _probs(frame: pd.DataFrame, classes: list[str]) -> np.ndarray:
    return frame[[f"prob:{c}" for c in classes]].to_numpy(np.float64)


def bootstrap_intervals(
    task: str, classes: list[str], y: np.ndarray, probs: np.ndarray, patients: np.ndarray, thresholds, n: int, seed: int
) -> dict:
    """95 % percentile intervals of AUROC (macro and per class), accuracy and balanced accuracy,
    resampling patients with replacement. Each draw is a weight per image (how often its patient
    was drawn), all draws scored at once (``medfold.evaluation.clinical``): the same statistics as scoring the
    concatenated images of each draw, without a Python loop per draw."""
    boot = PatientBootstrap(patients, n, seed)
    onehot = y if task == "multilabel" else np.eye(len(classes), dtype=int)[y]
    scored = [1] if task == "binary" else list(range(len(classes)))
    pred = predict(task, probs, thresholds)
    per_class = {classes[j]: boot.draws(lambda w, j=j: weighted_auroc(onehot[:, j], probs[:, j], w)) for j in scored}
    aurocs = np.stack(list(per_class.values()))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw with no defined class: NaN
        macro = np.nanmean(aurocs, axis=0)
    correct = np.all(y == pred, axis=1) if task == "multilabel" else y == pred
    accuracy = boot.draws(lambda w: (w * correct).sum(1) / w.sum(1))
    if task == "multilabel":
        balanced = np.mean(
            [boot.draws(lambda w, j=j: weighted_balanced(y[:, j], pred[:, j], w)) for j in range(len(classes))], 0
        )
    else:
        balanced = boot.draws(lambda w: weighted_balanced(y, pred, w))
    out = {"auroc_macro": macro, "accuracy": accuracy, "balanced_accuracy": balanced}
    out.update({f"auroc.{name}": values for name, values in per_class.items()})
    return {key: interval(values, min_defined=0.0) for key, values in out.items()}


def weighted_balanced(y: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Balanced accuracy (mean recall over the classes present) for each row of ``weights``
    (draws, images); equal to sklearn's ``balanced_accuracy_score(sample_weight=row)``."""
    recalls = []
    for c in np.unique(y):
        member = y == c
        support = weights[:, member].sum(1)
        hit = weights[:, member & (pred == c)].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(support > 0, hit / np.where(support > 0, support, 1.0), np.nan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(recalls), axis=0)


def _per_class_auroc(per_fold: pd.DataFrame) -> dict:
    """Per part (val, test) and class: the AUROC's mean and standard deviation across folds."""
    per_class = {}
    for part in ("val", "test"):
        cols = [c for c in per_fold.columns if c.startswith(f"{part}.auroc.")]
        per_class[part] = {
            c.split(".", 2)[2]: {"mean": _num(per_fold[c].mean()), "std": _num(per_fold[c].std())} for c in cols
        }
    return per_class


def _fold_ensemble(test, results, classes, task, thresholds, decision: str, n_bootstrap: int, seed: int):
    """The fold models' mean probabilities on the shared test set, evaluated at the pooled
    out-of-fold thresholds with patient-bootstrap intervals. Returns the result and the
    ensemble's predictions."""
    # in the order of the predictions (fold 0's test rows), never the IDs' sort order
    mean_probs = test.groupby("image_id", sort=False)[[f"prob:{c}" for c in classes]].mean()
    first = test.drop_duplicates("image_id").set_index("image_id").loc[mean_probs.index]
    y_test = targets_for(first["labels"], classes, task)
    probs = mean_probs.to_numpy(np.float64)
    ensemble = evaluate(task, classes, y_test, probs, thresholds)
    ensemble["models"] = int(len(results))
    # the models it averages, as folders below the experiment's (what medfold predict loads)
    ensemble["members"] = [f"fold_{r['fold']}" + (f"/seed_{r['repeat']}" if r.get("repeat") else "") for r in results]
    ensemble["threshold_source"] = "pooled out-of-fold predictions"
    ensemble["decision"] = decision
    ensemble["ci95"] = bootstrap_intervals(
        task, classes, y_test, probs, first["patient_id"].to_numpy(), thresholds, n_bootstrap, seed
    )
    ensemble["bootstrap"] = {"resamples": n_bootstrap, "unit": "patient", "seed": seed}
    predictions = mean_probs.reset_index().assign(
        patient_id=first["patient_id"].to_numpy(), labels=first["labels"].to_list()
    )
    return ensemble, predictions


def aggregate_experiment(metrics_paths, prediction_paths, n_bootstrap: int, seed: int) -> dict:
    """Everything ``cv/`` holds, as frames and dicts."""
    results = _load(metrics_paths)
    classes, task = results[0]["classes"], results[0]["task"]
    per_fold = per_fold_table(results)
    summary = summary_table(per_fold)
    per_class = _per_class_auroc(per_fold)
    # each file tagged with its model's seed (the metrics file beside it says which)
    predictions = pd.concat(
        [pd.read_parquet(p).assign(repeat=r.get("repeat", 0)) for p, r in zip(prediction_paths, results)],
        ignore_index=True,
    )
    predictions = combine_repeats(predictions, classes)
    oof = predictions[predictions["set"] == "val"]
    y_oof = targets_for(oof["labels"], classes, task)
    oof_probs = _probs(oof, classes)
    decision = results[0].get("decision_rule")  # the experiment's, as its folds used it
    thresholds = choose_thresholds(task, y_oof, oof_probs, decision)
    pooled = evaluate(task, classes, y_oof, oof_probs, thresholds)
    out = {
        "task": task,
        "classes": classes,
        "folds": int(per_fold["fold"].nunique()),
        "models": int(len(results)),
        "per_fold": per_fold,
        "variance": variance_split(per_fold),
        "predictions": predictions.drop(columns=["repeat"]),
        "summary": summary,
        "per_class_auroc": per_class,
        "decision": describe_decision(decision),
        "oof": pooled,
    }
    test = predictions[predictions["set"] == "test"]
    out["ensemble_predictions"] = pd.DataFrame(
        columns=["image_id", *[f"prob:{c}" for c in classes], "patient_id", "labels"]
    )
    # a fold ensemble needs one test set that every fold model predicted; the dataset's own folds
    # may each have their own (glaucoma Fold0..Fold9), and then only the per-fold test metrics hold
    shared = len(test) and (test.groupby("image_id")["fold"].nunique() == test["fold"].nunique()).all()
    if not shared:
        out["ensemble_test_skipped"] = "no test set shared by every fold" if len(test) else "no test set"
    else:
        out["ensemble_test"], out["ensemble_predictions"] = _fold_ensemble(
            test, results, classes, task, thresholds, out["decision"], n_bootstrap, seed
        )
    return out


def _num(value) -> float | None:
    return None if pd.isna(value) else float(value)


def write_experiment(agg: dict, per_fold, summary_table, summary, ensemble, ensemble_predictions) -> None:
    """The aggregation's files, at the paths the rule names."""
    for path in (per_fold, summary_table, summary, ensemble, ensemble_predictions):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    agg["per_fold"].to_csv(per_fold, index=False)
    agg["summary"].to_csv(summary_table, index_label="statistic")
    record = {
        "task": agg["task"],
        "classes": agg["classes"],
        "folds": agg["folds"],
        "models": agg["models"],
        "variance": agg["variance"],
        "statistics": {
            col: {stat: _num(v) for stat, v in agg["summary"][col].items()} for col in agg["summary"].columns
        },
        "per_class_auroc": agg["per_class_auroc"],
        "decision": agg["decision"],
        "oof": agg["oof"],
    }
    Path(summary).write_text(json.dumps(record, indent=2) + "\n")
    Path(ensemble).write_text(json.dumps(agg.get("ensemble_test"), indent=2) + "\n")
    agg["ensemble_predictions"].to_parquet(ensemble_predictions, index=False)


COMPARED = ("auroc_macro", "accuracy", "balanced_accuracy", "f1_macro")


def compare_experiments(
    summary_paths: dict[str, str], ensemble_paths: dict[str, str], select_on: str = "val.auroc_macro"
) -> pd.DataFrame:
    """One row per experiment: mean and std across folds of the main metrics, the test-set
    ensemble's AUROC with its interval, and ``best`` marking the experiment with the highest
    mean ``select_on`` (validation, so the test set plays no part in choosing)."""
    rows = []
    for name, path in summary_paths.items():
        stats = json.loads(Path(path).read_text())["statistics"]
        ensemble = json.loads(Path(ensemble_paths[name]).read_text()) or {}
        row = {"experiment": name}
        for part in ("val", "test"):
            for metric in COMPARED:
                col = stats.get(f"{part}.{metric}")
                if col:
                    row[f"{part}.{metric}.mean"] = col["mean"]
                    row[f"{part}.{metric}.std"] = col["std"]
        row["ensemble_test.auroc_macro"] = ensemble.get("auroc_macro")
        ci = (ensemble.get("ci95") or {}).get("auroc_macro")
        row["ensemble_test.auroc_macro.ci_low"], row["ensemble_test.auroc_macro.ci_high"] = ci or (None, None)
        row["train_seconds.mean"] = (stats.get("train_seconds") or {}).get("mean")
        row["parameters.mean"] = (stats.get("parameters") or {}).get("mean")
        rows.append(row)
    table = pd.DataFrame(rows)
    key = f"{select_on}.mean"
    table["best"] = False
    if key in table and table[key].notna().any():
        table.loc[table[key].idxmax(), "best"] = True
    return table


CV_TEST_COLUMNS = [
    "a",
    "b",
    "metric",
    "folds",
    "seeds",
    "pairs",
    "mean_a",
    "mean_b",
    "difference",
    "std_difference",
    "test_train_ratio",
    "t_naive",
    "p_naive",
    "t_corrected",
    "p_corrected",
]


def corrected_t_test(differences: np.ndarray, test_train_ratio: float) -> dict:
    """The corrected repeated k-fold cross-validation t-test (Bouckaert & Frank 2004, after Nadeau
    & Bengio 2003) on the paired differences of K x R fold-and-seed scores, beside the naive
    paired t-test. The folds' training sets overlap, so their scores are correlated and the naive
    variance sigma^2 / n is too small; the correction takes it as (1/n + n_test/n_train) sigma^2,
    n_test/n_train = 1/(K-1) for K folds. Both on n - 1 degrees of freedom, two-sided."""
    from scipy import stats

    d = np.asarray(differences, np.float64)
    n = len(d)
    out = {"difference": float(d.mean()) if n else None, "std_difference": None}
    out.update(t_naive=None, p_naive=None, t_corrected=None, p_corrected=None)
    if n < 2:
        return out
    var = float(np.var(d, ddof=1))
    out["std_difference"] = var**0.5
    if var == 0:  # every pair differs by the same amount: no spread to test against
        return out
    for name, scale in (("naive", 1 / n), ("corrected", 1 / n + test_train_ratio)):
        t = float(d.mean() / np.sqrt(scale * var))
        out[f"t_{name}"], out[f"p_{name}"] = t, float(2 * stats.t.sf(abs(t), df=n - 1))
    return out


def cv_t_tests(per_fold: dict[str, pd.DataFrame], pairs: list[tuple[str, str]], metric: str) -> pd.DataFrame:
    """Each pair's cross-validation t-tests on ``metric``, over the (fold, seed) both trained:
    fold k seed r of one experiment against fold k seed r of the other (same split, same seed
    index)."""
    rows = []
    for a, b in pairs:
        fa, fb = per_fold[a], per_fold[b]
        if metric not in fa or metric not in fb:
            continue
        joined = fa[["fold", "seed", metric]].merge(fb[["fold", "seed", metric]], on=["fold", "seed"])
        joined = joined.dropna()
        folds = int(joined["fold"].nunique())
        ratio = 1 / (folds - 1) if folds > 1 else None
        row = {
            "a": a,
            "b": b,
            "metric": metric,
            "folds": folds,
            "seeds": int(joined.groupby("fold")["seed"].nunique().min()) if len(joined) else 0,
            "pairs": len(joined),
            "mean_a": float(joined[f"{metric}_x"].mean()) if len(joined) else None,
            "mean_b": float(joined[f"{metric}_y"].mean()) if len(joined) else None,
            "test_train_ratio": ratio,
        }
        if ratio is not None:
            row.update(corrected_t_test((joined[f"{metric}_x"] - joined[f"{metric}_y"]).to_numpy(), ratio))
        rows.append(row)
    return pd.DataFrame(rows, columns=CV_TEST_COLUMNS)


# ----------------------------------------------------------------------------- across experiments
def experiment_ensemble_fold(
    prediction_paths: dict[str, str], metrics_paths: dict[str, str], weights: list[float], fold: int
) -> tuple[dict, pd.DataFrame]:
    """Fold ``fold`` of an experiment ensemble (``ensembles.<name>``; not an experiment's own fold
    ensemble, which ``write_experiment`` evaluates): the weighted mean of the experiments'
    fold-``fold`` probabilities on the same validation and test images, thresholds chosen on
    validation, evaluated as a fold model is. Returns (metrics, predictions)."""
    names = list(prediction_paths)
    weights = np.asarray(weights or [1.0] * len(names), np.float64)
    if len(weights) != len(names) or weights.sum() <= 0:
        raise ConfigError(
            f"ensembles: {len(weights)} weights for {len(names)} experiments {names}; give one per "
            f"experiment, not all zero"
        )
    weights = weights / weights.sum()
    results = {name: json.loads(Path(metrics_paths[name]).read_text()) for name in names}
    classes, task = results[names[0]]["classes"], results[names[0]]["task"]
    prob_cols = [f"prob:{c}" for c in classes]
    frames = {}
    for name in names:
        if results[name]["classes"] != classes or results[name]["task"] != task:
            raise ConfigError(
                f"ensembles: experiment {name!r} predicts {results[name]['classes']} ({results[name]['task']}), "
                f"{names[0]!r} predicts {classes} ({task}); an ensemble needs the same classes"
            )
        frames[name] = pd.read_parquet(prediction_paths[name]).set_index(["set", "image_id"])
    first = frames[names[0]]
    for name in names[1:]:
        if len(frames[name]) != len(first) or not frames[name].index.isin(first.index).all():
            raise ConfigError(
                f"ensembles: experiments {names[0]!r} and {name!r} predicted different images in fold {fold}; "
                f"an ensemble needs one split"
            )
        frames[name] = frames[name].loc[first.index]  # in the first member's order
    probs = sum(w * frames[name][prob_cols].to_numpy(np.float64) for w, name in zip(weights, names))
    predictions = (
        first.drop(columns=prob_cols).assign(**{c: probs[:, j] for j, c in enumerate(prob_cols)}).reset_index()
    )
    predictions = predictions[["image_id", "patient_id", "labels", "set", "fold", *prob_cols]]
    result = {
        "fold": fold,
        "task": task,
        "classes": classes,
        "members": names,
        "weights": weights.tolist(),
        "best_epoch": None,
        "epochs_trained": None,
        "train_seconds": float(sum(r["train_seconds"] for r in results.values())),
    }
    val = predictions[predictions["set"] == "val"]
    y_val = targets_for(val["labels"], classes, task)
    decision = results[names[0]].get("decision_rule")  # the first member's rule
    result.update(decision=describe_decision(decision), decision_rule=decision)
    thresholds = choose_thresholds(task, y_val, val[prob_cols].to_numpy(np.float64), decision)
    result["val"] = evaluate(task, classes, y_val, val[prob_cols].to_numpy(np.float64), thresholds)
    test = predictions[predictions["set"] == "test"]
    if len(test):
        result["test"] = evaluate(
            task, classes, targets_for(test["labels"], classes, task), test[prob_cols].to_numpy(np.float64), thresholds
        )
    return result, predictions


def grid_table(combinations: dict[str, dict], summary_paths: dict[str, str], rank_by: str) -> pd.DataFrame:
    """One row per combination of a grid, ranked by the mean validation ``rank_by`` across folds
    (rank 1 best), with its values, the metric's std, the test mean and the training time."""
    rows = []
    for name, values in combinations.items():
        stats = json.loads(Path(summary_paths[name]).read_text())["statistics"]
        metric = stats.get(rank_by) or {}
        test = stats.get(rank_by.replace("val.", "test.", 1)) or {}
        seconds = stats.get("train_seconds") or {}
        rows.append(
            {
                "experiment": name,
                **{f"param:{k}": v for k, v in values.items()},
                f"{rank_by}.mean": metric.get("mean"),
                f"{rank_by}.std": metric.get("std"),
                f"{rank_by.replace('val.', 'test.', 1)}.mean": test.get("mean"),
                "train_seconds.mean": seconds.get("mean"),
                "train_seconds.total": (seconds.get("mean") or 0) * (seconds.get("count") or 0),
            }
        )
    table = pd.DataFrame(rows)
    key = f"{rank_by}.mean"
    table = table.sort_values([key, "train_seconds.mean"], ascending=[False, True], na_position="last", kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table.reset_index(drop=True)


# ----------------------------------------------------------------------------- the stages
@dataclass(frozen=True)
class CvOutputs(files.Outputs):
    """The cross-validation files every aggregate rule writes (experiment, ensemble, variant)."""

    per_fold: Path
    summary_table: Path
    summary: Path
    ensemble: Path
    ensemble_predictions: Path
    NAMES: ClassVar[dict[str, str]] = {
        "per_fold": "per_fold.csv",
        "summary_table": "summary.csv",
        "summary": "summary.json",
        "ensemble": "ensemble_test.json",
        "ensemble_predictions": "ensemble_test_predictions.parquet",
    }


@dataclass(frozen=True)
class ClinicalOutputs(files.Outputs):
    """The clinical evaluation's files (medfold.evaluation.clinical.write), for experiments and ensembles."""

    test_predictions: Path
    clinical: Path
    subgroups: Path
    forest: Path
    calibration: Path
    reliability: Path
    operating_points: Path
    NAMES: ClassVar[dict[str, str]] = {
        "test_predictions": "test_predictions.parquet",
        "clinical": "clinical.json",
        "subgroups": "subgroups.csv",
        "forest": "subgroups.png",
        "calibration": "calibration.csv",
        "reliability": "reliability.png",
        "operating_points": "operating_points.csv",
    }


@dataclass(frozen=True)
class AggregateOutputs:
    """What one aggregate rule writes: the cross-validation files, and, where the rule has them,
    the clinical evaluation (not for compressed variants) and the label audit."""

    cv: CvOutputs
    clinical: ClinicalOutputs | None = None
    label_issues: Path | None = None

    @classmethod
    def from_rule(cls, output) -> AggregateOutputs:
        return cls(
            CvOutputs.from_rule(output),
            ClinicalOutputs.from_rule(output) if hasattr(output, "clinical") else None,
            Path(output.label_issues) if hasattr(output, "label_issues") else None,
        )


def aggregate_job(
    name: str,
    metrics_paths,
    prediction_paths,
    index_path,
    outputs: AggregateOutputs,
    evaluation: dict,
    n_bootstrap: int,
    seed: int,
) -> dict:
    """An aggregate rule: the folds (and seeds) of ``name`` across cross-validation, its label
    audit and its clinical evaluation on the shared view of the index. Returns the aggregate."""
    from medfold.core.privacy import shareable_view
    from medfold.data.index.io import read_index
    from medfold.evaluation.clinical.experiment import evaluate_experiment
    from medfold.evaluation.clinical.figures import write_clinical
    from medfold.evaluation.labels import audit

    agg = aggregate_experiment(metrics_paths, prediction_paths, n_bootstrap, seed)
    cv = outputs.cv
    write_experiment(agg, cv.per_fold, cv.summary_table, cv.summary, cv.ensemble, cv.ensemble_predictions)
    if outputs.label_issues is not None:
        audit(agg["predictions"], agg["classes"], agg["task"]).to_csv(outputs.label_issues, index=False)
    if outputs.clinical is not None:
        # with repeats, each validation image once (its seeds averaged); the index as the
        # predictions name images and patients
        index = shareable_view(read_index(index_path)[0])
        result = evaluate_experiment(
            agg["predictions"], index, agg["task"], agg["classes"], evaluation, n_bootstrap, seed
        )
        write_clinical(result, name, outputs.clinical)
    return agg


@dataclass(frozen=True)
class ComparisonOutputs(files.Outputs):
    """What the compare_experiments rule writes."""

    table: Path
    comparisons: Path
    cv_tests: Path
    NAMES: ClassVar[dict[str, str]] = {
        "table": "experiments.csv",
        "comparisons": "comparisons.csv",
        "cv_tests": "cv_tests.csv",
    }


def compare_job(
    names: list[str],
    summaries,
    ensembles,
    test_predictions,
    per_fold,
    comparisons,
    n_bootstrap: int,
    seed: int,
    outputs: ComparisonOutputs,
) -> None:
    """The compare_experiments rule: every experiment and experiment ensemble in one table (the
    best by validation marked), the paired test-set comparisons and the cross-validation t-tests.
    The path lists are in the order of ``names``; ``comparisons``: ``evaluation.comparisons``."""
    from medfold.evaluation.clinical.comparison import paired_comparisons, pairs_to_compare
    from medfold.settings.sections import ComparisonSettings

    comparisons = ComparisonSettings.of(comparisons)
    table = compare_experiments(dict(zip(names, summaries)), dict(zip(names, ensembles)))
    table.to_csv(outputs.table, index=False)
    best = table.loc[table["best"], "experiment"].tolist()
    best = best[0] if best else None
    predictions = {name: pd.read_parquet(path) for name, path in zip(names, test_predictions)}
    paired_comparisons(predictions, summaries[0], comparisons, best, n_bootstrap, seed).to_csv(
        outputs.comparisons, index=False
    )
    folds = {name: pd.read_csv(path) for name, path in zip(names, per_fold)}
    cv_t_tests(folds, pairs_to_compare(names, comparisons, best), comparisons.cv_metric).to_csv(
        outputs.cv_tests, index=False
    )


@dataclass(frozen=True)
class ExperimentEnsembleFoldOutputs(files.Outputs):
    """What the ensemble_fold rule writes for one fold of an experiment ensemble."""

    predictions: Path
    metrics: Path
    NAMES: ClassVar[dict[str, str]] = {"predictions": "predictions.parquet", "metrics": "metrics.json"}


def experiment_ensemble_fold_job(
    names: list[str],
    prediction_paths,
    metrics_paths,
    weights: list[float],
    fold: int,
    outputs: ExperimentEnsembleFoldOutputs,
) -> None:
    """The ensemble_fold rule: fold ``fold`` of an experiment ensemble of ``names``."""
    result, predictions = experiment_ensemble_fold(
        dict(zip(names, prediction_paths)), dict(zip(names, metrics_paths)), weights, fold
    )
    predictions.to_parquet(outputs.predictions, index=False)
    Path(outputs.metrics).write_text(json.dumps(result, indent=2) + "\n")


@dataclass(frozen=True)
class GridOutputs(files.Outputs):
    """What the grid_table rule writes for one grid."""

    table: Path
    NAMES: ClassVar[dict[str, str]] = {"table": "grid.csv"}


def grid_job(combinations: dict[str, dict], summary_paths, rank_by: str, outputs: GridOutputs) -> None:
    """The grid_table rule: the combinations of one grid ranked (summary paths in their order)."""
    table = grid_table(combinations, dict(zip(combinations, summary_paths)), rank_by)
    table.to_csv(outputs.table, index=False)
