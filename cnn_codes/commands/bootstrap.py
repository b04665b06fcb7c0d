"""``cnn-codes bootstrap``: build the default model if the repository lacks it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cnn_codes.settings import Settings

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bootstrap`` on ``subparsers``."""
    p = subparsers.add_parser("bootstrap",
                              help="build the default model if the repository lacks it")
    p.add_argument("--force", action="store_true", help="build a new version even if one exists")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Train and publish ``settings.model_name`` on the sample data unless a version exists."""
    from models.repository import list_versions

    if list_versions(settings.repository, settings.model_name) and not args.force:
        logger.info("model %r already in %s; nothing to build", settings.model_name,
                    settings.repository)
        return 0
    from export.onnx_export import export_run
    from training.config import TrainConfig
    from training.trainer import train

    data = settings.sample_data
    if not (data / "train").is_dir():
        raise SystemExit(f"sample data not found at {data.resolve()} "
                         "(set CNN_CODES_SAMPLE_DATA to an ImageFolder with train/ and val/)")
    run_dir = Path("runs") / f"{settings.model_name}-{settings.default_backbone}"
    config = TrainConfig(data=data, backbone=settings.default_backbone,
                         epochs=settings.default_epochs, lr=settings.default_lr)
    logger.info("building the default model: %s, %d epochs on %s (random init: ImageNet "
                "weights cannot be downloaded here) -> %s", config.backbone, config.epochs,
                data, run_dir)
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    train(config, run_dir, resume=resume)
    published = export_run(run_dir, repository=settings.repository, name=settings.model_name)
    logger.info("published %s:%d (val_acc %.3f) at %s", published.card.name,
                published.card.version, published.card.training.get("val_acc") or 0.0,
                published.path)
    return 0
