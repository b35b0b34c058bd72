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

from alwa_sweep.locks import FolderLock
from alwa_sweep.signals import terminate_on_signals
from alwa_sweep.tracking import end_run, get_or_create_experiment, open_store
from alwa_sweep.spec import Spec
from reports.schema import (ARTIFACT_SPEC, EXPECTED_STATUSES, FINAL_STATUSES, KIND_SWEEP, STATUS_ERROR,
                            STATUS_INTERRUPTED, STATUS_RUNNING, SWEEP_FINISHED, SWEEP_INCOMPLETE, TAG_KIND, TAG_NOTE,
                            TAG_PARENT, TAG_STATUS, TAG_SUMMARY, TAG_SWEEP, TAG_TRIAL_KEY)
from trainers.errors import Interrupted
from alwa_sweep.trial import TUNE_NAME, run_trial, trial_fields, trial_payload



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
        """Trials without an outcome a sweep may expect (nan/overflow cells are results)."""
        return sum(n for status, n in self.counts.items() if status not in EXPECTED_STATUSES)

    def line(self) -> str:
        counts = self.counts
        parts = [f"{status}={counts[status]}" for status in FINAL_STATUSES if counts[status]]
        parts += [f"{s}={n}" for s, n in sorted(counts.items()) if s not in FINAL_STATUSES]
        return " ".join(parts) or "no trials"


def _common_payload(spec: Spec, sweep_dir: Path, state: dict) -> dict:
    """What every trial of the sweep gets (a trial's own fields: ``alwa_sweep.trial.trial_fields``)."""
    resources = spec.resources
    return {
        "sweep_dir": str(sweep_dir),
        "storage": state.get("storage"),
        "tracking_uri": state["tracking_uri"],
        "experiment_id": state["experiment_id"],
        "parent_run_id": state["parent_run_id"],
        "sweep_name": state["name"],
        "workers": resources.workers,
        "cpus_per_worker": resources.cpus_per_worker,
        "gpus_per_worker": resources.gpus_per_worker,
        "resources_per_worker": resources.resources_per_worker,
        "accelerator_type": resources.accelerator_type,
        "placement_strategy": resources.placement_strategy,
        "max_failures": spec.max_failures,
        "keep_checkpoints": spec.keep_checkpoints,
    }


def _param_space(spec: Spec, sweep_dir: Path, state: dict) -> dict:
    """A grid: one payload per trial (``tune.grid_search``). A search: one payload for
    all, and the ranges Tune samples into ``sample`` (the trial resolves its config)."""
    from ray import tune

    from alwa_sweep.search import tune_space

    common = _common_payload(spec, sweep_dir, state)
    if spec.search is None:
        return {"trial": tune.grid_search([{**common, **trial_fields(t, sweep_dir)} for t in spec.trials])}
    common.update(search_base=spec.base, emulate_workers=spec.resources.emulate_workers,
                  search_keys=list(spec.search.space))
    return {"trial": common, "sample": tune_space(spec.search)}


def prepare_sweep(spec: Spec, sweep_dir: Path, tracking_uri: str, storage: str | None = None) -> dict:
    """Create the store, experiment and parent run, and write the sweep folder."""
    client = open_store(tracking_uri)
    experiment_id = get_or_create_experiment(client, spec.experiment)
    name = sweep_dir.name
    parent = client.create_run(experiment_id, run_name=name,
                               tags={TAG_KIND: KIND_SWEEP, TAG_SWEEP: name, TAG_STATUS: STATUS_RUNNING,
                                     TAG_NOTE: spec.description or f"sweep {spec.name}"})
    sweep_dir.mkdir(parents=True, exist_ok=False)
    spec_text = yaml.safe_dump(spec.raw, sort_keys=False)
    (sweep_dir / ARTIFACT_SPEC).write_text(spec_text)
    client.log_text(parent.info.run_id, spec_text, ARTIFACT_SPEC)
    client.log_batch(parent.info.run_id, params=[
        _param("spec.name", spec.name), _param("trials", spec.trial_count),
        _param("resources", json.dumps(spec.resources.model_dump())), _param("scheduler", spec.scheduler.type)]
        + ([_param("search", json.dumps(spec.search.model_dump()))] if spec.search is not None else []))
    state = {"name": name, "spec_name": spec.name, "experiment": spec.experiment,
             "experiment_id": experiment_id, "parent_run_id": parent.info.run_id,
             "tracking_uri": tracking_uri, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    if storage:  # --storage, kept for resume
        state["storage"] = storage
    write_sweep_state(sweep_dir, state)
    return state


def _param(key, value):
    from mlflow.entities import Param

    return Param(key, str(value))


# ---- ray init, scheduler, storage (alwa_sweep.preflight / schedulers / storage) ----


def _init_ray(address: str | None, num_cpus: int | None):
    """Connect (bounded in time: :func:`alwa_sweep.preflight.connect`); the cluster's info."""
    import ray

    from alwa_sweep.preflight import connect

    if ray.is_initialized():
        return None
    return connect(address, num_cpus=num_cpus, include_dashboard=False if address is None else None)


def _scheduler(spec: Spec):
    from alwa_sweep.schedulers import build_scheduler

    return build_scheduler(spec.scheduler.model_dump(), max(_epochs(config) for config in spec.configs),
                           dataset_kind=_dataset_kind(spec))


def _dataset_kind(spec: Spec) -> str | None:
    kinds = {config.dataset.kind for config in spec.configs}
    return kinds.pop() if len(kinds) == 1 else None


def _storage(sweep_dir: Path, state: dict):
    """Where Tune and Train write: ``state["storage"]`` (the ``--storage`` URI) or, by
    default, the sweep folder itself (Tune's state in ``<sweep>/tune``)."""
    from alwa_sweep.storage import sweep_storage

    return sweep_storage(state.get("storage"), state["name"], sweep_dir)


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


def _epochs(config) -> int:
    schedule = config.schedule
    return schedule.epochs if schedule.unit == "epoch" else 10**6


def _trial_resources(spec: Spec):
    """What one Tune trial reserves: its bundle (a single-worker trial trains in it), or
    the Train driver's 1 CPU (the DDP workers reserve their own)."""
    from ray import tune

    from alwa_sweep.preflight import trial_bundles

    driver, _, _ = trial_bundles(spec.resources.model_dump())
    return tune.PlacementGroupFactory(driver)


def _build_tuner(spec: Spec, sweep_dir: Path, state: dict, max_concurrent: int | None, progress, storage):
    from ray import tune

    trainable = tune.with_resources(run_trial, _trial_resources(spec))
    search = {}
    if spec.search is not None:
        from alwa_sweep.schedulers import scheduler_metric
        from alwa_sweep.search import build_searcher

        metric = scheduler_metric(spec.search.model_dump(), _dataset_kind(spec))
        search = {"search_alg": build_searcher(spec.search, metric), "num_samples": spec.search.samples}
    return tune.Tuner(
        trainable,
        param_space=_param_space(spec, sweep_dir, state),
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent or spec.max_concurrent,
            scheduler=_scheduler(spec),
            trial_name_creator=lambda t: trial_payload(t.config)["name"][:100],
            trial_dirname_creator=lambda t: trial_payload(t.config)["key"],
            **search,
        ),
        run_config=_run_config(spec, progress, storage),
    )


def _run_config(spec: Spec, progress, storage):
    from ray import tune

    from alwa_sweep.schedulers import StoppedTrialRecorder

    callbacks = [StoppedTrialRecorder()] + ([progress] if progress is not None else [])
    return tune.RunConfig(
        name=TUNE_NAME, **storage.run_config_kwargs(),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # the only stored copies of a trial's checkpoints (the engine hands its own off)
        checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
        # each trial's output in its folder, uploaded with it (alwa_sweep.trial_logs)
        log_to_file=("stdout.log", "stderr.log"), sync_config=tune.SyncConfig(sync_artifacts=True),
        callbacks=callbacks, verbose=0)


def run_sweep(spec: Spec, sweep_dir: Path, tracking_uri: str, *, address: str | None = None,
              max_concurrent: int | None = None, num_cpus: int | None = None,
              progress=True, state: dict | None = None, storage: str | None = None) -> SweepSummary:
    """Run (or, with ``state`` from ``sweep.json``, resume) a sweep to completion.

    ``storage`` (``--storage``) is where Tune's state, checkpoints and Train runs go
    (default: the sweep folder); it is kept in ``sweep.json`` for resume. The sweep
    folder is locked for the whole run (a second driver fails at once), and the sweep's
    parent run is ended on every exit path: FINISHED when every trial reached an
    outcome, KILLED when interrupted (SIGTERM, Ctrl-C) or left incomplete, FAILED on an
    error."""
    # Tune syncs its experiment state to storage at most every ~10 s by default; a
    # driver killed in between forgets finished trials. Sync every second instead.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A trial reports its metric only once it has been evaluated (schedulers.tune_result):
    # Tune's strict check, run here in the driver for ASHA's and the sampler's metric, would
    # fail every result before that — on a new sweep and on a restored one alike.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    sweep_dir = Path(sweep_dir).resolve()
    with terminate_on_signals():
        if state is None:
            state = prepare_sweep(spec, sweep_dir, tracking_uri, storage=storage)
        else:  # a resumed sweep: its store must answer before any trial starts
            open_store(state["tracking_uri"], f"{sweep_dir / 'sweep.json'}: tracking_uri")
        try:
            with FolderLock(sweep_dir, what="sweep folder", command="alwa-sweep run/resume"):
                _fit(spec, sweep_dir, state, address, max_concurrent, num_cpus, progress)
                _upload_logs(sweep_dir, state)
                return finish_sweep(spec, sweep_dir, state)
        except BaseException as exc:
            _end_parent(state, exc)
            raise


def _fit(spec: Spec, sweep_dir: Path, state: dict, address, max_concurrent, num_cpus, progress) -> None:
    _init_ray(address, num_cpus)
    from alwa_sweep.live import LiveTable

    with terminate_on_signals():  # ray.init installs its own SIGTERM handler: take the signals back
        reporter = LiveTable(spec.trial_count) if progress else None
        _tuner(spec, sweep_dir, state, max_concurrent, reporter).fit()


def _end_parent(state: dict, exc: BaseException) -> None:
    """After the driver stopped early: Ray shut down (its trial processes die with it,
    without ending their MLflow runs), every trial run still RUNNING ended as
    interrupted, and the sweep's parent run ended — best effort, the store may be what
    failed; further signals meanwhile are noted, not raised."""
    from alwa_sweep.signals import signals_noted_not_raised
    from alwa_sweep.trial import end_unfinished_trial_runs
    from trainers.errors import interruption_reason

    interrupted = isinstance(exc, (KeyboardInterrupt, Interrupted))
    reason = interruption_reason(exc) if interrupted else f"{type(exc).__name__}: {exc}"
    with signals_noted_not_raised():
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - the original error is what the user must see
            pass
        try:
            end_unfinished_trial_runs(state, f"{reason} (the sweep's driver)"[:500])
        except Exception:  # noqa: BLE001
            pass
        try:
            client = open_store(state["tracking_uri"])
            end_run(client, state["parent_run_id"], STATUS_INTERRUPTED if interrupted else STATUS_ERROR, reason)
        except Exception:  # noqa: BLE001
            pass


def collect_statuses(client, state: dict) -> dict:
    runs = client.search_runs([state["experiment_id"]],
                              filter_string=f"tags.`{TAG_PARENT}` = '{state['parent_run_id']}'",
                              max_results=10000)
    return {r.data.tags.get(TAG_TRIAL_KEY, r.info.run_id): r.data.tags.get(TAG_STATUS, "unknown")
            for r in runs}


def finish_sweep(spec: Spec, sweep_dir: Path, state: dict) -> SweepSummary:
    client = open_store(state["tracking_uri"])
    statuses = collect_statuses(client, state)
    for trial in spec.trials:
        statuses.setdefault(trial.key, "missing")
    summary = SweepSummary(state["name"], sweep_dir, state["parent_run_id"], state["experiment"],
                           state["tracking_uri"], statuses)
    parent = state["parent_run_id"]
    client.set_tag(parent, TAG_SUMMARY, summary.line())
    client.log_dict(parent, {"statuses": statuses, "counts": dict(summary.counts)}, "summary.json")
    complete = all(s in FINAL_STATUSES for s in statuses.values())
    client.set_tag(parent, TAG_STATUS, SWEEP_FINISHED if complete else SWEEP_INCOMPLETE)
    client.set_terminated(parent, "FINISHED" if complete else "KILLED")
    return summary


STATE_KEYS = ("name", "experiment", "experiment_id", "parent_run_id", "tracking_uri")


def write_sweep_state(sweep_dir: Path, state: dict) -> None:
    """``sweep.json``, written atomically (a crash never leaves half a file)."""
    target = Path(sweep_dir) / "sweep.json"
    partial = target.with_name(f".sweep.json.{os.getpid()}")
    partial.write_text(json.dumps(state, indent=2))
    os.replace(partial, target)


def load_sweep_state(sweep_dir: Path) -> dict:
    """``sweep.json`` of a sweep folder; a missing, truncated or foreign file is a ConfigError."""
    from trainers.errors import ConfigError

    path = Path(sweep_dir) / "sweep.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(str(path), f"cannot be read as a sweep's state ({exc}).",
                          "The folder is damaged: start the sweep again under a new --name.") from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or not isinstance(state.get(key), str)]
    if missing:
        raise ConfigError(str(path), f"lacks {', '.join(missing)}.",
                          "The folder is damaged: start the sweep again under a new --name.")
    return state


def print_summary(summary: SweepSummary, out=None) -> None:
    out = out or sys.stdout
    print(f"sweep {summary.name}: {len(summary.statuses)} trials: {summary.line()}", file=out)
    print(f"  MLflow: experiment {summary.experiment!r}, parent run {summary.parent_run_id}, "
          f"store {summary.tracking_uri}", file=out)
    print(f"  folder: {summary.sweep_dir}", file=out)
