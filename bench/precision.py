"""fp32 vs int8 on the CPU: throughput and agreement for MobileNetV3-Large and VGG16.

Run: ``make bench-precision`` or ``python -m bench.precision [--quick]``. Not a test.

For each backbone, with nothing heavy trained (steps 1-2 in :mod:`bench.precision_model`):

1. build it with random initialisation (ImageNet weights cannot be downloaded here) through the
   registry, 2 classes; recompute BatchNorm statistics on real training photos
   (``training/precise_bn.py``) where the network has BatchNorm;
2. fit only the final Linear layer (logistic regression on the fp32 embeddings of the same
   training photos), so that ``logits`` encode a decision rather than a random projection
   whose two class scores differ by ~0.01 (top-1 agreement of a random head measures nothing
   but rounding);
3. export fp32 ONNX (``export.onnx_export.export_onnx``: uint8 input, normalisation inside)
   and quantise it to int8 exactly as ``cnn-codes export --precision int8`` does
   (``export.quantize.quantize_int8``, calibrated on those training photos);
4. compare int8 with fp32 on the real val photos (``export.quantize.compare_variant``);
5. time both onnxruntime CPU sessions (``models.runtime.open_session``, same thread settings)
   at each batch size on real preprocessed photos, interleaving fp32 and int8 rounds so that a
   change of the machine's load hits both; report the median images/s and the median of the
   per-round ratios.

Prints a table and writes ``bench/results/precision.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.machine import machine_info
from bench.precision_model import build_model, labelled_images
from models.card import INPUT_NAME
from models.runtime import SessionConfig, open_session

logger = logging.getLogger("bench.precision")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "hymenoptera"
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "precision.json"
TARGET_SPEEDUP, TARGET_COSINE, TARGET_AGREEMENT = 2.0, 0.99, 0.98


def time_cell(sessions: dict, images: np.ndarray, batch: int, *, rounds: int,
              min_seconds: float) -> dict:
    """Interleaved timing of every session at one batch size.

    Each round runs every session (order alternating between rounds) for at least
    ``min_seconds`` (at least one call). Returns per-variant round throughputs, their median,
    and the median per-round ratio int8/fp32.
    """
    x = np.ascontiguousarray(images[:batch])
    feed = {INPUT_NAME: x}
    names = list(sessions)
    for sess in sessions.values():
        sess.run(None, feed)  # warm-up (allocations, first-run kernel selection)
    per_round = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            sess, calls, start = sessions[name], 0, time.perf_counter()
            while True:
                sess.run(None, feed)
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            per_round[name].append(calls * batch / elapsed)
    out = {name: {"images_per_s": statistics.median(v), "rounds": [round(t, 3) for t in v]}
           for name, v in per_round.items()}
    if "fp32" in per_round and "int8" in per_round:
        ratios = [b / a for a, b in zip(per_round["fp32"], per_round["int8"])]
        out["int8_speedup"] = statistics.median(ratios)
        out["int8_speedup_rounds"] = [round(x, 3) for x in ratios]
    return out


def bench_model(name: str, args, work: Path) -> dict:
    """Build, export, quantise, check and time one backbone."""
    from export.onnx_export import export_onnx
    from export.quantize import (Int8Options, compare_variant, convert_fp16, load_images,
                                 quantize_int8)
    from models.backbones.registry import get_backbone_info

    spec = get_backbone_info(name).preprocessing
    result: dict = {"model": name, "load_before": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    train_files, train_labels = labelled_images(args.data / "train", args.calibration)
    train_images, used = load_images(train_files, spec)
    decoded = set(used)
    train_labels = [label for f, label in zip(train_files, train_labels) if f in decoded]
    val_files, _ = labelled_images(args.data / "val", args.check_images or None)
    val_images, _ = load_images(val_files, spec)
    model, prep = build_model(name, train_images, train_labels, spec)
    result.update(prep)
    fp32 = work / f"{name}.fp32.onnx"
    export_onnx(model, spec, fp32)
    del model
    t1 = time.perf_counter()
    int8 = work / f"{name}.int8.onnx"
    conversion = quantize_int8(fp32, int8, train_images,
                               options=Int8Options(reduce_range=args.reduce_range))
    t2 = time.perf_counter()
    check = compare_variant(fp32, int8, val_images, precision="int8",
                            source=str(args.data / "val"))
    t3 = time.perf_counter()
    paths = {"fp32": fp32, "int8": int8}
    if args.fp16:
        paths["fp16"] = work / f"{name}.fp16.onnx"
        convert_fp16(fp32, paths["fp16"])
        result["fp16_check_cpu"] = compare_variant(
            fp32, paths["fp16"], val_images[:16], precision="fp16").model_dump(
                exclude={"conversion", "thresholds"})
    result.update({
        "onnx_mb": {k: round(p.stat().st_size / 2**20, 1) for k, p in paths.items()},
        "calibration_images": len(train_images), "check_images": len(val_images),
        "int8_conversion": {k: v for k, v in conversion.items() if k != "float_nodes"},
        "int8_vs_fp32": check.model_dump(exclude={"conversion", "thresholds"}),
        "seconds": {"build_and_export": round(t1 - t0, 1), "quantize": round(t2 - t1, 1),
                    "check": round(t3 - t2, 1)},
    })
    # same thread settings for every variant; the rest as the service opens sessions
    config = SessionConfig(intra_op_threads=args.threads, inter_op_threads=1)
    sessions = {k: open_session(p, config) for k, p in paths.items()}
    result["cells"] = {}
    for batch in args.batches:
        if batch > len(val_images):
            continue
        cell = time_cell(sessions, val_images, batch, rounds=args.rounds,
                         min_seconds=args.min_seconds)
        result["cells"][str(batch)] = cell
        logger.info("%s batch %d: %s", name, batch, json.dumps(
            {k: round(v["images_per_s"], 2) for k, v in cell.items() if isinstance(v, dict)}
            | {"speedup": round(cell.get("int8_speedup", 0), 2)}))
    result["seconds"]["timing"] = round(time.perf_counter() - t3, 1)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    speedups = [c["int8_speedup"] for c in result["cells"].values()]
    result["target_met"] = bool(
        speedups and min(speedups) >= TARGET_SPEEDUP
        and check.embedding_cosine_mean >= TARGET_COSINE
        and check.top1_agreement >= TARGET_AGREEMENT)
    return result


def table(results: list[dict]) -> str:
    """The human-readable report."""
    lines = [f"{'model':<20} {'batch':>5} {'fp32 img/s':>11} {'int8 img/s':>11} "
             f"{'int8/fp32':>9}   {'emb cos mean':>12} {'emb cos min':>11} {'top-1 agree':>11} "
             f"{'max |dp|':>8}"]
    for r in results:
        c = r["int8_vs_fp32"]
        for i, (batch, cell) in enumerate(r["cells"].items()):
            figures = (f"   {c['embedding_cosine_mean']:>12.5f} {c['embedding_cosine_min']:>11.5f} "
                       f"{c['top1_agreement']:>11.2%} {c['max_prob_diff']:>8.4f}") if i == 0 else ""
            lines.append(f"{r['model']:<20} {batch:>5} {cell['fp32']['images_per_s']:>11.1f} "
                         f"{cell['int8']['images_per_s']:>11.1f} {cell['int8_speedup']:>8.2f}x"
                         + figures)
    for r in results:
        c = r["int8_vs_fp32"]
        lines.append(
            f"{r['model']}: int8 {r['onnx_mb']['int8']} MB vs fp32 {r['onnx_mb']['fp32']} MB; "
            f"{c['n_images']} val photos compared, {r['calibration_images']} train photos "
            f"calibrated; target (int8 >= {TARGET_SPEEDUP:g}x at every batch, cos mean >= "
            f"{TARGET_COSINE}, top-1 >= {TARGET_AGREEMENT:.0%}): "
            f"{'MET' if r['target_met'] else 'not met'}; load avg {r['load_before']} -> "
            f"{r['load_after']}")
        if "fp16_check_cpu" in r:
            f16 = r["fp16_check_cpu"]
            fp16_ips = {b: round(cell["fp16"]["images_per_s"], 1) for b, cell in r["cells"].items()}
            lines.append(f"{r['model']}: fp16 on the CPU provider: cos min "
                         f"{f16['embedding_cosine_min']:.5f}, img/s by batch {fp16_ips}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.precision",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mobilenet_v3_large,vgg16")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("CNN_CODES_SAMPLE_DATA", DEFAULT_DATA)))
    parser.add_argument("--calibration", type=int, default=64,
                        help="train photos for BN statistics, the head fit and int8 calibration")
    parser.add_argument("--check-images", type=int, default=0, help="val photos compared, 0 = all")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="onnxruntime intra-op threads, both variants (default: usable cores)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per cell")
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="each variant runs at least this long per round")
    parser.add_argument("--fp16", action="store_true",
                        help="also convert to fp16 and time it on the CPU provider (slow)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 16 calibration / 16 check photos, 1 round, 0.3 s")
    parser.add_argument("--reduce-range", action="store_true",
                        help="int8 weights in the 7-bit range (export's --int8-reduce-range)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if args.quick:
        args.calibration, args.check_images, args.rounds, args.min_seconds = 16, 16, 1, 0.3
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: run every model, print the table, write the JSON."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("onnxruntime", "onnx_ir", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not (args.data / "train").is_dir():
        print(f"sample data not found at {args.data} (set CNN_CODES_SAMPLE_DATA)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    report = {"started_at": datetime.now(timezone.utc).isoformat(), "machine": machine_info(),
              "command": "python -m bench.precision " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "results": []}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        for name in args.models:
            logger.info("%s: build, export, quantise, check, time", name)
            report["results"].append(bench_model(name, args, Path(tmp)))
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["target_met_by"] = [r["model"] for r in report["results"] if r["target_met"]]
    text = table(report["results"])
    report["table"] = text
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    print(f"({report['seconds']:.0f} s; {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
