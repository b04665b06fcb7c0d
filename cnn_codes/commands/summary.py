"""``cnn-codes summary``: Keras-style per-layer table of a backbone."""

from __future__ import annotations

import argparse
import json

from cnn_codes.settings import Settings


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``summary BACKBONE`` on ``subparsers``."""
    parser = subparsers.add_parser("summary",
                                   help="per-layer table: output shapes, parameters, MACs")
    parser.add_argument("backbone", help="registry name")
    parser.add_argument("--input-size", type=int, help="input side S (default: weights preset)")
    parser.add_argument("--num-classes", type=int, default=1000, help="K of the head")
    parser.add_argument("--mode", choices=["finetune", "feature-extract"], default="finetune",
                        help="which parameters are trainable")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Print the table (analytic output shapes, params, MACs), or JSON with ``--json``."""
    from diagnostics.summary import summarize
    from models.backbones.registry import build_backbone, get_backbone_info

    info = get_backbone_info(args.backbone)
    model = build_backbone(args.backbone, num_classes=args.num_classes)
    if args.mode == "feature-extract":  # what training freezes: all but the final Linear
        head = {id(p) for p in model.classifier_layer.parameters()}
        for param in model.parameters():
            param.requires_grad = id(param) in head
    summary = summarize(model, args.input_size or info.default_input_size)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.to_text())
    return 0
