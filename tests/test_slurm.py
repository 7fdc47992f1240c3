"""The workflow through a real single-node Slurm (Debian's slurm-wlm, started by
tests/cluster/slurm.sh with 2 fake GPUs) and the project's own profile, profiles/slurm."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    SLURM,
    TRAINING_ONLY,
    planned,
    run_snakemake,
    sbatch_calls,
    seed_data_stages,
    slurm_cluster,
    snakemake_command,
    snakemake_slurm,
    workflow_dir,
)

pytestmark = pytest.mark.skipif(
    not shutil.which("slurmctld") and not os.environ.get("CI"),
    reason="Debian's slurm-wlm is not installed (.ci/run installs it)",
)
DS = "results/demo_cxr14"
# tiny: 2 folds, a few epochs; one single-GPU experiment, one DDP experiment over 2 GPUs, and one
# long enough to be cancelled mid-training
TINY = {
    "split": {"folds": 2},
    "evaluation": {"bootstrap": 100},
    "training": {"epochs": 2, "early_stopping": {"enabled": False}, "threads": 1, "mem_mb": 1000},
    "experiments": {
        "onegpu": {"gpus": 1, "batch_norm": True},
        "spread": {"distributed": {"backend": "ddp", "gpus": 2}},
        "long": {"epochs": 100, "batch_norm": True},
    },
    **TRAINING_ONLY,
}


# enough epochs that the kill, 2 s after the first checkpoint, lands well inside training (an epoch
# takes seconds here) and few enough that the resumed run is short
LONG = {"epochs": 15, "batch_norm": True}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from slurm_cluster(tmp_path_factory.mktemp("slurm"))


def snakemake(work: Path, env: dict, *args: str, cwd: Path | None = None, timeout: int = 900):
    return snakemake_slurm(work, env, *args, cwd=cwd, timeout=timeout)


def test_dry_run_with_the_profile_shows_what_each_rule_requests(slurm, tmp_path):
    work = workflow_dir(tmp_path, TINY)
    proc = snakemake(work, slurm, "--dry-run")  # `--profile slurm` typed in the repository root
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert planned(proc)["train"] == 6
    blocks = {}
    for block in re.split(r"\n(?=rule |localrule )", out):
        name = re.match(r"(?:local)?rule (\w+):", block)
        found = re.search(r"resources: (.*)", block)
        if name and found:
            blocks.setdefault(name.group(1), []).append(found.group(1))
    train = " ".join(blocks["train"])
    assert "gpu=1" in train and "gpu=2" in train and "tasks=2" in train and "tasks_per_gpu=1" in train
    assert "mpi=srun" in train and "runtime=60" in train and "mem_mb=1000" in train
    assert all("gpu=" not in r or "gpu=0" in r for r in blocks["index"])
    assert all("mem_mb=" in r and "runtime=" in r for rs in blocks.values() for r in rs)


def test_the_workflow_runs_through_sbatch_with_gpu_requests_and_ddp_under_srun(slurm, tmp_path):
    # fold 0 of each (the 2 test GPUs hold one of them at a time) on a smaller demo: each job
    # through the queue costs its start and the executor's status checks, whatever it computes
    small = {k: {**v, "folds": [0]} for k, v in TINY["experiments"].items() if k != "long"}
    work = workflow_dir(tmp_path, {**TINY, "demo": {"cxr14_patients": 80}, "experiments": small})
    # the data stages run here first (what they ask of Slurm is checked by the dry run above): each
    # stage through the queue costs about 50 s of submission and status checks on this test
    # cluster, and training, aggregation and the report are the jobs that ask for GPUs and tasks
    run_snakemake(work, "--cores", "2", f"{DS}/split_check.json", f"{DS}/cache/64/images.npy")
    start = time.monotonic()
    proc = snakemake(work, slurm, "--verbose")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    print(f"workflow through Slurm: {time.monotonic() - start:.0f} s, {len(sbatch_calls(out))} sbatch calls")
    calls = sbatch_calls(out)
    assert len(calls) == planned_jobs(out)  # every job went through sbatch
    train = [c for c in calls if "rule_train" in c]
    assert len(train) == 2
    single = [c for c in train if "onegpu" in c]
    spread = [c for c in train if "spread" in c]
    assert len(single) == len(spread) == 1 and all("--gpus=1" in c for c in single)
    assert all("--gpus=2" in c and "--ntasks=2" in c and "--ntasks-per-gpu=1" in c for c in spread)
    assert calls and all("--gpu" not in c for c in calls if "rule_aggregate" in c or "rule_report" in c)
    import json

    metrics = json.loads((work / DS / "spread" / "fold_0" / "metrics.json").read_text())
    assert metrics["distributed"]["world_size"] == 2 and metrics["distributed"]["replicas_identical"]
    assert (work / DS / "report" / "index.html").exists()


def planned_jobs(text: str) -> int:
    table = text[text.index("Job stats:") :]
    total = re.search(r"^total\s+(\d+)", table, re.M)
    return int(total.group(1)) - 1  # 'all' runs locally


def test_a_job_killed_mid_training_is_retried_and_resumes_from_its_checkpoint(slurm, trained_workflow, tmp_path):
    # the shared trained workflow's split (QUICK's) and data stages: only the training job goes
    # through Slurm; LONG's epochs leave the kill well inside training
    work = workflow_dir(tmp_path, {**{k: v for k, v in TINY.items() if k != "split"}, "experiments": {"long": LONG}})
    seed_data_stages(trained_workflow, work)
    target = f"{DS}/long/fold_0/metrics.json"
    cmd = snakemake_command(work, *SLURM, target)
    log = open(tmp_path / "snakemake.out", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=slurm, stdout=log, stderr=subprocess.STDOUT)
    checkpoint = work / DS / "long" / "fold_0" / "checkpoint.pt"
    deadline = time.monotonic() + 600
    while not checkpoint.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "snakemake.out").read_text()[-4000:]
        time.sleep(0.5)
    time.sleep(2)
    jobs = subprocess.run(["squeue", "-h", "-o", "%i %k"], env=slurm, capture_output=True, text=True).stdout
    train = [line.split()[0] for line in jobs.splitlines() if "rule_train" in line]
    assert len(train) == 1, jobs
    subprocess.run(["scancel", "--signal=KILL", "--full", train[0]], env=slurm, check=True)
    assert proc.wait(timeout=900) == 0, (tmp_path / "snakemake.out").read_text()[-6000:]
    out = (tmp_path / "snakemake.out").read_text()
    assert out.count("Trying to restart job") == 1  # the profile's retries: 1
    train_log = (work / DS / "long" / "fold_0" / "train.log").read_text()
    resumed = re.search(r"resumed fold 0 from .* after epoch (\d+)", train_log)
    assert resumed and int(resumed.group(1)) >= 1, train_log[-2000:]
    assert f"fold 0 epoch {LONG['epochs']}/{LONG['epochs']}" in train_log
    assert (work / target).exists()
