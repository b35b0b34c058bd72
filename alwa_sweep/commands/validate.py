"""``alwa-sweep validate``: expand and check a sweep spec without running anything."""

from __future__ import annotations

import json

from alwa_sweep.spec import check_datasets, load_spec



def add_arguments(parser) -> None:
    parser.add_argument("spec", help="sweep spec YAML (see search_spaces/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the base config (repeatable)")
    parser.add_argument("--check-paths", action="store_true",
                        help="also read the datasets here (folders, annotations, images)")
    parser.add_argument("--json", action="store_true",
                        help="print the expanded trials (key, name, overrides, resolved config) as JSON")


def trial_table(spec) -> str:
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
    }


def run(args) -> int:
    spec = load_spec(args.spec, args.overrides, check_paths=args.check_paths)
    if args.check_paths:
        check_datasets(trial.config for trial in spec.trials)
    if args.json:
        print(json.dumps(spec_as_json(spec), indent=1))
        return 0
    print(f"spec {spec.name!r}: {spec.description}" if spec.description else f"spec {spec.name!r}")
    print(trial_table(spec))
    resources = spec.resources
    unit = "GPU" if spec.uses_gpus else "CPU"
    per_trial = resources.workers * (resources.gpus_per_worker if spec.uses_gpus else resources.cpus_per_worker)
    print(f"trials: {len(spec.trials)}; per trial: {resources.workers} worker(s) × "
          f"{resources.cpus_per_worker:g} CPU, {resources.gpus_per_worker:g} GPU ({per_trial:g} {unit}s)")
    hours = spec.resource_hours()
    if hours is None:
        print(f"estimated {unit}-hours: unknown (set estimate.hours_per_trial in the spec)")
    else:
        print(f"estimated {unit}-hours: {hours:,.1f} ({spec.estimate.hours_per_trial:g} h per trial)")
    print("valid")
    return 0
