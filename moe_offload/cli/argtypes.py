"""Command-line argument types and the parser class every moe-offload command uses.

A bad flag value is a MoEOffloadError like any other bad input, so ``cli.main``
prints it as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import math

from ..errors import MoEOffloadError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (bad values, missing or unknown flags) raise MoEOffloadError."""

    def error(self, message: str):
        raise MoEOffloadError(f"{self.prog}: {message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value
