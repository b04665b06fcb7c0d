"""The ``cnn-codes`` command: backbones, train, export, models, bootstrap, embed, serve.

A dispatcher: each subcommand is a module of :mod:`cnn_codes.commands` (also ``summary`` and
``viz``). Heavy imports (torch, onnx, bentoml) happen inside each subcommand, so
``cnn-codes --help`` is fast and ``serve`` never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cnn_codes.commands import COMMANDS
from cnn_codes.settings import Settings, apply_offline_env


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cnn-codes`` (one subparser per subcommand)."""
    parser = argparse.ArgumentParser(prog="cnn-codes", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cnn-codes``; returns the exit status."""
    apply_offline_env()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args, Settings()) or 0)


if __name__ == "__main__":
    sys.exit(main())
