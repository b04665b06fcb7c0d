"""``cnn-codes backbones``: the registered backbones with their dimensions."""

from __future__ import annotations

import argparse
import json

from cnn_codes.settings import Settings

_KEYS = ("name", "family", "embedding_dim", "features_dim", "input_size", "embedding_layer")
_HEADER = ("backbone", "family", "embedding D", "features C", "input", "embedding layer")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``backbones`` on ``subparsers``."""
    parser = subparsers.add_parser("backbones", help="list registered backbones with their dims")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Print the registry as an aligned table, or as a JSON list with ``--json``."""
    from models.backbones.registry import list_backbones

    rows = [(i.name, i.family, str(i.embedding_dim), str(i.features_dim),
             str(i.default_input_size), i.embedding_layer) for i in list_backbones()]
    if args.json:
        print(json.dumps([dict(zip(_KEYS, r)) for r in rows], indent=2))
        return 0
    widths = [max(len(r[i]) for r in [_HEADER, *rows]) for i in range(len(_HEADER))]
    for row in [_HEADER, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0
