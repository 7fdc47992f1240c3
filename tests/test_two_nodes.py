"""Training across two nodes under a real Slurm: tests/cluster/slurm.sh starts one slurmctld and
two slurmd, each slurmd in a network namespace of its own (its own interface and address on a
bridge, its own host name and /etc/hosts), so the two ranks of a job reach each other over the
network only, as on two machines. Both backends: DDP meets at the step's first node, Horovod (gloo,
no MPI) at the rendezvous server the job starts."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TRAINING_ONLY, sbatch_calls, seed_data_stages, slurm_cluster, snakemake_slurm, workflow_dir

from medfold.training.models import build_model


def _namespaces_work() -> bool:
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    return probe.returncode == 0 and shutil.which("ip") is not None


pytestmark = [
    pytest.mark.skipif(
        not shutil.which("slurmctld") and not os.environ.get("CI"),
        reason="Debian's slurm-wlm is not installed (.ci/run installs it)",
    ),
    pytest.mark.skipif(
        not _namespaces_work() and not os.environ.get("CI"),
        reason="two simulated nodes need root: network and UTS namespaces (ip, unshare)",
    ),
]
DS = "results/demo_cxr14"
HOROVOD = (Path(sys.executable).parent / "horovodrun").exists() or bool(os.environ.get("CI"))
BACKENDS = ["ddp", pytest.param("horovod", marks=pytest.mark.skipif(not HOROVOD, reason="Horovod is not installed"))]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    yield from slurm_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2)


def _sbatch_wait(env: dict, tmp_path: Path, script: str) -> str:
    out = tmp_path / "job.out"
    proc = subprocess.run(
        ["sbatch", "--wait", "-N", "2", "-n", "2", "--ntasks-per-node=1", "-o", str(out), "-D", str(tmp_path)],
        input=f"#!/bin/bash\n{script}\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + text[-4000:]
    return text


def test_the_two_nodes_are_two_machines_on_the_network(two_nodes, tmp_path):
    text = _sbatch_wait(
        two_nodes,
        tmp_path,
        'srun -l sh -c \'echo "$(hostname) $(ip -4 -o addr show eth0 | awk "{print \\$4}")"\'',
    )
    rows = dict(line.split(": ", 1) for line in text.strip().splitlines())
    names = {rank: row.split()[0] for rank, row in rows.items()}
    addresses = {rank: row.split()[1] for rank, row in rows.items()}
    assert sorted(names.values()) == ["mfnode1", "mfnode2"], text
    assert len(set(addresses.values())) == 2, text  # one address each, on its own eth0
    assert names["0"] == "mfnode1"  # block order: rank 0 on the step's first node


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_on_two_nodes_updates_like_one_process_with_the_whole_batch(backend, two_nodes, tmp_path):
    programs = REPO / "tests" / "programs"
    alone, spread = tmp_path / "alone.pt", tmp_path / f"{backend}.pt"
    subprocess.run([sys.executable, str(programs / "one_step.py"), "none", "16", "16", str(alone)], check=True)
    launch = (
        "import logging, sys; logging.basicConfig(level=logging.INFO); from medfold.training import distributed; "
        f"sys.exit(distributed.launch('{backend}', 2, 'auto', 0, "
        f"['one_step', '{backend}', '8', '16', '{spread}'], nodes=2))"
    )
    text = _sbatch_wait(two_nodes, tmp_path, f'cd {programs} && PYTHONPATH=. {sys.executable} -c "{launch}"')
    assert "on 2 node(s): srun -N 2 -n 2 --ntasks-per-node=1" in text, text
    assert json.loads(Path(f"{spread}.json").read_text()) == {"world": 2, "nodes": 2}
    a, s = torch.load(alone, weights_only=True), torch.load(spread, weights_only=True)
    initial = build_model("lenet", 1, 3, init_seed=0).state_dict()
    for key in a:
        assert (a[key] - initial[key]).abs().max() > 1e-4, f"{key} did not move"
        # averaged over the two machines: equal up to summation order; summed would be 2x, dropped 0.5x
        assert torch.allclose(s[key], a[key], atol=1e-6, rtol=1e-5), key


TWO_NODE_TRAINING = {
    "evaluation": {"bootstrap": 100, "comparisons": {"pairs": []}},
    "training": {"epochs": 6, "early_stopping": {"enabled": False}, "threads": 1, "mem_mb": 1000},
    "experiments": {
        "ddp_nodes": {"batch_norm": True, "distributed": {"backend": "ddp", "gpus": 2, "nodes": 2}},
        **(
            {"horovod_nodes": {"batch_norm": True, "distributed": {"backend": "horovod", "gpus": 2, "nodes": 2}}}
            if HOROVOD
            else {}
        ),
    },
    **TRAINING_ONLY,
}


def test_a_fold_trains_on_two_nodes_through_the_slurm_profile(two_nodes, trained_workflow, tmp_path):
    config = TWO_NODE_TRAINING
    work = workflow_dir(tmp_path, config)
    # the demo data, index, split and cache from the shared trained workflow (the same dataset and
    # split settings): only the training jobs go through Slurm here
    seed_data_stages(trained_workflow, work)
    names = list(config["experiments"])
    targets = [f"{DS}/{name}/fold_0/metrics.json" for name in names]
    proc = snakemake_slurm(work, two_nodes, "--verbose", *targets)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    calls = sbatch_calls(out)
    train = [c for c in calls if "rule_train" in c]
    assert len(train) == len(names) == len(calls), calls
    for call in train:  # two nodes, one GPU and one task on each
        for flag in ("--nodes=2", "--gres=gpu:1", "--ntasks=2", "--ntasks-per-node=1"):
            assert flag in call, call
        assert "--gpus=" not in call and "--ntasks-per-gpu" not in call, call
    for name in names:
        fold = work / DS / name / "fold_0"
        metrics = json.loads((fold / "metrics.json").read_text())
        backend = config["experiments"][name]["distributed"]["backend"]
        assert {k: metrics["distributed"][k] for k in ("backend", "world_size", "nodes", "replicas_identical")} == {
            "backend": backend,
            "world_size": 2,
            "nodes": 2,
            "replicas_identical": True,
        }
        assert metrics["test"]["auroc_macro"] > 0.7, metrics["test"]  # learned (chance is 0.5)
        log = (fold / "train.log").read_text()
        assert re.search(rf"launching 2 {backend} processes on 2 node\(s\): srun -N 2 -n 2", log), log[-3000:]
        assert log.count("epoch 6/6") == 1  # only rank 0 logs
