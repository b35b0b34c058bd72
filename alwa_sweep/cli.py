"""The ``alwa-sweep`` command line: a thin dispatcher over ``alwa_sweep.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys

from alwa_sweep import __version__
from alwa_sweep.commands import COMMANDS
from trainers.errors import UserInputError


def _available_commands():
    """Subcommands whose module exists (later issues add more)."""
    for name, module_name in COMMANDS:
        try:
            module = importlib.import_module(f"alwa_sweep.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"alwa_sweep.commands.{module_name}":
                continue
            raise
        yield name, module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alwa-sweep",
        description="Loss-weight sweeps (ALWA, fixed grids, Guided Loss, DWA, DTP) for "
        "torchvision detectors on Ray Tune, tracked in MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"alwa-sweep {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in _available_commands():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks on errors")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserInputError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
