"""A config of one's own, as README's "Your own data" says to run it: exactly what it names runs."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO, SNAKEFILE, planned

from medfold.data.demo import generate_folders

OWN = {
    "dataset": {"name": "my_xrays", "format": "folders", "root": "data/chest_xray", "patient_regex": r"^(person\d+)_"},
    "experiments": {"small": {"image_size": 32, "epochs": 2}},
}


def _readme_command(work, *extra):
    """README: `snakemake --cores 8 --configfile my_dataset.yaml`, run where the demo's
    config/config.yaml also lies (as in the repository's root)."""
    command = next(
        line
        for line in (REPO / "README.md").read_text().splitlines()
        if line.startswith("snakemake --cores 8 --configfile my_dataset.yaml")
    )
    args = command.split("  #", 1)[0].split()[1:]  # the comment after the command is not part of it
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), *args, *extra],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_config_of_ones_own_plans_exactly_its_one_experiment(tmp_path):
    generate_folders(tmp_path / "data" / "chest_xray", 30, 0)
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config" / "config.yaml")  # the demo, beside it
    (tmp_path / "my_dataset.yaml").write_text(yaml.safe_dump(OWN))
    proc = _readme_command(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 3 folds (the schema's default) of one experiment; no demo experiments, grid, ensembles,
    # explanations or variants (before: 61 jobs, 21 of them training)
    assert planned(proc) == {
        "index": 1,
        "cache": 1,
        "split": 1,
        "check_split": 1,
        "train": 3,
        "aggregate": 1,
        "compare_experiments": 1,
        "report": 1,
        "all": 1,
    }
    assert "demo_cxr14" not in proc.stdout and "Cardiomegaly" not in proc.stdout


def test_no_config_file_still_runs_the_demo(tmp_path):
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config" / "config.yaml")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(SNAKEFILE),
            "--cores",
            "2",
            "--dry-run",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    jobs = planned(proc)
    assert jobs["demo_cxr14"] == jobs["demo_site_b"] == 1 and "demo_dicom" not in jobs  # the forms it reads
    assert jobs["compress"] > 0 and jobs["explain"] > 0 and jobs["grid_table"] == 1
    # the demo stays a few minutes' run on 2 cores (README's make demo): every stage is there,
    # and the job count is kept in check (57 jobs and 16 minutes before it was cut down; 39 before
    # the export and the second site's index and validation, about 45 s together)
    assert jobs["train"] == 12 and jobs["compress"] == 4 and jobs["explain"] == 1 and jobs["aggregate_ensemble"] == 1
    assert jobs["export"] == jobs["external_index"] == jobs["external_validate"] == 1
    assert sum(jobs.values()) <= 43, jobs  # the demo data in two jobs since its forms were made apart


def test_compression_and_explanation_folds_must_exist(tmp_path):
    from conftest import run_snakemake, workflow_dir

    work = workflow_dir(tmp_path, {"compression": {"folds": [0, 7]}})
    proc = run_snakemake(work, "--dry-run", check=False)
    assert proc.returncode != 0
    assert "compression.folds: folds [7] do not exist (split.folds gives folds [0, 1, 2])" in proc.stdout + proc.stderr


def test_an_experiment_can_train_on_chosen_folds_only(tmp_path):
    """A grid tuned on fold 0 (study 002 tuned on Fold0): one training per combination; an
    ensemble or a compression that needs the other folds of it is refused before any job."""
    from conftest import planned, run_snakemake, workflow_dir

    tuned = {"baseline": {}, "tune": {"folds": [0], "grid": {"lr": [0.001, 0.003, 0.01]}}}
    plain = {
        "variants": {},
        "ensembles": {},
        "explain": {"experiments": []},
        "export": {"experiments": []},
        "external": {},
    }
    work = workflow_dir(tmp_path / "ok", {**plain, "experiments": tuned})
    jobs = planned(run_snakemake(work, "--dry-run"))
    assert jobs["train"] == 3 + 3 * 1 and jobs["grid_table"] == 1 and jobs["aggregate"] == 4
    bad = {**plain, "experiments": tuned, "ensembles": {"all": {"experiments": ["baseline", "tune_lr~0.01"]}}}
    proc = run_snakemake(workflow_dir(tmp_path / "bad", bad), "--dry-run", check=False)
    assert proc.returncode != 0
    assert (
        "ensembles.all.experiments: experiment 'tune_lr~0.01' trains on folds [0] only (its folds key), "
        "not on folds [1, 2]" in proc.stdout + proc.stderr
    )
    unknown = {**plain, "experiments": {"tune": {"folds": [5], "grid": {"lr": [0.001]}}}}
    proc = run_snakemake(workflow_dir(tmp_path / "unknown", unknown), "--dry-run", check=False)
    assert "experiments.tune_lr~0.001.folds: folds [5] do not exist" in proc.stdout + proc.stderr


def _covid_table(root):
    """A public COVID-19 collection's metadata as it comes: X-ray and CT, several views, raw
    findings to be mapped, one row to be done."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    rows = []
    findings = ["COVID-19", "COVID-19, ARDS", "Pneumonia/Viral/SARS", "No Finding", "todo"]
    for i in range(40):
        name = f"img_{i:03d}.png"
        Image.fromarray(np.full((32, 32), 10 * (i % 20), np.uint8)).save(root / name)
        rows.append(
            {
                "filename": name,
                "patientid": f"p{i // 2}",
                "finding": findings[i % 5],
                "modality": "CT" if i % 8 == 7 else "X-ray",
                "view": ["PA", "AP", "L", "AP Supine"][i % 4],
            }
        )
    table = pd.DataFrame(rows)
    table.to_csv(root / "metadata.csv", index=False)
    return table


def test_rows_are_selected_and_raw_findings_mapped_with_every_omission_counted(tmp_path, demo_dir):
    import pytest
    from conftest import csv_dataset

    from medfold.core.errors import ConfigError
    from medfold.data.index.build import build_index

    table = _covid_table(tmp_path)
    query = "modality == 'X-ray' and view in ['PA', 'AP']"
    ds = csv_dataset(
        demo_dir,
        table=str(tmp_path / "metadata.csv"),
        root=str(tmp_path),
        path_column="filename",
        label_column="finding",
        label_separator=None,
        patient_column="patientid",
        task="binary",
        labels=["Other", "COVID"],
        no_finding_label=None,
        filter=query,
        label_map={"COVID-19": "COVID", "COVID-19, ARDS": "COVID", "todo": None},
        unmapped_label="Other",
    )
    index, report = build_index(ds)
    selected = table.query(query)
    kept = selected[selected["finding"] != "todo"]
    assert report["rows_left_out"] == {
        "dataset.filter": len(table) - len(selected),
        "no class after dataset.label_map": int((selected["finding"] == "todo").sum()),
    }
    assert set(index["image_id"]) == set(kept["filename"])
    covid = set(kept.loc[kept["finding"].str.startswith("COVID"), "filename"])
    assert set(index.loc[index["labels"].map(lambda labels: labels == ["COVID"]), "image_id"]) == covid
    others = kept.loc[~kept["finding"].str.startswith("COVID"), "finding"].value_counts().to_dict()
    assert report["label_map"]["unmapped_raw_labels"] == others and set(others) == {
        "Pneumonia/Viral/SARS",
        "No Finding",
    }
    with pytest.raises(ConfigError, match=r"dataset.filter .*'modalty'.* its columns are \['filename'"):
        build_index({**ds, "filter": "modalty == 'X-ray'"})
    with pytest.raises(ConfigError, match=r"dataset.filter .* cannot be evaluated"):
        build_index({**ds, "filter": "modality ==="})
    with pytest.raises(ConfigError, match=r"dataset.filter .* leaves none of the 40 rows"):
        build_index({**ds, "filter": "modality == 'MRI'"})


def test_medfold_init_writes_a_starter_config_that_plans(tmp_path):
    medfold = str(__import__("pathlib").Path(sys.executable).parent / "medfold")
    help_text = subprocess.run([medfold, "--help"], capture_output=True, text=True).stdout
    assert "predict" in help_text and "init" in help_text
    proc = subprocess.run(
        [medfold, "init", "--preset", "kermany_pneumonia", "mine.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "snakemake --cores 8 --configfile mine.yaml" in proc.stdout
    config = yaml.safe_load((tmp_path / "mine.yaml").read_text())
    assert config["dataset"]["name"] == "kermany_pneumonia"
    again = subprocess.run(
        [medfold, "init", "--preset", "kermany_pneumonia", "mine.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert again.returncode == 1 and "mine.yaml exists" in again.stderr and "Traceback" not in again.stderr
    wrong = subprocess.run([medfold, "init", "--preset", "nih"], cwd=tmp_path, capture_output=True, text=True)
    assert wrong.returncode == 1 and "'nih_cxr14'" in wrong.stderr


def _readme_block(heading: str) -> list[str]:
    """The commands of the README's code block under ``heading``, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = text.split(heading, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readmes_ten_lines_on_ones_own_data_run_as_written(tmp_path):
    """README's "Your own data, in ten lines", on a folder per class at data/chest_xray (the demo's
    folder form): medfold plan writes the config, the snakemake lines plan (dry run) its whole
    workflow and the one fold asked for; presets and init run; predict and export parse as the
    medfold command reads them (tests/test_predict.py and test_export.py run them on a trained demo)."""
    from medfold.cli import _parser
    from medfold.data.demo import generate_folders

    lines = _readme_block("## Your own data, in ten lines")
    assert lines[0] == ". .venv/bin/activate" and len(lines) <= 10 and lines[1].startswith("medfold plan ")
    generate_folders(tmp_path / "data" / "chest_xray", 40, 0)
    bin_dir = Path(sys.executable).parent
    for line in lines[1:]:
        words = line.split()
        if words[0] == "medfold" and words[1] in ("plan", "presets", "init"):
            proc = subprocess.run(
                [str(bin_dir / "medfold"), *words[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600
            )
            assert proc.returncode == 0, proc.stderr
            if words[1] == "plan":
                planned_config = yaml.safe_load((tmp_path / "my_dataset.yaml").read_text())
                assert (tmp_path / planned_config["plan"]).is_file()
            else:
                assert "kermany_pneumonia" in proc.stdout or (tmp_path / "study.yaml").exists()
        elif words[0] == "medfold":
            parsed = _parser().parse_args(words[1:])
            assert parsed.command in ("predict", "export") and parsed.out
        elif "--profile" in words:
            assert (
                words[words.index("--profile") + 1] == "slurm"
                and (REPO / "slurm").resolve() == (REPO / "profiles" / "slurm").resolve()
            )  # the profile test_slurm.py runs
        else:
            assert words[0] == "snakemake"
            proc = subprocess.run(
                [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), *words[1:], "--dry-run"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
            jobs = planned(proc)
            if any(w.endswith("metrics.json") for w in words):  # one fold asked for: its training alone
                assert jobs["train"] == 1 and "report" not in jobs
            else:  # the planned experiment on each of the planned folds, and the report
                assert jobs["train"] == planned_config["split"]["folds"] and jobs["report"] == 1
