"""Claim: the project's MLflow logging costs <= 1 % of a tiny-model CPU training step.

Measured in one run, in interleaved rounds so that the shared machine's load hits all
three alike:

(a) the step: the real engine loop (:func:`trainers.engine.train_one_epoch`, tiny
    Faster R-CNN, batch 4 of 128 px synthetic VOC images pre-loaded in memory, ALWA_1
    with interval 20) for ``log_every = 50`` iterations per round; median of the
    per-iteration times (the pull of the records happens after the round's last hook,
    so it is not in them);
(b) the project's logging path, as training feels it: the 50 rows a round pulled from
    the engine (its real keys and values, 11 metrics per row and 4 more on ALWA's
    update rows) go to ``MlflowHook.log_iterations`` (which queues them for
    its background writer thread), then the next 50 engine steps run *while* the
    writer stores them in a fresh SQLite store. Cost per iteration = the queueing call
    / 50 + (median step with the writer busy − median step of (a), measured in the
    same round). The writer's own work (its time to store 50 rows with nothing else
    running) is printed too;
(c) the naive alternative: the same rows logged one per iteration with
    ``mlflow.log_metrics(..., synchronous=True)`` into a second fresh SQLite store;
    the total time / 50.

Prints (b)/(a) (the PASS criterion), (c)/(a) and (c)/(b), each the median over rounds
of the ratio within the round.

    python benchmarks/bench_mlflow_logging.py            # 8 rounds of 50 iterations
    python benchmarks/bench_mlflow_logging.py --quick    # 3 rounds
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from alwa_sweep.tracking import MlflowHook, get_or_create_experiment, open_store, sqlite_uri
from trainers.config import load_config
from trainers.data.synthetic import make_synthetic
from trainers.engine import Run, TrainingHook, train_one_epoch

CLAIMED_SHARE = 0.01
LOG_EVERY = 50  # the engine's default train.log_every
WARM_UP = 10  # iterations (and rows logged) before the measured rounds


def benchmark_config(data: dict) -> dict:
    """The tiny detector of tests/trainers/test_engine.py with ALWA_1 and the default log_every."""
    return {
        "dataset": {"kind": "voc", "root": data["root"], "train_sets": data["train_sets"],
                    "test_sets": data["test_sets"], "scale": [128, 128], "num_workers": 0,
                    "flip": 0.5},
        "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
        "weighting": {"method": "alwa", "variant": 1, "interval": 20},
        "optimizer": {"lr": 0.01},
        "schedule": {"unit": "iter", "max_iters": 10**8, "steps": [], "warmup_iters": 0},
        "train": {"batch_size": 4, "log_every": LOG_EVERY, "eval_every": 0, "device": "cpu"},
    }


def clocks() -> tuple[float, float]:
    """(wall clock, this process's CPU time): the second is less sensitive to other
    processes competing for the machine's cores."""
    return time.perf_counter(), time.process_time()


class Rows(TrainingHook):
    """The benchmarked run's hook: stamps every step, keeps the rows the engine's own
    ``Run.flush`` pulls (every LOG_EVERY iterations, i.e. at the end of a round)."""

    def __init__(self):
        self.stamps, self.rows = [], []

    def on_iteration(self, iteration):
        self.stamps.append(clocks())

    def log_iterations(self, rows):
        self.rows.extend(rows)


def engine_round(run: Run, hook: Rows, batches: list):
    """``len(batches)`` engine steps; returns the median step (wall, CPU) in seconds
    and the pulled rows."""
    hook.stamps, hook.rows = [clocks()], []
    run.loader = batches
    run.position.epoch_batches = 0  # train_one_epoch only reads it for checkpoints (disabled)
    train_one_epoch(run)
    run.flush()  # what a round shorter than LOG_EVERY left in the records
    stamps = hook.stamps
    wall = statistics.median(b[0] - a[0] for a, b in zip(stamps, stamps[1:]))
    cpu = statistics.median(b[1] - a[1] for a, b in zip(stamps, stamps[1:]))
    return (wall, cpu), hook.rows


def project_logging(logger: MlflowHook, rows: list[dict]) -> tuple[float, float]:
    """(wall, CPU) seconds of the engine's one ``log_iterations`` call per pull."""
    wall, cpu = clocks()
    logger.log_iterations(rows)
    return time.perf_counter() - wall, time.process_time() - cpu


def naive_logging(run_id: str, rows: list[dict]) -> float:
    """Seconds for one synchronous ``mlflow.log_metrics`` per iteration."""
    start = time.perf_counter()
    for row in rows:
        metrics = {name: value for name, value in row.items() if name not in ("step", "epoch")}
        mlflow.log_metrics(metrics, step=row["step"], synchronous=True, run_id=run_id)
    return time.perf_counter() - start


def open_logger(store: Path, config: dict) -> MlflowHook:
    """A training run in a fresh SQLite store, started as the engine starts it."""
    client = open_store(sqlite_uri(store / "mlflow.db"))
    experiment = get_or_create_experiment(client, "bench-logging")
    logger = MlflowHook.create(client, experiment, "batched")
    logger.start(config, 0, config.schedule.max_iters)
    return logger


def open_naive_run(store: Path) -> str:
    """A run in another fresh SQLite store for the fluent API."""
    client = open_store(sqlite_uri(store / "mlflow.db"))
    mlflow.set_tracking_uri(client.tracking_uri)
    experiment = get_or_create_experiment(client, "bench-logging")
    return client.create_run(experiment, run_name="naive").info.run_id


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds (well under a minute)")
    parser.add_argument("--rounds", type=int, help="measured rounds of 50 iterations (default 8, quick 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = parser.parse_args(argv)
    num_rounds = args.rounds or (3 if args.quick else 8)
    torch.set_num_threads(args.threads)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # store creation notices

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_synthetic(tmp / "data", format="voc", images=64, seed=0)
        config = load_config(benchmark_config(data))
        hook = Rows()
        run = Run(config, torch.device("cpu"), tmp / "run", hook)
        run.sampler.set_epoch(0)
        batches = list(itertools.islice(itertools.cycle(list(run.loader)), LOG_EVERY))
        logger = open_logger(tmp / "batched", config)
        naive_run = open_naive_run(tmp / "naive")

        print(f"tiny Faster R-CNN, batch 4 of 128 px images, ALWA_1 (interval 20), torch threads "
              f"{torch.get_num_threads()}; {num_rounds} rounds of {LOG_EVERY} iterations, "
              f"each logged to fresh SQLite stores")
        # Warm-up (first-call paths of the model and of both stores), not measured.
        _, rows = engine_round(run, hook, batches[:WARM_UP])
        project_logging(logger, rows)
        naive_logging(naive_run, rows)

        steps, busy_steps, batched, naive, writer_work, metrics_per_row = [], [], [], [], [], []
        logger.wait()
        for index in range(num_rounds):
            (step, _), rows = engine_round(run, hook, batches)
            queued_wall, _ = project_logging(logger, rows)
            (busy_step, _), next_rows = engine_round(run, hook, batches)  # writer busy
            logger.wait()
            start = time.perf_counter()
            project_logging(logger, next_rows)
            logger.wait()
            writer_work.append((time.perf_counter() - start) / len(next_rows))
            naive.append(naive_logging(naive_run, rows + next_rows) / (len(rows) + len(next_rows)))
            steps.append(step)
            busy_steps.append(busy_step)
            batched.append(queued_wall / len(rows) + (busy_step - step))
            metrics_per_row += [len(row) - 2 for row in rows + next_rows]
            print(f"  round {index + 1:2d}: (a) step {step * 1e3:7.2f} ms, with the writer busy "
                  f"{busy_step * 1e3:7.2f} ms   (b) {batched[-1] * 1e3:+7.3f} ms/iter   writer work "
                  f"{writer_work[-1] * 1e3:6.3f} ms/iter   (c) naive {naive[-1] * 1e3:7.2f} ms/iter")

        logged = logger.client.get_metric_history(logger.run_id, "train/loss")
        expected = WARM_UP + 2 * num_rounds * LOG_EVERY
        assert sorted(m.step for m in logged) == list(range(1, expected + 1)), "batched store is incomplete"
        naive_logged = MlflowClient(mlflow.get_tracking_uri()).get_metric_history(naive_run, "train/loss")
        assert sorted(m.step for m in naive_logged) == list(range(1, expected + 1)), "naive store is incomplete"

    share = statistics.median(b / a for a, b in zip(steps, batched))
    naive_share = statistics.median(c / a for a, c in zip(steps, naive))
    writer_share = statistics.median(w / a for a, w in zip(steps, writer_work))
    print(f"{statistics.fmean(metrics_per_row):.1f} metrics per row on average "
          f"({min(metrics_per_row)}..{max(metrics_per_row)}); both stores hold every step")
    print(f"(a) tiny-model CPU step, median:                 {statistics.median(steps) * 1e3:8.2f} ms")
    print(f"    the same with the MLflow writer busy:        {statistics.median(busy_steps) * 1e3:8.2f} ms")
    print(f"(b) logging cost to training, per iteration:     {statistics.median(batched) * 1e3:+8.3f} ms")
    print(f"    the writer thread's own work, per iteration: {statistics.median(writer_work) * 1e3:8.3f} ms "
          f"({100 * writer_share:.2f} % of a step, off the training thread)")
    print(f"(c) mlflow.log_metrics per iteration:            {statistics.median(naive) * 1e3:8.3f} ms")
    print(f"(b)/(a) = {100 * share:+.2f} %   (c)/(a) = {100 * naive_share:.1f} %   "
          f"(medians of the per-round ratios, wall clock)")
    ok = share <= CLAIMED_SHARE
    print(f"{'PASS' if ok else 'FAIL'}: logging costs {'<=' if ok else '>'} "
          f"{100 * CLAIMED_SHARE:.0f} % of a tiny-model CPU step (wall clock)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
