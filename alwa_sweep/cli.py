"""The ``alwa-sweep`` command line: a thin dispatcher over ``alwa_sweep.commands``.

Only the module of the command being run is imported (``alwa-sweep --help`` imports
no torch, Ray or MLflow). Every :class:`~trainers.errors.UserInputError` is printed as
its paragraph(s) with exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from alwa_sweep import __version__
from alwa_sweep.commands import COMMANDS
from alwa_sweep.commands.argcheck import one_paragraph_errors


def _chosen_command(argv: list[str]) -> str | None:
    names = {name for name, _, _ in COMMANDS}
    for token in argv:
        if not token.startswith("-"):
            return token if token in names else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="alwa-sweep",
        description="Loss-weight sweeps (ALWA, fixed grids, Guided Loss, DWA, DTP) for "
        "torchvision detectors on Ray Tune, tracked in MLflow.",
    )
    one_paragraph_errors(parser)
    parser.add_argument("--version", action="version", version=f"alwa-sweep {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = _chosen_command(argv)
    for name, module_name, help_text in COMMANDS:
        p = one_paragraph_errors(sub.add_parser(name, help=help_text, description=help_text))
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks on errors")
        if name == chosen:
            module = importlib.import_module(f"alwa_sweep.commands.{module_name}")
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from alwa_sweep.signals import Terminated
    from trainers.errors import UserInputError

    try:
        return int(args._run(args) or 0)
    except UserInputError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
