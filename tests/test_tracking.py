"""MLflow tracking against a real ``mlflow server`` started here on localhost: one parent run per
experiment, a nested run per fold and seed with the settings as params, per-epoch metrics, the
fold's files as artifacts, the cross-validation summary on the parent; a job killed mid-training
and run again (a Slurm retry) continues its run; the MLflow UI lists the runs in Chromium."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, SNAKEFILE, SNAKEMAKE, run_snakemake, workflow_dir

from medfold.training.tracking import RUN_FILE, flatten

pytestmark = pytest.mark.workflow
DS = "results/demo_cxr14"
SERVER = REPO / ".venv-mlflow" / "bin" / "mlflow"  # make test installs it (its own env: mlflow pins pyarrow<26)
EPOCHS = 4
SMALL = {
    "demo": {"cxr14_patients": 24, "folder_patients": 10},
    "split": {"folds": 2},
    "training": {"epochs": EPOCHS, "image_size": 32, "early_stopping": {"enabled": False}, "threads": 2},
    "experiments": {"base": {"repeats": 2}},
    "ensembles": {},
    "evaluation": {"bootstrap": 100},
    "variants": {},
    "explain": {"experiments": []},
    "export": {"experiments": []},
    "external": {},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    assert SERVER.exists(), f"{SERVER} missing: `make test` installs the MLflow server into .venv-mlflow"
    store = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(SERVER),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{store}/mlflow.db",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=open(store / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (store / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tracked(server, tmp_path_factory):
    """The small workflow tracked on the server; fold 0's first seed is killed (the whole
    Snakemake session, as a lost node) after its first checkpoint, then everything is run again."""
    work = workflow_dir(
        tmp_path_factory.mktemp("tracked"), {**SMALL, "tracking": {"mlflow": {"enabled": True, "uri": server}}}
    )
    fold = work / DS / "base" / "fold_0"
    target = f"{DS}/base/fold_0/metrics.json"
    cmd = [
        *SNAKEMAKE,
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(work),
        "--cores",
        "2",
        target,
    ]
    cmd += ["--configfile", str(work / "config" / "config.yaml")]
    first = subprocess.Popen(
        cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not (fold / "checkpoint.pt").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first attempt ended before a checkpoint"
        time.sleep(0.05)
    run_before = json.loads((fold / RUN_FILE).read_text())["run_id"]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = time.time()
    run_snakemake(work, "--unlock")
    run_snakemake(work, "--cores", "2", "--rerun-incomplete", f"{DS}/base/cv/summary.json")
    return work, server, run_before, killed_at


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_a_parent_run_per_experiment_and_a_nested_run_per_fold_and_seed(tracked):
    work, uri, _, _ = tracked
    client = _client(uri)
    experiment = client.get_experiment_by_name("medfold/demo_cxr14")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("medfold.role") == "experiment"]
    folds = [r for r in runs if r.data.tags.get("medfold.role") == "fold"]
    assert len(parents) == 1 and parents[0].info.run_name == "base" and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert sorted(r.info.run_name for r in folds) == [
        "fold_0",
        "fold_0/seed_1",
        "fold_1",
        "fold_1/seed_1",
    ]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in folds)
    assert all(r.info.status == "FINISHED" for r in folds)
    for run in folds:
        fold, seed = run.data.tags["medfold.fold"], run.data.tags["medfold.seed"]
        metrics = json.loads(
            (work / DS / "base" / f"fold_{fold}" / ("seed_1" if seed == "1" else "") / "metrics.json").read_text()
        )
        # the resolved settings as params, each as the fold trained with it
        params = run.data.params
        assert params["lr"] == json.dumps(metrics["settings"]["lr"]) and params["seed"] == str(
            metrics["settings"]["seed"]
        )
        assert params["augment.hflip"] == json.dumps(metrics["settings"]["augment"]["hflip"])
        assert len(params) == len(flatten(metrics["settings"]))
        # per-epoch metrics by step, the final ones, the fold's files
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, EPOCHS + 1))
        assert run.data.metrics["val.auroc_macro"] == pytest.approx(metrics["val"]["auroc_macro"])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "history.csv", "model.pt"} <= artifacts
        assert not (work / DS / "base" / f"fold_{fold}" / RUN_FILE).exists()  # a finished fold keeps no run to continue
    summary = json.loads((work / DS / "base" / "cv" / "summary.json").read_text())
    want = summary["statistics"]["val.auroc_macro"]
    assert parent.data.metrics["cv.val.auroc_macro.mean"] == pytest.approx(want["mean"])
    assert parent.data.metrics["cv.val.auroc_macro.std"] == pytest.approx(want["std"])
    assert parent.data.metrics["models"] == 4
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "cv")} >= {"cv/summary.json", "cv/per_fold.csv"}


def test_a_killed_fold_run_again_continues_its_run(tracked):
    work, uri, run_before, killed_at = tracked
    client = _client(uri)
    experiment = client.get_experiment_by_name("medfold/demo_cxr14")
    fold0 = [
        r
        for r in client.search_runs(
            [experiment.experiment_id], "tags.`medfold.fold` = '0' and tags.`medfold.seed` = '0'"
        )
    ]
    assert [r.info.run_id for r in fold0] == [run_before]  # one run, the one the killed attempt opened
    assert fold0[0].info.start_time < killed_at * 1000
    # every epoch once: those logged before the kill, then the resumed ones
    steps = sorted(m.step for m in client.get_metric_history(run_before, "train_loss"))
    assert steps == list(range(1, EPOCHS + 1))
    log = (work / DS / "base" / "fold_0" / "train.log").read_text()
    assert "continuing run" in log and "resum" in log.lower()


def test_tracking_off_writes_nothing_and_a_bad_uri_is_refused_before_any_job(tmp_path):
    work = workflow_dir(tmp_path, {**SMALL, "tracking": {"mlflow": {"enabled": True, "uri": "mlflow.example.org"}}})
    proc = run_snakemake(work, "--cores", "2", "--dry-run", check=False)
    assert proc.returncode != 0 and "does not match" in proc.stdout + proc.stderr and "uri" in proc.stdout + proc.stderr
    assert not (work / "results").exists()


def test_the_mlflow_ui_lists_the_experiments_runs(tracked, tmp_path):
    from playwright.sync_api import sync_playwright

    _, uri, _, _ = tracked
    client = _client(uri)
    experiment = client.get_experiment_by_name("medfold/demo_cxr14")
    shot = Path(os.environ.get("MEDFOLD_MLFLOW_SCREENSHOT", tmp_path / "mlflow.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium")
        page = browser.new_page(viewport={"width": 1400, "height": 800})
        page.goto(f"{uri}/#/experiments/{experiment.experiment_id}/runs")
        page.get_by_text("base", exact=True).first.wait_for(timeout=60_000)
        # the parent's expander shows its nested runs; the assistant's side panel is closed
        page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
        page.get_by_text("fold_1/seed_1").first.wait_for(timeout=30_000)
        for button in page.locator("button[aria-label*='lose']").all():
            button.click()
        page.wait_for_timeout(500)
        text = page.inner_text("body")
        page.screenshot(path=str(shot))
        browser.close()
    print(f"screenshot: {shot}")
    assert all(name in text for name in ("fold_0", "fold_0/seed_1", "fold_1", "fold_1/seed_1"))
    assert shot.stat().st_size > 20_000


def _fold_files(work: Path, epochs: int) -> None:
    import pandas as pd

    work.mkdir(parents=True, exist_ok=True)
    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "lr": 0.01} for e in range(1, epochs + 1)]
    pd.DataFrame(rows).to_csv(work / "history.csv", index=False)
    scores = {"val": {"auroc_macro": 0.7, "auroc": {"a": 0.7}}, "test": {"auroc_macro": 0.6, "auroc": {"a": 0.6}}}
    (work / "metrics.json").write_text(json.dumps(scores))
    (work / "model.pt").write_bytes(b"weights")


def test_the_embedded_file_store_and_a_failed_job_continuing_its_run(tmp_path):
    """No server: the default store under <results>/mlruns. A job that fails after two epochs (its
    run left open) and is run again continues the same run; the epoch lost between checkpoint and
    log is filled in from history.csv once; a forced retrain after completion is a new run."""
    from medfold.training.tracking import FoldTracker, fold_run, store_uri

    results = tmp_path / "results"
    cfg = {"enabled": True, "uri": None, "experiment": None}
    settings = {"lr": 0.01, "seed": 0, "augment": {"hflip": 0.5}}
    work = results / "ds" / "exp" / "fold_0"
    with pytest.raises(RuntimeError):
        with fold_run(cfg, results, "ds", "exp", 0, settings, work) as tracker:
            tracker.log_epoch({"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "lr": 0.01})
            raise RuntimeError("killed after epoch 2's checkpoint, before its log")
    first = FoldTracker.of_work_dir(work).run_id
    assert _client(store_uri(cfg, results)).get_run(first).info.status == "FAILED"  # until continued
    _fold_files(work, 3)
    with fold_run(cfg, results, "ds", "exp", 0, settings, work) as tracker:
        assert tracker.run_id == first
        tracker.log_epoch({"epoch": 3, "train_loss": 1 / 3, "val_loss": 1.1 / 3, "lr": 0.01})
    uri = store_uri(cfg, results)
    assert uri.startswith("file:") and (results / "mlruns").is_dir()
    client = _client(uri)
    steps = sorted(m.step for m in client.get_metric_history(first, "val_loss"))
    assert steps == [1, 2, 3]  # epoch 2 from history.csv, each epoch once
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.data.metrics["test.auroc_macro"] == 0.6
    assert run.data.params["augment.hflip"] == "0.5" and run.info.run_name == "fold_0"
    assert not (work / RUN_FILE).exists()
    with fold_run(cfg, results, "ds", "exp", 0, settings, work) as tracker:  # --forcerun: a new run
        assert tracker.run_id != first
    parent = json.loads((results / "ds" / "exp" / RUN_FILE).read_text())["run_id"]
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 2
    with fold_run({"enabled": False}, results, "ds", "other", 0, settings, results / "ds" / "other" / "fold_0"):
        pass
    assert not (results / "ds" / "other").exists()  # off: nothing written
