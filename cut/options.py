"""Option checks shared by every command-line tool: typed values checked as they are parsed.

Each factory returns an argparse `type=` callable that turns the string into a value or raises
`argparse.ArgumentTypeError` with what was wrong; `Parser` reports it in one line that names the
option and exits 2, before any model loads, any request is sent or anything is written:

    p = Parser(prog="cut.x")
    p.add_argument("--seed", type=integer(0, 2**32 - 1), default=0)
    p.add_argument("--temperature", type=number(0, None), default=0.7)
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn

# the largest value a whole-number / real option takes: beyond them a value is a typo
# (99999999999999999999) that overflows an int32 index, a time stamp or a half-precision product
# downstream, after a model has loaded; every tool checks its numbers against these
INT_MAX = 2**31 - 1
FLOAT_MAX = 1e6


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `prog: error: argument --x: why` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """A finite float in [lo, hi] (open ends with lo_open / hi_open; None = unbounded)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if (lo is not None and (value < lo or (lo_open and value == lo))) or (
            hi is not None and (value > hi or (hi_open and value == hi))
        ):
            raise argparse.ArgumentTypeError(f"must be in {_bounds(lo, hi, lo_open, hi_open)}, got {text!r}")
        return value

    return parse


def integer(lo: int | None = None, hi: int | None = None):
    """A whole number in [lo, hi] (None = unbounded); '3.0', 'nan', '1e99' are refused."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be in {_bounds(lo, hi, False, False)}, got {text!r}")
        return value

    return parse


SEED = integer(0, 2**32 - 1)  # what numpy / torch / random all accept


def die(prog: str, message: str) -> NoReturn:
    """The same one-line error for a check that needs more than one option."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
