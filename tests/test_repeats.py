"""Repeats: R seeds of each fold (experiments.<name>.repeats), one job each; the spread over folds
and over seeds and the variance split that adds up; the fold ensemble over all R x K models; and
the corrected repeated k-fold t-test (Bouckaert & Frank 2004) beside the naive paired one."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import planned, run_snakemake
from scipy import stats

from medfold.core.errors import ConfigError
from medfold.evaluation.aggregate import corrected_t_test, cv_t_tests, variance_split
from medfold.study.resolve import experiment_repeats, repeat_settings

DS = "results/demo_cxr14"


def test_the_variance_split_adds_up_and_matches_its_definition():
    rng = np.random.default_rng(3)
    scores = 0.8 + 0.05 * rng.standard_normal((5, 1)) + 0.01 * rng.standard_normal((5, 3))  # 5 folds x 3 seeds
    per_fold = pd.DataFrame(
        [{"fold": k, "seed": r, "val.auroc_macro": scores[k, r]} for k in range(5) for r in range(3)]
    )
    split = variance_split(per_fold)["metrics"]["val.auroc_macro"]
    assert split["var_fold"] + split["var_seed"] == pytest.approx(split["var_total"], rel=1e-12)
    assert split["var_total"] == pytest.approx(np.var(scores))
    assert split["var_fold"] == pytest.approx(np.var(scores.mean(1)))
    assert split["std_over_seeds"] == pytest.approx(np.std(scores.mean(0), ddof=1))
    # the folds were drawn 5x further apart than the seeds: most of the variance is the folds'
    assert split["seed_share"] < 0.2
    assert variance_split(per_fold[per_fold["seed"] == 0]) is None  # one seed: no seed part to see


def test_the_corrected_t_test_is_the_paired_t_test_with_the_overlap_allowed_for():
    rng = np.random.default_rng(0)
    a = 0.80 + 0.02 * rng.standard_normal(10)
    b = a - 0.01 + 0.01 * rng.standard_normal(10)
    got = corrected_t_test(a - b, 1 / (5 - 1))
    naive = stats.ttest_rel(a, b)
    assert got["t_naive"] == pytest.approx(naive.statistic) and got["p_naive"] == pytest.approx(naive.pvalue)
    # by hand: t = mean / sqrt((1/n + 1/(K-1)) var), n - 1 degrees of freedom
    d = a - b
    t = d.mean() / np.sqrt((1 / 10 + 1 / 4) * d.var(ddof=1))
    assert got["t_corrected"] == pytest.approx(t)
    assert got["p_corrected"] == pytest.approx(2 * stats.t.sf(abs(t), 9))
    assert got["p_corrected"] > got["p_naive"]
    assert corrected_t_test(np.full(6, 0.01), 0.5)["p_corrected"] is None  # no spread: nothing to test


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_repeats_must_be_a_whole_number_of_seeds(bad):
    with pytest.raises(ConfigError, match=r"experiments.e.repeats: expected a whole number of seeds per fold"):
        experiment_repeats({"repeats": bad}, "e")
    assert experiment_repeats({}, "e") == 1
    settings = {"seed": 4, "lr": 0.1}
    assert repeat_settings(settings, 0) is settings  # seed 0 is the fold model without repeats
    assert repeat_settings(settings, 1)["seed"] != 4 and repeat_settings(settings, 1)["repeat"] == 1


def test_each_fold_trains_two_seeds_and_the_aggregate_reports_both(trained_workflow):
    for exp in ("baseline", "batchnorm"):
        root = trained_workflow / DS / exp
        for k in range(3):
            first = json.loads((root / f"fold_{k}" / "metrics.json").read_text())
            second = json.loads((root / f"fold_{k}" / "seed_1" / "metrics.json").read_text())
            assert (first["repeat"], second["repeat"], first["fold"], second["fold"]) == (0, 1, k, k)
            assert first["seed"] != second["seed"]
            # the same images (one split), other weights: other probabilities
            p0 = pd.read_parquet(root / f"fold_{k}" / "predictions.parquet")
            p1 = pd.read_parquet(root / f"fold_{k}" / "seed_1" / "predictions.parquet")
            assert p0["image_id"].tolist() == p1["image_id"].tolist()
            assert np.abs(p0.filter(like="prob:").to_numpy() - p1.filter(like="prob:").to_numpy()).max() > 1e-3
        per_fold = pd.read_csv(root / "cv" / "per_fold.csv")
        summary = json.loads((root / "cv" / "summary.json").read_text())
        variance = summary["variance"]
        assert (variance["folds"], variance["seeds"], summary["models"]) == (3, 2, 6)
        for metric in ("val.auroc_macro", "test.auroc_macro"):
            split = variance["metrics"][metric]
            scores = per_fold.pivot(index="fold", columns="seed", values=metric).to_numpy()
            assert split["var_fold"] + split["var_seed"] == pytest.approx(split["var_total"], rel=1e-9)
            assert split["var_total"] == pytest.approx(np.var(scores))
            assert split["var_seed"] > 0  # the two seeds differ
            print(
                f"{exp} {metric}: mean {split['mean']:.4f}, std over folds {split['std_over_folds']:.4f}, "
                f"over seeds {split['std_over_seeds']:.4f}, all {split['std_all']:.4f}; variance fold "
                f"{split['var_fold']:.2e} + seed {split['var_seed']:.2e} = {split['var_total']:.2e} "
                f"(seed share {split['seed_share']:.0%})"
            )
        # the fold ensemble is the mean of all six models' test probabilities
        ensemble = json.loads((root / "cv" / "ensemble_test.json").read_text())
        members = ["fold_0", "fold_0/seed_1", "fold_1", "fold_1/seed_1", "fold_2", "fold_2/seed_1"]
        assert ensemble["models"] == 6 and ensemble["members"] == members
        tests = [pd.read_parquet(root / m / "predictions.parquet").query("set == 'test'") for m in members]
        mean = sum(t.set_index("image_id").filter(like="prob:") for t in tests) / 6
        own = pd.read_parquet(root / "cv" / "ensemble_test_predictions.parquet").set_index("image_id")
        assert np.abs(own.loc[mean.index, mean.columns].to_numpy() - mean.to_numpy()).max() < 1e-6
        # each out-of-fold image once in the label audit, its two seeds averaged
        issues = pd.read_csv(root / "cv" / "label_issues.csv")
        assert not issues.duplicated(["image_id", "label"] if "label" in issues else ["image_id"]).any()


def test_the_corrected_test_pairs_fold_and_seed_and_is_less_confident(trained_workflow):
    tests = pd.read_csv(trained_workflow / DS / "cv_tests.csv")
    names = ["baseline", "batchnorm"]
    row = tests[tests["a"].isin(names) & tests["b"].isin(names)].iloc[0]
    assert (row["pairs"], row["folds"], row["seeds"], row["metric"]) == (6, 3, 2, "val.auroc_macro")
    a = pd.read_csv(trained_workflow / DS / row["a"] / "cv" / "per_fold.csv")
    b = pd.read_csv(trained_workflow / DS / row["b"] / "cv" / "per_fold.csv")
    naive = stats.ttest_rel(a["val.auroc_macro"], b["val.auroc_macro"])  # rows in (fold, seed) order
    assert row["p_naive"] == pytest.approx(naive.pvalue) and row["test_train_ratio"] == pytest.approx(0.5)
    assert row["p_corrected"] > row["p_naive"]
    print(f"{row['a']} vs {row['b']}: naive p {row['p_naive']:.4f}, corrected p {row['p_corrected']:.4f}")
    page = (trained_workflow / DS / "report" / "index.html").read_text()
    assert "Seed against fold variance" in page and "Paired cross-validation t-tests" in page
    assert f"{row['p_corrected']:.4f}" in page


def test_pairs_join_on_the_folds_and_seeds_both_trained():
    one = pd.DataFrame({"fold": [0, 0, 1, 1, 2, 2], "seed": [0, 1] * 3, "val.auroc_macro": np.linspace(0.7, 0.8, 6)})
    other = one[one["seed"] == 0].assign(**{"val.auroc_macro": lambda f: f["val.auroc_macro"] - [0.01, 0.03, 0.02]})
    row = cv_t_tests({"a": one, "b": other}, [("a", "b")], "val.auroc_macro").iloc[0]
    assert (row["pairs"], row["folds"], row["seeds"]) == (3, 3, 1)
    assert row["difference"] == pytest.approx(0.02)


def test_one_seed_of_one_fold_is_one_job(trained_workflow):
    """README: asking for fold_<k>/seed_<r>/metrics.json plans that seed's training alone."""
    target = f"{DS}/baseline/fold_1/seed_1/metrics.json"
    proc = run_snakemake(trained_workflow, "--cores", "2", "--dry-run", "--forcerun", target, target)
    assert planned(proc)["train_repeat"] == 1 and "train" not in planned(proc)
    assert "experiment=baseline, fold=1, repeat=1" in proc.stdout + proc.stderr
    # a seed no experiment trains (repeats 2: seeds 0 and 1) is no target
    proc = run_snakemake(
        trained_workflow, "--cores", "2", "--dry-run", f"{DS}/baseline/fold_1/seed_2/metrics.json", check=False
    )
    assert proc.returncode != 0
