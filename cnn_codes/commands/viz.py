"""``cnn-codes viz``: diagnostic PNGs (learning curves, filters, weight histograms, augment)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cnn_codes.settings import Settings

PRESETS = ["none", "light", "standard", "heavy"]


def _add_curves(figures: argparse._SubParsersAction) -> None:
    f = figures.add_parser("curves", help="loss/accuracy/dead units/lr per epoch")
    f.add_argument("run_dirs", type=Path, nargs="+")
    f.add_argument("--labels", help="comma-separated legend labels, one per run")
    f.add_argument("--title")
    f.add_argument("--out", type=Path, help="PNG (default RUN_DIR/curves.png)")


def _add_filters(figures: argparse._SubParsersAction) -> None:
    f = figures.add_parser("filters", help="first convolution's kernels as an image grid")
    f.add_argument("run_dir", type=Path)
    f.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint file")
    f.add_argument("--mode", choices=["rgb", "gray"], default="rgb")
    f.add_argument("--out", type=Path, help="PNG (default RUN_DIR/filters_MODE.png)")


def _add_weights(figures: argparse._SubParsersAction) -> None:
    f = figures.add_parser("weights", help="per-layer weight histograms across epochs")
    f.add_argument("run_dir", type=Path)
    f.add_argument("--layers", help="regular expression over state-dict keys")
    f.add_argument("--max-layers", type=int, default=9)
    f.add_argument("--bins", type=int, default=60)
    f.add_argument("--no-init", action="store_true", help="leave out epoch 0 (initialisation)")
    f.add_argument("--out", type=Path, help="PNG (default RUN_DIR/weights.png)")


def _add_augment(figures: argparse._SubParsersAction) -> None:
    f = figures.add_parser("augment", help="augmented training photos per preset")
    f.add_argument("--data", type=Path, help="ImageFolder root (default: the sample data)")
    f.add_argument("--backbone", default="mobilenet_v3_small")
    f.add_argument("--input-size", type=int)
    f.add_argument("--preset", action="append", choices=PRESETS,
                   help="repeatable (default: light and heavy)")
    f.add_argument("--images", type=int, default=2)
    f.add_argument("--samples", type=int, default=6)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", type=Path, help="PNG (default ./augment.png)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``viz curves|filters|weights|augment`` on ``subparsers``."""
    parser = subparsers.add_parser("viz",
                                   help="diagnostic PNGs (curves, filters, weights, augment)")
    figures = parser.add_subparsers(dest="figure", required=True)
    for add in (_add_curves, _add_filters, _add_weights, _add_augment):
        add(figures)
    parser.set_defaults(func=run)
    return parser


def _draw(args: argparse.Namespace, settings: Settings) -> Path:
    """Draw the figure ``args.figure`` and return the PNG's path."""
    from diagnostics import viz

    if args.figure == "curves":
        labels = args.labels.split(",") if args.labels else None
        return viz.curves(args.run_dirs, args.out or args.run_dirs[0] / "curves.png", labels,
                          title=args.title)
    if args.figure == "filters":
        out = args.out or args.run_dir / f"filters_{args.mode}.png"
        return viz.filters(args.run_dir, out, checkpoint=args.checkpoint, mode=args.mode)
    if args.figure == "weights":
        return viz.weights(args.run_dir, args.out or args.run_dir / "weights.png",
                           pattern=args.layers, max_layers=args.max_layers, bins=args.bins,
                           include_init=not args.no_init)
    return viz.augment(args.data or settings.sample_data, args.out or Path("augment.png"),
                       backbone=args.backbone, input_size=args.input_size,
                       presets=args.preset or ["light", "heavy"], n_images=args.images,
                       n_samples=args.samples, seed=args.seed)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Draw one figure and print ``{"figure": ..., "png": ...}``."""
    path = _draw(args, settings)
    print(json.dumps({"figure": args.figure, "png": str(path)}))
    return 0
