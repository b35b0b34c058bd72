"""Read alwa-sweep's trial runs from MLflow into one pandas DataFrame.

The names are those of ``docs/tracking_schema.md``. One ``search_runs`` query per
experiment (paged) brings every run with its params, latest metrics and tags as
``params.*`` / ``metrics.*`` / ``tags.*`` columns, the same shape as
``mlflow.search_runs`` returns, but through an ``MlflowClient`` bound to the given
tracking URI instead of MLflow's process-wide one.

Derived columns added for the tables: ``name`` (run name), ``state`` (``ok``, ``nan``,
``overflow``, ``stopped``, ``error`` or ``running``) and ``reason`` (why a run is not ``ok``).
Reading shows a progress bar on stderr (``progress=False`` turns it off).
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from reports import schema as S
from trainers.errors import ConfigError

TRIAL_KINDS = S.TRIAL_KINDS
FINAL_STATES = S.FINAL_STATUSES
_PAGE = 1_000


def open_client(tracking_uri: str | None = None) -> MlflowClient:
    """An MlflowClient for ``tracking_uri`` (MLflow's default when None).

    A SQLite store that does not exist is an error rather than a new empty database:
    a report never creates a store.
    """
    uri = tracking_uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        db_path = Path(uri[len("sqlite:///"):])
        if not db_path.exists():
            raise ConfigError(
                "--tracking-uri", f"no MLflow database at {db_path}.",
                "Pass the store the sweep wrote to, e.g. --tracking-uri sqlite:///path/mlflow.db.")
    return MlflowClient(uri)


def load_trials(client: MlflowClient, *, experiment: str | None = None,
                sweep_run_id: str | None = None, progress: bool = False) -> pd.DataFrame:
    """The trial runs (tag ``alwa.kind`` in trial/train) of an experiment or of one sweep.

    Exactly one of ``experiment`` (a name) and ``sweep_run_id`` (the sweep's parent run)
    must be given; a sweep restricts the result to that parent's children.
    """
    if (experiment is None) == (sweep_run_id is None):
        raise ConfigError("report", "give exactly one of --experiment and --sweep.")
    if sweep_run_id is not None:
        sweep = sweep_run(client, sweep_run_id)
        experiment_id = sweep.info.experiment_id
        query = f"tags.`{S.TAG_PARENT}` = '{sweep_run_id}'"
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ConfigError("--experiment", f"no experiment named {experiment!r}.",
                              f"Experiments in this store: {', '.join(names) or 'none'}.")
        experiment_id = found.experiment_id
        query = ""
    runs = _search(client, experiment_id, query, progress)
    if runs.empty:
        return runs
    kind = runs.get(S.TAG_PREFIX + S.TAG_KIND, pd.Series(None, index=runs.index))
    trials = runs[kind.isin(TRIAL_KINDS)].reset_index(drop=True)
    return _with_state(trials)


def sweep_run(client: MlflowClient, run_id: str):
    """The sweep's parent run; a ConfigError when the id is unknown or not a sweep."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError("--sweep", f"no MLflow run with id {run_id!r}.",
                          f"Pass the run id of the sweep's parent run (tag {S.TAG_KIND}={S.KIND_SWEEP})."
                          ) from None
    kind = run.data.tags.get(S.TAG_KIND)
    if kind != S.KIND_SWEEP:
        raise ConfigError("--sweep", f"run {run_id} is a {kind or 'run without ' + S.TAG_KIND}, "
                          "not a sweep.", "Pass the sweep's parent run id, or use --experiment.")
    return run


def _search(client: MlflowClient, experiment_id: str, query: str, progress: bool = False) -> pd.DataFrame:
    from tqdm import tqdm

    records = []
    token = None
    with tqdm(desc="reading runs", unit=" runs", file=sys.stderr, disable=not progress,
              leave=False) as bar:
        while True:
            page = client.search_runs([experiment_id], filter_string=query, max_results=_PAGE,
                                      page_token=token)
            records.extend(_record(run) for run in page)
            bar.update(len(page))
            token = page.token
            if not token:
                break
    return pd.DataFrame.from_records(records)


def _record(run) -> dict:
    record = {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "start_time": run.info.start_time,
    }
    record.update({S.PARAM_PREFIX + k: v for k, v in run.data.params.items()})
    record.update({S.METRIC_PREFIX + k: v for k, v in run.data.metrics.items()})
    record.update({S.TAG_PREFIX + k: v for k, v in run.data.tags.items()})
    return record


def _with_state(trials: pd.DataFrame) -> pd.DataFrame:
    """Add ``state`` and ``reason``: the alwa.status tag, checked against MLflow's status.

    A run whose process died never sets its final tag: MLflow then says FAILED/KILLED
    (or FINISHED) while the tag still says ``running``, and that counts as an error.
    """
    tag = trials.get(S.TAG_PREFIX + S.TAG_STATUS, pd.Series(None, index=trials.index))
    reason = trials.get(S.TAG_PREFIX + S.TAG_REASON, pd.Series(None, index=trials.index))
    states, reasons = [], []
    for status, mlflow_status, why in zip(tag, trials["status"], reason):
        why = why if isinstance(why, str) else ""
        if status in FINAL_STATES:
            states.append(status)
            reasons.append(why)
        elif mlflow_status == "RUNNING":
            states.append(S.STATUS_RUNNING)
            reasons.append("")
        elif status is None and mlflow_status == "FINISHED":
            states.append(S.STATUS_OK)
            reasons.append("")
        else:
            states.append(S.STATUS_ERROR)
            reasons.append(why or f"the run ended ({mlflow_status}) without a final {S.TAG_STATUS}")
    trials = trials.copy()
    trials["state"] = states
    trials["reason"] = reasons
    return trials


def metric_column(metric: str) -> str:
    """The DataFrame column of a validation metric: ``map`` -> ``metrics.val/map``."""
    return S.METRIC_PREFIX + S.metric_val(metric)
