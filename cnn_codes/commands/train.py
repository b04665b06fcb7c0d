"""``cnn-codes train``: fine-tune a registry backbone on an ImageFolder (train/ + val/).

The flags of :class:`training.config.TrainConfig`'s fields are generated from the model
(:mod:`cnn_codes.commands.model_flags`); ``--config``, ``--out`` and ``--resume`` are the
command's own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cnn_codes.commands.model_flags import add_model_flags, given_values
from cnn_codes.settings import Settings

if TYPE_CHECKING:
    from training.config import TrainConfig

DESCRIPTION = ("Fine-tune a registry backbone. Settings: defaults < --config FILE < flags; "
               "the resolved config is written to OUT/config.json and OUT/config.yaml. "
               "Field meanings: training/config.py (TrainConfig).")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train``: ``--config``, one flag per TrainConfig field, ``--out``, ``--resume``.

    Without the ``train`` extra (no PyYAML: a serving-only install) ``train`` is still listed
    and the other subcommands work; ``cnn-codes train ...`` then exits with what to install.
    """
    try:
        from training.config import TrainConfig  # pydantic + yaml, no torch
    except ImportError as exc:
        return _add_unavailable(subparsers, exc)
    parser = subparsers.add_parser(
        "train", help="fine-tune a backbone on an ImageFolder (train/ + val/)",
        description=DESCRIPTION)
    parser.add_argument("--config", type=Path, help="YAML/JSON file of TrainConfig fields")
    add_model_flags(parser, TrainConfig)
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.set_defaults(func=run)
    return parser


def _add_unavailable(subparsers: argparse._SubParsersAction,
                     exc: ImportError) -> argparse.ArgumentParser:
    """``train`` when :mod:`training` cannot be imported: takes any arguments, then refuses."""
    def refuse(args: argparse.Namespace, settings: Settings) -> int:
        raise SystemExit(f"cnn-codes train needs the train extra "
                         f"(pip install 'cnn-codes[train]'): {exc}")

    # No option prefix and no -h: every argument (flags too) lands in the catch-all.
    parser = subparsers.add_parser(
        "train", help="fine-tune a backbone on an ImageFolder (train/ + val/)",
        description=DESCRIPTION, prefix_chars="\0", add_help=False)
    parser.add_argument("ignored", nargs=argparse.REMAINDER)
    parser.set_defaults(func=refuse)
    return parser


def resolve_config(args: argparse.Namespace) -> "TrainConfig":
    """The run's :class:`~training.config.TrainConfig`: defaults < ``--config FILE`` < flags.

    With ``--resume`` and no ``--data`` anywhere, a placeholder ``data`` is used: the trainer
    replaces the config by the run's saved one.
    """
    from training.config import TrainConfig, load_config_file

    overrides = given_values(args, TrainConfig)
    from_file = load_config_file(args.config) if args.config else {}
    if args.resume and "data" not in overrides and "data" not in from_file:
        overrides["data"] = Path(".")  # replaced by the run's saved config
    return TrainConfig(**(from_file | overrides))


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Train into ``--out`` and print one JSON line: run dir, epochs, best and last metrics."""
    from training.trainer import train

    history = train(resolve_config(args), args.out, resume=args.resume)
    last = history[-1]
    print(json.dumps({"run_dir": str(args.out), "epochs": len(history),
                      "best_val_acc": max(r["val_acc"] for r in history), **last}))
    return 0
