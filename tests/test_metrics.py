import numpy as np
import pandas as pd
import pytest

from medfold.evaluation.aggregate import bootstrap_intervals, compare_experiments, summary_table, weighted_balanced
from medfold.evaluation.metrics import evaluate, youden_threshold


def test_binary_auroc_threshold_and_confusion_by_hand():
    y = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.3, 0.9])
    probs = np.stack([1 - p1, p1], 1)
    # positives' scores 0.8, 0.3, 0.9 vs negatives' 0.1, 0.4, 0.35: 7 of 9 pairs ranked right
    assert youden_threshold(y, p1) == pytest.approx(0.8)  # TPR 2/3 at FPR 0: J = 2/3, the best
    result = evaluate("binary", ["neg", "pos"], y, probs, [0.8])
    assert result["auroc_macro"] == pytest.approx(7 / 9)
    assert result["confusion"] == [[3, 0], [1, 2]]
    assert result["sensitivity"] == pytest.approx(2 / 3) and result["specificity"] == 1.0
    assert result["accuracy"] == pytest.approx(5 / 6) and result["balanced_accuracy"] == pytest.approx(5 / 6)
    assert result["precision_macro"] == pytest.approx((3 / 4 + 1) / 2)


def test_multiclass_metrics_by_hand():
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    result = evaluate("multiclass", ["a", "b", "c"], y, probs)
    assert result["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert result["accuracy"] == 0.75 and result["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert result["auroc"]["a"] == 1.0
    # c's scores 0.3, 0.8 vs the others' 0.1, 0.3: 3 pairs right and one tie (counts half) of 4
    assert result["auroc"]["c"] == pytest.approx(3.5 / 4)
    assert result["f1_macro"] == pytest.approx(np.mean([1, 2 * 0.5 * 1 / 1.5, 2 * 1 * 0.5 / 1.5]))


def test_multilabel_exact_match_accuracy_and_undefined_auroc():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    probs = np.array([[0.9, 0.2], [0.2, 0.6], [0.7, 0.1], [0.4, 0.1]])
    result = evaluate("multilabel", ["x", "y"], y, probs, [0.5, 0.5])
    assert result["accuracy"] == 0.75  # row 2 predicts y wrongly
    assert result["label_accuracy"] == 7 / 8
    assert result["auroc"] == {"x": 1.0, "y": None} and result["auroc_macro"] == 1.0
    assert result["confusion"]["y"] == [[3, 1], [0, 0]]


def test_bootstrap_interval_brackets_the_estimate_and_resamples_patients():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p1 = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    patients = np.repeat(np.arange(100), 3)
    ci = bootstrap_intervals("binary", ["n", "p"], y, probs, patients, [0.5], 300, seed=1)
    estimate = evaluate("binary", ["n", "p"], y, probs)["auroc_macro"]
    low, high = ci["auroc_macro"]
    assert low < estimate < high and high - low < 0.15
    assert ci == bootstrap_intervals("binary", ["n", "p"], y, probs, patients, [0.5], 300, seed=1)


def test_weighted_balanced_accuracy_equals_sklearn_with_sample_weights():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(3)
    for classes in (2, 4):
        y = rng.integers(0, classes, 200)
        pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, classes, 200))
        weights = rng.multinomial(200, np.full(200, 1 / 200), size=5).astype(float)
        got = weighted_balanced(y, pred, weights)
        for row, value in zip(weights, got):
            kept = row > 0  # sklearn counts only the classes present among weighted images
            expected = balanced_accuracy_score(y[kept], pred[kept], sample_weight=row[kept])
            assert value == pytest.approx(expected, abs=1e-12)


def test_summary_has_quartiles_and_compare_marks_best_on_validation(tmp_path):
    per_fold = pd.DataFrame({"fold": [0, 1, 2, 3], "val.auroc_macro": [0.8, 0.9, 0.7, 1.0]})
    summary = summary_table(per_fold)
    assert list(summary.index) == ["count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    assert summary.loc["25%", "val.auroc_macro"] == pytest.approx(0.775)
    import json

    paths, ens = {}, {}
    for name, val, test in (("a", 0.9, 0.99), ("b", 0.95, 0.5)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(
            json.dumps(
                {
                    "statistics": {
                        "val.auroc_macro": {"mean": val, "std": 0.01},
                        "test.auroc_macro": {"mean": test, "std": 0.01},
                    }
                }
            )
        )
        ens[name] = tmp_path / f"{name}_ens.json"
        ens[name].write_text(json.dumps({"auroc_macro": test, "ci95": {"auroc_macro": [test - 0.1, test]}}))
    table = compare_experiments(paths, ens)
    assert table.set_index("experiment")["best"].to_dict() == {"a": False, "b": True}


@pytest.mark.parametrize("task,k", [("multilabel", 4), ("multiclass", 3), ("binary", 2)])
def test_an_epochs_scores_equal_the_full_evaluation(task, k):
    """What each epoch logs and early stopping watches is ``evaluate``'s numbers, computed lighter."""
    from medfold.evaluation.metrics import epoch_scores, evaluate

    rng = np.random.default_rng(k)
    classes = ["a", "b", "c", "d"][:k]
    for n in (7, 60, 301):
        y = (rng.random((n, k)) < 0.3).astype(int) if task == "multilabel" else rng.integers(0, k, n)
        p = rng.random((n, k))
        p = p if task == "multilabel" else p / p.sum(1, keepdims=True)
        full, light = evaluate(task, classes, y, p), epoch_scores(task, classes, y, p)
        assert light == {key: full[key] for key in ("auroc_macro", "accuracy", "balanced_accuracy", "f1_macro")}
