"""``cnn-codes export``: export a run to ONNX, check it, publish it.

Exit 0 published; 3 a precision variant missed a threshold (nothing published).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cnn_codes.commands._common import report_error
from cnn_codes.settings import Settings

EXIT_VARIANT_REJECTED = 3


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export RUN_DIR`` on ``subparsers``."""
    p = subparsers.add_parser("export", help="export a run to ONNX, check it, publish it")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--repository", type=Path)
    p.add_argument("--name")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint file")
    p.add_argument("--parity-data", type=Path,
                   help="images for the parity check (default <data>/val)")
    p.add_argument("--parity-limit", type=int, default=64, help="0 = all images")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="int8: static quantisation for the CPU; fp16: for CUDA/TensorRT. The "
                        "variant is checked against fp32 on the parity images and published "
                        "only if it meets the CNN_CODES_VARIANT_* thresholds (else exit 3)")
    p.add_argument("--calibration-data", type=Path,
                   help="int8 calibration images (default <data>/train)")
    p.add_argument("--calibration-limit", type=int, default=64,
                   help="int8: at most this many calibration images, 0 = all")
    p.add_argument("--calibrate-method", choices=["MinMax", "Percentile", "Entropy"],
                   default="MinMax", help="int8 activation range calibration")
    p.add_argument("--int8-quantize-head", action="store_true",
                   help="int8: quantise the dense head too (smaller file, e.g. VGG16 fc6/fc7; "
                        "default: float after the last conv)")
    p.add_argument("--int8-reduce-range", action="store_true",
                   help="int8: 7-bit weights, so that x86 CPUs without VNNI cannot saturate "
                        "(slightly less accurate on CPUs with VNNI; see "
                        "export.quantize.Int8Options)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Export and publish; print the published card as JSON (or the rejection, exit 3)."""
    from export.onnx_export import export_run
    from export.quantize import Int8Options, VariantRejectedError, VariantThresholds

    try:
        published = export_run(
            args.run_dir, repository=args.repository or settings.repository,
            name=args.name or settings.model_name, checkpoint=args.checkpoint,
            parity_data=args.parity_data, parity_limit=args.parity_limit or None,
            precision=args.precision, calibration_data=args.calibration_data,
            calibration_limit=args.calibration_limit or None,
            variant_thresholds=VariantThresholds.from_settings(settings),
            int8_options=Int8Options(calibrate_method=args.calibrate_method,
                                     float_head=not args.int8_quantize_head,
                                     reduce_range=args.int8_reduce_range),
        )
    except VariantRejectedError as exc:
        report_error(f"cnn-codes export: {exc}")
        print(json.dumps({"published": False, "precision": args.precision,
                          "failures": exc.failures,
                          "variant_check": exc.check.model_dump(exclude={"conversion"})}))
        return EXIT_VARIANT_REJECTED
    card = published.card
    print(json.dumps({"path": str(published.path), "name": card.name, "version": card.version,
                      "precision": card.precision,
                      "parity": card.parity.model_dump() if card.parity else None,
                      "variant_check": card.variant_check.model_dump(exclude={"conversion"})
                      if card.variant_check else None}))
    return 0
