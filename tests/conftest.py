"""Shared fixtures: the validated default config, generated demo data, a runner for the real snakemake."""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from filelock import FileLock
from snakemake.utils import validate

# `make test` runs the suite in two pytest-xdist workers, so two workflows often share the 2 cores:
# OpenMP threads that spin while they wait (libgomp's default) then take cores from the other
# worker's jobs. Sleeping waits (set before torch is imported, here and in every job) made a pair of
# workflow tests 1.13 x faster in parallel (238 -> 211 s, measured); results do not depend on it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
SNAKEFILE = REPO / "workflow" / "Snakefile"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def resolved_config(overrides: dict | None = None, base: Path | None = REPO / "config" / "config.yaml") -> dict:
    """The config as the workflow sees it: base file, overrides merged, schema defaults filled."""
    config = yaml.safe_load(base.read_text()) if base else {}
    merge(config, overrides or {})
    validate(config, str(SCHEMA))
    return config


def merge(into: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder ``build(folder)`` fills once per test session, shared by the xdist workers: the
    first to ask builds it under a lock, the others wait for it and then read it."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / f"shared-{name}"
    with FileLock(str(shared / f"shared-{name}.lock")):
        if not (shared / f"shared-{name}.done").exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            (shared / f"shared-{name}.done").touch()
    return folder


# The xdist groups: the tests of one module run in one worker (their module fixtures are built once);
# the Slurm tests share one group (each starts a real cluster on the default ports and
# /etc/slurm); the modules that read the trained workflow share another (test_report edits and
# restores its files while the others read them). The heaviest groups are handed out first (their
# cost measured in a sequential run), so that the two workers end together. (A scheduler of our own:
# xdist 3.8's `loadgroup` writes the group into an attribute that pytest 9 no longer reads.)
SLURM_MODULES = {"test_slurm", "test_two_nodes"}
HEAVY_FIRST = ["trained_workflow", "test_faults", "slurm", "test_bench", "test_presets", "test_tracking"]


@functools.cache  # the scheduler asks once per test id; a module's file is read once
def xdist_group(path: str) -> str:
    """The group of a test module (its path, as a test id begins)."""
    module = Path(path).stem
    if module in SLURM_MODULES:
        return "slurm"
    if "trained_workflow" in (REPO / path).read_text():
        return "trained_workflow"
    return module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid.split("::")[0])

    return ByGroup(config, log)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    # stable: file order within a rank
    items.sort(key=lambda item: rank.get(xdist_group(item.nodeid.split("::")[0]), len(rank)))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from medfold.data.demo import generate_demo

    return built_once(
        tmp_path_factory, "demo", lambda out: generate_demo(out, cxr14_patients=150, folder_patients=90, seed=0)
    )


def csv_dataset(demo_dir: Path, **overrides) -> dict:
    return resolved_config(
        {
            "dataset": {
                "table": str(demo_dir / "cxr14" / "Data_Entry.csv"),
                "root": str(demo_dir / "cxr14" / "images"),
                **overrides,
            }
        }
    )["dataset"]


def prepare_demo(root: Path, demo_dir: Path, size: int = 64) -> Path:
    """The demo's index, split and ``size`` px cache under ``root``, built with the library."""
    from medfold.data.cache import build_cache
    from medfold.data.index.build import build_index
    from medfold.data.index.io import write_index
    from medfold.split import make_splits

    table, report = build_index(csv_dataset(demo_dir), threads=2)
    write_index(table, report, root / "index.parquet", root / "index_report.json")
    splits, _ = make_splits(table, report["classes"], resolved_config()["split"])
    splits.to_parquet(root / "splits.parquet", index=False)
    build_cache(table, root / "cache", size, 1, threads=2)
    return root


def folder_dataset(root: Path, **overrides) -> dict:
    base = {
        "format": "folders",
        "task": "multiclass",
        "root": str(root),
        "table": None,
        "labels": [],
        "patient_column": None,
        "patient_regex": r"^(person\d+)_",
    }
    return resolved_config({"dataset": {**base, **overrides}})["dataset"]


def workflow_dir(
    tmp_path: Path, overrides: dict | None = None, base: Path | None = REPO / "config" / "config.yaml"
) -> Path:
    """A working directory for a real snakemake run: the repo's Snakefile, a config built from
    ``base`` (None: the overrides alone, as a config of one's own) and ``overrides``; results and
    demo data are written under ``tmp_path``."""
    config = yaml.safe_load(base.read_text()) if base else {}
    overrides = dict(overrides or {})
    for key in ("experiments", "variants", "ensembles", "external"):  # these maps replace the base config's
        if key in overrides:
            config[key] = overrides.pop(key)
    merge(config, overrides)
    (tmp_path / "config").mkdir(parents=True, exist_ok=True)
    (tmp_path / "config" / "config.yaml").write_text(
        yaml.safe_dump(config, sort_keys=False)
    )  # grid names follow key order
    return tmp_path


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    """The real snakemake on the repository's Snakefile, in ``workdir`` with its own config."""
    return [
        *SNAKEMAKE,
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config" / "config.yaml"),
        *args,
    ]


def run_snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: int = 1500, env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd = snakemake_command(workdir, *args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


# training and evaluation only: no variants, ensembles, explanations, exports or other sites
TRAINING_ONLY = {
    "variants": {},
    "compression": {"experiments": []},
    "ensembles": {},
    "explain": {"experiments": []},
    "export": {"experiments": []},
    "external": {},
}


def seed_data_stages(source: Path, work: Path, dataset: str = "results/demo_cxr14", size: int = 64) -> None:
    """Copy a finished workflow's demo data, index, split and cache into ``work`` (mtimes kept),
    so that a test of the training jobs runs those alone. ``work``'s config must have the same
    dataset and split settings as ``source``'s (QUICK's)."""
    import shutil

    shutil.copytree(source / "resources", work / "resources")
    (work / dataset / "cache").mkdir(parents=True)
    for item in (source / dataset).iterdir():
        if item.is_file():
            shutil.copy2(item, work / dataset / item.name)
    shutil.copytree(source / dataset / "cache" / str(size), work / dataset / "cache" / str(size))


def train_command(settings_file: Path, prepared: Path, fold: int, out: Path, threads: int = 2) -> list[str]:
    """``python -m medfold.training.train`` for one fold of a prepared demo (index, splits, cache), as a
    launcher or a resumed job would start it."""
    return [
        sys.executable,
        "-m",
        "medfold.training.train",
        "--settings",
        str(settings_file),
        "--index",
        str(prepared / "index.parquet"),
        "--splits",
        str(prepared / "splits.parquet"),
        "--cache",
        str(prepared / "cache"),
        "--fold",
        str(fold),
        "--out",
        str(out),
        "--threads",
        str(threads),
    ]


def slurm_cluster(state: Path, nodes: int = 1):
    """A real Slurm cluster (tests/cluster/slurm.sh) for a fixture to yield from: the environment
    its client commands need. ``nodes`` >= 2: one slurmd per simulated node, each in its own
    network namespace, with its own address and host name. Stopped when the fixture ends."""
    script = REPO / "tests" / "cluster" / "slurm.sh"
    subprocess.run(["bash", str(script), "start", str(state), str(nodes)], check=True, timeout=180)
    try:
        yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "PYTHONUNBUFFERED": "1"}
    finally:
        subprocess.run(["bash", str(script), "stop", str(state)], timeout=60)


# the project's profile, as typed in the repository root; the test cluster is idle and its jobs
# last seconds, so the executor looks at the queue 2 s after a submission instead of the profile's
# 20 (which suits a busy cluster, and made each stage of a test run wait 20-60 s for nothing)
SLURM = ("--cores", "8", "--profile", "slurm", "--slurm-init-seconds-before-status-checks", "2")


def snakemake_slurm(work: Path, env: dict, *args: str, cwd: Path | None = None, timeout: int = 900):
    """The workflow in ``work`` through ``--profile slurm``, typed in the repository root."""
    cmd = snakemake_command(work, *SLURM, *args)
    return subprocess.run(cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)


def sbatch_calls(text: str) -> list[str]:
    """The sbatch command lines a ``--verbose`` run through the Slurm executor printed."""
    return re.findall(r"sbatch call: (.*)", text)


def planned(proc) -> dict[str, int]:
    """Job counts per rule from a dry run's 'Job stats' table ({} when nothing is to be done)."""
    text = proc.stdout + proc.stderr
    if "Job stats:" not in text:
        assert "Nothing to be done" in text, text[-3000:]
        return {}
    table = text[text.index("Job stats:") :]
    return {
        m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M) if m.group(1) != "total"
    }


# tiny training: the tests that use it are about what runs, not how well (test_train.py checks learning)
QUICK = {
    "training": {"epochs": 3, "early_stopping": {"enabled": False}},
    # two seeds of every fold (test_repeats): the fold ensembles average 6 models
    "experiments": {"baseline": {"repeats": 2}, "batchnorm": {"batch_norm": True, "repeats": 2}},
    # the two experiments' own pair too (the reference is the best, the "both" ensemble)
    "evaluation": {"bootstrap": 200, "comparisons": {"pairs": [["batchnorm", "baseline"]]}},
    "variants": {
        "pruned": {
            "method": "prune",
            "epochs": 2,
            "pruning": {
                "initial_sparsity": 0.2,
                "final_sparsity": 0.6,
                "start_epoch": 0.5,
                "end_epoch": 1.5,
                "update_every": 3,
            },
        },
        "int8": {"method": "ptq", "calibration_images": 128},
    },
    # every fold's model compressed and explained (the demo does fold 0's only)
    "compression": {"experiments": ["batchnorm"], "folds": [], "latency": {"repeats": 5}},
    "ensembles": {"both": {"experiments": ["baseline", "batchnorm"]}},
    "explain": {"experiments": ["batchnorm"], "folds": [], "images_per_class": 1, "lime": {"samples": 60}},
}


PROGRESS_EVERY_TWENTIETH = {"MEDFOLD_PROGRESS_SECONDS": "0.05"}


@pytest.fixture(scope="session")
def trained_workflow(tmp_path_factory) -> Path:
    """The whole workflow, report included, run once with QUICK training. While developing,
    MEDFOLD_TRAINED_WORKFLOW=<a finished run's folder> reuses that run (brought up to date first)."""
    reuse = os.environ.get("MEDFOLD_TRAINED_WORKFLOW")
    if reuse:
        run_snakemake(Path(reuse), "--cores", "2")
        return Path(reuse)
    # the Slurm group seeds its runs from it too, in the other worker: built once, under a lock;
    # its jobs print progress lines every 0.05 s (test_progress reads them in its logs)
    return built_once(
        tmp_path_factory,
        "trained_workflow",
        lambda work: run_snakemake(workflow_dir(work, QUICK), "--cores", "2", env=PROGRESS_EVERY_TWENTIETH),
    )


def planted_label_errors(demo_dir: Path) -> set[str]:
    """The demo's films whose listed labels the film contradicts (medfold.data.demo._flip_labels)."""
    import pandas as pd

    return set(pd.read_csv(demo_dir / "cxr14" / "planted_label_errors.csv")["image"])


def visible_test_metrics(predictions_path: Path, demo_dir: Path, classes: list[str]) -> dict:
    """The test-set metrics of a demo fold model on the images whose findings the demo draws
    visibly (patients under medfold.data.demo.WEAK_SUBGROUP_AGE; older ones are its planted weaker
    subgroup, where findings are faint or unseen) and whose labels say what the film shows (the
    demo's planted label errors left out)."""
    import pandas as pd

    from medfold.data.demo import WEAK_SUBGROUP_AGE
    from medfold.data.index.labels import targets_for
    from medfold.evaluation.metrics import evaluate

    table = pd.read_csv(demo_dir / "cxr14" / "Data_Entry.csv").drop_duplicates("Image Index")
    ages = table.set_index("Image Index")["Patient Age"]
    test = pd.read_parquet(predictions_path).query("set == 'test'")
    test = test[
        (test["image_id"].map(ages) < WEAK_SUBGROUP_AGE) & ~test["image_id"].isin(planted_label_errors(demo_dir))
    ]
    probs = test[[f"prob:{c}" for c in classes]].to_numpy()
    return evaluate("multilabel", classes, targets_for(test["labels"], classes, "multilabel"), probs)
