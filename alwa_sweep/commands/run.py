"""``alwa-sweep run``: launch a sweep on a local Ray runtime or an existing cluster."""

from __future__ import annotations

import re
import time
from pathlib import Path

from alwa_sweep.preflight import before_sweep
from alwa_sweep.spec import check_datasets, load_spec
from alwa_sweep.storage import resolve_storage
from alwa_sweep.sweep_paths import check_writable, runs_root
from alwa_sweep.tracking import check_tracking_server, default_tracking_uri
from alwa_sweep.tune import load_sweep_state, print_summary, run_sweep
from trainers.errors import ConfigError, UserInputError



def add_common_arguments(parser) -> None:
    parser.add_argument("--address", help="Ray cluster address (auto, ray://host:port); default: a local "
                        "Ray runtime on this machine")
    parser.add_argument("--max-concurrent", type=int, metavar="N", help="at most N trials at once")
    parser.add_argument("--num-cpus", type=int, metavar="N", help="CPUs of the local Ray runtime")
    parser.add_argument("--runs-dir", default=None, help="folder of sweeps and the default MLflow store "
                        "(default: ./alwa_runs)")
    parser.add_argument("--quiet", action="store_true", help="no live table of trials")


def add_arguments(parser) -> None:
    parser.add_argument("spec", help="sweep spec YAML (see search_spaces/)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                        "sqlite:///<runs-dir>/mlflow.db)")
    parser.add_argument("--name", help="sweep name (default: <spec name>-<date>-<time>); an existing "
                        "unfinished sweep of this name is resumed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the base config (repeatable)")
    parser.add_argument("--no-check-paths", action="store_true",
                        help="don't check dataset paths on this machine (they exist on the cluster)")
    parser.add_argument("--force-new-name", action="store_true",
                        help="when a sweep of this --name exists with another spec, start this one under a "
                        "fresh name (<name>-2, ...) instead of refusing")
    add_common_arguments(parser)
    parser.add_argument("--storage", metavar="URI", help="where Ray Tune's state, checkpoints and Train runs go: a "
                        "folder (shared by all nodes) or s3://bucket/prefix, gs://… (default: the sweep folder)")
    parser.add_argument("--submit", action="store_true", help="send this command to the cluster as a Ray Job "
                        "(--address: its dashboard, http://head:8265) and return; see `alwa-sweep status/logs`")
    parser.add_argument("--runtime-env", choices=("pip", "image"), default="pip",
                        help="with --submit: nodes install the dependencies with pip (cached per node), or "
                        "their image has them (see Dockerfile)")


def run(args) -> int:
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError("--max-concurrent", f"must be at least 1, got {args.max_concurrent}.")
    spec = load_spec(args.spec, args.overrides, check_paths=not args.no_check_paths)
    if not args.no_check_paths:
        check_datasets(spec.configs)
    root = runs_root(args.runs_dir)
    check_store_path(root, "--runs-dir" if args.runs_dir else "the current folder")
    check_writable(root, "--runs-dir")
    tracking_uri = args.tracking_uri or default_tracking_uri(root)
    check_tracking_uri_form(tracking_uri, "--tracking-uri" if args.tracking_uri else "MLFLOW_TRACKING_URI")
    check_tracking_server(tracking_uri)
    name = args.name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not re.fullmatch(r"[\w.\-]{1,100}", name) or not any(c.isalnum() for c in name):
        raise ConfigError("--name", f"{name!r} may only hold letters, digits, '.', '_' and '-' (at most 100).",
                          "Pick another name.")
    storage = resolve_storage(args.storage) if args.storage else None
    if args.submit:  # the driver runs on the cluster as a Ray Job
        from alwa_sweep.commands.jobs import submit_run

        return submit_run(args, name)
    sweep_dir = root / "sweeps" / name
    state = None
    if sweep_dir.exists():
        if not (sweep_dir / "sweep.json").exists():
            raise ConfigError("--name", f"{sweep_dir} exists but is not a sweep folder.", "Pick another --name.")
        changes = spec_changes(sweep_dir, spec)
        if changes and args.force_new_name:
            old, (name, sweep_dir) = name, _fresh_name(root, name)
            print(f"the spec differs from sweep {old}'s: starting it as {name}")
        elif changes:
            raise ConfigError("--name", f"sweep {name} was launched with another spec; resuming it would "
                              f"train the old configs. Changes:\n{changes}",
                              "Pick another --name, add --force-new-name to start it under a fresh name, "
                              "or run it with the spec it had.")
        else:
            state = load_sweep_state(sweep_dir)
            check_recorded_store(sweep_dir, state)
            if (args.tracking_uri or tracking_uri) != state["tracking_uri"]:
                tracking_uri = state["tracking_uri"]
            print(f"resuming sweep {name} (finished trials are not re-run)")
            storage = resolve_storage(state["storage"]) if state.get("storage") else storage
    # Connect (bounded), check the trial fits and the store/storage reach every node,
    # all before any MLflow state exists.
    cluster = before_sweep(args.address, resources=spec.resources.model_dump(), tracking_uri=tracking_uri, storage=storage,
                           num_cpus=args.num_cpus)
    try:
        summary = run_sweep(spec, sweep_dir, tracking_uri, address=args.address,
                            max_concurrent=args.max_concurrent, num_cpus=args.num_cpus,
                            progress=not args.quiet, state=state, storage=args.storage)
    except UserInputError:  # e.g. the store can't be created: leave no Ray runtime behind
        cluster.disconnect_if_started()
        raise
    print_summary(summary)
    return 0 if summary.failed == 0 else 1


def spec_changes(sweep_dir: Path, spec) -> str:
    """A unified diff of the spec a sweep folder holds against ``spec`` ('' if equal)."""
    import difflib

    import yaml

    from trainers.yamlio import load_yaml

    before = yaml.safe_dump(load_yaml(sweep_dir / "spec.yaml", what="sweep spec"), sort_keys=True).splitlines()
    after = yaml.safe_dump(spec.raw, sort_keys=True).splitlines()
    if before == after:
        return ""
    diff = difflib.unified_diff(before, after, "launched", "now", lineterm="", n=1)
    lines = list(diff)[2:]
    return "\n".join(lines[:40] + ([f"... ({len(lines) - 40} more lines)"] if len(lines) > 40 else []))


def _fresh_name(root: Path, name: str) -> tuple[str, Path]:
    for index in range(2, 10_000):
        candidate = f"{name}-{index}"
        if not (root / "sweeps" / candidate).exists():
            return candidate, root / "sweeps" / candidate
    raise ConfigError("--name", f"no free name of the form {name}-N.", "Pick another --name.")


def check_store_path(folder: Path, field: str) -> None:
    """A folder whose SQLite store's URI would be misread: '?' starts the URI's query, so
    ``sqlite:///runs?x=1/mlflow.db`` opens ``runs`` (a file) with the option ``x``."""
    if "?" in str(folder):
        raise ConfigError(field, f"{str(folder)!r} holds '?', which a sqlite:/// URI reads as the start of its "
                          "options: the store would be written elsewhere.", "Choose a folder name without '?'.")


def check_tracking_uri_form(uri: str, field: str = "--tracking-uri") -> None:
    """A tracking URI names its scheme: a plain path (``store/mlflow.db``, ``mlruns``) would be
    MLflow's deprecated file store, a folder of YAML files, not the SQLite database meant."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    if not scheme or len(scheme) == 1:  # no scheme, or a Windows drive letter
        path = Path(uri).expanduser().resolve()
        db = path if path.suffix == ".db" else path / "mlflow.db"
        raise ConfigError(field, f"{uri!r} is a path, not a tracking URI.",
                          f"For a SQLite store write sqlite:///{db}; for a server, http://host:port.")
    if scheme == "sqlite":
        check_store_path(Path(uri.split("sqlite:///", 1)[-1]), field)


def check_recorded_store(sweep_dir: Path, state: dict) -> None:
    """A sweep resumed from its folder must find its SQLite store where ``sweep.json`` says:
    opening a missing one would create an empty store there, and every trial would start afresh."""
    from alwa_sweep.tracking import sqlite_path

    db = sqlite_path(state["tracking_uri"])
    if db is not None and not db.is_file():
        raise ConfigError(f"{sweep_dir / 'sweep.json'}: tracking_uri",
                          f"the sweep's MLflow store was {db}, which does not exist (the sweep folder was moved, "
                          "or the store deleted).",
                          f"Move the store back to {db}, or edit tracking_uri in sweep.json to where it is now.")
