"""The real snakemake through training and aggregation: one fold on request, only what changed reruns."""

import json
import re

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
        assert per_fold["fold"].tolist() == [0, 1, 2] and per_fold["epochs_trained"].eq(3).all()
        summary = json.loads((finished / DS / exp / "cv" / "summary.json").read_text())
        stats = summary["statistics"]["test.auroc_macro"]
        assert set(stats) == {"count", "mean", "std", "min", "25%", "50%", "75%", "max"} and stats["count"] == 3
        assert set(summary["per_class_auroc"]["test"]) == {"Cardiomegaly", "Effusion", "Nodule", "Pneumonia"}
        ensemble = json.loads((finished / DS / exp / "cv" / "ensemble_test.json").read_text())
        assert ensemble["models"] == 3 and len(ensemble["ci95"]["auroc_macro"]) == 2
    table = pd.read_csv(finished / DS / "experiments.csv")
    assert sorted(table["experiment"]) == ["baseline", "batchnorm"] and table["best"].sum() == 1


def test_a_deleted_fold_is_rebuilt_alone_and_only_its_downstream_follows(finished):
    fold = f"{DS}/baseline/fold_1/metrics.json"
    (finished / fold).unlink()
    proc = run_snakemake(finished, "--cores", "2", "--dry-run", fold)
    assert planned(proc) == {"train": 1} and planned_folds(proc) == [("baseline", "1")]
    run_snakemake(finished, "--cores", "2", fold)
    after = run_snakemake(finished, "--cores", "2", "--dry-run")
    assert planned(after) == {"aggregate": 1, "compare_experiments": 1, "report": 1, "all": 1}
    assert "experiment=baseline" in after.stdout and "experiment=batchnorm" not in after.stdout


def test_forcing_one_fold_retrains_only_that_fold(finished):
    target = f"{DS}/batchnorm/fold_0/metrics.json"
    proc = run_snakemake(finished, "--cores", "2", "--dry-run", "--forcerun", target)
    assert planned(proc)["train"] == 1 and planned_folds(proc) == [("batchnorm", "0")]


def test_changing_one_experiments_settings_reruns_only_its_folds(finished):
    config = finished / "config" / "config.yaml"
    original = config.read_text()
    try:
        workflow_dir(finished, {**QUICK, "experiments": {"baseline": {}, "batchnorm": {"batch_norm": True, "lr": 0.002}}})
        proc = run_snakemake(finished, "--cores", "2", "--dry-run")
    finally:
        config.write_text(original)
    assert planned(proc)["train"] == 3
    assert planned_folds(proc) == [("batchnorm", "0"), ("batchnorm", "1"), ("batchnorm", "2")]


def test_a_bad_experiment_override_is_caught_before_any_job(tmp_path):
    work = workflow_dir(tmp_path, {"experiments": {"wide": {"modle": "lenet_wide"}, "fast": {"lr": -1}}})
    proc = run_snakemake(work, "--cores", "2", "--dry-run", check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr  # the first bad experiment met is named
    assert "experiments.fast.lr: -1 is less than or equal to the minimum of 0" in text or \
        "experiments.wide: Additional properties are not allowed ('modle' was unexpected)" in text
    assert not (work / "results").exists()
