"""MLflow tracking: the store, experiments, and the engine's logger.

The names written here come from ``reports/schema.py`` (explained in
``docs/tracking_schema.md``), which ``reports`` reads them back with. Metrics go out with ``MlflowClient.log_batch`` (one call per pull of
the engine's records, ≤ 1000 metrics per call), never one request per iteration, and
the per-iteration rows are aggregated into one point per ``train.log_interval``
iterations (``IntervalAggregator``); ``benchmarks/bench_records_scale.py`` measures the
store and the reads at paper scale.
"""

from __future__ import annotations

import logging
import math
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
from reports.schema import (ARTIFACT_CONFIG, ARTIFACT_DETECTIONS, ARTIFACT_MODEL_DIR, EXTREME_METRICS, METRIC_ALPHA,
                            METRIC_FINAL_ITERATIONS, METRIC_FINAL_SECONDS, METRIC_LOSS, METRIC_LR, STATUS_ERROR,
                            STATUS_INTERRUPTED, STATUS_OK, STATUS_RUNNING, STATUS_STOPPED, TAG_CHECKPOINT,
                            TAG_PARENT, TAG_REASON, TAG_STATUS, main_metric, metric_final, metric_max, metric_min)
from trainers.config import flatten
from trainers.errors import ConfigError
from trainers.hooks import TrainingHook

DEFAULT_STORE_DIR = "alwa_runs"
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
_LOG = logging.getLogger("alwa_sweep.train")


def default_tracking_uri(runs_dir: str | Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` in ``runs_dir``
    (default ``./alwa_runs``)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return sqlite_uri(Path(runs_dir or Path.cwd() / DEFAULT_STORE_DIR) / "mlflow.db")


def sqlite_uri(path: str | Path) -> str:
    """The ``sqlite:///`` URI of a database file; '%', '?' and '#' are percent-quoted
    (SQLAlchemy decodes them), so a folder named ``runs?x=1`` is not read as a query."""
    text = str(Path(path).resolve())
    return "sqlite:///" + text.replace("%", "%25").replace("?", "%3F").replace("#", "%23")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else ``None``."""
    if not uri.startswith("sqlite:///"):
        return None
    from urllib.parse import unquote

    return Path(unquote(uri[len("sqlite:///"):].split("?", 1)[0]))


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
            taken, stop = 1, item is None
            batch = [] if item is None else list(item)
            # Coalesce what queued up meanwhile (a slow store, a remote server): fewer,
            # fuller log_batch calls, in the order the items came.
            while not stop and len(batch) < MAX_METRICS_PER_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                taken += 1
                if more is None:
                    stop = True
                else:
                    batch.extend(more)
            try:
                if batch and self._error is None:
                    self._write(batch)
            except BaseException as exc:  # surfaced by wait()
                self._error = exc
            finally:
                for _ in range(taken):
                    self._queue.task_done()
            if stop:
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


def _is_weight(name: str) -> bool:
    return name.startswith("weight/")


def _is_window(name: str) -> bool:
    return name.startswith("window/")


class IntervalAggregator:
    """The engine's per-iteration rows → MLflow points, one per ``interval`` iterations.

    A point at step ``s`` (the last iteration of its interval; an interval ends where
    ``step % interval == 0``, or early at :meth:`flush`) holds the mean of every loss
    over the interval and ``/min`` and ``/max`` of the losses in ``EXTREME_METRICS``.
    Besides the points: ``window/…`` at the iteration it was computed (ALWA's updates),
    ``weight/…`` at its first iteration and at each iteration it changed (a step
    function: its value at any point is the last one written — writing it again at
    every interval end would triple ALWA's α points for nothing),
    ``lr`` at the first iteration of an interval where it differs from the last value
    written and, if it moved on, at the interval's end. ``interval=1`` writes every row
    as it is. Rows with ``step <= skip_until`` (already stored before a resume) are dropped.

    Pure Python: ``add``/``flush`` return ``(name, value, step)`` triples.
    """

    def __init__(self, interval: int, skip_until: int = 0):
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.interval = interval
        self.skip_until = skip_until
        self.last_step = skip_until  # the last iteration seen (stored or dropped)
        self.last_point: dict[str, float] = {}  # the last point's loss means
        self.weights: dict[str, float] = {}  # each weight's last value seen
        self._sums: dict[str, list] = {}  # name -> [sum, count, min, max]
        self._count = 0
        self._end_step = 0
        self._end_lr = None
        self._written_weights: dict[str, float] = {}
        self._written_lr = None
        self._lr_written_this_interval = False

    def add(self, rows) -> list[tuple[str, float, int]]:
        out: list[tuple[str, float, int]] = []
        for row in rows:
            step = int(row["step"])
            self.last_step = max(self.last_step, step)
            for name, value in row.items():
                if _is_weight(name):
                    self.weights[name] = value
            if step <= self.skip_until:
                continue
            for name, value in row.items():
                if name in ("step", "epoch"):
                    continue
                if _is_window(name):
                    out.append((name, value, step))
                elif _is_weight(name):
                    if self._written_weights.get(name) != value:
                        out.append((name, value, step))
                        self._written_weights[name] = value
                elif name == METRIC_LR:
                    self._end_lr = value
                    if value != self._written_lr and not self._lr_written_this_interval:
                        out.append((name, value, step))
                        self._written_lr = value
                        self._lr_written_this_interval = True
                else:
                    acc = self._sums.get(name)
                    if acc is None:
                        self._sums[name] = [value, 1, value, value]
                    else:
                        acc[0] += value
                        acc[1] += 1
                        acc[2] = value if (value < acc[2] or math.isnan(value)) else acc[2]
                        acc[3] = value if (value > acc[3] or math.isnan(value)) else acc[3]
            self._count += 1
            self._end_step = step
            if step % self.interval == 0:
                out.extend(self._close())
        return out

    def flush(self) -> list[tuple[str, float, int]]:
        """Close the interval under way (a checkpoint, an evaluation, the end)."""
        return self._close() if self._count else []

    def _close(self) -> list[tuple[str, float, int]]:
        step, out, means = self._end_step, [], {}
        for name, (total, count, low, high) in self._sums.items():
            means[name] = total / count
            out.append((name, means[name], step))
            if name in EXTREME_METRICS:
                out.append((metric_min(name), low, step))
                out.append((metric_max(name), high, step))
        if self._end_lr is not None and self._end_lr != self._written_lr:
            out.append((METRIC_LR, self._end_lr, step))
            self._written_lr = self._end_lr
        self.last_point = means
        self._sums, self._count, self._lr_written_this_interval = {}, 0, False
        return out


def _dedupe(points):
    """One value per (name, step): the last one (a weight written at its change and again
    at the interval's end on the same iteration)."""
    seen = {}
    for name, value, step in points:
        seen[(name, step)] = value
    return [(name, value, step) for (name, step), value in seen.items()]


class MlflowHook(TrainingHook):
    """Writes the engine's records into one MLflow run.

    Per-iteration rows are aggregated into one point per ``train.log_interval``
    iterations (:class:`IntervalAggregator`); evaluations go out as they come; at the
    end, the run's summary (``final/…``, ``reports.schema``) is written once, so tables
    never read histories. ``start`` also records the run's provenance
    (``alwa_sweep.provenance``: code version, environment, dataset inputs) and starts
    ``logs/train.log`` (the ``trainers``/``alwa_sweep`` loggers and one line per point,
    uploaded at the end); ``system_metrics`` samples CPU/GPU/memory as ``system/…``;
    ``log_model`` uploads the final checkpoint file under ``model/`` when it is written
    (a sweep trial's engine hands its checkpoints to Tune, which deletes the file after).
    The tag ``alwa.checkpoint`` names the last checkpoint, or ``checkpoint_location``
    (where a sweep's storage keeps a trial's checkpoints) when given.

    Resuming (``start`` with ``start_iteration > 0``) continues the same run; steps
    already stored before the interruption are not written again. ``finish`` ends the
    run (FINISHED for ``ok``, KILLED for an interruption, FAILED otherwise).
    """

    def __init__(self, client: MlflowClient, run_id: str, background: bool = True, *,
                 provenance: bool = True, system_metrics: bool = False, log_model: bool = False,
                 train_log: bool = True, checkpoint_location: str | None = None):
        self.client = client
        self.run_id = run_id
        self._skip_until = 0
        self._writer = BackgroundWriter(self._log_metrics) if background else None
        self.provenance = provenance
        self.system_metrics = system_metrics
        self.log_model = log_model
        self.train_log = train_log
        self._aggregator = IntervalAggregator(1)
        self._total = 0
        self._started = None
        self._seconds_before = 0.0
        self.checkpoint_location = checkpoint_location
        self._problems: list[str] = []  # met before finish, reported by it
        self._log = None
        self._monitor = None

    @classmethod
    def create(cls, client: MlflowClient, experiment_id: str, run_name: str, *, tags: dict | None = None,
               parent_run_id: str | None = None, **options):
        tags = dict(tags or {})
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        return cls(client, run.info.run_id, **options)

    def start(self, config, start_iteration, total_iterations):
        self._started = time.monotonic()
        self._total = total_iterations
        run = self.client.get_run(self.run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        self._config = config
        # the config's switches, unless the caller turned them on already
        self.system_metrics = self.system_metrics or config.train.system_metrics
        self.log_model = self.log_model or config.train.log_model
        resolved = config.dump()
        existing = run.data.params
        params = [Param(k, _param_value(v)) for k, v in sorted(flatten(resolved).items()) if k not in existing]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
        self.client.set_tag(self.run_id, TAG_STATUS, STATUS_RUNNING)
        self.client.log_text(self.run_id, yaml.safe_dump(resolved, sort_keys=False), ARTIFACT_CONFIG)
        # Steps this run stored before (a restart from a checkpoint, or from scratch after a
        # kill before the first one) are not written again.
        history = self.client.get_metric_history(self.run_id, METRIC_LOSS)
        self._skip_until = max((m.step for m in history), default=0)
        if start_iteration > 0:
            self._seconds_before = run.data.metrics.get(METRIC_FINAL_SECONDS, 0.0)
        self._aggregator = IntervalAggregator(config.train.log_interval, self._skip_until)
        if self.train_log:
            from alwa_sweep.provenance import TrainLog
            self._log = TrainLog.open(start_iteration)
        if self.provenance:
            from alwa_sweep.provenance import log_provenance
            log_provenance(self.client, self.run_id, config)
        if self.system_metrics:
            from alwa_sweep.provenance import start_system_metrics
            self._monitor = start_system_metrics(self.client, self.run_id, resume=start_iteration > 0)
        _LOG.info("training %s from iteration %d of %d (log_interval %d)", self.run_id, start_iteration,
                  total_iterations, config.train.log_interval)

    def log_iterations(self, rows):
        self._put(self._aggregator.add(rows))

    def _put(self, points) -> None:
        if not points:
            return
        self._log_line(points)
        timestamp = int(time.time() * 1000)
        metrics = [Metric(name, value, timestamp, step) for name, value, step in _dedupe(points)]
        if self._writer is not None:
            self._writer.put(metrics)
        else:
            self._log_metrics(metrics)

    def _log_line(self, points) -> None:
        """One line per point, as mmengine's TextLoggerHook writes them."""
        point = {name: value for name, value, _ in points if name.startswith("train/") or name == METRIC_LR
                 or name == METRIC_ALPHA}
        if METRIC_LOSS not in point:
            return
        step = max(s for _, _, s in points)
        text = "  ".join(f"{name.removeprefix('train/')}: {value:.4g}" for name, value in point.items())
        _LOG.info("iter [%d/%d]  %s", step, self._total, text)

    def wait(self) -> None:
        """Close the interval under way and block until every queued metric is stored
        (before a checkpoint: what it covers is stored before its file exists)."""
        self._put(self._aggregator.flush())
        if self._writer is not None:
            self._writer.wait()

    def log_evaluation(self, epoch, iteration, metrics):
        timestamp = int(time.time() * 1000)
        self.wait()
        self._log_metrics([Metric(name, value, timestamp, epoch) for name, value in metrics.items()])
        main = main_metric(metrics)
        _LOG.info("evaluation after epoch %d (iteration %d): %s", epoch, iteration,
                  f"{main:.4f}" if main is not None else "no main metric")

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
        self.client.set_tag(self.run_id, TAG_CHECKPOINT, self.checkpoint_location or str(path))
        _LOG.info("checkpoint at iteration %d: %s", iteration, path)
        if self.log_model and iteration >= self._total:  # the final one: the trained model
            try:
                self.client.log_artifact(self.run_id, str(path), ARTIFACT_MODEL_DIR)
            except Exception as exc:
                self._problems.append(f"uploading the model failed: {exc}")

    def summary(self, metrics: dict) -> dict[str, float]:
        """The run's ``final/…`` metrics (``reports.schema``)."""
        aggregator = self._aggregator
        out = {metric_final(name): value for name, value in (metrics or {}).items()}
        out.update({metric_final(name): value for name, value in aggregator.weights.items()})
        out.update({metric_final(name): value for name, value in aggregator.last_point.items()})
        out[METRIC_FINAL_ITERATIONS] = float(aggregator.last_step)
        elapsed = time.monotonic() - self._started if self._started is not None else 0.0
        out[METRIC_FINAL_SECONDS] = self._seconds_before + elapsed
        return out

    def finish(self, status, reason, metrics):
        problems, self._problems = self._problems, []
        try:
            self._put(self._aggregator.flush())
            summary = self.summary(metrics)
            step = int(summary[METRIC_FINAL_ITERATIONS])
            timestamp = int(time.time() * 1000)
            points = [Metric(name, value, timestamp, step) for name, value in summary.items()]
            if self._writer is not None:
                self._writer.put(points)
            else:
                self._log_metrics(points)
            _LOG.info("finished: %s%s", status, f" ({reason})" if reason else "")
        except Exception as exc:
            problems.append(f"writing the summary failed: {exc}")
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except Exception as exc:  # the run's result stands, but say its records are incomplete
                problems.append(f"writing metrics to MLflow failed: {exc}")
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as exc:
                _LOG.warning("system metrics: %s", exc)
            self._monitor = None
        if self._log is not None:
            log, self._log = self._log, None
            try:
                log.close_and_upload(self.client, self.run_id)
            except Exception as exc:
                problems.append(f"uploading the training log failed: {exc}")
        if problems and status == STATUS_OK:
            status, reason = STATUS_ERROR, "; ".join(problems)
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
