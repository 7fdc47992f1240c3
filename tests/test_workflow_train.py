"""The real snakemake through training and aggregation: one fold on request, only what changed reruns."""

import json
import re
import shutil

import pandas as pd
import pytest
from conftest import QUICK, planned, run_snakemake, workflow_dir

pytestmark = pytest.mark.workflow
DS = "results/demo_cxr14"


def planned_folds(proc) -> list[str]:
    return sorted(set(re.findall(r"experiment=(\w+), fold=(\d+)", proc.stdout + proc.stderr)))


@pytest.fixture
def finished(trained_workflow):
    return trained_workflow


def test_asking_for_one_folds_file_plans_only_that_fold(tmp_path):
    work = workflow_dir(tmp_path, QUICK)
    proc = run_snakemake(work, "--cores", "2", "--dry-run", f"{DS}/baseline/fold_2/metrics.json")
    assert planned(proc)["train"] == 1 and planned_folds(proc) == [("baseline", "2")]
    assert "aggregate" not in planned(proc)


def test_the_whole_workflow_writes_fold_and_cv_outputs(finished):
    for exp in ("baseline", "batchnorm"):
        per_fold = pd.read_csv(finished / DS / exp / "cv" / "per_fold.csv")
        # QUICK trains two seeds of each fold (experiments.<name>.repeats)
        assert per_fold["fold"].tolist() == [0, 0, 1, 1, 2, 2] and per_fold["seed"].tolist() == [0, 1] * 3
        assert per_fold["epochs_trained"].eq(3).all()
        summary = json.loads((finished / DS / exp / "cv" / "summary.json").read_text())
        stats = summary["statistics"]["test.auroc_macro"]
        assert set(stats) == {"count", "mean", "std", "min", "25%", "50%", "75%", "max"} and stats["count"] == 6
        assert set(summary["per_class_auroc"]["test"]) == {"Cardiomegaly", "Effusion", "Nodule", "Pneumonia"}
        ensemble = json.loads((finished / DS / exp / "cv" / "ensemble_test.json").read_text())
        assert ensemble["models"] == 6 and len(ensemble["ci95"]["auroc_macro"]) == 2
    table = pd.read_csv(finished / DS / "experiments.csv")
    assert sorted(table["experiment"]) == ["baseline", "batchnorm", "both"] and table["best"].sum() == 1
    # the ensemble across experiments is evaluated like one: per fold, aggregated, on the same test set
    both = json.loads((finished / DS / "ensembles" / "both" / "cv" / "ensemble_test.json").read_text())
    assert both["models"] == 3 and both["auroc_macro"] > 0.5
    fold = json.loads((finished / DS / "ensembles" / "both" / "fold_0" / "metrics.json").read_text())
    members = [pd.read_parquet(finished / DS / e / "fold_0" / "predictions.parquet") for e in ("baseline", "batchnorm")]
    mine = pd.read_parquet(finished / DS / "ensembles" / "both" / "fold_0" / "predictions.parquet")
    key = ["set", "image_id"]
    mean = (members[0].set_index(key)["prob:Effusion"] + members[1].set_index(key)["prob:Effusion"]) / 2
    assert (
        mine.set_index(key)["prob:Effusion"] - mean.loc[mine.set_index(key).index]
    ).abs().max() < 1e-6  # float32 files
    assert fold["members"] == ["baseline", "batchnorm"] and len(fold["val"]["thresholds"]) == 4


def test_a_deleted_fold_is_rebuilt_alone_and_only_its_downstream_follows(finished, tmp_path):
    fold = f"{DS}/baseline/fold_1/metrics.json"
    # the fold's files as they were, with their times: put back after, so that the shared workflow is
    # whole again for the tests after this one without rerunning what follows the fold
    shutil.copytree(finished / DS / "baseline" / "fold_1", tmp_path / "fold_1")
    benchmark = finished / DS / "benchmarks" / "train_baseline_fold_1.tsv"  # the report reads it too
    shutil.copy2(benchmark, tmp_path / benchmark.name)
    (finished / fold).unlink()
    alone = run_snakemake(finished, "--cores", "2", "--dry-run", fold)
    assert planned(alone) == {"train": 1} and planned_folds(alone) == [("baseline", "1")]
    try:
        run_snakemake(finished, "--cores", "2", fold)
        after = run_snakemake(finished, "--cores", "2", "--dry-run")
    finally:
        shutil.rmtree(finished / DS / "baseline" / "fold_1")
        shutil.copytree(tmp_path / "fold_1", finished / DS / "baseline" / "fold_1")
        shutil.copy2(tmp_path / benchmark.name, benchmark)
    assert planned(after) == {
        "aggregate": 1,
        "compare_experiments": 1,
        "ensemble_fold": 1,
        "aggregate_ensemble": 1,
        "report": 1,
        "all": 1,
    }
    assert "experiment=baseline" in after.stdout and "experiment=batchnorm" not in after.stdout
    assert planned(run_snakemake(finished, "--cores", "2", "--dry-run")) == {}


def test_forcing_one_fold_retrains_only_that_fold(finished):
    target = f"{DS}/batchnorm/fold_0/metrics.json"
    proc = run_snakemake(finished, "--cores", "2", "--dry-run", "--forcerun", target)
    assert planned(proc)["train"] == 1 and planned_folds(proc) == [("batchnorm", "0")]


def test_changing_one_experiments_settings_reruns_only_its_folds(finished):
    config = finished / "config" / "config.yaml"
    original = config.read_text()
    try:
        changed = {**QUICK["experiments"]["batchnorm"], "lr": 0.002}
        workflow_dir(finished, {**QUICK, "experiments": {**QUICK["experiments"], "batchnorm": changed}})
        proc = run_snakemake(finished, "--cores", "2", "--dry-run")
    finally:
        config.write_text(original)
    assert planned(proc)["train"] == 3 and planned(proc)["train_repeat"] == 3  # both seeds of each fold
    assert planned_folds(proc) == [("batchnorm", "0"), ("batchnorm", "1"), ("batchnorm", "2")]


def test_a_bad_experiment_override_is_caught_before_any_job(tmp_path):
    work = workflow_dir(tmp_path, {"experiments": {"wide": {"modle": "lenet_wide"}, "fast": {"lr": -1}}})
    proc = run_snakemake(work, "--cores", "2", "--dry-run", check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr  # the first bad experiment met is named
    assert (
        "experiments.fast.lr: -1 is less than or equal to the minimum of 0" in text
        or "experiments.wide: Additional properties are not allowed ('modle' was unexpected)" in text
    )
    assert not (work / "results").exists()


def test_a_2x2_grid_is_four_jobs_per_fold_ranked_in_one_table(tmp_path):
    grid = {"sweep": {"batch_norm": True, "grid": {"lr": [0.001, 0.01], "batch_size": [16, 32]}}}
    # two folds and two epochs: what is checked is the grid's jobs and table, not how well it learns
    small = {"split": {"folds": 2}, "training": {**QUICK["training"], "epochs": 2}}
    work = workflow_dir(
        tmp_path,
        {
            **QUICK,
            **small,
            "experiments": grid,
            "evaluation": {**QUICK["evaluation"], "comparisons": {"pairs": []}},  # QUICK's pair is not here
            "variants": {},
            "ensembles": {},
            "explain": {"experiments": []},
            "export": {"experiments": []},
            "external": {},
        },
    )
    target = f"{DS}/grids/sweep.csv"
    proc = run_snakemake(work, "--cores", "2", "--dry-run", target)
    assert planned(proc)["train"] == 4 * 2 and planned(proc)["aggregate"] == 4 and planned(proc)["grid_table"] == 1
    names = sorted(set(re.findall(r"experiment=(sweep_[^,\s]+)", proc.stdout + proc.stderr)))
    assert names == [
        "sweep_lr~0.001_batch_size~16",
        "sweep_lr~0.001_batch_size~32",
        "sweep_lr~0.01_batch_size~16",
        "sweep_lr~0.01_batch_size~32",
    ]
    run_snakemake(work, "--cores", "2", target)
    table = pd.read_csv(work / target)
    assert table["rank"].tolist() == [1, 2, 3, 4] and sorted(table["experiment"]) == names
    scores = table["val.auroc_macro.mean"]
    assert scores.is_monotonic_decreasing and scores.notna().all() and (table["train_seconds.mean"] > 0).all()
    for _, row in table.iterrows():  # each row's values are the ones its combination trained with
        settings = json.loads((work / DS / row["experiment"] / "fold_0" / "metrics.json").read_text())["settings"]
        assert (settings["lr"], settings["batch_size"]) == (row["param:lr"], row["param:batch_size"])
        assert settings["batch_norm"] is True  # the experiment's other overrides hold for every combination
    # a chosen combination feeds compression like any experiment
    best = table["experiment"].iloc[0]
    work = workflow_dir(
        tmp_path / "feed",
        {
            **QUICK,
            **small,
            "experiments": grid,
            "evaluation": {**QUICK["evaluation"], "comparisons": {"pairs": []}},  # QUICK's pair is not here
            "ensembles": {},
            "explain": {"experiments": []},
            "export": {"experiments": []},
            "external": {},
            "variants": {"int8": {"method": "ptq"}},
            "compression": {"experiments": [best], "folds": []},
        },
    )
    proc = run_snakemake(work, "--cores", "2", "--dry-run")
    assert planned(proc)["compress"] == 2 and f"experiment={best}" in proc.stdout


def test_the_report_finds_the_subgroup_the_demo_makes_weaker(finished):
    # in the demo's patients aged 65+ findings are faint or unseen (medfold.data.demo.finding_strength)
    subgroups = pd.read_csv(finished / DS / "batchnorm" / "cv" / "subgroups.csv")
    age = subgroups[(subgroups["subgroup"] == "age") & (subgroups["metric"] == "auroc_macro")].set_index("group")
    others = age.drop(index=["all", "65+"])
    others = others[~others["too_small"]]
    assert len(others) >= 2 and age.loc["<18", "too_small"] and pd.isna(age.loc["<18", "value"])  # 6 images < 15
    weak = age.loc["65+", "value"]
    assert weak < age.loc["all", "value"] - 0.1 and (others["value"] > weak + 0.1).all(), age
    assert age.loc["65+", "ci_low"] < weak < age.loc["65+", "ci_high"]
    assert age["images"].drop(index="all").sum() == age.loc["all", "images"]  # every test image in one band
    html = (finished / DS / "report" / "index.html").read_text()
    section = html[html.index("Clinical evaluation of batchnorm") :]
    row = section[section.index('<td class="l">65+</td>') :][:200]
    assert f"<td>{weak:.3f} [{age.loc['65+', 'ci_low']:.3f}, {age.loc['65+', 'ci_high']:.3f}]</td>" in row
    assert "too small" in html and "Clinical evaluation of batchnorm" in html


def test_calibration_operating_points_patients_and_paired_comparisons_are_written(finished):
    record = json.loads((finished / DS / "batchnorm" / "cv" / "clinical.json").read_text())
    calibration = record["calibration"]
    assert set(calibration["temperatures"]) == {"0", "1", "2"} and all(
        0.05 < t < 20 for t in calibration["temperatures"].values()
    )
    for stage in ("before", "after"):
        assert set(calibration[stage]) == {"Cardiomegaly", "Effusion", "Nodule", "Pneumonia"}
        assert all(0 <= r["ece"] <= 1 and 0 <= r["brier"] <= 1 for r in calibration[stage].values())
    test_images = len(pd.read_parquet(finished / DS / "batchnorm" / "cv" / "test_predictions.parquet"))
    assert all(sum(r["count"]) == test_images for r in calibration["before"].values())
    points = pd.read_csv(finished / DS / "batchnorm" / "cv" / "operating_points.csv")
    assert set(points["target"]) == {"youden", "specificity", "sensitivity"} and len(points) == 4 * 5
    reached = points[points["target"] == "specificity"].dropna(subset=["threshold"])
    assert (reached["val.specificity"] >= reached["target_value"] - 1e-9).all()  # chosen on validation to reach it
    level = record["patient_level"]
    assert (
        level["image"]["images"] == test_images
        and level["patient"]["rows"] == level["patient"]["patients"] < test_images
    )
    comparisons = pd.read_csv(finished / DS / "comparisons.csv")
    best = pd.read_csv(finished / DS / "experiments.csv").query("best")["experiment"].iloc[0]
    # the best against every other, then QUICK's configured pair (batchnorm, baseline) unless already there
    pairs = {(best, other) for other in {"baseline", "batchnorm", "both"} - {best}}
    if not {("batchnorm", "baseline"), ("baseline", "batchnorm")} & pairs:
        pairs.add(("batchnorm", "baseline"))
    assert set(zip(comparisons["a"], comparisons["b"])) == pairs
    per_class = comparisons[comparisons["class"] != "macro"]
    assert per_class["delong_p"].between(0, 1).all() and len(per_class) == 4 * len(pairs)
    assert ((per_class["difference"] - (per_class["auroc_a"] - per_class["auroc_b"])).abs() < 1e-12).all()
    assert (
        (per_class["delong_ci_low"] < per_class["difference"]) & (per_class["difference"] < per_class["delong_ci_high"])
    ).all()
