"""Experiment tracking in MLflow (``tracking.mlflow``; off unless enabled): one parent run per
experiment, a nested run per fold and seed, per-epoch metrics, the fold's files as artifacts,
and the cross-validation summary on the parent.

MLflow cannot group fold runs by itself (mlflow#3762), so medfold keeps the grouping: the parent
run's ID in ``<experiment>/mlflow_run.json`` (created once, under a file lock: the folds' jobs
start together) and each fold run's ID in ``mlflow_run.json`` beside the fold's checkpoint. A job
that is run again after a kill or a Slurm retry finds that file and continues its run: the epochs
it logged stay, the epochs it trains next follow them, and no second run appears. A finished
fold removes the file with its checkpoint, so a forced retrain is a new run.

Only MLflow's client (mlflow-skinny) is a dependency: a hospital's tracking server is a service
of its own (``mlflow server``), or the store is a folder (``file:``, the default under
``<results>/mlruns``) that ``mlflow ui`` opens. Training never waits on a slow server more than
MLflow's own timeouts; a server that refuses the first call stops the job with its address.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path

from medfold.core.errors import MedfoldError
from medfold.settings.sections import MlflowSettings

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"
PARAM_LIMIT = 6000  # characters of one parameter's value MLflow stores


def store_uri(mlflow: MlflowSettings | dict | None, results) -> str:
    """The tracking URI: the configured one, or a file store under ``<results>/mlruns``."""
    return MlflowSettings.of(mlflow).uri or (Path(results).resolve() / "mlruns").as_uri()


def _client(uri: str):
    if uri.startswith("file:"):
        # MLflow 3 keeps its folder store in maintenance and asks for an opt-in; medfold opts in:
        # every fold job (on any Slurm node of a shared file system) writes its own run folder,
        # where one SQLite file would be written by all at once (and SQLite's locks on NFS fail)
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _call(uri: str, what: str, fn):
    """An MLflow call; a server that cannot be reached becomes an error naming it."""
    try:
        return fn()
    except MedfoldError:
        raise
    except Exception as exc:  # MLflow raises MlflowException, requests' errors, OSError...
        raise MedfoldError(
            f"tracking.mlflow: {what} at {uri} failed: {type(exc).__name__}: {str(exc)[:300]}; check that the "
            f"tracking server is up (or set tracking.mlflow.enabled: false), then run the same command again"
        ) from exc


def _experiment_id(client, uri: str, name: str) -> str:
    def get_or_create():
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return client.create_experiment(name)

    return _call(uri, f"finding experiment {name!r}", get_or_create)


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: dotted keys, values as text (long ones cut)."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            out[name] = text[:PARAM_LIMIT]
    return out


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_exists(client, run_id: str) -> bool:
    try:
        run = client.get_run(run_id)
    except Exception:  # deleted, or a store that never held it (a new server)
        return False
    return run.info.lifecycle_stage == "active"


def parent_run(mlflow: MlflowSettings | dict, uri: str, dataset: str, experiment: str, experiment_dir) -> str:
    """The experiment's parent run ID, created by the first fold job that asks for it."""
    path = Path(experiment_dir) / RUN_FILE
    client = _client(uri)
    with _locked(path):
        if path.exists():
            known = json.loads(path.read_text())
            if known.get("uri") == uri and _run_exists(client, known["run_id"]):
                return known["run_id"]
        exp_id = _experiment_id(client, uri, MlflowSettings.of(mlflow).experiment or f"medfold/{dataset}")
        run = _call(
            uri,
            "creating the experiment's run",
            lambda: client.create_run(
                exp_id,
                run_name=experiment,
                tags={"medfold.dataset": dataset, "medfold.experiment": experiment, "medfold.role": "experiment"},
            ),
        )
        path.write_text(json.dumps({"uri": uri, "run_id": run.info.run_id}) + "\n")
        return run.info.run_id


class FoldTracker:
    """One fold (and seed) run: per-epoch metrics by step = epoch. Picklable by value (URI and
    run ID), so a distributed run's rank 0 logs into the run its job opened."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._client = None

    @classmethod
    def of_work_dir(cls, work) -> FoldTracker | None:
        path = Path(work) / RUN_FILE
        if not path.exists():
            return None
        known = json.loads(path.read_text())
        return cls(known["uri"], known["run_id"])

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    def log_epoch(self, row: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), stamp, int(row["epoch"]))
            for key, value in row.items()
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool)
        ]
        try:  # a hiccup of the server costs a point, never the epoch
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as exc:
            log.warning("tracking.mlflow: epoch %s not logged to %s: %s", row.get("epoch"), self.uri, exc)

    def logged_epochs(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}


@contextlib.contextmanager
def fold_run(mlflow: MlflowSettings | dict | None, results, dataset: str, experiment: str, fold: int, training, work):
    """Open (or continue) the fold's run around its training; afterwards log the epochs that
    are not there yet (a point lost to a kill between checkpoint and log), the fold's metrics
    and files, and finish it. Nothing at all when tracking is off. ``mlflow``:
    ``tracking.mlflow``; ``training``: the experiment's settings (``TrainSettings`` or dict)."""
    mlflow = MlflowSettings.of(mlflow)
    if not mlflow.enabled:
        yield None
        return
    from mlflow.entities import Param

    from medfold.settings.sections import settings_digest
    from medfold.settings.training import TrainSettings

    training = TrainSettings.of(training)
    uri = store_uri(mlflow, results)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    repeat = training.repeat
    digest = settings_digest(training.raw)
    path = work / RUN_FILE
    known = json.loads(path.read_text()) if path.exists() else {}
    if known.get("uri") == uri and known.get("settings") == digest and _run_exists(client, known["run_id"]):
        run_id = known["run_id"]
        _call(uri, "reopening the fold's run", lambda: client.update_run(run_id, status="RUNNING"))
        log.info("tracking.mlflow: continuing run %s (%s)", run_id, uri)
    else:
        parent = parent_run(mlflow, uri, dataset, experiment, work_experiment_dir(work))
        exp_id = client.get_run(parent).info.experiment_id
        name = f"fold_{fold}" + (f"/seed_{repeat}" if repeat else "")
        run = _call(
            uri,
            "creating the fold's run",
            lambda: client.create_run(
                exp_id,
                run_name=name,  # nested under the experiment's run, which is named after it
                tags={
                    "mlflow.parentRunId": parent,
                    "medfold.dataset": dataset,
                    "medfold.experiment": experiment,
                    "medfold.fold": str(fold),
                    "medfold.seed": str(repeat),
                    "medfold.role": "fold",
                },
            ),
        )
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in flatten(training.raw).items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 params per call
            _call(uri, "logging the settings", lambda s=start: client.log_batch(run_id, params=params[s : s + 100]))
        path.write_text(json.dumps({"uri": uri, "run_id": run_id, "settings": digest}) + "\n")
        log.info("tracking.mlflow: run %s for %s %s (%s)", run_id, experiment, name, uri)
    tracker = FoldTracker(uri, run_id)
    try:
        yield tracker
    except BaseException:
        # the job failed (or was stopped): the run says so until a retry continues it
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        raise
    _finish_fold(tracker, work)
    path.unlink(missing_ok=True)  # complete: a retrain is a new run


def work_experiment_dir(work: Path) -> Path:
    """``<experiment>/`` above a fold's folder (``fold_<k>/`` or ``fold_<k>/seed_<r>/``)."""
    return work.parent.parent if work.name.startswith("seed_") else work.parent


def _finish_fold(tracker: FoldTracker, work: Path) -> None:
    import pandas as pd

    from medfold.evaluation.metrics import scalar_metrics

    client, run_id, uri = tracker.client, tracker.run_id, tracker.uri
    history = pd.read_csv(work / "history.csv")
    if len(history):
        logged = _call(uri, "reading the run's history", lambda: tracker.logged_epochs("val_loss"))
        for row in history.to_dict("records"):
            if int(row["epoch"]) not in logged:
                tracker.log_epoch(row)
    result = json.loads((work / "metrics.json").read_text())
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    final = [
        Metric(f"{part}.{key}", float(value), stamp, 0)
        for part in ("val", "test")
        if part in result
        for key, value in scalar_metrics(result[part]).items()
        if value is not None
    ]
    _call(uri, "logging the fold's metrics", lambda: client.log_batch(run_id, metrics=final))
    for name in ("metrics.json", "history.csv", "model.pt"):
        _call(uri, f"uploading {name}", lambda n=name: client.log_artifact(run_id, str(work / n)))
    _call(uri, "finishing the fold's run", lambda: client.set_terminated(run_id, "FINISHED"))


def log_summary(
    mlflow: MlflowSettings | dict | None, results, dataset: str, experiment: str, experiment_dir, files: list
) -> None:
    """The cross-validation summary on the experiment's parent run (the aggregate job): mean and
    std of every metric over folds (and seeds), the fold ensemble's test metrics, the files."""
    mlflow = MlflowSettings.of(mlflow)
    if not mlflow.enabled:
        return
    from mlflow.entities import Metric

    uri = store_uri(mlflow, results)
    client = _client(uri)
    run_id = parent_run(mlflow, uri, dataset, experiment, experiment_dir)
    summary = json.loads(Path(experiment_dir, "cv", "summary.json").read_text())
    ensemble = json.loads(Path(experiment_dir, "cv", "ensemble_test.json").read_text()) or {}
    stamp = int(time.time() * 1000)
    metrics = [
        Metric(f"cv.{column}.{stat}", float(stats[stat]), stamp, 0)
        for column, stats in summary["statistics"].items()
        if column.startswith(("val.", "test."))
        for stat in ("mean", "std")
        if stats.get(stat) is not None
    ]
    metrics += [
        Metric(f"ensemble_test.{key}", float(value), stamp, 0)
        for key, value in ensemble.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    metrics.append(Metric("models", float(summary.get("models") or summary["folds"]), stamp, 0))
    for start in range(0, len(metrics), 500):
        _call(uri, "logging the summary", lambda s=start: client.log_batch(run_id, metrics=metrics[s : s + 500]))
    for path in files:
        _call(uri, f"uploading {Path(path).name}", lambda p=path: client.log_artifact(run_id, str(p), "cv"))
    _call(uri, "finishing the experiment's run", lambda: client.set_terminated(run_id, "FINISHED"))


def log_experiment(mlflow: MlflowSettings | dict | None, results, dataset: str, experiment: str, outputs) -> None:
    """``log_summary`` for what an aggregate rule wrote (a ``medfold.evaluation.aggregate.AggregateOutputs``)."""
    cv = outputs.cv
    experiment_dir = Path(cv.summary).parent.parent
    log_summary(
        mlflow,
        results,
        dataset,
        experiment,
        experiment_dir,
        [cv.summary, cv.per_fold, cv.ensemble, outputs.label_issues],
    )
