"""moe-offload command line: one module per command (run, info, calibrate, trace, fit-predictor, sweep,
plan, serve, batch)."""

from __future__ import annotations

import argparse
import sys

from ..errors import MoEOffloadError
from . import batch, calibrate, fit_predictor, info, plan, run, serve, sweep, trace
from .argtypes import Parser

COMMANDS = (run, info, calibrate, trace, fit_predictor, sweep, plan, serve, batch)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moe-offload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except MoEOffloadError as err:
        print(f"moe-offload: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
