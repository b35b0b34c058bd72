"""The body of one sweep trial, run inside a Ray Tune trial process.

Every trial maps to exactly one MLflow run, found by its deterministic trial key (a
tag) before a run is created, so a retried, resumed or re-launched trial continues its
run instead of adding a duplicate, and a trial that already reached a final status is
not trained again. The training itself is :func:`trainers.engine.train`; checkpoints
are handed to Tune (``tune.report(..., checkpoint=...)``) so that a killed trial is
restarted from its last one.

Single-worker trials train in the Tune trial process. Multi-worker trials start a Ray
Train ``TorchTrainer`` (DDP; gloo on CPU, NCCL on GPU) from the trial function, as Ray
Train V2 documents for Tune; only rank 0 logs to MLflow.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from alwa_sweep.tracking import MlflowHook, end_run, find_runs_by_tag
from reports.schema import (DONE_STATUSES, KIND_TRIAL, METRIC_LOSS, STATUS_ERROR, STATUS_INTERRUPTED, STATUS_PENDING, STATUS_RUNNING,
                            STATUS_STOPPED, TAG_KIND, TAG_PARENT, TAG_STATUS, TAG_SWEEP, TAG_TRIAL_KEY)
from alwa_sweep.schedulers import tune_result
from trainers.engine import Diverged, train
from trainers.hooks import TrainingHook


def find_or_create_trial_run(client, payload: dict):
    """The trial's MLflow run (existing one by trial key, else a new child run)."""
    runs = [r for r in find_runs_by_tag(client, payload["experiment_id"], TAG_TRIAL_KEY, payload["key"])
            if r.data.tags.get(TAG_PARENT) == payload["parent_run_id"]]
    if runs:
        runs.sort(key=lambda r: r.info.start_time)
        return runs[0]
    tags = {TAG_KIND: KIND_TRIAL, TAG_TRIAL_KEY: payload["key"], TAG_SWEEP: payload["sweep_name"],
            TAG_PARENT: payload["parent_run_id"], TAG_STATUS: STATUS_PENDING}
    return client.create_run(payload["experiment_id"], run_name=payload["name"], tags=tags)


def _checkpoint_for_report(path: Path):
    """A Tune/Train checkpoint holding just this checkpoint file (and its digest)."""
    from ray import tune

    staging = Path(tempfile.mkdtemp(prefix="alwa_ckpt_"))
    for source in (path, path.with_name(path.name + ".sha256")):
        if source.exists():
            shutil.copy2(source, staging / source.name)
    return tune.Checkpoint.from_directory(str(staging)), staging


class TuneReportHook(TrainingHook):
    """Each checkpoint, with the latest loss and score, goes to ``report`` (Tune's or
    Train's); every rank gets it (Train wants every rank to report)."""

    def __init__(self, report):
        self.report = report
        self.metrics: dict = {}
        self.loss: float | None = None

    def log_iterations(self, rows):
        if rows:
            self.loss = rows[-1][METRIC_LOSS]

    def log_evaluation(self, epoch, iteration, metrics):
        if metrics:
            self.metrics = metrics

    def on_checkpoint(self, path, iteration, epoch):
        result = tune_result(iteration, epoch, STATUS_RUNNING, self.metrics, self.loss)
        if path is None:
            self._report(result, None)
            return
        checkpoint, staging = _checkpoint_for_report(Path(path))
        try:
            self._report(result, checkpoint)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _report(self, result: dict, checkpoint) -> None:
        try:
            self.report(result, checkpoint=checkpoint)
        except SystemExit:  # Tune stopped this trial (ASHA) while it waited in report()
            raise Diverged(STATUS_STOPPED, f"stopped early by the scheduler at epoch {result['epoch']}") from None


def _resume_source(get_checkpoint, workdir: Path):
    """Whether to resume from the trial's checkpoint folder (``True``) or start afresh.

    The framework's checkpoint (Tune's copy of the last reported one) is added to that
    folder when it is missing there (a restart on another node), never over a file
    already present: the engine then loads the newest checkpoint that passes its
    digest and falls back to the previous one, with a warning, when that one is
    truncated or corrupt. A lone copy in a temporary folder had nothing to fall back to.
    """
    checkpoint = get_checkpoint()
    own = workdir / "checkpoints"
    if checkpoint is not None:
        own.mkdir(parents=True, exist_ok=True)
        local = Path(tempfile.mkdtemp(prefix="alwa_restore_"))
        try:
            checkpoint.to_directory(str(local))
            for source in sorted(local.iterdir(), key=lambda p: p.suffix == ".pt"):  # digest first
                target = own / source.name
                if not target.exists():
                    partial = target.with_name(target.name + f".restore{os.getpid()}")
                    shutil.copy2(source, partial)
                    os.replace(partial, target)  # ranks sharing the folder never see half a file
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return True
    if own.is_dir():
        return True
    return None


def _train_with_logging(payload: dict, report, get_checkpoint, device=None, is_main=True):
    from mlflow.tracking import MlflowClient

    workdir = Path(payload["workdir"])
    hooks = [TuneReportHook(report)]
    if is_main:  # only rank 0 logs
        hooks.insert(0, MlflowHook(MlflowClient(payload["tracking_uri"]), payload["run_id"]))
    resume = _resume_source(get_checkpoint, workdir)
    return train(payload["config"], workdir=workdir, hooks=hooks, resume=resume, device=device)


def run_trial(params: dict) -> None:
    """The Tune function trainable."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    payload = dict(params["trial"])
    client = MlflowClient(payload["tracking_uri"])
    run = find_or_create_trial_run(client, payload)
    payload["run_id"] = run.info.run_id
    status = run.data.tags.get(TAG_STATUS)
    if status in DONE_STATUSES:
        tune.report({**tune_result(0, 0, status, run.data.metrics), "skipped": True})
        return
    try:
        if payload["workers"] > 1:
            # Rank 0's last ray.train.report reaches Tune through TuneReportCallback.
            _run_distributed(payload)
            return
        result = _train_with_logging(payload, tune.report, tune.get_checkpoint)
        if result.status == STATUS_STOPPED:
            return  # Tune takes no more results from a stopped trial
    except Exception as exc:  # recorded in MLflow (again, if the engine got that far); the sweep goes on
        end_run(client, payload["run_id"], STATUS_ERROR, f"{type(exc).__name__}: {exc}")
        tune.report({**tune_result(0, 0, STATUS_ERROR), "error": f"{type(exc).__name__}: {exc}"[:500]})
        return
    tune.report(tune_result(result.iterations, _last_epoch(result), result.status, result.metrics))


def _train_storage(payload: dict) -> dict:
    """Where Ray Train keeps a DDP trial's runs: the sweep's ``--storage``, else its folder."""
    from alwa_sweep.storage import resolve_storage

    if payload.get("storage"):
        storage = resolve_storage(payload["storage"]).join(payload["sweep_name"], "train")
    else:
        storage = resolve_storage(payload["train_storage"])
    return storage.run_config_kwargs()


def _train_worker(payload: dict) -> None:
    """One Ray Train worker: the engine under the process group Ray Train started."""
    import ray.train
    import ray.train.torch

    is_main = ray.train.get_context().get_world_rank() == 0
    result = _train_with_logging(payload, ray.train.report, ray.train.get_checkpoint,
                                 device=ray.train.torch.get_device(), is_main=is_main)
    ray.train.report(tune_result(result.iterations, _last_epoch(result), result.status, result.metrics),
                     checkpoint=None)


def _last_epoch(result) -> int:
    """The epoch of the last evaluation (ASHA's time attribute), 0 before any."""
    return int(result.evaluations[-1][0]) if result.evaluations else 0


def _run_distributed(payload: dict) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    use_gpu = payload["gpus_per_worker"] > 0
    per_worker = {"CPU": payload["cpus_per_worker"], **(payload.get("resources_per_worker") or {})}
    if use_gpu:
        per_worker["GPU"] = payload["gpus_per_worker"]
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=payload,
        scaling_config=ray.train.ScalingConfig(num_workers=payload["workers"], use_gpu=use_gpu,
                                               resources_per_worker=per_worker,
                                               accelerator_type=payload.get("accelerator_type"),
                                               placement_strategy=payload.get("placement_strategy", "PACK")),
        run_config=ray.train.RunConfig(name=f"train-{payload['key']}", **_train_storage(payload),
                                       callbacks=[TuneReportCallback()],
                                       failure_config=ray.train.FailureConfig(max_failures=payload["max_failures"])),
    )
    trainer.fit()


def end_unfinished_trial_runs(state: dict, reason: str) -> list[str]:
    """End every trial run of a sweep that is still RUNNING as interrupted (KILLED).

    For the driver after the sweep stopped early (SIGTERM, Ctrl-C, an error): Ray stops
    the trial processes when the driver's runtime shuts down, without running their
    ``finally`` blocks (the training thread of a Tune function trainable dies with the
    process), so their runs would stay RUNNING. Call it after ``ray.shutdown()``, so no
    trial still writes. ``state`` is the sweep's ``sweep.json``; returns the ended run ids.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(state["tracking_uri"])
    ended = []
    for run in find_runs_by_tag(client, state["experiment_id"], TAG_PARENT, state["parent_run_id"]):
        if run.info.status == "RUNNING" and run.data.tags.get(TAG_STATUS) not in DONE_STATUSES:
            end_run(client, run.info.run_id, STATUS_INTERRUPTED, reason)
            ended.append(run.info.run_id)
    return ended
