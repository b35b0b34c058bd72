"""``alwa-sweep validate``: expand and check a sweep spec without running anything."""

from __future__ import annotations

from alwa_sweep.spec import check_datasets, load_spec

HELP = "validate a sweep spec: print the expanded trials, their count and the resource-hours"


def add_arguments(parser) -> None:
    parser.add_argument("spec", help="sweep spec YAML (see search_spaces/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the base config (repeatable)")
    parser.add_argument("--check-paths", action="store_true",
                        help="also read the datasets here (folders, annotations, images)")


def trial_table(spec) -> str:
    width = max([len(t.name) for t in spec.trials] + [5])
    lines = [f"{'#':>4}  {'key':<12}  {'trial':<{width}}  detector / backbone / weighting"]
    for index, trial in enumerate(spec.trials, 1):
        model, weighting = trial.config["model"], trial.config["weighting"]
        what = f"{model['detector']} / {model['backbone']} / {weighting['method']}"
        lines.append(f"{index:>4}  {trial.key:<12}  {trial.name:<{width}}  {what}")
    return "\n".join(lines)


def run(args) -> int:
    spec = load_spec(args.spec, args.overrides, check_paths=args.check_paths)
    if args.check_paths:
        check_datasets(trial.config for trial in spec.trials)
    print(f"spec {spec.name!r}: {spec.description}" if spec.description else f"spec {spec.name!r}")
    print(trial_table(spec))
    resources = spec.resources
    unit = "GPU" if spec.uses_gpus else "CPU"
    per_trial = resources["workers"] * (resources["gpus_per_worker"] if spec.uses_gpus
                                        else resources["cpus_per_worker"])
    print(f"trials: {len(spec.trials)}; per trial: {resources['workers']} worker(s) × "
          f"{resources['cpus_per_worker']} CPU, {resources['gpus_per_worker']} GPU ({per_trial:g} {unit}s)")
    hours = spec.resource_hours()
    if hours is None:
        print(f"estimated {unit}-hours: unknown (set estimate.hours_per_trial in the spec)")
    else:
        print(f"estimated {unit}-hours: {hours:,.1f} ({spec.estimate['hours_per_trial']} h per trial)")
    print("valid")
    return 0
