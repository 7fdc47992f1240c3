"""The real snakemake on the demo data, up to the leakage check."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, SNAKEMAKE, run_snakemake, workflow_dir

pytestmark = pytest.mark.workflow
TARGET = "results/{name}/split_check.json"


def test_demo_workflow_indexes_splits_and_proves_the_split_leak_free(tmp_path):
    work = workflow_dir(tmp_path)
    run_snakemake(work, "--cores", "2", TARGET.format(name="demo_cxr14"))
    out = work / "results" / "demo_cxr14"
    check = json.loads((out / "split_check.json").read_text())
    report = json.loads((out / "index_report.json").read_text())
    rows = pd.read_csv(work / "resources" / "demo" / "cxr14" / "Data_Entry.csv")
    # one file is listed twice in the demo's table (under two patients): one image
    files = rows["Image Index"].nunique()
    assert check["verdict"] == "leak-free" and check["images_checked"] == files == report["images_indexed"]
    assert (
        report["near_duplicates"]["clusters_joining_patients_or_sources"] == 12
    )  # the planted copies: 8 transformed, 4 re-published
    assert check["near_duplicate_clusters_crossing_sets"] == 0
    assert check["sets"] == ["fold_0", "fold_1", "fold_2", "test"]
    splits = pd.read_parquet(out / "splits.parquet")
    assert splits.groupby("patient_id")["fold"].nunique().max() == 1
    # a second run has nothing to do
    again = run_snakemake(work, "--cores", "2", "--dry-run", TARGET.format(name="demo_cxr14"))
    assert "Nothing to be done" in again.stdout + again.stderr


def test_folder_form_reports_the_source_leak_and_resplits(tmp_path):
    # the preset alone: a config file of one's own replaces the demo's
    work = workflow_dir(
        tmp_path, yaml.safe_load((REPO / "config" / "examples" / "demo_folders.yaml").read_text()), base=None
    )
    run_snakemake(work, "--cores", "2", TARGET.format(name="demo_folders"))
    summary = json.loads((work / "results" / "demo_folders" / "split_summary.json").read_text())
    # the 8 planted copies, each joined to its original as a near-duplicate; one of them is a copy of a
    # person1 film, and person1 crosses the folders in its own right too (a film of its own in each)
    leaks = summary["source_leaks"]
    assert len(leaks) == 8 and all(len(leak["near_duplicates"]) == 1 for leak in leaks)
    (person1,) = [leak for leak in leaks if "person1" in leak["patients"]]
    copies = {name for pair in person1["near_duplicates"] for name in pair.split(" ") if "/" in name}
    assert set(person1["test_images"]) - copies == {"test/Effusion/person1_effusion_2.png"}
    assert set(person1["other_images"]) - copies == {"train/Effusion/person1_effusion_1.png"}
    assert json.loads((work / "results" / "demo_folders" / "split_check.json").read_text())["verdict"] == "leak-free"


@pytest.mark.parametrize("identifiers", ["raw", "pseudonymized"])
def test_source_leak_with_stop_fails_the_workflow_naming_the_patient(tmp_path, identifiers):
    overrides = yaml.safe_load((REPO / "config" / "examples" / "demo_folders.yaml").read_text())
    overrides["split"]["on_source_leak"] = "stop"
    overrides["privacy"]["identifiers"] = identifiers
    work = workflow_dir(tmp_path, overrides, base=None)
    proc = run_snakemake(work, "--cores", "2", TARGET.format(name="demo_folders"), check=False)
    assert proc.returncode != 0
    log = (work / "results" / "demo_folders" / "logs" / "split.log").read_text()
    assert "split failed" in log and "Traceback" not in log and "split.on_source_leak is 'stop'" in proc.stderr
    assert ("person1" in log) == ("person1" in proc.stderr) == (identifiers == "raw")  # shared: pseudonyms
    # the data's owner finds the real file names beside the privacy key, named in the message
    refused = work / "results" / "split_refused_demo_folders.csv"
    assert (work / "results" / "privacy.key").exists() == (identifiers == "pseudonymized")
    assert str(refused) in proc.stderr or "split_refused_demo_folders.csv" in proc.stderr
    crossing = pd.read_csv(refused)
    person1 = crossing[crossing["patient_id"] == "person1"]
    assert {"test/Effusion/person1_effusion_2.png", "train/Effusion/person1_effusion_1.png"} <= set(person1["image_id"])
    assert set(crossing["side"]) == {"test", "other"} and crossing["path"].map(lambda p: (work / p).is_file()).all()


def test_config_errors_are_caught_by_the_schema_before_any_job_runs(tmp_path):
    work = workflow_dir(tmp_path, {"split": {"folds": 0}, "dataset": {"task": "multi-label"}})
    proc = run_snakemake(work, "--cores", "2", check=False)
    assert proc.returncode != 0
    # the schema reports the first violation it meets, naming the value and the rule it breaks
    assert "0 is less than the minimum of 1" in proc.stderr or "'multi-label' is not one of" in proc.stderr
    assert not (work / "results").exists() and not (work / "resources").exists()


@pytest.mark.parametrize(
    "evaluation, message",
    [
        ({"subgroups": [{"column": "Patient Age", "bands": []}]}, "[] should be non-empty"),
        (
            {"comparisons": {"pairs": [["baseline", "nope"]]}},
            "evaluation.comparisons.pairs: ['nope'] are neither experiments nor ensembles",
        ),
        ({"operating_points": {"specificity": [1.5]}}, "1.5 is greater than the maximum of 1"),
    ],
)
def test_evaluation_settings_are_checked_before_any_job_runs(tmp_path, evaluation, message):
    work = workflow_dir(tmp_path, {"evaluation": evaluation})
    proc = run_snakemake(work, "--cores", "2", "--dry-run", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in text, text[-2000:]
    assert not (work / "results").exists()


def test_a_missing_column_stops_the_index_with_the_file_and_key(tmp_path):
    work = workflow_dir(tmp_path, {"dataset": {"patient_column": "PatientID"}})
    proc = run_snakemake(work, "--cores", "2", check=False)
    assert proc.returncode != 0
    assert "column 'PatientID' (dataset.patient_column) not found" in proc.stderr and "Data_Entry.csv" in proc.stderr


def test_lint_is_clean_and_rules_are_snakefmt_formatted():
    proc = subprocess.run([*SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    snakefmt = Path(sys.executable).with_name("snakefmt")
    fmt = subprocess.run(
        [str(snakefmt), "--check", "workflow/Snakefile", "workflow/rules"], cwd=REPO, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_python_code_passes_ruff_lint_and_format():
    # settings in pyproject.toml ([tool.ruff]): 120 columns, pycodestyle, pyflakes, imports, bugbear
    ruff = Path(sys.executable).with_name("ruff")
    lint = subprocess.run([str(ruff), "check", "."], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run([str(ruff), "format", "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_jobs_import_medfold_from_the_workflows_own_src(tmp_path):
    # a copy of the workflow whose medfold differs from the one installed in this venv: its jobs
    # must run the copy's (the Snakefile puts src/ on PYTHONPATH), as they do in a conda
    # environment that installs the dependencies alone (envs/medfold.yaml)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("workflow", "src", "config", "envs"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(
            source, copy / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if source.is_dir() else {})
        )
    demo = copy / "src" / "medfold" / "data" / "demo.py"
    marker = tmp_path / "marker"
    demo.write_text(demo.read_text() + f"\nPath({str(marker)!r}).write_text(__file__)\n")
    proc = subprocess.run(
        [*SNAKEMAKE, "--cores", "1", "resources/demo/cxr14/Data_Entry.csv"], cwd=copy, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.read_text() == str(demo)
    assert "- -e " not in (REPO / "envs" / "medfold.yaml").read_text()
