"""``alwa-sweep train``: one training run, logged to MLflow."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from alwa_sweep.commands.run import check_tracking_uri_form
from alwa_sweep.locks import FolderLock
from alwa_sweep.progress import ProgressBar
from alwa_sweep.signals import terminate_on_signals
from alwa_sweep.spec import check_datasets
from alwa_sweep.sweep_paths import check_writable
from alwa_sweep.tracking import MlflowHook, check_tracking_server, default_tracking_uri, get_or_create_experiment, open_store
from reports.schema import KIND_TRAIN, STATUS_OK, TAG_KIND
from trainers.config import load_config
from trainers.checkpoint import require_resumable_checkpoint
from trainers.engine import train
from trainers.errors import ConfigError



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config YAML (see search_spaces/ for examples)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optimizer.lr=0.01 (repeatable)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                        "or sqlite:///./alwa_runs/mlflow.db)")
    parser.add_argument("--experiment", default="alwa-train", help="MLflow experiment name")
    parser.add_argument("--run-name", help="MLflow run name (default: the config file's stem)")
    parser.add_argument("--workdir", help="checkpoint folder (default: ./alwa_runs/train/<run name>)")
    parser.add_argument("--resume", metavar="CKPT",
                        help="resume from a checkpoint file or folder; continues its MLflow run")


def run(args) -> int:
    config = load_config(args.config, args.overrides)
    run_name = args.run_name or Path(args.config).stem
    if not re.fullmatch(r"[\w.\-]{1,200}", run_name):
        raise ConfigError("--run-name", f"{run_name!r} may only hold letters, digits, '.', '_' and '-' "
                          "(at most 200).", "Pick another name.")
    if args.resume:
        # An empty or all-corrupt checkpoint folder fails here, before any MLflow run exists.
        require_resumable_checkpoint(args.resume)
    if args.workdir:
        workdir = Path(args.workdir).resolve()
    elif args.resume:
        # A run's folder holds checkpoints/ckpt_*.pt and the id of its MLflow run.
        resume = Path(args.resume).resolve()
        workdir = resume.parent.parent if resume.is_file() else resume.parent
    else:
        workdir = (Path("alwa_runs") / "train" / run_name).resolve()
    if not args.resume and (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        raise ConfigError("--workdir", f"{workdir} already holds checkpoints of an earlier run.",
                          f"Resume it with --resume {workdir / 'checkpoints'}, or pick another --run-name.")
    # Everything that can be checked is, before the MLflow run exists.
    tracking_uri = args.tracking_uri or default_tracking_uri()
    check_tracking_uri_form(tracking_uri, "--tracking-uri" if args.tracking_uri else "MLFLOW_TRACKING_URI")
    check_tracking_server(tracking_uri)
    check_datasets([config])
    check_writable(workdir, "--workdir")
    client = open_store(tracking_uri)
    experiment_id = get_or_create_experiment(client, args.experiment)
    with terminate_on_signals(), FolderLock(workdir, what="work folder", command="alwa-sweep train"):
        run_id_file = workdir / "mlflow_run_id"
        if args.resume and run_id_file.exists():
            logger = MlflowHook(client, run_id_file.read_text().strip())
        else:
            logger = MlflowHook.create(client, experiment_id, run_name, tags={TAG_KIND: KIND_TRAIN})
            run_id_file.write_text(logger.run_id)
        # From here the engine finishes the run on every exit path (errors, signals).
        result = train(config, workdir=workdir, hooks=[logger, ProgressBar(run_name)], resume=args.resume)
    print(f"status: {result.status}" + (f" ({result.reason})" if result.reason else ""))
    print(f"iterations: {result.iterations} in {result.seconds:.1f} s")
    for name, value in sorted(result.metrics.items()):
        if name.count("/") == 1:
            print(f"{name}: {value:.4f}")
    print(f"MLflow run: {logger.run_id} (experiment {args.experiment!r}, store {client.tracking_uri})")
    print(f"checkpoints: {workdir / 'checkpoints'}")
    return 0 if result.status == STATUS_OK else 1
