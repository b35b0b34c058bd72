"""The body of one sweep trial, run inside a Ray Tune trial process.

Every trial maps to exactly one MLflow run, found by its deterministic trial key (a
tag) before a run is created, so a retried, resumed or re-launched trial continues its
run instead of adding a duplicate, and a trial that already reached a final status is
not trained again. The training itself is :func:`trainers.engine.train`; its
checkpoints are handed off to Tune (``tune.report(..., checkpoint=...)``) or Train,
which store the only copies (``keep_checkpoints`` of them), and a killed trial restarts
from the last one there. A search trial (``search:`` specs) gets its config from the
point the sampler proposed (:func:`trial_payload`).

Single-worker trials train in the Tune trial process. Multi-worker trials start a Ray
Train ``TorchTrainer`` (DDP; gloo on CPU, NCCL on GPU) from the trial function, as Ray
Train V2 documents for Tune; only rank 0 logs to MLflow.
"""

from __future__ import annotations

import shutil
import warnings
from contextlib import ExitStack
from pathlib import Path

from alwa_sweep.tracking import MlflowHook, end_run, find_runs_by_tag
from reports.schema import (DONE_STATUSES, KIND_TRIAL, METRIC_LOSS, STATUS_ERROR, STATUS_INTERRUPTED, STATUS_PENDING, STATUS_RUNNING,
                            STATUS_STOPPED, TAG_KIND, TAG_PARENT, TAG_SEARCH, TAG_STATUS, TAG_SWEEP, TAG_TRIAL_KEY)
from alwa_sweep.schedulers import tune_result
from alwa_sweep.spec import KEEP_CHECKPOINTS
from trainers.checkpoint import require_resumable_checkpoint
from trainers.errors import NoResumableCheckpointError
from trainers.engine import Diverged, train
from trainers.hooks import TrainingHook


TUNE_NAME = "tune"  # Ray Tune's experiment (state, trial folders, checkpoints) in the sweep's storage
TRAIN_NAME = "train"  # Ray Train's runs of DDP trials, beside Tune's state in the sweep's storage


def train_run_name(key: str) -> str:
    return f"train-{key}"


def trial_fields(trial, sweep_dir) -> dict:
    """One trial's own part of its payload (``trial``: an ``alwa_sweep.spec.Trial``)."""
    return {"key": trial.key, "name": trial.name,
            "config": trial.config.dump(),  # plain data: Tune restores placeholders for objects
            "workdir": str(Path(sweep_dir) / "trials" / trial.key)}


def trial_payload(params: dict) -> dict:
    """The payload of the trial Tune started with ``params``: a grid trial's as the driver
    wrote it; a search trial's resolved from the point the sampler proposed (``sample``)."""
    payload = dict(params["trial"])
    if "sample" in params and "key" not in payload:
        from alwa_sweep.spec import sampled_trial

        trial = sampled_trial(payload["search_base"], params["sample"], payload.get("emulate_workers", 1))
        payload.update(trial_fields(trial, payload["sweep_dir"]))
    return payload


def checkpoint_location(payload: dict) -> str:
    """Where the trial's checkpoints are stored (its MLflow tag ``alwa.checkpoint``)."""
    storage = _sweep_storage(payload)
    if payload["workers"] > 1:  # Ray Train's run folder (_run_distributed)
        return storage.join(TRAIN_NAME, train_run_name(payload["key"])).display
    return storage.join(TUNE_NAME, payload["key"]).display


def find_or_create_trial_run(client, payload: dict):
    """The trial's MLflow run (existing one by trial key, else a new child run)."""
    runs = [r for r in find_runs_by_tag(client, payload["experiment_id"], TAG_TRIAL_KEY, payload["key"])
            if r.data.tags.get(TAG_PARENT) == payload["parent_run_id"]]
    if runs:
        runs.sort(key=lambda r: r.info.start_time)
        return runs[0]
    tags = {TAG_KIND: KIND_TRIAL, TAG_TRIAL_KEY: payload["key"], TAG_SWEEP: payload["sweep_name"],
            TAG_PARENT: payload["parent_run_id"], TAG_STATUS: STATUS_PENDING}
    if payload.get("search_keys"):  # a sampled trial (reports/search.py)
        tags[TAG_SEARCH] = ",".join(payload["search_keys"])
    return client.create_run(payload["experiment_id"], run_name=payload["name"], tags=tags)


class TuneReportHook(TrainingHook):
    """Each checkpoint, with the latest loss and score, goes to ``report``
    (:func:`report_to_tune` or :func:`report_to_train`); every rank gets it (Train wants
    every rank to report). The engine hands its checkpoints off
    (``train(hand_off_checkpoints=True)``): ``report`` persists the folder into the
    storage, the one durable copy, and the folder is deleted once it returns."""

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
        folder = Path(path).parent if path is not None else None
        try:
            self.report(result, folder)
        except SystemExit:  # Tune stopped this trial (ASHA) while it waited in report()
            raise Diverged(STATUS_STOPPED, f"stopped early by the scheduler at epoch {result['epoch']}") from None
        finally:
            if folder is not None:  # persisted by report (synchronously), or the trial ends here
                shutil.rmtree(folder, ignore_errors=True)


def report_to_tune(result: dict, folder: Path | None) -> None:
    """``tune.report``: Tune copies ``folder`` into the trial's ``checkpoint_NNNNNN``
    (``ray/train/_internal/session.py``: ``persist_current_checkpoint``) before it returns."""
    from ray import tune

    tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(folder)) if folder else None)


def report_to_train(result: dict, folder: Path | None) -> None:
    """``ray.train.report`` from a Train worker (rank 0 has the checkpoint); synchronous
    upload, into a folder named after the engine's (``checkpoint_<iteration>``)."""
    import ray.train

    if folder is None:
        ray.train.report(result, checkpoint=None)
        return
    ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                     checkpoint_dir_name=folder.name.replace("ckpt_", "checkpoint_"))


class RestoredCheckpoint(TrainingHook):
    """The checkpoint a restarted trial resumes from, as a local folder (``folder``;
    ``None``: start afresh).

    ``get_checkpoint()`` is the framework's last persisted checkpoint. On a local or
    shared file system that is the storage folder itself (no copy); from a bucket it is
    downloaded into a temporary folder, deleted as soon as the engine has loaded it
    (``start``) or the run ended before (``finish``, :meth:`release`). A truncated or
    corrupt newest checkpoint (its SHA-256 digest) is skipped, with a warning, for the
    one persisted before it: the sibling ``checkpoint_*`` folders of the storage.
    """

    def __init__(self, get_checkpoint):
        self._held = ExitStack()
        self.folder: Path | None = None
        checkpoint = get_checkpoint()
        if checkpoint is not None:
            self.folder = self._first_intact(checkpoint)

    def _first_intact(self, checkpoint) -> Path | None:
        for candidate in _newest_first(checkpoint):
            attempt = ExitStack()
            folder = Path(attempt.enter_context(candidate.as_directory()))
            try:
                require_resumable_checkpoint(folder, field=candidate.path)
            except NoResumableCheckpointError as exc:
                attempt.close()
                warnings.warn(f"skipping corrupt checkpoint {candidate.path}: {exc.problem} Falling back to the "
                              "previous one.", stacklevel=2)
                continue
            self._held = attempt
            return folder
        return None

    def release(self) -> None:
        self._held.close()

    def start(self, config, start_iteration, total_iterations):
        self.release()

    def finish(self, status, reason, metrics):
        self.release()


def _newest_first(checkpoint) -> list:
    """``checkpoint``, then the older ``checkpoint_*`` folders beside it in its storage."""
    import posixpath

    import pyarrow.fs as pafs

    parent, name = posixpath.split(checkpoint.path.rstrip("/"))
    try:
        infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    except OSError:
        infos = []
    older = sorted((info.path for info in infos if info.type == pafs.FileType.Directory
                    and info.base_name.startswith("checkpoint_") and info.base_name < name), reverse=True)
    return [checkpoint] + [type(checkpoint)(path, filesystem=checkpoint.filesystem) for path in older]


def _train_with_logging(payload: dict, report, get_checkpoint, device=None, is_main=True):
    from mlflow.tracking import MlflowClient

    workdir = Path(payload["workdir"])
    if is_main:  # an earlier attempt's unreported checkpoint (killed mid-report) is not a copy to keep
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    restored = RestoredCheckpoint(get_checkpoint)
    hooks = [restored, TuneReportHook(report)]
    if is_main:  # only rank 0 logs
        hooks.insert(0, MlflowHook(MlflowClient(payload["tracking_uri"]), payload["run_id"],
                                   checkpoint_location=checkpoint_location(payload)))
    try:
        return train(payload["config"], workdir=workdir, hooks=hooks, resume=restored.folder, device=device,
                     hand_off_checkpoints=True)
    finally:
        restored.release()


def run_trial(params: dict) -> None:
    """The Tune function trainable."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    payload = trial_payload(params)
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
        result = _train_with_logging(payload, report_to_tune, tune.get_checkpoint)
        if result.status == STATUS_STOPPED:
            return  # Tune takes no more results from a stopped trial
    except Exception as exc:  # recorded in MLflow (again, if the engine got that far); the sweep goes on
        end_run(client, payload["run_id"], STATUS_ERROR, f"{type(exc).__name__}: {exc}")
        tune.report({**tune_result(0, 0, STATUS_ERROR), "error": f"{type(exc).__name__}: {exc}"[:500]})
        return
    tune.report(tune_result(result.iterations, _last_epoch(result), result.status, result.metrics))


def _sweep_storage(payload: dict):
    from alwa_sweep.storage import sweep_storage

    # a sweep launched before "sweep_dir" was in the payload named its train folder instead
    sweep_dir = payload.get("sweep_dir") or str(Path(payload["train_storage"]).parent)
    return sweep_storage(payload.get("storage"), payload["sweep_name"], sweep_dir)


def _train_storage(payload: dict) -> dict:
    """Where Ray Train keeps a DDP trial's runs: ``train/`` in the sweep's storage."""
    return _sweep_storage(payload).join(TRAIN_NAME).run_config_kwargs()


def _train_worker(payload: dict) -> None:
    """One Ray Train worker: the engine under the process group Ray Train started."""
    import ray.train
    import ray.train.torch

    is_main = ray.train.get_context().get_world_rank() == 0
    result = _train_with_logging(payload, report_to_train, ray.train.get_checkpoint,
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
        run_config=ray.train.RunConfig(name=train_run_name(payload["key"]), **_train_storage(payload),
                                       callbacks=[TuneReportCallback()],
                                       checkpoint_config=ray.train.CheckpointConfig(
                                           num_to_keep=payload.get("keep_checkpoints", KEEP_CHECKPOINTS)),
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
