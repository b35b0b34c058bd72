"""``alwa-sweep resume``: finish an interrupted sweep."""

from __future__ import annotations

from pathlib import Path

from alwa_sweep.commands.run import add_common_arguments, check_recorded_store
from alwa_sweep.spec import load_spec
from alwa_sweep.preflight import before_sweep
from alwa_sweep.storage import resolve_storage
from alwa_sweep.sweep_paths import runs_root
from alwa_sweep.tune import load_sweep_state, print_summary, run_sweep
from trainers.errors import ConfigError, UserInputError



def add_arguments(parser) -> None:
    parser.add_argument("sweep", help="the sweep's folder, or its name under <runs-dir>/sweeps")
    add_common_arguments(parser)


def find_sweep_dir(text: str, root: Path) -> Path:
    for candidate in (Path(text), root / "sweeps" / text):
        if (candidate / "sweep.json").is_file():
            return candidate.resolve()
    raise ConfigError("SWEEP", f"no sweep folder found for {text!r} (looked for sweep.json in {text} and "
                      f"{root / 'sweeps' / text}).", "Pass the folder printed by `alwa-sweep run`.")


def run(args) -> int:
    root = runs_root(args.runs_dir)
    sweep_dir = find_sweep_dir(args.sweep, root)
    state = load_sweep_state(sweep_dir)
    check_recorded_store(sweep_dir, state)
    # The spec as it was run; paths were checked when it was launched.
    spec = load_spec(sweep_dir / "spec.yaml", check_paths=False)
    storage = resolve_storage(state["storage"]) if state.get("storage") else None
    cluster = before_sweep(args.address, resources=spec.resources.model_dump(), tracking_uri=state["tracking_uri"], storage=storage,
                           num_cpus=args.num_cpus)  # issue 17
    try:
        summary = run_sweep(spec, sweep_dir, state["tracking_uri"], address=args.address,
                            max_concurrent=args.max_concurrent, num_cpus=args.num_cpus,
                            progress=not args.quiet, state=state)
    except UserInputError:  # e.g. the store can't be created: leave no Ray runtime behind
        cluster.disconnect_if_started()
        raise
    print_summary(summary)
    return 0 if summary.failed == 0 else 1
