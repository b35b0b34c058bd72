"""Claim: an engine training step is <= 5 % slower than a bare torchvision training loop.

Both loops train the same tiny Faster R-CNN object with the same SGD optimizer on the
same pre-loaded batches of the synthetic VOC set (loading is excluded from both: it is
the DataLoader's cost, identical for any loop, and on 2 shared cores its noise would
drown a 5 % difference). Per step:

- bare loop (torchvision's ``references/detection`` reduced to its core):
  ``loss = sum(model(images, targets).values()); zero_grad; backward; step``;
- engine: the real :func:`trainers.engine.train_one_epoch` of a :class:`trainers.engine._Run`
  built from a config (ALWA_1, interval 20), whose loader is swapped for the list of
  pre-loaded batches. So every step pays what the engine adds: the lr lookup and
  setting, the device copy, the autocast context, the ALWA call and its records,
  the disabled GradScaler, ``RecordBuffer.add``, the ``on_iteration`` hook, and a pull
  of the records every ``train.log_every`` iterations (the engine's ``flush``:
  ``RecordBuffer.pull`` + the non-finite check + a no-op ``log_iterations``).

Bare and engine steps alternate one by one, on the same model and optimizer: the
engine's loader runs (and times) a bare step on batch k before handing batch k to the
engine, so both see the same machine load and model state, and the bare time is
subtracted from the engine's hook-to-hook interval. A round is a whole number of
``log_every`` periods, so each round holds the same number of pulls. Printed: per
round, both per-step times amortised over the round; the medians over rounds and the
median of the per-round ratios engine / bare (the PASS criterion, wall clock); the
same in process CPU time (far less disturbed by other processes on a shared machine);
and the engine's added host work timed alone (the same calls around constant losses
in place of the model: an upper bound, far less noisy than a difference of two steps).

    python benchmarks/bench_engine_overhead.py            # 10 rounds x 40 step pairs
    python benchmarks/bench_engine_overhead.py --quick    # 3 rounds x 20 step pairs
    python benchmarks/bench_engine_overhead.py --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from trainers.config import load_config
from trainers.data.synthetic import make_synthetic
from trainers.engine import Run, TrainingHook, _to_device, _weighted_total, train_one_epoch
from trainers.records import RecordBuffer, first_non_finite
from trainers.weighting import build_weighting

CLAIMED_OVERHEAD = 0.05
LOG_EVERY = 20  # the engine pulls its records every LOG_EVERY iterations


def benchmark_config(data: dict, batch_size: int) -> dict:
    """The tiny detector of tests/trainers/test_engine.py, ALWA_1 updating every 20 calls, a
    schedule too long to end inside the benchmark and a constant lr (no warm-up)."""
    return {
        "dataset": {"kind": "voc", "root": data["root"], "train_sets": data["train_sets"],
                    "test_sets": data["test_sets"], "scale": [128, 128], "num_workers": 0,
                    "flip": 0.5},
        "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
        "weighting": {"method": "alwa", "variant": 1, "interval": 20},
        "optimizer": {"lr": 0.01},
        "schedule": {"unit": "iter", "max_iters": 10**8, "steps": [], "warmup_iters": 0},
        "train": {"batch_size": batch_size, "log_every": LOG_EVERY, "eval_every": 0, "device": "cpu"},
    }


class Stamps(TrainingHook):
    """The hook the benchmarked run is built with: ``on_iteration`` calls whatever the
    current round set; ``log_iterations`` keeps the last logged loss (the engine's own
    ``Run.flush`` pulls the records every LOG_EVERY iterations and stops on a NaN)."""

    def __init__(self):
        self.callback = lambda iteration: None
        self.last_loss = None

    def on_iteration(self, iteration):
        self.callback(iteration)

    def log_iterations(self, rows):
        self.last_loss = rows[-1]["train/loss"]


def preload_batches(run: Run) -> list:
    """One epoch of the engine's own loader (real images, flips and collation), kept in memory."""
    run.sampler.set_epoch(0)
    return list(run.loader)


def make_flush(buffer: RecordBuffer, logger: TrainingHook, last_loss: list):
    """The engine's ``flush`` (``trainers.engine.train``) for one process."""
    def flush() -> None:
        rows = buffer.pull()
        if not rows:
            return
        bad = first_non_finite(rows, "train/loss")
        if bad is not None:
            raise RuntimeError(f"non-finite loss at iteration {bad['step']}: the timings would be meaningless")
        logger.log_iterations(rows)
        last_loss[0] = rows[-1]["train/loss"]
    return flush


def bare_step(model, optimizer, images, targets) -> None:
    """torchvision's training step, nothing else."""
    loss = sum(model(images, targets).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


class PairedLoader:
    """The engine's loader for one round: before handing the engine batch k, it runs
    (and times) a bare step on the same batch.

    Bare and engine steps thus alternate one by one on the same model and optimizer
    (the engine's previous step, flush included, is complete when the loop asks for the
    next batch), so both see the same machine load and the same model state.
    """

    def __init__(self, model, optimizer, batches: list):
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.bare_wall: list[float] = []
        self.bare_cpu: list[float] = []

    def __iter__(self):
        for images, targets in self.batches:
            wall, cpu = time.perf_counter(), time.process_time()
            bare_step(self.model, self.optimizer, images, targets)
            self.bare_wall.append(time.perf_counter() - wall)
            self.bare_cpu.append(time.process_time() - cpu)
            yield images, targets


def paired_round(run: Run, stamps: Stamps, batches: list) -> dict:
    """One round of ``len(batches)`` bare steps interleaved with as many engine steps.

    An engine step's time runs from one ``on_iteration`` hook to the next (the records'
    pull every LOG_EVERY iterations falls in the following step, the last one is
    charged to the last step) minus the bare step run inside the loader meanwhile.
    """
    wall_stamps, cpu_stamps = [time.perf_counter()], [time.process_time()]

    def on_iteration(iteration: int) -> None:
        wall_stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())

    stamps.callback = on_iteration
    run.loader = loader = PairedLoader(run.model, run.optimizer, batches)
    run.position.epoch_batches = 0  # train_one_epoch only reads it for checkpoints (disabled)
    train_one_epoch(run)
    wall_stamps[-1], cpu_stamps[-1] = time.perf_counter(), time.process_time()
    return {
        "engine_wall": [b - a - bare for a, b, bare in zip(wall_stamps, wall_stamps[1:], loader.bare_wall)],
        "engine_cpu": [b - a - bare for a, b, bare in zip(cpu_stamps, cpu_stamps[1:], loader.bare_cpu)],
        "bare_wall": loader.bare_wall,
        "bare_cpu": loader.bare_cpu,
    }


def engine_additions_alone(run: Run, batches: list, iterations: int) -> float:
    """Seconds per step of the engine's host work around the model, the model's losses
    replaced by constants (a fresh ALWA, so the benchmarked run's weighting is untouched).
    It also charges the making of the constant losses; it leaves out only the backward
    of the few autograd nodes the weighting adds (scalar products)."""
    stand_in = SimpleNamespace(head=run.head, weighting=build_weighting(run.config.weighting))
    leaf = torch.ones((), requires_grad=True)
    names = ("rpn_cls", "rpn_reg", "roi_cls", "roi_reg")
    buffer, last_loss = RecordBuffer(), [None]
    flush = make_flush(buffer, TrainingHook(), last_loss)
    batch_cycle = itertools.cycle(batches)
    start = time.perf_counter()
    for iteration in range(1, iterations + 1):
        lr = run.schedule.lr_at(iteration)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        images, targets = _to_device(*next(batch_cycle), run.device)
        with torch.autocast(run.device.type, enabled=False):
            raw_losses = {name: leaf * (1.0 + 0.1 * i) for i, name in enumerate(names)}
        total, values = _weighted_total(stand_in, raw_losses, None)
        values["lr"] = lr
        buffer.add(iteration, 1, values)
        if iteration % LOG_EVERY == 0:
            flush()
    return (time.perf_counter() - start) / iterations


def median_block_ratio(rounds: list[dict], engine_key: str, bare_key: str) -> tuple[float, float, float]:
    """(median engine s/step, median bare s/step, median of the per-round ratios), each
    round's per-step times amortised over the round (flushes included)."""
    engine = [statistics.fmean(r[engine_key]) for r in rounds]
    bare = [statistics.fmean(r[bare_key]) for r in rounds]
    ratios = [e / b for e, b in zip(engine, bare)]
    return statistics.median(engine), statistics.median(bare), statistics.median(ratios)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 20 step pairs (well under a minute)")
    parser.add_argument("--rounds", type=int, help="measured rounds (default 10, quick 3)")
    parser.add_argument("--iters", type=int, help=f"step pairs per round, a multiple of {LOG_EVERY} "
                        "(default 40, quick 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both loops (default 1)")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    num_rounds = args.rounds or (3 if args.quick else 10)
    iters = args.iters or (20 if args.quick else 40)
    if iters % LOG_EVERY:
        parser.error(f"--iters must be a multiple of {LOG_EVERY} so every round pulls its records equally often")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic(tmp, format="voc", images=64, seed=0)
        config = load_config(benchmark_config(data, args.batch_size))
        stamps = Stamps()
        run = Run(config, torch.device("cpu"), Path(tmp) / "run", stamps)
        distinct = preload_batches(run)
    batches = list(itertools.islice(itertools.cycle(distinct), iters))

    print(f"tiny Faster R-CNN, batch {args.batch_size} of 128 px images ({len(distinct)} distinct batches), "
          f"ALWA_1 (interval 20), records pulled every {LOG_EVERY} iterations, "
          f"torch threads {torch.get_num_threads()}, {num_rounds} rounds x {iters} interleaved step pairs")
    paired_round(run, stamps, batches[:LOG_EVERY // 2])  # warm-up, not measured
    rounds = []
    for index in range(num_rounds):
        rounds.append(paired_round(run, stamps, batches))
        engine, bare = statistics.fmean(rounds[-1]["engine_wall"]), statistics.fmean(rounds[-1]["bare_wall"])
        print(f"  round {index + 1:2d}: engine {engine * 1e3:7.2f} ms/step   bare {bare * 1e3:7.2f} ms/step   "
              f"ratio {engine / bare:.3f}")

    added = engine_additions_alone(run, distinct, 20 * LOG_EVERY)
    engine, bare, ratio = median_block_ratio(rounds, "engine_wall", "bare_wall")
    engine_cpu, bare_cpu, ratio_cpu = median_block_ratio(rounds, "engine_cpu", "bare_cpu")
    pair_ratios = [e / b for r in rounds for e, b in zip(r["engine_wall"], r["bare_wall"])]
    print(f"last logged train/loss {stamps.last_loss:.4f}: finite, both loops trained a live model")
    print(f"wall clock, per step amortised over a round (median of {num_rounds} rounds): "
          f"engine {engine * 1e3:.2f} ms, bare {bare * 1e3:.2f} ms")
    print(f"  engine / bare: median of per-round ratios {ratio:.3f} -> overhead {100 * (ratio - 1):+.1f} %; "
          f"median of {len(pair_ratios)} per-pair ratios {statistics.median(pair_ratios):.3f}")
    print(f"process CPU time, same rounds: engine {engine_cpu * 1e3:.2f} ms, bare {bare_cpu * 1e3:.2f} ms, "
          f"ratio {ratio_cpu:.3f} (less sensitive to other processes on the machine)")
    print(f"engine's added host work timed alone: {added * 1e6:.0f} us/step "
          f"= {100 * added / bare:.2f} % of a bare step")
    ok = ratio <= 1 + CLAIMED_OVERHEAD
    print(f"{'PASS' if ok else 'FAIL'}: engine step {'<=' if ok else '>'} {100 * CLAIMED_OVERHEAD:.0f} % "
          f"slower than the bare loop (wall clock, median of per-round ratios)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
