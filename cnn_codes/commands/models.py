"""``cnn-codes models list|show|verify|promote|remove`` over the model repository.

Errors (unknown model/version, corrupt files, alias conflicts) exit 1 with a message.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cnn_codes.commands._common import report_error
from cnn_codes.settings import Settings

ACTIONS = ["list", "show", "verify", "promote", "remove"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``models ACTION [NAME]`` on ``subparsers``."""
    p = subparsers.add_parser("models", help="inspect and manage the model repository")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("name", nargs="?", help="NAME[:VERSION|ALIAS]")
    p.add_argument("--repository", type=Path)
    p.add_argument("--alias", default="production", help="alias that promote moves")
    p.add_argument("--force", action="store_true", help="remove even if an alias points at it")
    p.set_defaults(func=run)
    return p


def _list(repository: Path) -> None:
    """One line per model: name, versions, and its aliases if any (tab-separated)."""
    from models.repository import list_models, read_aliases

    for name, versions in list_models(repository).items():
        aliases = ",".join(f"{a}={v}" for a, v in sorted(read_aliases(repository, name).items()))
        print(f"{name}\t{','.join(map(str, versions))}" + (f"\t{aliases}" if aliases else ""))
        for version in versions:
            figures = _retrieval_line(repository, name, version)
            if figures:
                print(f"  {name}:{version}\t{figures}")


def _retrieval_line(repository: Path, name: str, version: int) -> str:
    """``knn@1=.. knn@5=.. mAP=.. (constant .., random mAP ..)`` from the card, or ''."""
    import json

    from models.card import CARD_FILENAME

    try:
        card = json.loads((repository / name / str(version) / CARD_FILENAME).read_text())
    except (OSError, ValueError):
        return ""
    figures = card.get("retrieval") or {}
    if not figures:
        return ""
    knn = " ".join(f"knn@{k}={v}" for k, v in figures.get("knn_accuracy", {}).items())
    return (f"{knn} mAP={figures.get('map')} (constant {figures.get('best_constant_accuracy')}, "
            f"random mAP {figures.get('chance_map')})")


def _act(args: argparse.Namespace, repository: Path, name: str, version: str) -> None:
    """``promote``, ``remove``, ``show`` or ``verify`` one model (version)."""
    from models.repository import remove_version, resolve, set_alias

    if args.action == "promote":
        if not version:
            raise SystemExit("models promote: give NAME:VERSION")
        published = set_alias(repository, name, args.alias, int(version))
        print(f"{name}:{args.alias} -> {published.card.version}")
    elif args.action == "remove":
        if not version.isdigit():
            raise SystemExit("models remove: give NAME:VERSION (a number)")
        remove_version(repository, name, int(version), force=args.force)
        print(f"removed {name}:{version}")
    else:
        published = resolve(repository, name, version or "latest")  # verifies sha256
        if args.action == "show":
            print(published.card.model_dump_json(indent=2))
        else:
            print(f"OK {name}:{published.card.version} sha256 {published.card.onnx_sha256}")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the action; exit 1 with ``error: ...`` on stderr when the repository refuses."""
    from models.repository import ModelIntegrityError, ModelNotFoundError

    repository = args.repository or settings.repository
    if args.action == "list":
        _list(repository)
        return 0
    if not args.name:
        raise SystemExit(f"models {args.action}: a model name is required")
    name, _, version = args.name.partition(":")
    try:
        _act(args, repository, name, version)
    except (ModelNotFoundError, ModelIntegrityError, ValueError) as exc:
        report_error(f"error: {exc}")
        return 1
    return 0
