"""Multi-process training on CPU (gloo) with real launchers: torchrun for DDP, horovodrun for
Horovod (built by install/horovod.sh; .ci/run installs it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, resolved_config

from medfold.core.errors import ConfigError
from medfold.study.resolve import experiment_settings, train_resources
from medfold.training.distributed import first_host, launch_command
from medfold.training.models import build_model
from medfold.training.train import train_fold_job

DS = "results/demo_cxr14"
HOROVODRUN = Path(sys.executable).parent / "horovodrun"
needs_horovod = pytest.mark.skipif(
    not HOROVODRUN.exists() and not os.environ.get("CI"),
    reason="Horovod is not installed (install/horovod.sh; .ci/run installs it)",
)
BACKENDS = ["ddp", pytest.param("horovod", marks=needs_horovod)]


def _step(tmp_path: Path, command: list[str], name: str) -> dict:
    out = tmp_path / f"{name}.pt"
    proc = subprocess.run([*command, str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_with_batch_b_update_like_one_process_with_batch_2b(backend, tmp_path):
    program = str(REPO / "tests" / "programs" / "one_step.py")
    alone = _step(tmp_path, [sys.executable, program, "none", "16", "16"], "alone")
    launcher = launch_command(backend, 2, "local", 0, ["x"])  # the launcher as the train rule builds it
    if backend == "ddp":  # [... --nproc_per_node 2 -m x]: torchrun runs a script path as well
        command = [*launcher[:-2], program, backend, "8", "16"]
    else:  # [... --gloo python -m x]
        command = [*launcher[:-3], sys.executable, program, backend, "8", "16"]
    spread = _step(tmp_path, command, backend)
    initial = build_model("lenet", 1, 3, init_seed=0).state_dict()
    for key in alone:
        moved = (alone[key] - initial[key]).abs().max()
        assert moved > 1e-4, f"{key} did not move"  # the comparison below is of a real update
        # averaged gradients: equal up to float summation order; summed would be 2x, dropped 0.5x
        assert torch.allclose(spread[key], alone[key], atol=1e-6, rtol=1e-5), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_process_training_learns_and_ends_with_identical_replicas(backend, trained_workflow, tmp_path):
    config = resolved_config(
        {
            "training": {
                "epochs": 6,
                "early_stopping": {"enabled": False},
                "distributed": {"backend": backend, "gpus": 2},
                "device": "cpu",
            },
            "experiments": {"spread": {"batch_norm": True}},
        }
    )
    settings = experiment_settings(config, "spread", REPO / "workflow/schemas/config.schema.yaml")
    out, log = tmp_path / "fold_0", tmp_path / "train.log"
    train_fold_job(
        settings,
        trained_workflow / DS / "index.parquet",
        trained_workflow / DS / "splits.parquet",
        trained_workflow / DS / "cache" / "64",
        0,
        out,
        2,
        str(log),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed"] == {
        "backend": backend,
        "world_size": 2,
        "nodes": 1,
        "lr": 2 * settings["lr"],
        "replicas_identical": True,
    }
    assert metrics["test"]["auroc_macro"] > 0.7  # learned (chance is 0.5) in 6 short epochs
    assert (out / "model.pt").exists()
    assert not (out / "checkpoint.pt").exists()
    text = log.read_text()
    assert "rank 0 of 2" in text and "rank 1 of 2" not in text  # only rank 0 logs
    assert text.count("epoch 6/6") == 1
    events = list((out / "tensorboard").glob("events.*"))
    assert len(events) == 1  # only rank 0 writes TensorBoard events


def test_resources_and_launchers_for_each_backend():
    base = resolved_config({"training": {"device": "auto"}})["training"]
    ddp = {**base, "distributed": {**base["distributed"], "backend": "ddp", "gpus": 4}}
    hvd = {**base, "distributed": {**base["distributed"], "backend": "horovod", "gpus": 4}}
    one_node = {"gres": "", "nodes": 1, "slurm_extra": ""}
    assert train_resources(ddp) == {"gpu": 4, "tasks": 4, "tasks_per_gpu": 1, "mpi": "srun", **one_node}
    assert train_resources(hvd) == {"gpu": 4, "tasks": 1, "tasks_per_gpu": 0, "mpi": "", **one_node}
    assert train_resources({**base, "gpus": 1}) == {"gpu": 1, "tasks": 1, "tasks_per_gpu": 0, "mpi": "", **one_node}
    assert train_resources({**ddp, "device": "cpu"})["gpu"] == 0
    hvd_srun = {**hvd, "distributed": {**hvd["distributed"], "launcher": "srun"}}
    assert train_resources(hvd_srun) == train_resources(ddp)  # Horovod under srun: one task per GPU, as DDP
    # two nodes: per-node GPUs and tasks (a total could land unevenly), srun starting every process
    for spread in (ddp, hvd):
        two = {**spread, "distributed": {**spread["distributed"], "nodes": 2}}
        assert train_resources(two) == {
            "gpu": 0,
            "gres": "gpu:2",
            "nodes": 2,
            "tasks": 4,
            "tasks_per_gpu": 0,
            "mpi": "srun",
            "slurm_extra": "--ntasks-per-node=2",
        }
        assert launch_command(spread["distributed"]["backend"], 4, "auto", 1, ["m"], nodes=2)[:9] == [
            "srun",
            "-N",
            "2",
            "-n",
            "4",
            "--ntasks-per-node=2",
            "--distribution=block",
            "--kill-on-bad-exit=1",
            "--gpus-per-task=1",
        ]
    assert launch_command("ddp", 4, "srun", 1, ["m"])[:9] == [
        "srun",
        "-N",
        "1",
        "-n",
        "4",
        "--ntasks-per-node=4",
        "--distribution=block",
        "--kill-on-bad-exit=1",
        "--gpus-per-task=1",
    ]
    assert launch_command("ddp", 2, "local", 0, ["m"])[2:6] == [
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]


def test_first_host_of_slurm_host_lists():
    assert first_host("mfnode[1-2]") == "mfnode1"
    assert first_host("gpu[07-09,12],cpu3") == "gpu07"
    assert first_host("node3,node1") == "node3"
    assert first_host("a[2,4]-b[10-11]") == "a2-b10"
    assert first_host("login") == "login"


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        ({"backend": "ddp", "gpus": 3, "nodes": 2}, "distributed.gpus, 3"),
        ({"backend": "none", "gpus": 2, "nodes": 2}, "the backend is 'none'"),
    ],
)
def test_nodes_that_cannot_share_the_processes_evenly_are_refused(parallel, message):
    config = resolved_config({"experiments": {"spread": {"distributed": parallel}}})
    with pytest.raises(ConfigError, match=r"experiments\.spread\.distributed\.nodes: 2 nodes") as err:
        experiment_settings(config, "spread", REPO / "workflow/schemas/config.schema.yaml")
    assert message in str(err.value)


def test_nodes_without_slurm_are_refused_with_what_to_do(tmp_path, monkeypatch):
    from medfold.training.distributed import launch

    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without Slurm's srun
    with pytest.raises(ConfigError, match=r"2 ddp processes on 2 node\(s\) are started with Slurm's srun"):
        launch("ddp", 2, "auto", 0, ["medfold.training.train", "job.json"], nodes=2)
