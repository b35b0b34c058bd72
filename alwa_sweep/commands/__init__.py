"""One module per ``alwa-sweep`` subcommand.

Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code). ``alwa_sweep.cli`` imports only the module of
the command being run, so ``alwa-sweep --help`` imports no torch, Ray or MLflow.
"""

# (subcommand, module, one-line help) in the order shown by --help
COMMANDS = [
    ("make-synthetic", "make_synthetic", "write a synthetic dataset in the VOC XML or COCO JSON layout"),
    ("evaluate", "evaluate", "evaluate saved detections on a VOC or COCO test set (mAP / AP)"),
    ("train", "train", "train one detector from a config YAML (progress bar, MLflow logging, resumable)"),
    ("validate", "validate", "validate a sweep spec: print the expanded trials, their count and the resource-hours"),
    ("schema", "schema", "write the JSON Schema of sweep specs (editor completion and checks)"),
    ("run", "run", "run a sweep spec with Ray Tune (local runtime by default, or --address for a cluster)"),
    ("resume", "resume", "resume an interrupted sweep (by folder or name): finished trials are not re-run"),
    ("status", "status", "the state of sweeps submitted as Ray Jobs (run --submit)"),
    ("logs", "logs", "the driver's log of a sweep submitted as a Ray Job"),
    ("report", "report", "the paper's tables (Markdown/LaTeX) and figures from the MLflow records"),
    ("ui", "ui", "open the MLflow UI on a sweep's store"),
    ("demo", "demo", "the CPU demo sweep: synthetic data, a tiny detector, tables and figures"),
]
