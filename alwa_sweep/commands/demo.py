"""``alwa-sweep demo``: the whole story on a laptop CPU — synthetic data, a local Ray Tune
sweep of a tiny Faster R-CNN over RPN loss weights and ALWA, MLflow, tables, figures."""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

from alwa_sweep.spec import load_spec
from alwa_sweep.sweep_paths import check_writable
from alwa_sweep.tracking import sqlite_uri
from alwa_sweep.tune import print_summary, run_sweep
from trainers.yamlio import load_yaml
from trainers.data.synthetic import make_synthetic
from trainers.errors import ConfigError


DEMO_IMAGES = 240
QUICK_ITERS = 40


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("alwa_demo"),
                        help="folder for the data, the MLflow store, the sweeps and the reports "
                        "(default: ./alwa_demo)")
    parser.add_argument("--workers", type=int, default=2, help="trials run at once (default: 2)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 3 trials of a few dozen iterations (about 2 minutes)")


def demo_spec_path() -> Path:
    return Path(str(resources.files("search_spaces") / "demo.yaml"))


def demo_spec_dict(data_root: Path, quick: bool) -> dict:
    raw = load_yaml(demo_spec_path())
    raw["base"]["dataset"]["root"] = str(data_root)
    if quick:
        raw["base"]["schedule"].update(max_iters=QUICK_ITERS, steps=[QUICK_ITERS - 10], warmup_iters=10)
        raw["base"]["train"].update(eval_every=0, checkpoint_every_iters=20)
        raw["grid"] = {"weighting": [{"method": "fixed", "cls": 1.0, "reg": 1.0},
                                     {"method": "alwa", "variant": 1, "interval": 5},
                                     {"method": "alwa", "variant": 2, "interval": 5}]}
        raw["name"] = "demo-quick"
    return raw


def run(args) -> int:
    if args.workers < 1:
        raise ConfigError("--workers", f"must be at least 1, got {args.workers}.")
    started = time.perf_counter()
    out = args.out.resolve()
    check_writable(out, "--out")
    print(f"[1/4] synthetic VOC data in {out / 'data'} …", flush=True)
    data = make_synthetic(out / "data", format="voc", images=DEMO_IMAGES, seed=0, size=128)
    spec = load_spec(demo_spec_dict(Path(data["root"]).resolve(), args.quick))
    uri = sqlite_uri(out / "mlflow.db")
    name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = out / "sweeps" / name
    print(f"[2/4] sweep {name}: {len(spec.trials)} trials, {args.workers} at a time, on a local Ray "
          "runtime …", flush=True)
    summary = run_sweep(spec, sweep_dir, uri, max_concurrent=args.workers,
                        num_cpus=max(args.workers, 1), progress=True)
    print_summary(summary)

    print("[3/4] tables and figures …", flush=True)
    from alwa_sweep.commands import report

    report_dir = out / "reports" / name
    report.run(argparse.Namespace(experiment=None, sweep=summary.parent_run_id, table=[1, 2],
                                  format="both", out=report_dir, metric=None, paper=False,
                                  tracking_uri=uri, no_figures=False, compact=True))
    minutes = (time.perf_counter() - started) / 60
    print(f"[4/4] done in {minutes:.1f} min.")
    print(f"  tables and figures: {report_dir}")
    print(f"  sweep folder:       {sweep_dir}")
    print(f"  MLflow store:       {uri}")
    print(f"  open the MLflow UI: alwa-sweep ui --store {out / 'mlflow.db'}")
    print(f"  resume if interrupted: alwa-sweep resume {sweep_dir}")
    return 0 if summary.failed == 0 else 1
