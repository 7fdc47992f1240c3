"""A config of one's own, as README's "Your own data" says to run it: exactly what it names runs."""

import shutil
import subprocess
import sys

import yaml

from conftest import REPO, planned
from medfold.demo import generate_folders

OWN = {"dataset": {"name": "my_xrays", "format": "folders", "root": "data/chest_xray",
                   "patient_regex": r"^(person\d+)_"},
       "experiments": {"small": {"image_size": 32, "epochs": 2}}}


def _readme_command(work, *extra):
    """README: `snakemake --cores 8 --configfile my_dataset.yaml`, run where the demo's
    config/config.yaml also lies (as in the repository's root)."""
    command = next(line for line in (REPO / "README.md").read_text().splitlines()
                   if line.startswith("snakemake --cores 8 --configfile my_dataset.yaml"))
    args = command.split()[1:]
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args, *extra],
                          cwd=work, capture_output=True, text=True, timeout=600)


def test_a_config_of_ones_own_plans_exactly_its_one_experiment(tmp_path):
    generate_folders(tmp_path / "data" / "chest_xray", 30, 0)
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config" / "config.yaml")  # the demo, beside it
    (tmp_path / "my_dataset.yaml").write_text(yaml.safe_dump(OWN))
    proc = _readme_command(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 3 folds (the schema's default) of one experiment; no demo experiments, grid, ensembles,
    # explanations or variants (before: 61 jobs, 21 of them training)
    assert planned(proc) == {"index": 1, "cache": 1, "split": 1, "check_split": 1, "train": 3, "aggregate": 1,
                             "compare_experiments": 1, "report": 1, "all": 1}
    assert "demo_data" not in proc.stdout and "Cardiomegaly" not in proc.stdout


def test_no_config_file_still_runs_the_demo(tmp_path):
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config" / "config.yaml")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2",
                           "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    jobs = planned(proc)
    assert jobs["demo_data"] == 1 and jobs["compress"] > 0 and jobs["explain"] > 0 and jobs["grid_table"] == 1
