"""GPU readiness check: is the engine ready for the paper's runs on this CUDA machine?

Without a CUDA device it prints ``no CUDA device`` and exits 0 (so it is safe anywhere).
On a CUDA machine, for the tiny and the R50-FPN Faster R-CNN at the paper's scale
(``dataset.scale: [1000, 600]``, 2 images per GPU, ALWA_1 with C = 100), in fp32 and AMP:

1. **throughput**: img/s of the engine (``trainers.engine.train_one_epoch``) against a
   bare torchvision loop (``sum(model(images, targets).values())``, ``zero_grad``,
   ``backward``, ``step``, the GradScaler under AMP) on the same model, optimizer, data
   loader and GPU, in alternating rounds (goal: engine / bare >= 0.97, the median of
   the per-round ratios);
2. **host synchronisations** per iteration, counted with
   ``set_sync_debug_mode("warn")`` for both loops: torchvision's detectors
   synchronise by themselves (``nonzero`` in the samplers, ...), so the engine's own
   are the difference, on iterations outside the logging intervals (goal 0; an
   iteration k is a logging one when k or k - 1 is a multiple of ``train.log_every``,
   the records' pull falling just after ``on_iteration(k)``);
3. **peak memory** (``torch.cuda.max_memory_allocated``) of each loop;
4. **data-loader stall**: the time per step the training loop waits in ``next()`` on
   its DataLoader (``dataset.num_workers`` workers);
5. **evaluation time** over a VOC07-test-sized set (4,952 images: the synthetic test
   images repeated), detections and ``voc_map`` included;
6. **emulated vs real workers on CUDA**: a 2-process DDP run (NCCL with 2 GPUs, else
   gloo on one GPU) against 1 process emulating 2 workers, tiny Faster R-CNN, ALWA_1:
   the largest relative gap of α per rank, losses and parameters, next to the gap
   between two identical emulated runs (CUDA's non-deterministic kernels: the floor).

The data are synthetic (``trainers.data.synthetic``, 500 × 500 px JPEGs, 8 classes (its maximum),
resized to 600 × 600 by the paper's scale). R50 uses the cached ImageNet weights (and
so FrozenBatchNorm2d, as in the paper) when the torch hub cache holds them, else
random weights with trainable BatchNorm (said in the output).

    python benchmarks/gpu_check.py              # 300 iterations per setting (~10 min on an H100)
    python benchmarks/gpu_check.py --quick      # 60 iterations, tiny only, eval on 500 images
    python benchmarks/gpu_check.py --models r50 --iters 200 --skip-ddp
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL_RATIO = 0.97
# --cpu-dry-run (development machines): the same code on the CPU at 128 px, the CUDA-only
# measurements (memory, sync debug mode) reported as 0; it checks the script, not a GPU.
DEVICE = "cuda"
SCALE = [1000, 600]


def _cuda() -> bool:
    return DEVICE == "cuda"


def synchronize() -> None:
    if _cuda():
        synchronize()


def set_sync_debug_mode(mode: str) -> None:
    if _cuda():
        torch.cuda.set_sync_debug_mode(mode)
VOC07_TEST_IMAGES = 4952
LOG_EVERY = 50


def config_for(data: dict, backbone: str, amp: bool, *, emulate: int = 1, iters: int = 10**8,
               num_workers: int = 4, interval: int = 100) -> dict:
    from trainers.detectors.backbones import imagenet_weights_path

    pretrained = "none"
    if backbone != "tiny" and Path(imagenet_weights_path(backbone)).is_file():
        pretrained = "imagenet"
    return {
        "dataset": {"kind": "voc", "root": data["root"], "train_sets": data["train_sets"],
                    "test_sets": data["test_sets"], "scale": list(SCALE), "num_workers": num_workers,
                    "flip": 0.5},
        "model": {"detector": "faster_rcnn", "backbone": backbone, "pretrained": pretrained},
        "weighting": {"method": "alwa", "variant": 1, "interval": interval},
        "schedule": {"unit": "iter", "max_iters": iters, "steps": [], "warmup_iters": 0},
        "optimizer": {"lr": 0.005},
        "train": {"batch_size": 2, "amp": amp, "log_every": LOG_EVERY, "eval_every": 0, "device": DEVICE,
                  "emulate_workers": emulate},
    }


class TimedBatches:
    """``count`` batches from an endless pass over ``loader`` (epoch after epoch), timing
    how long each ``next()`` blocks (the stall)."""

    def __init__(self, loader, sampler):
        self.loader, self.sampler = loader, sampler
        self.stalls: list[float] = []
        self.count = 0
        self._epoch = 0
        self._iterator = self._endless()

    def _endless(self):
        while True:
            self.sampler.set_epoch(self._epoch)
            yield from self.loader
            self._epoch += 1

    def close(self) -> None:
        """Shut the loader's workers down here (not in a process forked later)."""
        self._iterator.close()

    def __iter__(self):
        for _ in range(self.count):
            start = time.perf_counter()
            batch = next(self._iterator)
            self.stalls.append(time.perf_counter() - start)
            yield batch


def make_hook():
    from trainers.engine import TrainingHook

    class Stamps(TrainingHook):
        def __init__(self):
            self.callback = None
            self.last_loss = None

        def on_iteration(self, iteration):
            if self.callback:
                self.callback(iteration)

        def log_iterations(self, rows):
            self.last_loss = rows[-1]["train/loss"]

    return Stamps()


def bare_round(run, batches: TimedBatches) -> None:
    from trainers.engine import _to_device

    model, optimizer, scaler = run.model, run.optimizer, run.scaler
    model.train()
    for images, targets in batches:
        images, targets = _to_device(images, targets, run.device)
        with torch.autocast(run.device.type, enabled=run.amp):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def engine_round(run, batches: TimedBatches) -> None:
    from trainers.engine import train_one_epoch

    run.loader = batches
    run.position.epoch_batches = 0  # read for checkpoints only (disabled)
    train_one_epoch(run)


def timed(round_fn, run, batches, count) -> float:
    """Seconds for ``count`` iterations (the GPU drained before and after)."""
    batches.count = count
    synchronize()
    start = time.perf_counter()
    round_fn(run, batches)
    synchronize()
    return time.perf_counter() - start


def measure_syncs(kind: str, run, batches, hook, count: int, log_every: int) -> dict:
    """Syncs per iteration; the engine's iterations are delimited by ``on_iteration``,
    the bare loop's by the loader (one batch = one iteration)."""
    boundaries: list[int] = []
    batches.count = count

    def syncs() -> int:  # sync debug mode's warnings so far (other warnings do not count)
        return sum(1 for w in caught if "synchroniz" in str(w.message))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "engine":
            hook.callback = lambda iteration: boundaries.append(syncs())
            round_fn = engine_round
        else:
            original_iter = batches.__iter__

            def marking():
                for batch in original_iter():
                    boundaries.append(syncs())  # the previous iteration ended here
                    yield batch
            round_fn = lambda run_, batches_: bare_round(run_, marking())  # noqa: E731
        set_sync_debug_mode("warn")
        try:
            round_fn(run, batches)
        finally:
            set_sync_debug_mode("default")
            hook.callback = None
        end = syncs()
    previous = 0
    if kind != "engine":
        # iteration k ends when batch k + 1 is asked for (the first mark is the start)
        previous, boundaries = boundaries[0], boundaries[1:] + [end]
    counts = []
    for mark in boundaries:
        counts.append(mark - previous)
        previous = mark
    start_iteration = run.position.iteration - count if kind == "engine" else 0
    plain, logging = [], []
    for offset, n in enumerate(counts, 1):
        k = start_iteration + offset
        (logging if k % log_every == 0 or (k - 1) % log_every == 0 else plain).append(n)
    return {"plain": statistics.fmean(plain) if plain else math.nan,
            "logging": statistics.fmean(logging) if logging else math.nan,
            "where": sorted({f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})[:8]}


class RepeatedTestSet(torch.utils.data.Dataset):
    """A test set of ``size`` images: the synthetic ones repeated (detections and
    annotations line up, so ``voc_map`` runs over ``size`` images)."""

    def __init__(self, base, size: int):
        self.base, self.size = base, size
        self.annotations = [base.annotations[i % len(base)] for i in range(size)]
        self.class_names = base.class_names

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return self.base[index % len(self.base)]


def check_model(data: dict, backbone: str, amp: bool, iters: int, eval_images: int, out: dict) -> None:
    from trainers.config import load_config
    from trainers.engine import Run, evaluate

    hook = make_hook()
    config = load_config(config_for(data, backbone, amp))
    with tempfile.TemporaryDirectory() as workdir:
        run = Run(config, torch.device(DEVICE), Path(workdir), hook)
        batches = TimedBatches(run.loader, run.sampler)
        label = f"{backbone} ({config.model.pretrained}) {'AMP' if amp else 'fp32'}"
        warm = max(10, iters // 10)
        timed(bare_round, run, batches, warm)
        timed(engine_round, run, batches, warm)
        rounds = 4
        per_round = max(1, iters // rounds)
        ratios, engine_rates, bare_rates, stalls = [], [], [], {"engine": [], "bare": []}
        peaks = {}
        for _ in range(rounds):
            for kind, round_fn in (("bare", bare_round), ("engine", engine_round)):
                if _cuda():
                    torch.cuda.reset_peak_memory_stats()
                batches.stalls = []
                seconds = timed(round_fn, run, batches, per_round)
                peaks[kind] = max(peaks.get(kind, 0), torch.cuda.max_memory_allocated() if _cuda() else 0)
                stalls[kind].append(statistics.fmean(batches.stalls))
                rate = per_round * config.train.batch_size / seconds
                (engine_rates if kind == "engine" else bare_rates).append(rate)
            ratios.append(engine_rates[-1] / bare_rates[-1])
        sync_count = 2 * LOG_EVERY
        syncs = {kind: measure_syncs(kind, run, batches, hook, sync_count, LOG_EVERY) for kind in ("bare", "engine")}
        result = {
            "engine_img_s": statistics.median(engine_rates), "bare_img_s": statistics.median(bare_rates),
            "ratio": statistics.median(ratios), "ratios": ratios,
            "syncs_bare": syncs["bare"], "syncs_engine": syncs["engine"],
            "added_syncs_outside_logging": syncs["engine"]["plain"] - syncs["bare"]["plain"],
            "peak_gib": {k: v / 2**30 for k, v in peaks.items()},
            "stall_ms": {k: 1e3 * statistics.median(v) for k, v in stalls.items()},
            "last_loss": hook.last_loss,
        }
        print(f"{label}: engine {result['engine_img_s']:.1f} img/s, bare {result['bare_img_s']:.1f} img/s, "
              f"ratio {result['ratio']:.3f} (goal >= {GOAL_RATIO}; rounds {', '.join(f'{r:.3f}' for r in ratios)})")
        print(f"  host syncs per iteration outside logging: bare {syncs['bare']['plain']:.2f}, engine "
              f"{syncs['engine']['plain']:.2f} -> added {result['added_syncs_outside_logging']:+.2f} (goal 0); "
              f"logging iterations: engine {syncs['engine']['logging']:.2f}")
        if result["added_syncs_outside_logging"] > 0:
            print(f"  engine sync sites: {syncs['engine']['where']}")
        print(f"  peak memory: engine {result['peak_gib']['engine']:.2f} GiB, bare {result['peak_gib']['bare']:.2f} GiB;"
              f" data-loader stall per step: engine {result['stall_ms']['engine']:.2f} ms, "
              f"bare {result['stall_ms']['bare']:.2f} ms")
        batches.close()
        if eval_images:
            test_set = RepeatedTestSet(run.test_set, eval_images)
            synchronize()
            start = time.perf_counter()
            evaluation = evaluate(run.model, test_set, config, run.device)
            result["eval_s"] = time.perf_counter() - start
            result["eval_map"] = evaluation.metrics.get("val/map")
            print(f"  evaluation of {eval_images} test images (batch {config.train.eval_batch_size}): "
                  f"{result['eval_s']:.1f} s ({eval_images / result['eval_s']:.1f} img/s), "
                  f"mAP {result['eval_map']:.4f}")
        out[label] = result
    if amp:
        emulated_throughput(data, backbone, iters, out[label])


def emulated_throughput(data: dict, backbone: str, iters: int, result: dict) -> None:
    """img/s of the engine emulating 2 workers (2 micro-batches of 2 per step) against the
    plain engine's (``result``), and its peak memory: the emulation's own cost."""
    from trainers.config import load_config
    from trainers.engine import Run

    config = load_config(config_for(data, backbone, True, emulate=2))
    with tempfile.TemporaryDirectory() as workdir:
        run = Run(config, torch.device(DEVICE), Path(workdir), make_hook())
        batches = TimedBatches(run.loader, run.sampler)
        timed(engine_round, run, batches, max(5, iters // 20))
        if _cuda():
            torch.cuda.reset_peak_memory_stats()
        count = max(1, iters // 2)
        seconds = timed(engine_round, run, batches, count)
        batches.close()
        rate = count * 2 * config.train.batch_size / seconds
        peak = torch.cuda.max_memory_allocated() / 2**30 if _cuda() else 0.0
    result["emulated2_img_s"] = rate
    result["emulated2_peak_gib"] = peak
    print(f"  emulating 2 workers: {rate:.1f} img/s ({rate / result['engine_img_s']:.3f} of the plain engine's), "
          f"peak memory {peak:.2f} GiB")


# ---- emulated vs real workers on CUDA -------------------------------------------------------

def _probe_run(config: dict, workdir: str, device: str) -> dict:
    from trainers.config import load_config
    from trainers.engine import Run, TrainResult, _train_epochs
    from trainers.hooks import Hooks

    hook = make_hook()
    rows, alphas, projections = [], [], []
    run = Run(load_config(config), torch.device(device), Path(workdir), Hooks([hook]))
    directions = None

    def on_iteration(iteration):
        nonlocal directions
        alphas.append([float(w.alpha) for w in run.weightings])
        params = [p.detach().double() for p in run.model.parameters()]
        if directions is None:
            generator = torch.Generator(device=params[0].device).manual_seed(0)
            directions = [torch.randn(p.shape, generator=generator, dtype=torch.float64, device=p.device)
                          for p in params]
        projections.append([float((p * d).sum()) for p, d in zip(params, directions)])

    hook.callback = on_iteration
    hook.log_iterations = lambda new_rows: rows.extend(new_rows)
    _train_epochs(run, TrainResult(status="ok"))
    return {"rows": rows, "alphas": alphas, "projections": projections}


def _ddp_worker(rank: int, world: int, init_file: str, config: dict, workdir: str, out: str, backend: str,
                device_kind: str):
    import torch.distributed as dist

    global DEVICE
    DEVICE = device_kind  # a spawned process re-imports this module

    device = f"cuda:{rank if backend == 'nccl' else 0}" if _cuda() else "cpu"
    if _cuda():
        torch.cuda.set_device(torch.device(device))
    else:
        torch.set_num_threads(1)  # as the emulated run in the parent: the same float summation order
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = _probe_run(config, workdir, device)
        Path(f"{out}.{rank}").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def gap(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check_emulation(data: dict, iters: int, amp: bool, out: dict) -> None:
    import torch.multiprocessing as mp

    backend = "nccl" if _cuda() and torch.cuda.device_count() >= 2 else "gloo"
    base = config_for(data, "tiny", amp, iters=iters, num_workers=2, interval=10)
    base["dataset"]["scale"] = [512, 512] if _cuda() else [128, 128]
    base["train"]["log_every"] = 10
    emulated = json.loads(json.dumps(base))
    emulated["train"]["emulate_workers"] = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, f"{tmp}/init", base, f"{tmp}/ddp", f"{tmp}/out", backend, DEVICE), nprocs=2)
        ranks = [json.loads(Path(f"{tmp}/out.{r}").read_text()) for r in range(2)]
        first = _probe_run(emulated, f"{tmp}/emulated_a", DEVICE)
        second = _probe_run(emulated, f"{tmp}/emulated_b", DEVICE)
    alpha = max(gap([s[k] for s in first["alphas"]], [s[0] for s in ranks[k]["alphas"]]) for k in range(2))
    loss = gap([r["train/loss"] for r in first["rows"]],
               [(a["train/loss"] + b["train/loss"]) / 2 for a, b in zip(ranks[0]["rows"], ranks[1]["rows"])])
    params = max(gap(a, b) for a, b in zip(first["projections"], ranks[0]["projections"]))
    floor = max(gap(a, b) for a, b in zip(first["projections"], second["projections"]))
    floor_loss = gap([r["train/loss"] for r in first["rows"]], [r["train/loss"] for r in second["rows"]])
    label = f"emulated 2 vs DDP 2 ({backend}, {'AMP' if amp else 'fp32'}, {iters} iterations)"
    print(f"{label}: max relative gap α {alpha:.2e}, loss {loss:.2e}, parameters {params:.2e}; "
          f"two emulated runs (CUDA non-determinism floor): loss {floor_loss:.2e}, parameters {floor:.2e}")
    out[label] = {"alpha": alpha, "loss": loss, "params": params, "floor_params": floor, "floor_loss": floor_loss}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 iterations, tiny only, eval on 500 images")
    parser.add_argument("--iters", type=int, help="measured iterations per setting (default 300, quick 60)")
    parser.add_argument("--models", default=None, help="comma-separated: tiny,r50 (default both; quick tiny; none: only the emulation check)")
    parser.add_argument("--eval-images", type=int, default=None,
                        help=f"test images to evaluate (default {VOC07_TEST_IMAGES}, quick 500; 0: skip)")
    parser.add_argument("--skip-ddp", action="store_true", help="skip the emulated vs real workers check")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the script's code on the CPU at 128 px (checks the script, measures no GPU)")
    args = parser.parse_args(argv)
    global DEVICE, SCALE
    if args.cpu_dry_run:
        DEVICE, SCALE = "cpu", [128, 128]
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check (run this on the GPU machine)")
        return 0
    iters = args.iters or (60 if args.quick else 300)
    models = (args.models or ("tiny" if args.quick else "tiny,r50")).split(",")
    eval_images = args.eval_images if args.eval_images is not None else (500 if args.quick else VOC07_TEST_IMAGES)
    from trainers.data.synthetic import make_synthetic

    where = f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)" if _cuda() else "CPU DRY RUN"
    print(f"{where}, torch {torch.__version__}; batch 2 at scale {SCALE}, ALWA_1 C=100, "
          f"{iters} measured iterations per setting")
    out: dict = {}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic(tmp, format="voc", images=400 if _cuda() else 40, seed=0,
                              size=500 if _cuda() else 128, num_classes=8)
        for backbone in [m for m in models if m != "none"]:
            backbone = {"r50": "resnet50"}.get(backbone, backbone)
            for amp in (False, True):
                check_model(data, backbone, amp, iters, eval_images if amp else 0, out)
                result = out[next(reversed(out))]
                ok &= result["ratio"] >= GOAL_RATIO and result["added_syncs_outside_logging"] <= 0
        if not args.skip_ddp:
            for amp in (False, True):
                if amp and not _cuda():
                    continue  # AMP is CUDA only: the same run as fp32
                check_emulation(data, 30 if args.quick else 60, amp, out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    print(f"{'PASS' if ok else 'FAIL'}: engine >= {GOAL_RATIO} of the bare loop's img/s and no added host "
          "syncs outside logging, in every setting (the emulation gaps are reported, judge them against "
          "the non-determinism floor)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
