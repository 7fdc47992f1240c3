"""Clinical evaluation metrics: checked against scikit-learn / SciPy where they have the metric,
and against a hand-computed case where they do not (DeLong)."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from medfold.data.dicom import number_or_age
from medfold.evaluation.clinical.comparison import compare_pair
from medfold.evaluation.clinical.operating import per_patient, threshold_for
from medfold.evaluation.clinical.stats import (
    PatientBootstrap,
    apply_temperature,
    delong,
    delong_variance,
    fit_temperature,
    interval,
    reliability,
    weighted_auroc,
    weighted_rates,
)
from medfold.evaluation.clinical.subgroups import subgroup_of


def test_weighted_auroc_equals_sklearn_with_sample_weights_ties_included():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    score = np.round(rng.random(300) + 0.4 * y, 1)  # rounded: many ties, the case that needs care
    weights = rng.integers(0, 4, size=(25, 300)).astype(float)
    mine = weighted_auroc(y, score, weights)
    for row, value in zip(weights, mine):
        assert value == pytest.approx(roc_auc_score(y, score, sample_weight=row), abs=1e-12)
    assert weighted_auroc(y, score, np.ones((1, 300)))[0] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert np.isnan(weighted_auroc(y, score, (~y).astype(float)[None, :])[0])  # no positive weight: undefined


def test_a_bootstrap_draw_as_weights_is_the_same_as_concatenating_the_drawn_patients():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(40), rng.integers(1, 4, 40))
    y = rng.random(len(patients)) < 0.4
    score = rng.random(len(patients)) + y
    boot = PatientBootstrap(patients.astype(str), 5, seed=3)
    codes = pd.unique(pd.Series(patients.astype(str)))  # numbered in order of first appearance
    for d in range(5):
        w = boot.weights(chunk=slice(d, d + 1))
        rows = np.concatenate(
            [np.flatnonzero(patients.astype(str) == codes[k]).repeat(int(boot.counts[d, k])) for k in range(len(codes))]
        )
        assert weighted_auroc(y, score, w)[0] == pytest.approx(roc_auc_score(y[rows], score[rows]), abs=1e-12)
        sens, spec = weighted_rates(y, score > 0.9, w)
        assert sens[0] == pytest.approx((score[rows] > 0.9)[y[rows]].mean())
        assert spec[0] == pytest.approx((score[rows] <= 0.9)[~y[rows]].mean())
    assert boot.counts.sum(1).tolist() == [40.0] * 5  # every draw has as many patients as the set


def test_delong_matches_the_hand_computed_case():
    # positives then negatives; model A: pos .9 .8 .4, neg .7 .5 .1; model B: pos .6 .9 .3, neg .2 .8 .4
    # A: V10 = [1, 1, 1/3], V01 = [2/3, 2/3, 1], AUROC 7/9.  B: V10 = [2/3, 1, 1/3], V01 = [1, 1/3, 2/3], AUROC 2/3
    # S10 = [[4/27, 1/9], [1/9, 1/9]], S01 = [[1/27, 0], [0, 1/9]] (covariances, n - 1 in the denominator)
    # var(A - B) = (4/27 + 1/9 - 2/9) / 3 + (1/27 + 1/9) / 3 = 5/81; z = (1/9) / sqrt(5/81) = 1/sqrt(5)
    y = np.array([1, 1, 1, 0, 0, 0])
    a = np.array([0.9, 0.8, 0.4, 0.7, 0.5, 0.1])
    b = np.array([0.6, 0.9, 0.3, 0.2, 0.8, 0.4])
    result = delong(y, a, b)
    assert result["auroc_a"] == pytest.approx(7 / 9) and result["auroc_b"] == pytest.approx(2 / 3)
    assert result["variance"] == pytest.approx(5 / 81)
    assert result["z"] == pytest.approx(1 / math.sqrt(5))
    assert result["p"] == pytest.approx(2 * (1 - stats.norm.cdf(1 / math.sqrt(5))))  # 0.6547
    assert result["ci95"] == pytest.approx([1 / 9 - 1.959964 * math.sqrt(5 / 81), 1 / 9 + 1.959964 * math.sqrt(5 / 81)])
    assert delong_variance(y, a) == pytest.approx((4 / 27) / 3 + (1 / 27) / 3)
    # the same model against itself: no difference, p = 1
    same = delong(y, a, a)
    assert same["difference"] == 0 and same["p"] == 1.0


def test_delong_agrees_with_the_paired_bootstrap_on_larger_data():
    rng = np.random.default_rng(7)
    n = 1500
    y = rng.random(n) < 0.3
    shared = rng.normal(size=n)
    a = y * 1.2 + shared + rng.normal(scale=0.6, size=n)
    b = y * 0.9 + shared + rng.normal(scale=0.6, size=n)
    result = delong(y, a, b)
    boot = PatientBootstrap(np.arange(n).astype(str), 600, seed=0)
    draws = boot.draws(lambda w: weighted_auroc(y, a, w) - weighted_auroc(y, b, w))
    assert np.std(draws) == pytest.approx(math.sqrt(result["variance"]), rel=0.15)
    assert result["p"] < 0.01 and result["difference"] > 0


def test_reliability_bins_match_sklearn_calibration_curve_and_brier():
    rng = np.random.default_rng(2)
    prob = rng.random(500) ** 2
    y = rng.random(500) < prob**0.7
    mine = reliability(y, prob, bins=10)
    observed, predicted = calibration_curve(y, prob, n_bins=10, strategy="uniform")
    filled = [i for i, n in enumerate(mine["count"]) if n]
    assert np.allclose([mine["observed"][i] for i in filled], observed)
    assert np.allclose([mine["mean_predicted"][i] for i in filled], predicted)
    assert mine["brier"] == pytest.approx(brier_score_loss(y, prob))
    gaps = np.abs(observed - predicted)
    counts = np.array([mine["count"][i] for i in filled])
    assert mine["ece"] == pytest.approx(float((gaps * counts).sum() / 500))
    perfect = reliability(np.r_[np.zeros(50), np.ones(50)], np.r_[np.zeros(50), np.ones(50)], bins=10)
    assert perfect["ece"] == 0 and perfect["brier"] == 0


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_temperature_scaling_recovers_a_planted_overconfidence(task):
    rng = np.random.default_rng(4)
    n, k = 4000, 3
    logits = rng.normal(scale=1.5, size=(n, k))
    if task == "multilabel":
        true = 1 / (1 + np.exp(-logits))
        y = (rng.random((n, k)) < true).astype(float)
        overconfident = 1 / (1 + np.exp(-logits * 2.5))
    else:
        true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        y = np.array([rng.choice(k, p=p) for p in true])
        overconfident = np.exp(2.5 * logits) / np.exp(2.5 * logits).sum(1, keepdims=True)
    t = fit_temperature(task, y, overconfident)
    assert t == pytest.approx(2.5, rel=0.1)
    assert np.allclose(apply_temperature(task, overconfident, t), true, atol=0.05)
    assert np.allclose(apply_temperature(task, true, 1.0), true, atol=1e-6)  # T = 1 changes nothing


def test_subgroup_bands_parse_dicom_ages_and_show_missing_and_out_of_range():
    assert number_or_age("065Y") == 65 and number_or_age("006M") == 0.5 and number_or_age("41") == 41
    assert number_or_age("") is None and number_or_age("unknown") is None
    values = pd.Series(["12", "18", "39", "065Y", "70", "", "412", "n/a"])
    groups = subgroup_of(values, {"column": "Patient Age", "bands": [18, 40, 65], "valid": [0, 120]})
    assert groups.tolist() == ["<18", "18-40", "18-40", "65+", "65+", "missing", "out of range", "missing"]
    assert subgroup_of(pd.Series([" M", "F", None]), {"column": "sex"}).tolist() == ["M", "F", "missing"]


def test_thresholds_reach_their_target_on_validation():
    rng = np.random.default_rng(5)
    y = rng.random(400) < 0.35
    score = rng.random(400) + 0.5 * y
    for value in (0.8, 0.9, 0.95):
        t = threshold_for(y, score, "specificity", value)
        assert ((score < t)[~y]).mean() >= value  # reached ...
        assert ((score < np.max(score[score < t]))[~y]).mean() < value  # ... with the lowest such threshold
        t = threshold_for(y, score, "sensitivity", value)
        assert ((score >= t)[y]).mean() >= value
        assert ((score >= np.min(score[score > t]))[y]).mean() < value


def test_patient_level_takes_each_patients_highest_score_and_any_positive_image():
    frame = pd.DataFrame(
        {
            "patient_id": ["a", "a", "b", "c", "c"],
            "labels": [["Nodule"], [], [], ["Effusion"], ["Nodule", "Effusion"]],
            "prob:Nodule": [0.8, 0.1, 0.3, 0.2, 0.6],
            "prob:Effusion": [0.1, 0.2, 0.4, 0.9, 0.5],
        }
    )
    out, left = per_patient(frame, "multilabel", ["Nodule", "Effusion"], "max")
    assert left == 0 and out["patient_id"].tolist() == ["a", "b", "c"]
    assert out["prob:Nodule"].tolist() == [0.8, 0.3, 0.6] and out["prob:Effusion"].tolist() == [0.2, 0.4, 0.9]
    assert out["labels"].tolist() == [["Nodule"], [], ["Nodule", "Effusion"]]
    mean, _ = per_patient(frame, "multilabel", ["Nodule", "Effusion"], "mean")
    assert mean["prob:Nodule"].tolist() == pytest.approx([0.45, 0.3, 0.4])
    multi = pd.DataFrame(
        {
            "patient_id": ["a", "a", "b"],
            "labels": [["x"], ["y"], ["y"]],
            "prob:x": [0.7, 0.2, 0.1],
            "prob:y": [0.3, 0.8, 0.9],
        }
    )
    out, left = per_patient(multi, "multiclass", ["x", "y"], "mean")
    assert left == 1 and out["patient_id"].tolist() == ["b"]  # a's images disagree: left out, counted


def test_a_paired_comparison_of_a_model_with_itself_finds_no_difference():
    rng = np.random.default_rng(6)
    frame = pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(200)],
            "patient_id": [f"p{k // 2}" for k in range(200)],
            "labels": [["yes"] if v else ["no"] for v in rng.random(200) < 0.4],
        }
    )
    frame["prob:yes"] = rng.random(200) * 0.5 + 0.5 * frame["labels"].map(lambda v: v == ["yes"])
    frame["prob:no"] = 1 - frame["prob:yes"]
    rows = compare_pair(frame, frame.sample(frac=1, random_state=0), "binary", ["no", "yes"], 200, 0)
    assert len(rows) == 1 and rows[0]["difference"] == 0 and rows[0]["delong_p"] == 1.0
    assert rows[0]["bootstrap_ci_low"] == 0 and rows[0]["bootstrap_ci_high"] == 0
    assert interval(np.array([np.nan] * 7 + [0.5] * 3)) is None  # mostly undefined draws: no interval


def test_clustered_delong_matches_the_hand_computed_case():
    """Obuchowski 1997 by hand. Positives x1 .9 (patient 1), x2 .5 (patient 2); negatives y1 .3
    (patient 1), y2 .6 and y3 .2 (patient 3). AUROC = 5/6. V10 = [1, 2/3], V01 = [1, 1/2, 1];
    per patient V10 sums [1, 2/3, 0], V01 sums [1, 0, 3/2]; with m_i = [1, 1, 0], n_i = [1, 0, 2]:
    S10 = 3/(2*2) * ((1/6)^2 + (1/6)^2) = 1/24, S01 = 3/(2*3) * ((1/6)^2 + (1/6)^2) = 1/36,
    S11 = 3/2 * (1/6 * 1/6) = 1/24; var = S10/2 + S01/3 + 2 S11/6 = 19/432."""
    y = np.array([1, 1, 0, 0, 0])
    score = np.array([0.9, 0.5, 0.3, 0.6, 0.2])
    patients = np.array(["p1", "p2", "p1", "p3", "p3"])
    assert delong_variance(y, score, patients) == pytest.approx(19 / 432)
    # one image per patient: DeLong's variance up to the factor I(M-1)/((I-1)M) on each term
    rng = np.random.default_rng(3)
    n = 400
    y = rng.random(n) < 0.4
    s = y + rng.normal(size=n)
    m, i = y.sum(), n
    plain, single = delong_variance(y, s), delong_variance(y, s, np.arange(n))
    assert single == pytest.approx(plain, rel=1.5 * (1 - i * (m - 1) / ((i - 1) * m)) + 1e-3)
    result = delong(y, s, s + rng.normal(scale=0.5, size=n), clusters=np.arange(n))
    assert result["variance_method"].startswith("Obuchowski")


def test_clustered_delong_agrees_with_the_patient_bootstrap_where_plain_delong_is_too_confident():
    """Six images per patient that share the patient's own effect: the clustered variance of the
    AUROC difference is the patient bootstrap's; DeLong's plain one is far smaller, and its p far
    lower, on the same scores."""
    rng = np.random.default_rng(11)
    patients = np.repeat(np.arange(250), 6)
    sick = rng.random(250) < 0.35
    y = sick[patients]
    effect_a, effect_b = rng.normal(size=250)[patients], rng.normal(size=250)[patients]
    a = y * 1.0 + 1.2 * effect_a + rng.normal(scale=0.3, size=len(y))
    b = y * 0.8 + 1.2 * effect_b + rng.normal(scale=0.3, size=len(y))
    clustered = delong(y, a, b, clusters=patients)
    plain = delong(y, a, b)
    boot = PatientBootstrap(patients.astype(str), 800, seed=0)
    draws = boot.draws(lambda w: weighted_auroc(y, a, w) - weighted_auroc(y, b, w))
    assert math.sqrt(clustered["variance"]) == pytest.approx(np.std(draws), rel=0.15)
    assert plain["variance"] < 0.5 * clustered["variance"]
    assert clustered["difference"] == plain["difference"] and clustered["p"] > plain["p"]
