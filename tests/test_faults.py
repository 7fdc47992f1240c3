"""Faults survived, nothing lost: kill -9 of Snakemake and of its jobs at every stage, a full disk
during caching and training, truncated or altered caches and checkpoints, and two runs in one
folder. After each, the outputs are compared with those of an undisturbed run: byte for byte
where nothing measures time, value for value (timings left out) where something does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import planned, prepare_demo, resolved_config, run_snakemake, snakemake_command, workflow_dir

from medfold.core.errors import DataError

DS = "demo_cxr14"
# the smallest workflow that still has every stage: 2 folds, 2 epochs at 32 px, a bf16 variant
TINY = {
    "demo": {"cxr14_patients": 24, "folder_patients": 10},
    "split": {"folds": 2},
    # two threads per job on 2 cores: one job at a time, so each stage's job is there to be killed
    # (with one thread, fold 0's explain job may finish beside its compress job before the kill)
    "training": {"epochs": 2, "image_size": 32, "early_stopping": {"enabled": False}, "threads": 2},
    "experiments": {"bn": {"batch_norm": True}},
    "ensembles": {},
    "evaluation": {"bootstrap": 100},
    "variants": {"half": {"method": "bf16"}},
    # one fold's compression and explanation: a job of each stage to kill, not one per fold
    "compression": {"experiments": ["bn"], "folds": [0], "latency": {"repeats": 2, "warmup": 1}},
    "explain": {"experiments": ["bn"], "folds": [0], "images_per_class": 1, "lime": {"samples": 20}},
    "export": {"experiments": []},
    "external": {},
}
STAGES = ["index", "cache", "train", "compress", "explain", "report"]
# values that measure time or where a job ran, not what it computed
VOLATILE = ("seconds", "latency", "images_per_s", "speedup", "wall", "time", "hardware", "cpu", "threads", "rss")


# a .pt2 archive embeds ids of the process that exported it: its size varies by a few bytes
ARCHIVE = ("variant_measured", "size", "gzip")


def _stable(value, volatile=VOLATILE):
    if isinstance(value, dict):
        return {k: _stable(v, volatile) for k, v in value.items() if not any(word in k for word in volatile)}
    if isinstance(value, list):
        return [_stable(v, volatile) for v in value]
    return value


def compare_results(reference: Path, other: Path) -> int:
    """Assert that every result file of ``reference`` is in ``other`` with the same content;
    returns the number compared."""
    compared = 0
    for path in sorted((reference / "results").rglob("*")):
        rel = path.relative_to(reference)
        if (
            not path.is_file()
            or any(p in ("logs", "benchmarks", "tensorboard") for p in rel.parts)
            or path.suffix == ".log"
        ):
            continue
        twin = other / rel
        assert twin.exists(), f"{rel} missing after the faults"
        volatile = VOLATILE + (ARCHIVE if "variants" in rel.parts else ())
        if path.suffix == ".json":
            if path.name == "compression.json":
                assert 0 < json.loads(twin.read_text())["ratios"]["size"] < 1.5, rel
            assert _stable(json.loads(twin.read_text()), volatile) == _stable(json.loads(path.read_text()), volatile), (
                rel
            )
        elif path.suffix == ".csv" and any(c in path.read_text().split("\n")[0] for c in volatile):
            a, b = pd.read_csv(path), pd.read_csv(twin)
            keep = [c for c in a.columns if not any(word in c for word in volatile)]
            pd.testing.assert_frame_equal(a[keep], b[keep], obj=str(rel))
        elif path.suffix in (".html", ".png", ".svg") or path.name == "model.pt2":
            # the report carries wall times; figures and compiled archives embed run-specific ids
            assert twin.stat().st_size > 0, rel
        elif path.name == "model.pt":
            import torch

            a, b = (torch.load(p, weights_only=True) for p in (path, twin))
            assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), rel
        else:
            assert twin.read_bytes() == path.read_bytes(), rel
        compared += 1
    return compared


def _job_pid(work: Path, scripts: tuple[str, ...]) -> tuple[str, int] | None:
    """A running job of ``work`` executing workflow/scripts/<script>.py for one of ``scripts``, by
    its command line: (script, pid)."""
    marker = f"{work}/.snakemake/scripts/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for a in args:
            text = a.decode(errors="replace")
            if text.startswith(marker) and text.endswith(".py") and text.rsplit(".", 2)[-2] in scripts:
                return text.rsplit(".", 2)[-2], int(proc.name)
    return None


def _start(work: Path, *args: str) -> subprocess.Popen:
    cmd = snakemake_command(work, "--cores", "2", *args)
    return subprocess.Popen(
        cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _wait_for_job(proc: subprocess.Popen, work: Path, *scripts: str, timeout: float = 600) -> tuple[str, int]:
    """The first job to run of any of ``scripts``: (script, pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _job_pid(work, scripts)
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended before a {scripts} job started:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no {scripts} job within {timeout} s")


def _wait_gone(pid: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:  # an orphaned job is reaped by init; a zombie child of ours is not
            if open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                return
        except OSError:
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    work = workflow_dir(tmp_path_factory.mktemp("undisturbed"), TINY)
    run_snakemake(work, "--cores", "2")
    return work


def same_key(reference: Path, work: Path) -> Path:
    """``work`` with the reference's privacy key: the same pseudonyms, so files compare byte for byte."""
    (work / "results").mkdir(parents=True, exist_ok=True)
    shutil.copy(reference / "results" / "privacy.key", work / "results" / "privacy.key")
    return work


def test_killing_a_job_and_then_snakemake_at_every_stage_loses_nothing(reference, tmp_path):
    """At each stage, two kills in one pass (one workflow run serving both): kill -9 of the job
    itself, which Snakemake reports as the rule's error, removing its outputs; then, once that
    stage's job runs again under --rerun-incomplete, kill -9 of Snakemake (the job is orphaned and
    may finish or not): the next plain run refuses the incomplete outputs, naming them, or plans
    the job again. The run after the last kill completes, and the results equal the undisturbed
    run's (training resumed from its last checkpoint each time)."""
    work = same_key(reference, workflow_dir(tmp_path, TINY))
    killed, outcomes = [], []
    proc = _start(work)
    while len(killed) < len(STAGES):
        # the next stage to run, whichever it is (compression and explanation both follow
        # training, in the order Snakemake picks)
        stage, job = _wait_for_job(proc, work, *(s for s in STAGES if s not in killed))
        os.kill(job, signal.SIGKILL)
        out = proc.communicate(timeout=1200)[0]
        assert proc.returncode != 0 and f"Error in rule {stage}" in out, (stage, out[-3000:])
        proc = _start(work, "--rerun-incomplete")
        _, job = _wait_for_job(proc, work, stage)  # the killed job runs again
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed.append(stage)
        _wait_gone(job)
        # what was running is never taken as done: refused as incomplete, or planned again
        probe = run_snakemake(work, "--cores", "2", "--dry-run", check=False)
        text = probe.stdout + probe.stderr
        refused = probe.returncode != 0 and "Incomplete files" in text
        assert refused or stage in planned(probe), (stage, text[-2000:])
        outcomes.append("refused as incomplete" if refused else "planned again")
        run_snakemake(work, "--unlock")  # a killed Snakemake may leave its lock (README: after kill -9)
        proc = _start(work, "--rerun-incomplete")
    assert proc.wait(timeout=1200) == 0, proc.stdout.read()[-4000:]
    assert sorted(killed) == sorted(STAGES)
    print("after each kill of Snakemake:", dict(zip(killed, outcomes)))
    assert compare_results(reference, work) > 20


def test_a_second_run_in_the_same_folder_is_refused_and_the_first_is_unharmed(reference, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(reference, work, ignore=shutil.ignore_patterns("locks", "incomplete"))
    # a short rerun (aggregate, explain, their tables, the report); its aggregate job is held
    # (SIGSTOP) while the two other runs try, so the first is certainly still running then, on a
    # machine however loaded (it could end before them, and a run with nothing to do takes no lock)
    first = _start(work, "--forcerun", "aggregate", "explain")
    _, job = _wait_for_job(first, work, "aggregate")
    os.kill(job, signal.SIGSTOP)
    try:
        # a plain second run stops at the lock, or before it at the first's running jobs (marked
        # incomplete once their outputs appear); one told to rerun them is refused by the lock
        second = run_snakemake(work, "--cores", "1", check=False)
        text = second.stdout + second.stderr
        assert second.returncode != 0 and ("Incomplete files" in text or "cannot be locked" in text), text[-2000:]
        second = run_snakemake(work, "--cores", "1", "--rerun-incomplete", check=False)
        assert second.returncode != 0 and "cannot be locked" in second.stdout + second.stderr, second.stderr[-2000:]
        assert first.poll() is None  # the first was running all along
    finally:
        os.kill(job, signal.SIGCONT)
    assert first.wait(timeout=1200) == 0, first.stdout.read()[-3000:]
    assert compare_results(reference, work) > 20


# ----------------------------------------------------------------------------- storage faults
@pytest.fixture(scope="module")
def prepared(tmp_path_factory, demo_dir) -> Path:
    return prepare_demo(tmp_path_factory.mktemp("faults"), demo_dir, size=32)


def test_a_truncated_or_altered_cache_is_refused_and_a_rebuild_is_accepted(prepared, tmp_path):
    from medfold.data.cache import build_cache, open_cache
    from medfold.data.index.io import read_index

    index, _ = read_index(prepared / "index.parquet")
    cache = tmp_path / "cache"
    shutil.copytree(prepared / "cache", cache)
    good = (cache / "images.npy").read_bytes()
    assert open_cache(cache, index).shape[0] == len(index)
    (cache / "images.npy").write_bytes(good[:-100])
    with pytest.raises(DataError, match=r"images.npy: truncated .* --forcerun cache"):
        open_cache(cache, index)
    altered = bytearray(good)
    altered[len(good) // 2] ^= 0xFF
    (cache / "images.npy").write_bytes(bytes(altered))
    with pytest.raises(DataError, match="its bytes differ from those written"):
        open_cache(cache, index)
    build_cache(index, cache, 32, 1, threads=2)
    assert (cache / "images.npy").read_bytes() == good and open_cache(cache, index).shape[0] == len(index)


def test_an_unreadable_checkpoint_is_set_aside_and_the_fold_trains_from_the_start(prepared, tmp_path):
    from medfold.training.fold import CHECKPOINT
    from medfold.training.train import run_fold

    training = resolved_config(
        {
            "training": {
                "batch_norm": True,
                "device": "cpu",
                "image_size": 32,
                "epochs": 2,
                "early_stopping": {"enabled": False},
            }
        }
    )["training"]
    args = (prepared / "index.parquet", prepared / "splits.parquet", prepared / "cache", 0)
    run_fold(training, *args, tmp_path / "clean", threads=2)
    (tmp_path / "bad").mkdir()
    torch_zip = (tmp_path / "clean" / "model.pt").read_bytes()
    (tmp_path / "bad" / CHECKPOINT).write_bytes(torch_zip[: len(torch_zip) // 2])  # a truncated torch archive
    run_fold(training, *args, tmp_path / "bad", threads=2)
    assert (tmp_path / "bad" / (CHECKPOINT + ".unreadable")).exists()
    for name in ("predictions.parquet", "history.csv"):
        a, b = (
            pd.read_csv(p) if name.endswith("csv") else pd.read_parquet(p)
            for p in (tmp_path / "clean" / name, tmp_path / "bad" / name)
        )
        keep = [c for c in a.columns if not any(word in c for word in VOLATILE)]
        pd.testing.assert_frame_equal(a[keep], b[keep])


@contextmanager
def small_disk(where: Path, size_kb: int):
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.decode().strip()}); needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path, leave_kb: int) -> Path:
    """A file taking all but ``leave_kb`` of the disk."""
    free = shutil.disk_usage(disk).free
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_kb * 1024))
    return filler


def test_a_full_disk_while_caching_is_named_and_a_rerun_after_freeing_space_completes(prepared, tmp_path):
    from medfold.data.cache import build_cache, open_cache
    from medfold.data.index.io import read_index

    index, _ = read_index(prepared / "index.parquet")
    with small_disk(tmp_path / "disk", 4096) as disk:
        filler = _fill(disk, 64)
        with pytest.raises(DataError, match=rf"{disk}/cache/images.npy.partial: no space left on the device"):
            build_cache(index, disk / "cache", 32, 1, threads=2)
        assert not (disk / "cache" / "images.npy").exists()  # nothing half-written under the real name
        filler.unlink()
        build_cache(index, disk / "cache", 32, 1, threads=2)
        assert open_cache(disk / "cache", index).shape[0] == len(index)
        assert (disk / "cache" / "images.npy").read_bytes() == (prepared / "cache" / "images.npy").read_bytes()


def test_a_full_disk_while_training_is_named_and_a_rerun_after_freeing_space_completes(prepared, tmp_path):
    from medfold.training.train import run_fold

    training = resolved_config(
        {
            "training": {
                "batch_norm": True,
                "device": "cpu",
                "image_size": 32,
                "epochs": 2,
                "early_stopping": {"enabled": False},
            }
        }
    )["training"]
    args = (prepared / "index.parquet", prepared / "splits.parquet", prepared / "cache", 0)
    run_fold(training, *args, tmp_path / "clean", threads=2)
    with small_disk(tmp_path / "disk", 4096) as disk:
        filler = _fill(disk, 48)
        with pytest.raises(DataError, match=rf"{disk}/fold/checkpoint.pt: no space left on the device"):
            run_fold(training, *args, disk / "fold", threads=2)
        assert not list((disk / "fold").glob("*.tmp"))
        filler.unlink()
        run_fold(training, *args, disk / "fold", threads=2)
        a, b = (
            pd.read_parquet(tmp_path / "clean" / "predictions.parquet"),
            pd.read_parquet(disk / "fold" / "predictions.parquet"),
        )
        pd.testing.assert_frame_equal(a, b)
        assert np.array_equal(
            pd.read_csv(tmp_path / "clean" / "history.csv")["val_loss"],
            pd.read_csv(disk / "fold" / "history.csv")["val_loss"],
        )
