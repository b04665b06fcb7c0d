"""The subcommands of ``cnn-codes``, one module each.

Each module has ``add_parser(subparsers)``, which registers the subcommand and sets
``func=run`` as its default, and ``run(args, settings) -> int``, the exit status. Modules
import their heavy dependencies (torch, onnx, bentoml) inside ``run``, so ``--help`` is fast.
"""

from __future__ import annotations

from cnn_codes.commands import (backbones, bootstrap, dedup, embed, eval, export, index,
                                models, serve, summary, train, viz)

# In the order ``cnn-codes --help`` lists them.
COMMANDS = (backbones, train, summary, viz, export, models, bootstrap, embed, index, dedup,
            eval, serve)

__all__ = ["COMMANDS"]
