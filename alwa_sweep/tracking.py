"""MLflow tracking: the store, experiments, and the engine's logger.

The names written here come from ``reports/schema.py`` (explained in
``docs/tracking_schema.md``), which ``reports`` reads them back with. Metrics go out with ``MlflowClient.log_batch`` (one call per pull of
the engine's records, ≤ 1000 metrics per call), never one request per iteration.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from alwa_sweep.sweep_paths import check_writable
from reports.schema import (ARTIFACT_CONFIG, ARTIFACT_DETECTIONS, METRIC_LOSS, STATUS_ERROR, STATUS_INTERRUPTED, STATUS_OK,
                            STATUS_RUNNING, STATUS_STOPPED, TAG_CHECKPOINT, TAG_PARENT, TAG_REASON, TAG_STATUS)
from trainers.config import flatten
from trainers.errors import ConfigError
from trainers.hooks import TrainingHook

DEFAULT_STORE_DIR = "alwa_runs"
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000


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


def check_tracking_server(uri: str, field: str = "--tracking-uri", timeout: float = 3.0) -> None:
    """Fail fast when an http(s) tracking server does not answer.

    MLflow's client retries a refused connection with back-off for minutes before it
    gives up; a sweep or a training run should not start (or hang) that way.
    """
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    try:
        host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        host = port = None
    if not host or not port:
        raise ConfigError(field, f"{uri!r} is not of the form http://host:port.")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(field, f"cannot reach the MLflow tracking server at {host}:{port} "
                          f"({exc.strerror or exc}).",
                          "Start it (`mlflow server ...`, see the README) or fix the URI; "
                          f"`curl {uri.rstrip('/')}/health` should answer OK.") from None


def open_store(uri: str, field: str = "--tracking-uri") -> MlflowClient:
    """A client for ``uri``, creating (and migrating) a SQLite store if it is new.

    Call this in the driver before any trial starts: processes that create a fresh
    SQLite store concurrently race on its schema migration. An unreachable server or
    an unwritable store folder is a :class:`ConfigError` naming ``field``.
    """
    check_tracking_server(uri, field)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        check_writable(db.parent, field)
    client = MlflowClient(tracking_uri=uri)
    client.search_experiments(max_results=1)
    return client


def artifact_root(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside it (not in a cwd-relative ``mlruns``).

    The experiment name comes from a spec: it names one folder under ``artifacts/``
    whatever it holds (``../x`` or ``a/b`` cannot reach elsewhere)."""
    db = sqlite_path(uri)
    if db is None:
        return None  # a tracking server decides
    folder = re.sub(r"[^\w.\-]", "_", experiment).strip(".") or "experiment"
    return (db.parent / "artifacts" / folder).resolve().as_uri()


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from reports.ui_links import experiment_tags  # MLflow's UI then opens it on its runs table

    return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri, name),
                                    tags=experiment_tags())


def find_runs_by_tag(client: MlflowClient, experiment_id: str, key: str, value: str) -> list:
    escaped = value.replace("'", "\\'")
    return client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{escaped}'",
                              max_results=1000)


def _param_value(value) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


class BackgroundWriter:
    """One thread that writes metric batches, so training never waits on the store.

    ``wait()`` blocks until everything queued is written and re-raises the first
    error the thread met; the logger calls it at evaluations, checkpoints and the end,
    so what a checkpoint covers is stored before the checkpoint is announced.
    """

    def __init__(self, write):
        self._write = write
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="mlflow-writer", daemon=True)
        self._thread.start()

    def _work(self):
        while True:
            item = self._queue.get()
            try:
                if item is not None and self._error is None:
                    self._write(item)
            except BaseException as exc:  # surfaced by wait()
                self._error = exc
            finally:
                self._queue.task_done()
            if item is None:
                return

    def put(self, item) -> None:
        self._raise()
        self._queue.put(item)

    def wait(self) -> None:
        self._queue.join()
        self._raise()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)
        self._raise()

    def _raise(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class MlflowHook(TrainingHook):
    """Writes the engine's records into one MLflow run.

    Resuming (``start`` with ``start_iteration > 0``) continues the same run; steps
    already stored before the interruption are not written again. ``finish`` ends the
    run (FINISHED for ``ok``, KILLED for an interruption, FAILED otherwise).
    """

    def __init__(self, client: MlflowClient, run_id: str, background: bool = True):
        self.client = client
        self.run_id = run_id
        self._skip_until = 0
        self._writer = BackgroundWriter(self._log_metrics) if background else None

    @classmethod
    def create(cls, client: MlflowClient, experiment_id: str, run_name: str, *, tags: dict | None = None,
               parent_run_id: str | None = None):
        tags = dict(tags or {})
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        return cls(client, run.info.run_id)

    def start(self, config, start_iteration, total_iterations):
        run = self.client.get_run(self.run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        self._config = config
        resolved = config.dump()
        existing = run.data.params
        params = [Param(k, _param_value(v)) for k, v in sorted(flatten(resolved).items()) if k not in existing]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
        self.client.set_tag(self.run_id, TAG_STATUS, STATUS_RUNNING)
        self.client.log_text(self.run_id, yaml.safe_dump(resolved, sort_keys=False), ARTIFACT_CONFIG)
        if start_iteration > 0:
            history = self.client.get_metric_history(self.run_id, METRIC_LOSS)
            self._skip_until = max((m.step for m in history), default=0)

    def log_iterations(self, rows):
        timestamp = int(time.time() * 1000)
        metrics = [Metric(name, value, timestamp, row["step"])
                   for row in rows if row["step"] > self._skip_until
                   for name, value in row.items() if name not in ("step", "epoch")]
        if self._writer is not None:
            self._writer.put(metrics)
        else:
            self._log_metrics(metrics)

    def wait(self) -> None:
        """Block until every queued metric is stored."""
        if self._writer is not None:
            self._writer.wait()

    def log_evaluation(self, epoch, iteration, metrics):
        timestamp = int(time.time() * 1000)
        self.wait()
        self._log_metrics([Metric(name, value, timestamp, epoch) for name, value in metrics.items()])

    def log_detections(self, detections, annotations, image_ids, class_names):
        """The final test-set detections as the run's ``detections.npz`` (``report --ci``)."""
        import tempfile

        from trainers.evaluation.detections_io import save_detections

        evaluation = self._config.evaluation
        with tempfile.TemporaryDirectory(prefix="alwa_detections_") as folder:
            path = save_detections(Path(folder) / ARTIFACT_DETECTIONS, detections, annotations,
                                   image_ids=image_ids, dataset=self._config.dataset.kind,
                                   iou_threshold=evaluation.iou_threshold, method=evaluation.method,
                                   class_names=class_names)
            self.client.log_artifact(self.run_id, str(path))

    def on_checkpoint(self, path, iteration, epoch):
        if path is None:
            return
        self.wait()
        self.client.set_tag(self.run_id, TAG_CHECKPOINT, str(path))

    def finish(self, status, reason, metrics):
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except Exception as exc:  # the run's result stands, but say its records are incomplete
                if status == STATUS_OK:
                    status, reason = STATUS_ERROR, f"writing metrics to MLflow failed: {exc}"
        end_run(self.client, self.run_id, status, reason)

    def _log_metrics(self, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])


def end_run(client: MlflowClient, run_id: str, status: str, reason: str = "") -> None:
    """Tag a run's final status (and reason) and end it in MLflow's own terms."""
    client.set_tag(run_id, TAG_STATUS, status)
    if reason:
        client.set_tag(run_id, TAG_REASON, reason[:5000])
    mlflow_status = ("FINISHED" if status in (STATUS_OK, STATUS_STOPPED)
                     else "KILLED" if status == STATUS_INTERRUPTED else "FAILED")
    client.set_terminated(run_id, mlflow_status)
