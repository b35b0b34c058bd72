"""Launching and resuming sweeps with Ray Tune (the driver side).

A sweep lives in a folder ``<runs>/sweeps/<name>/``::

    spec.yaml      the spec as run (``--set`` applied)
    sweep.json     MLflow store, experiment and parent run; resolved resources
    tune/          Ray Tune's experiment state and trial checkpoints
    trials/<key>/  each trial's working folder (engine checkpoints)

The driver creates the MLflow store, the experiment and the sweep's parent run
*before* any trial starts (trials racing to create a fresh SQLite store fail), then
runs one Tune trial per grid point. Resuming restores Tune's state when it can; either
way trials find their MLflow run by trial key, so none is duplicated and none that
finished is trained again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from alwa_sweep.spec import Spec
from alwa_sweep.tracking import (TAG_KIND, TAG_PARENT, TAG_STATUS, TAG_SWEEP, get_or_create_experiment,
                                 open_store)
from alwa_sweep.trial import run_trial

TUNE_NAME = "tune"


@dataclass
class SweepSummary:
    name: str
    sweep_dir: Path
    parent_run_id: str
    experiment: str
    tracking_uri: str
    statuses: dict  # trial key → status

    @property
    def counts(self) -> Counter:
        return Counter(self.statuses.values())

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.counts.items() if status != "ok")

    def line(self) -> str:
        counts = self.counts
        parts = [f"{status}={counts[status]}" for status in ("ok", "nan", "overflow", "error") if counts[status]]
        parts += [f"{s}={n}" for s, n in sorted(counts.items()) if s not in ("ok", "nan", "overflow", "error")]
        return " ".join(parts) or "no trials"


def _payloads(spec: Spec, sweep_dir: Path, state: dict) -> list[dict]:
    resources = spec.resources
    return [{
        "key": trial.key,
        "name": trial.name,
        "config": trial.config,
        "workdir": str(sweep_dir / "trials" / trial.key),
        "train_storage": str(sweep_dir / "train"),
        "tracking_uri": state["tracking_uri"],
        "experiment_id": state["experiment_id"],
        "parent_run_id": state["parent_run_id"],
        "sweep_name": state["name"],
        "workers": resources["workers"],
        "cpus_per_worker": resources["cpus_per_worker"],
        "gpus_per_worker": resources["gpus_per_worker"],
        "max_failures": spec.max_failures,
    } for trial in spec.trials]


def prepare_sweep(spec: Spec, sweep_dir: Path, tracking_uri: str) -> dict:
    """Create the store, experiment and parent run, and write the sweep folder."""
    client = open_store(tracking_uri)
    experiment_id = get_or_create_experiment(client, spec.experiment)
    name = sweep_dir.name
    parent = client.create_run(experiment_id, run_name=name,
                               tags={TAG_KIND: "sweep", TAG_SWEEP: name, TAG_STATUS: "running",
                                     "mlflow.note.content": spec.description or f"sweep {spec.name}"})
    sweep_dir.mkdir(parents=True, exist_ok=False)
    spec_text = yaml.safe_dump({**spec.raw, "base": spec.base}, sort_keys=False)
    (sweep_dir / "spec.yaml").write_text(spec_text)
    client.log_text(parent.info.run_id, spec_text, "spec.yaml")
    client.log_batch(parent.info.run_id, params=[
        _param("spec.name", spec.name), _param("trials", len(spec.trials)),
        _param("resources", json.dumps(spec.resources)), _param("scheduler", spec.scheduler["type"])])
    state = {"name": name, "spec_name": spec.name, "experiment": spec.experiment,
             "experiment_id": experiment_id, "parent_run_id": parent.info.run_id,
             "tracking_uri": tracking_uri, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (sweep_dir / "sweep.json").write_text(json.dumps(state, indent=2))
    return state


def _param(key, value):
    from mlflow.entities import Param

    return Param(key, str(value))


# ---- issue 17: ray init, scheduler, storage (alwa_sweep.preflight/schedulers/storage) ----
CHECKPOINTS_KEPT = 2  # Tune keeps the newest N checkpoints of a trial in the storage


def _init_ray(address: str | None, num_cpus: int | None):
    """Connect (bounded in time: :func:`alwa_sweep.preflight.connect`); the cluster's info."""
    import ray

    from alwa_sweep.preflight import connect

    if ray.is_initialized():
        return None
    return connect(address, num_cpus=num_cpus, include_dashboard=False if address is None else None)


def _scheduler(spec: Spec):
    from alwa_sweep.schedulers import build_scheduler

    kinds = {t.config.get("dataset", {}).get("kind") for t in spec.trials}
    return build_scheduler(spec.scheduler, max(_epochs(t.config) for t in spec.trials),
                           dataset_kind=kinds.pop() if len(kinds) == 1 else None)


def _storage(sweep_dir: Path, state: dict):
    """Where Tune and Train write: ``state["storage"]`` (the ``--storage`` URI) or, by
    default, the sweep folder itself (Tune's state in ``<sweep>/tune``)."""
    from alwa_sweep.storage import resolve_storage

    uri = state.get("storage")
    if not uri:
        return resolve_storage(None, default=sweep_dir)
    return resolve_storage(uri).join(state["name"])


def _tuner(spec: Spec, sweep_dir: Path, state: dict, max_concurrent: int | None, progress):
    """A new Tuner, or the restored one when the storage holds this sweep's Tune state."""
    from ray import tune

    storage = _storage(sweep_dir, state)
    location = storage.join(TUNE_NAME)
    restore_path = location.path  # with a filesystem given, bucket/prefix; else a folder or URI
    if tune.Tuner.can_restore(restore_path, storage_filesystem=storage.filesystem):
        return tune.Tuner.restore(restore_path, trainable=tune.with_resources(run_trial, _trial_resources(spec)),
                                  resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=storage.filesystem)
    return _build_tuner(spec, sweep_dir, state, max_concurrent, progress, storage=storage)
def _upload_logs(sweep_dir: Path, state: dict) -> None:
    from alwa_sweep.trial_logs import upload_trial_logs

    try:
        upload_trial_logs(_storage(sweep_dir, state).join(TUNE_NAME), state)
    except Exception as exc:  # noqa: BLE001 -- the logs are a convenience; the sweep's results stand
        print(f"warning: could not copy the trials' logs into MLflow ({type(exc).__name__}: {exc})", file=sys.stderr)
# ---- end issue 17 ----


def _epochs(config: dict) -> int:
    schedule = config["schedule"]
    return schedule["epochs"] if schedule["unit"] == "epoch" else 10**6


def _trial_resources(spec: Spec) -> dict:
    resources = spec.resources
    if resources["workers"] > 1:
        return {"cpu": 1}  # the Train driver; the workers reserve their own resources
    return {"cpu": resources["cpus_per_worker"], "gpu": resources["gpus_per_worker"]}


def _build_tuner(spec: Spec, sweep_dir: Path, state: dict, max_concurrent: int | None, progress, storage=None):
    from ray import tune

    payloads = _payloads(spec, sweep_dir, state)
    names = {p["key"]: p["name"] for p in payloads}
    trainable = tune.with_resources(run_trial, _trial_resources(spec))
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(payloads)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent or spec.max_concurrent,
            scheduler=_scheduler(spec),
            trial_name_creator=lambda t: names[t.config["trial"]["key"]][:100],
            trial_dirname_creator=lambda t: t.config["trial"]["key"],
        ),
        run_config=_run_config(spec, sweep_dir, progress, storage),
    )


def _run_config(spec: Spec, sweep_dir: Path, progress, storage=None):
    from ray import tune

    from alwa_sweep.schedulers import StoppedTrialRecorder
    from alwa_sweep.storage import resolve_storage

    storage = storage or resolve_storage(None, default=sweep_dir)
    callbacks = [StoppedTrialRecorder()] + ([progress] if progress is not None else [])
    return tune.RunConfig(
        name=TUNE_NAME, **storage.run_config_kwargs(),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        # each trial's output in its folder, uploaded with it (alwa_sweep.trial_logs)
        log_to_file=("stdout.log", "stderr.log"), sync_config=tune.SyncConfig(sync_artifacts=True),
        callbacks=callbacks, verbose=0)


def run_sweep(spec: Spec, sweep_dir: Path, tracking_uri: str, *, address: str | None = None,
              max_concurrent: int | None = None, num_cpus: int | None = None,
              progress=True, state: dict | None = None, storage: str | None = None) -> SweepSummary:
    """Run (or, with ``state`` from ``sweep.json``, resume) a sweep to completion."""
    # Tune syncs its experiment state to storage at most every ~10 s by default; a
    # driver killed in between forgets finished trials. Sync every second instead.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    sweep_dir = Path(sweep_dir).resolve()
    if state is None:
        state = prepare_sweep(spec, sweep_dir, tracking_uri)
        if storage:  # issue 17: --storage, kept for resume (the lead may move this into prepare_sweep)
            state["storage"] = storage
            (sweep_dir / "sweep.json").write_text(json.dumps(state, indent=2))
    else:  # a resumed sweep: its store must answer before any trial starts
        open_store(state["tracking_uri"], f"{sweep_dir / 'sweep.json'}: tracking_uri")
    _init_ray(address, num_cpus)
    from alwa_sweep.live import LiveTable

    reporter = LiveTable(len(spec.trials)) if progress else None
    tuner = _tuner(spec, sweep_dir, state, max_concurrent, reporter)  # issue 17: storage-aware
    tuner.fit()
    _upload_logs(sweep_dir, state)  # issue 17
    return finish_sweep(spec, sweep_dir, state)


def collect_statuses(client, state: dict) -> dict:
    runs = client.search_runs([state["experiment_id"]],
                              filter_string=f"tags.`{TAG_PARENT}` = '{state['parent_run_id']}'",
                              max_results=10000)
    return {r.data.tags.get("alwa.trial_key", r.info.run_id): r.data.tags.get(TAG_STATUS, "unknown")
            for r in runs}


def finish_sweep(spec: Spec, sweep_dir: Path, state: dict) -> SweepSummary:
    client = open_store(state["tracking_uri"])
    statuses = collect_statuses(client, state)
    for trial in spec.trials:
        statuses.setdefault(trial.key, "missing")
    summary = SweepSummary(state["name"], sweep_dir, state["parent_run_id"], state["experiment"],
                           state["tracking_uri"], statuses)
    parent = state["parent_run_id"]
    client.set_tag(parent, "alwa.summary", summary.line())
    client.log_dict(parent, {"statuses": statuses, "counts": dict(summary.counts)}, "summary.json")
    complete = all(s in ("ok", "nan", "overflow", "error") for s in statuses.values())
    client.set_tag(parent, TAG_STATUS, "finished" if complete else "incomplete")
    client.set_terminated(parent, "FINISHED" if complete else "KILLED")
    return summary


def load_sweep_state(sweep_dir: Path) -> dict:
    return json.loads((Path(sweep_dir) / "sweep.json").read_text())


def print_summary(summary: SweepSummary, out=None) -> None:
    out = out or sys.stdout
    print(f"sweep {summary.name}: {len(summary.statuses)} trials: {summary.line()}", file=out)
    print(f"  MLflow: experiment {summary.experiment!r}, parent run {summary.parent_run_id}, "
          f"store {summary.tracking_uri}", file=out)
    print(f"  folder: {summary.sweep_dir}", file=out)
