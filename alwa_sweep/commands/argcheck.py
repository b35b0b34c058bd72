"""Command-line numbers checked at parse time, and argparse errors as one paragraph.

``int_in(lo, hi)`` / ``float_in(lo, hi, ...)`` are argparse ``type=`` functions: the
value must parse, be finite and lie in range, else the message names the accepted
range and the value. ``one_paragraph_errors(parser)`` makes a (sub)parser print
``error: <prog>: <problem> Run `<prog> --help` for the options.`` on one line and exit
2, instead of argparse's usage block plus error line.
"""

from __future__ import annotations

import argparse
import math
import sys


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def int_in(lo: int, hi: int, *, example: int | None = None):
    """An argparse type: an integer in ``lo..hi`` (both included)."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except (ValueError, AttributeError):
            raise argparse.ArgumentTypeError(
                f"expected an integer in {lo}..{hi}, got {_shown(text)}"
                + (f" (e.g. {example})" if example is not None else "")) from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in {lo}..{hi}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite number in the interval (``lo_open``: ``lo`` excluded)."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except (ValueError, AttributeError):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {_shown(text)}") from None
        if not math.isfinite(value) or (value <= lo if lo_open else value < lo) \
                or (value >= hi if hi_open else value > hi):
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text.strip()}")
        return value
    parse.__name__ = "number"
    return parse


def one_paragraph_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report its errors as one line on stderr, exit code 2."""
    def error(message: str):
        text = " ".join(str(message).split())
        if not text.endswith("."):
            text += "."
        sys.stderr.write(f"error: {parser.prog}: {text} Run `{parser.prog} --help` for the options.\n")
        sys.exit(2)
    parser.error = error
    return parser
