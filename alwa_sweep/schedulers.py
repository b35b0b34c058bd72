"""Tune schedulers of a sweep, and recording the trials a scheduler stops.

ASHA compares trials on ``scheduler.metric`` (default: the main metric, ``val/map`` for
VOC, ``val/ap`` for COCO) in ``scheduler.mode`` at rungs of ``epoch``. It must never
see a score a trial has not earned: a trial reports a metric only once it has been
evaluated (:func:`tune_result` below is what ``trial.py`` must report), and Tune's
strict metric check, which would fail a result without the metric, is turned off.

A trial ASHA stops is killed by Tune mid-training, so it can not record its own end:
:class:`StoppedTrialRecorder` (a driver-side Tune callback) tags its MLflow run
``stopped`` (``reports.schema.STATUS_STOPPED``) and ends the run ``KILLED``.
"""

from __future__ import annotations

import math

from reports.schema import (DONE_STATUSES, FINAL_STATUSES, MAIN_METRICS, STATUS_STOPPED, TAG_PARENT,
                            TAG_REASON, TAG_STATUS, TAG_TRIAL_KEY, VAL_PREFIX, main_metric)

TIME_ATTR = "epoch"
RESULT_KEYS = ("loss", "score")  # top-level keys of a trial's Tune results


def scheduler_metric(scheduler: dict, dataset_kind: str | None = None) -> str:
    """``scheduler.metric`` as a key of the trial's results: ``loss`` (the last training
    loss) and ``score`` (the main metric) as they are, other names may omit the ``val/``
    prefix (``map`` → ``val/map``); the default is the dataset's main metric."""
    metric = scheduler.get("metric")
    if not metric:
        return MAIN_METRICS[1] if dataset_kind == "coco" else MAIN_METRICS[0]
    metric = str(metric)
    return metric if "/" in metric or metric in RESULT_KEYS else f"{VAL_PREFIX}{metric}"


def build_scheduler(scheduler: dict, max_epochs: int, dataset_kind: str | None = None):
    """The Tune scheduler of ``spec.scheduler`` (None for ``type: none``)."""
    if scheduler.get("type", "none") != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Results before the first evaluation carry no metric; ASHA skips them (and run_sweep
    # turns Tune's strict metric check off).
    return ASHAScheduler(time_attr=TIME_ATTR, metric=scheduler_metric(scheduler, dataset_kind),
                         mode=scheduler.get("mode", "max"), grace_period=int(scheduler.get("grace_period", 1)),
                         reduction_factor=float(scheduler.get("reduction_factor", 3)),
                         max_t=max(int(max_epochs), 1),
                         # A trial reaching max_t ends by itself (and records ok); stopping it
                         # there would kill it before its last evaluation is logged.
                         stop_last_trials=False)


def tune_result(iteration: int, epoch: int, status: str, metrics: dict | None = None,
                loss: float | None = None) -> dict:
    """What a trial reports to Tune: the evaluation metrics only when there are some
    (finite ones), the main one also as ``score``; ``epoch`` is ASHA's time."""
    result = {"iteration": int(iteration), "epoch": int(epoch), "status": status,
              "loss": float("nan") if loss is None else float(loss)}
    for name, value in (metrics or {}).items():
        if name.startswith(VAL_PREFIX) and isinstance(value, (int, float)) and math.isfinite(value):
            result[name] = float(value)
    score = main_metric(result)
    if score is not None:
        result["score"] = score
    return result


def _tune_callback_base():
    from ray.tune import Callback

    return Callback


class StoppedTrialRecorder(_tune_callback_base()):
    """Tags the MLflow run of a trial that ended without a final status of its own
    (stopped by the scheduler) ``stopped``. Runs in the driver."""

    def __init__(self):
        self.recorded: list[str] = []

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if last.get("status") in FINAL_STATUSES or last.get("skipped"):
            return  # it ended by itself (ok, nan, overflow, error) or was already done
        from alwa_sweep.trial import trial_payload

        try:
            payload = trial_payload(trial.config or {})
        except (KeyError, TypeError, ValueError):  # not a trial of this sweep's making
            return
        if not payload.get("key") or not payload.get("tracking_uri"):
            return
        record_stopped(payload, epoch=last.get(TIME_ATTR), metric=last.get("score"))
        self.recorded.append(payload["key"])


def record_stopped(payload: dict, epoch=None, metric=None) -> str | None:
    """Mark the trial's MLflow run ``stopped`` unless it already has a final status."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(payload["tracking_uri"])
    escaped = payload["key"].replace("'", "\\'")
    runs = client.search_runs([payload["experiment_id"]], filter_string=f"tags.`{TAG_TRIAL_KEY}` = '{escaped}'",
                              max_results=100)
    runs = [r for r in runs if r.data.tags.get(TAG_PARENT) == payload.get("parent_run_id")]
    if not runs:
        return None
    run = min(runs, key=lambda r: r.info.start_time)
    if run.data.tags.get(TAG_STATUS) in DONE_STATUSES:
        return run.info.run_id
    reason = "stopped early by the ASHA scheduler"
    if epoch is not None:
        reason += f" after epoch {epoch}"
    if metric is not None:
        reason += f" (score {metric:.4g})"
    client.set_tag(run.info.run_id, TAG_STATUS, STATUS_STOPPED)
    client.set_tag(run.info.run_id, TAG_REASON, reason)
    client.set_terminated(run.info.run_id, "KILLED")
    return run.info.run_id
