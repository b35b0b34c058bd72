"""One module per ``alwa-sweep`` subcommand.

Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code). ``alwa_sweep.cli`` imports them lazily so that
``alwa-sweep --help`` stays fast.
"""

# (subcommand, module) in the order shown by --help
COMMANDS = [
    ("make-synthetic", "make_synthetic"),
    ("evaluate", "evaluate"),
    ("train", "train"),
    ("validate", "validate"),
    ("run", "run"),
    ("resume", "resume"),
    ("status", "status"),  # issue 17: Ray Jobs (run --submit)
    ("logs", "logs"),
    ("report", "report"),
    ("ui", "ui"),
    ("demo", "demo"),
]
