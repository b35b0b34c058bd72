"""Many trials, one SQLite MLflow store: no metric lost, no "database is locked".

Eight processes (as eight concurrent trials would) each log per-iteration rows shaped
like the engine's through ``MlflowHook`` into their own child run of one
pre-created store (written by its background thread, as in training), all starting at
the same moment; every stored step of every metric is then read back and checked.
"""

from __future__ import annotations

import multiprocessing
import time

import pytest

from alwa_sweep.tracking import TAG_PARENT, get_or_create_experiment, open_store, sqlite_uri

PROCESSES = 8
ITERATIONS = 300
BATCH = 20  # rows per flush, as train.log_every
METRICS = ("train/loss", "train/rpn_cls", "train/rpn_reg", "train/roi_cls", "train/roi_reg",
           "train/rpn_cls_weighted", "train/rpn_reg_weighted", "weight/alpha", "window/cls_mean",
           "window/cls_std", "window/reg_mean", "lr")


def value(writer: int, step: int, metric: int) -> float:
    """What writer ``writer`` logs for ``metric`` at ``step`` (exact in float64)."""
    return writer * 1000.0 + step + metric / 16.0


def log_like_a_trial(uri: str, run_id: str, writer: int, barrier, results) -> None:
    from mlflow.tracking import MlflowClient

    from alwa_sweep.tracking import MlflowHook

    logger = MlflowHook(MlflowClient(uri), run_id)
    errors = []
    barrier.wait()
    started = time.perf_counter()
    for first in range(1, ITERATIONS + 1, BATCH):
        rows = [{"step": step, "epoch": 1, **{name: value(writer, step, i) for i, name in enumerate(METRICS)}}
                for step in range(first, first + BATCH)]
        try:
            logger.log_iterations(rows)
        except Exception as exc:  # counted, not raised: the test reports them all
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
    try:
        logger.wait()  # the logger writes from a background thread, as in training
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}"[:300])
    results.put((writer, errors, time.perf_counter() - started))


@pytest.mark.slow
def test_concurrent_writers_lose_no_metric(tmp_path, figures):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = open_store(uri)  # created and migrated once, before any writer, as the driver does
    experiment = get_or_create_experiment(client, "concurrency")
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    run_ids = [client.create_run(experiment, run_name=f"trial{i}", tags={TAG_PARENT: parent}).info.run_id
               for i in range(PROCESSES)]

    # Fork from a server that imported the stack once (not from this process, which
    # holds open store connections; spawning 8 fresh interpreters costs a minute here).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["alwa_sweep.tracking", "mlflow.store.tracking.sqlalchemy_store",
                                    "alembic.command"])
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    processes = [context.Process(target=log_like_a_trial, args=(uri, run_id, i, barrier, results))
                 for i, run_id in enumerate(run_ids)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)

    errors = [e for _, errs, _ in outcomes for e in errs]
    stored, wrong, incomplete = 0, 0, []
    for writer, run_id in enumerate(run_ids):
        for index, name in enumerate(METRICS):
            history = client.get_metric_history(run_id, name)
            steps = {m.step: m.value for m in history}
            stored += len(set(steps) & set(range(1, ITERATIONS + 1)))
            wrong += sum(v != value(writer, step, index) for step, v in steps.items())
            if sorted(m.step for m in history) != list(range(1, ITERATIONS + 1)):
                incomplete.append(f"{name} of writer {writer}")
    expected = PROCESSES * ITERATIONS * len(METRICS)
    figures.record("concurrency", processes=PROCESSES, iterations=ITERATIONS, batch=BATCH,
                   metrics_per_row=len(METRICS), expected_values=expected, stored_values=stored,
                   wrong_values=wrong, errors=len(errors),
                   locked_errors=sum("database is locked" in e for e in errors),
                   log_seconds_max=max(seconds for *_, seconds in outcomes))
    assert errors == []
    assert all(process.exitcode == 0 for process in processes)
    assert incomplete == [], "steps missing or duplicated"
    assert stored == expected and wrong == 0
