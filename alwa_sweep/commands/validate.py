"""``alwa-sweep validate``: expand and check a sweep spec without running anything."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from alwa_sweep.commands.argcheck import int_in
from alwa_sweep.spec import check_datasets, load_spec

MAKESPAN_MODEL = (
    "model: a trial is the spec's DDP ranks (workers x emulate_workers) whatever the layout; its time "
    "is proportional to the micro-batches each process runs per step (estimate.hours_per_trial, for the "
    "spec's layout, x spec workers / layout workers: perfect DDP scaling, no all-reduce cost, no "
    "per-micro-batch overhead); trials of equal length run in waves of floor(GPUs / GPUs per trial) "
    "(capped by max_concurrent); ASHA's early stops are ignored, so it is an upper bound")


def add_arguments(parser) -> None:
    parser.add_argument("spec", help="sweep spec YAML (see search_spaces/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the base config (repeatable)")
    parser.add_argument("--check-paths", action="store_true",
                        help="also read the datasets here (folders, annotations, images)")
    parser.add_argument("--json", action="store_true",
                        help="print the expanded trials (key, name, overrides, resolved config) as JSON")
    parser.add_argument("--gpus", type=int_in(1, 100_000, example=8), default=None, metavar="G",
                        help="also print the sweep's makespan on a cluster of G GPUs for each layout of "
                        "the trial's DDP ranks: real workers vs emulated ones (resources.emulate_workers)")


@dataclass
class Layout:
    workers: int  # real DDP workers (processes) per trial
    emulate_workers: int  # DDP ranks each one plays
    gpus_per_trial: float
    concurrent: int  # trials at once on the cluster (0: a trial does not fit)
    trial_time: float  # relative to the spec's layout (1.0), or hours
    makespan: float | None  # same unit as trial_time; None when it does not fit
    spec_layout: bool


def layouts(spec, gpus: int) -> list[Layout]:
    """Every way to play the trial's DDP ranks (``workers × emulate_workers``) with whole
    real workers, and the sweep's makespan on ``gpus`` GPUs for each (:data:`MAKESPAN_MODEL`).
    Times are in hours when the spec has ``estimate.hours_per_trial``, else in units of
    the spec layout's trial time."""
    resources = spec.resources
    ranks = resources.ranks
    per_worker = resources.gpus_per_worker if resources.gpus_per_worker > 0 else 1.0
    unit = spec.estimate.hours_per_trial or 1.0
    trials = spec.trial_count
    found = []
    for workers in (w for w in range(ranks, 0, -1) if ranks % w == 0):
        per_trial = workers * per_worker
        concurrent = min(int(gpus // per_trial), trials)
        if spec.max_concurrent:
            concurrent = min(concurrent, spec.max_concurrent)
        trial_time = unit * resources.workers / workers
        makespan = math.ceil(trials / concurrent) * trial_time if concurrent else None
        found.append(Layout(workers, ranks // workers, per_trial, concurrent, trial_time, makespan,
                            workers == resources.workers))
    return found


def layout_table(spec, gpus: int) -> str:
    hours = spec.estimate.hours_per_trial is not None
    unit = "h" if hours else "x T"
    lines = [f"makespan of {spec.trial_count} trials on {gpus} GPUs, per layout of the trial's "
             f"{spec.resources.ranks} DDP ranks"
             + ("" if hours else " (T: a trial's time in the spec's layout; set estimate.hours_per_trial "
                "for hours)") + ":",
             f"  {'layout':<34} {'GPUs/trial':>10} {'at once':>8} {'trial':>10} {'makespan':>11}"]
    if spec.resources.gpus_per_worker == 0:
        lines.insert(1, "  (the spec reserves no GPUs: the layouts assume 1 GPU per worker)")
    for layout in layouts(spec, gpus):
        name = f"{layout.workers} worker(s) x {layout.emulate_workers} emulated" + (" (spec)" if layout.spec_layout else "")
        makespan = f"{layout.makespan:,.1f} {unit}" if layout.makespan is not None else "does not fit"
        lines.append(f"  {name:<34} {layout.gpus_per_trial:>10g} {layout.concurrent:>8} "
                     f"{layout.trial_time:>8,.1f} {unit:<1} {makespan:>11}")
    lines.append("  " + MAKESPAN_MODEL + ".")
    return "\n".join(lines)


def search_table(spec) -> str:
    """A search spec: what is sampled, and the corners checked."""
    search = spec.search
    lines = [f"search: {search.type}, {search.samples} trials sampled (seed {search.seed}), "
             f"{search.mode} {search.metric or 'the main metric'}"]
    for key, rng in search.space.items():
        lines.append(f"  {key:<28} [{rng.low:g}, {rng.high:g}]{' log' if rng.log else ''}")
    model, weighting = spec.probes[0].config.model, spec.probes[0].config.weighting
    lines.append(f"  every trial: {model.detector} / {model.backbone} / {weighting.method}; "
                 f"{len(spec.probes)} corners of the space checked")
    return "\n".join(lines)


def trial_table(spec) -> str:
    if spec.search is not None:
        return search_table(spec)
    width = max([len(t.name) for t in spec.trials] + [5])
    lines = [f"{'#':>4}  {'key':<12}  {'trial':<{width}}  detector / backbone / weighting"]
    for index, trial in enumerate(spec.trials, 1):
        model, weighting = trial.config.model, trial.config.weighting
        what = f"{model.detector} / {model.backbone} / {weighting.method}"
        lines.append(f"{index:>4}  {trial.key:<12}  {trial.name:<{width}}  {what}")
    return "\n".join(lines)


def spec_as_json(spec) -> dict:
    """The stable, scriptable view of a spec: its settings and every expanded trial."""
    return {
        "name": spec.name, "experiment": spec.experiment, "description": spec.description,
        "resources": spec.resources.model_dump(), "scheduler": spec.scheduler.model_dump(),
        "max_failures": spec.max_failures, "max_concurrent": spec.max_concurrent,
        "trials": [{"key": t.key, "name": t.name, "overrides": t.overrides, "config": t.config.dump()}
                   for t in spec.trials],
        "search": spec.search.model_dump() if spec.search is not None else None,
        "trial_count": spec.trial_count,
    }


def run(args) -> int:
    spec = load_spec(args.spec, args.overrides, check_paths=args.check_paths)
    if args.check_paths:
        check_datasets(spec.configs)
    if args.json:
        view = spec_as_json(spec)
        if args.gpus:
            view["layouts"] = {"gpus": args.gpus, "model": MAKESPAN_MODEL,
                               "hours": spec.estimate.hours_per_trial is not None,
                               "layouts": [asdict(layout) for layout in layouts(spec, args.gpus)]}
        print(json.dumps(view, indent=1))
        return 0
    print(f"spec {spec.name!r}: {spec.description}" if spec.description else f"spec {spec.name!r}")
    print(trial_table(spec))
    resources = spec.resources
    unit = "GPU" if spec.uses_gpus else "CPU"
    per_trial = resources.workers * (resources.gpus_per_worker if spec.uses_gpus else resources.cpus_per_worker)
    print(f"trials: {spec.trial_count}; per trial: {resources.workers} worker(s) × "
          f"{resources.cpus_per_worker:g} CPU, {resources.gpus_per_worker:g} GPU ({per_trial:g} {unit}s)")
    batch = {config.train.batch_size for config in spec.configs}
    images = "/".join(str(resources.ranks * b) for b in sorted(batch))
    print(f"DDP ranks per trial: {resources.ranks} ({resources.workers} worker(s) × {resources.emulate_workers} "
          f"emulated), {images} images per optimizer step")
    hours = spec.resource_hours()
    if hours is None:
        print(f"estimated {unit}-hours: unknown (set estimate.hours_per_trial in the spec)")
    else:
        print(f"estimated {unit}-hours: {hours:,.1f} ({spec.estimate.hours_per_trial:g} h per trial)")
    if args.gpus:
        print(layout_table(spec, args.gpus))
    print("valid")
    return 0
