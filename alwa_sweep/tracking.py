"""MLflow tracking: the store, experiments, and the engine's logger.

The names written here are documented in ``docs/tracking_schema.md``; ``reports``
reads them back. Metrics go out with ``MlflowClient.log_batch`` (one call per pull of
the engine's records, ≤ 1000 metrics per call), never one request per iteration.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from trainers.config import flatten
from trainers.engine import TrainingLogger

DEFAULT_STORE_DIR = "alwa_runs"
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000

TAG_KIND = "alwa.kind"
TAG_STATUS = "alwa.status"
TAG_REASON = "alwa.status_reason"
TAG_TRIAL_KEY = "alwa.trial_key"
TAG_SWEEP = "alwa.sweep_name"
TAG_PARENT = "mlflow.parentRunId"


def default_tracking_uri(runs_dir: str | Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` in ``runs_dir``
    (default ``./alwa_runs``)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return sqlite_uri(Path(runs_dir or Path.cwd() / DEFAULT_STORE_DIR) / "mlflow.db")


def sqlite_uri(path: str | Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else ``None``."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def open_store(uri: str) -> MlflowClient:
    """A client for ``uri``, creating (and migrating) a SQLite store if it is new.

    Call this in the driver before any trial starts: processes that create a fresh
    SQLite store concurrently race on its schema migration.
    """
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    client.search_experiments(max_results=1)
    return client


def artifact_root(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside it (not in a cwd-relative ``mlruns``)."""
    db = sqlite_path(uri)
    if db is None:
        return None  # a tracking server decides
    return (db.parent / "artifacts" / experiment).resolve().as_uri()


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri, name))


def find_runs_by_tag(client: MlflowClient, experiment_id: str, key: str, value: str) -> list:
    escaped = value.replace("'", "\\'")
    return client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{escaped}'",
                              max_results=1000)


def _param_value(value) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


class MlflowTrainingLogger(TrainingLogger):
    """Writes the engine's records into one MLflow run.

    Resuming (``start`` with ``start_iteration > 0``) continues the same run; steps
    already stored before the interruption are not written again.
    """

    def __init__(self, client: MlflowClient, run_id: str, progress: TrainingLogger | None = None):
        self.client = client
        self.run_id = run_id
        self.progress = progress or TrainingLogger()
        self._skip_until = 0

    @classmethod
    def create(cls, client: MlflowClient, experiment_id: str, run_name: str, *, tags: dict | None = None,
               parent_run_id: str | None = None, progress: TrainingLogger | None = None):
        tags = dict(tags or {})
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        return cls(client, run.info.run_id, progress)

    def start(self, config, start_iteration, total_iterations):
        run = self.client.get_run(self.run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        existing = run.data.params
        params = [Param(k, _param_value(v)) for k, v in sorted(flatten(config).items())
                  if k not in existing]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
        self.client.set_tag(self.run_id, TAG_STATUS, "running")
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        if start_iteration > 0:
            history = self.client.get_metric_history(self.run_id, "train/loss")
            self._skip_until = max((m.step for m in history), default=0)
        self.progress.start(config, start_iteration, total_iterations)

    def on_iteration(self, iteration):
        self.progress.on_iteration(iteration)

    def log_iterations(self, rows):
        timestamp = int(time.time() * 1000)
        metrics = [Metric(name, value, timestamp, row["step"])
                   for row in rows if row["step"] > self._skip_until
                   for name, value in row.items() if name not in ("step", "epoch")]
        self._log_metrics(metrics)
        self.progress.log_iterations(rows)

    def log_evaluation(self, epoch, iteration, metrics):
        timestamp = int(time.time() * 1000)
        self._log_metrics([Metric(name, value, timestamp, epoch) for name, value in metrics.items()])
        self.progress.log_evaluation(epoch, iteration, metrics)

    def on_checkpoint(self, path, iteration, epoch):
        self.client.set_tag(self.run_id, "alwa.checkpoint", str(path))
        self.progress.on_checkpoint(path, iteration, epoch)

    def finish(self, status, reason, metrics):
        self.client.set_tag(self.run_id, TAG_STATUS, status)
        if reason:
            self.client.set_tag(self.run_id, TAG_REASON, reason[:5000])
        self.client.set_terminated(self.run_id, "FINISHED" if status == "ok" else "FAILED")
        self.progress.finish(status, reason, metrics)

    def _log_metrics(self, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
