"""``make bench``: the limit, our service, the alternatives, side by side in one run.

Writes ``bench/results/latest.json`` (everything, including ``ratios``), ``latest.md`` (the
tables) and ``throughput.png`` (images/s vs concurrency for every system).

    python -m bench.run            # full run, ~17 minutes on 2 cores
    python -m bench.run --quick    # seconds per cell, to check the harness
    python -m bench.run --quick --systems triton,ray_serve --no-batch-job   # only the peers
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from bench import limit as limit_mod
from bench import batchjob, contenders, plot, preproc, report, systems
from bench.machine import load_average, machine_info, usable_cores
from bench.model import REPO_ROOT, ensure_model
from bench.photos import describe, load_photos

logger = logging.getLogger("bench")

BENCH_DIR = REPO_ROOT / "bench"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "hymenoptera"
SYSTEMS = ("cnn_codes", "fastapi_torch", "torchserve", "torchserve_tuned", "triton",
           "ray_serve")


# Measured side by side, up at once, cells alternated (bench.systems.measure_together): our
# service and Triton, the peer whose ratios sit closest to 1.0. The others, one at a time.
MEASURED_TOGETHER = (("cnn_codes", "triton"),)


def _groups(wanted: list[str]) -> list[tuple[str, ...]]:
    """The selected systems in ``SYSTEMS`` order, as groups measured together: each group of
    ``MEASURED_TOGETHER`` (its selected members) where its first member comes, every other
    system alone."""
    groups: list[tuple[str, ...]] = []
    placed: set[str] = set()
    for key in SYSTEMS:
        if key not in wanted or key in placed:
            continue
        group = next((g for g in MEASURED_TOGETHER if key in g), (key,))
        members = tuple(k for k in group if k in wanted)
        placed.update(members)
        groups.append(members)
    return groups


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the harness."""
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seconds per cell (harness check)")
    p.add_argument("--data", type=Path,
                   default=Path(os.environ.get("CNN_CODES_SAMPLE_DATA", DEFAULT_DATA)))
    p.add_argument("--backbone", default="mobilenet_v3_large")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--duration", type=float, help="measuring window per cell, s")
    p.add_argument("--warmup", type=float, help="warm-up per cell, s")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy cells")
    p.add_argument("--passes", type=int, default=4,
                   help="passes of each cell when our service and Triton are measured side by "
                        "side (mirrored rounds A B .. B A ...); the window is split among them")
    p.add_argument("--no-batch-job", action="store_true",
                   help="skip the batch-job row (cnn-codes embed, local and Ray engines)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--cache", type=Path, default=BENCH_DIR / ".cache")
    p.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for our service, e.g. CNN_CODES_INTRA_OP_THREADS=1 "
                        "(repeatable)")
    p.add_argument("--render-only", action="store_true",
                   help="re-render latest.md and throughput.png from OUT/latest.json")
    return p


def _grpc_status(result: dict[str, Any]) -> dict[str, Any]:
    """Whether gRPC was measured, and its best throughput when it was."""
    files = contenders.grpc_front_files()
    if not files:
        return {"status": "not measured", "reason": "the service has no gRPC front "
                "(no service/grpc* or service/kserve/grpc*)", "images_per_s": None}
    ours = result["systems"].get("cnn_codes", {})
    entry = ours.get("endpoints", {}).get("grpc_embed")
    if entry is None:
        return {"status": "not measured", "files": files, "images_per_s": None,
                "reason": ours.get("reason") or "gRPC stubs did not import (see log)"}
    if entry.get("status") != "ok":
        return {"status": "not measured", "files": files, "images_per_s": None,
                "reason": entry.get("reason")}
    best = max(entry["cells"], key=lambda c: c["images_per_s"])
    return {"status": "measured", "files": files, "images_per_s": best["images_per_s"],
            "best_concurrency": best["concurrency"]}


def _limits(args: argparse.Namespace, photos: list, arrays, model, spec, quick: bool
            ) -> dict[str, Any]:
    seconds = 1.5 if quick else 5.0
    decode = limit_mod.decode_throughput(photos, spec, seconds=seconds,
                                         processes=usable_cores())
    onnx_rows = limit_mod.onnx_throughput(model.onnx_path, model.repository, model.name,
                                          model.version, arrays, (1, 8, 32, 64),
                                          seconds=seconds)
    best = max(onnx_rows, key=lambda r: r["images_per_s"])
    other_spinning = limit_mod.onnx_throughput(
        model.onnx_path, model.repository, model.name, model.version, arrays, (best["batch"],),
        seconds=seconds, allow_spinning=not best["allow_spinning"])
    return {"onnxruntime": onnx_rows, "onnxruntime_other_spinning": other_spinning,
            "decode": decode,
            "pipeline": limit_mod.pipeline_limit(onnx_rows, decode),
            "seconds_per_measure": seconds}


def _probe(result: dict[str, Any], model, photos: list, arrays, spec, quick: bool
           ) -> Callable[[], dict[str, Any]]:
    """:func:`bench.limit.probe` of the served model at the start's best batch: the limit
    measured again beside our cells and beside the batch job."""
    return functools.partial(
        limit_mod.probe, model.onnx_path, model.repository, model.name, model.version,
        photos, arrays, spec, batch=result["limit"]["pipeline"]["onnx_best_batch"],
        seconds=1.5 if quick else 3.0, processes=usable_cores())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One benchmark run; returns the result dict (also written to ``args.out``)."""
    from models.repository import resolve

    quick = args.quick
    plan = systems.Plan(
        concurrency=tuple(int(c) for c in args.concurrency.split(",")),
        warmup_s=args.warmup if args.warmup is not None else (1.0 if quick else 2.0),
        duration_s=args.duration if args.duration is not None else (3.0 if quick else 8.0),
        idle_s=2.0 if quick else 5.0,
        profile_s=0 if args.no_profile else (4 if quick else 10),
        drain_s=5.0 if quick else 10.0,
        passes_together=args.passes,
    )
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(wanted) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    work_dir = BENCH_DIR / ".work"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    started = time.monotonic()
    result: dict[str, Any] = {
        "schema": 1, "mode": "quick" if quick else "full",
        "command": "python -m bench.run " + shlex.join(sys.argv[1:]) if sys.argv[1:]
        else "make bench",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "load_average_start": load_average(),
        "plan": {"concurrency": list(plan.concurrency), "warmup_s": plan.warmup_s,
                 "duration_s": plan.duration_s, "images_per_request": 1,
                 "profile_s": plan.profile_s, "passes_together": plan.passes_together},
    }
    photos = load_photos(args.data)
    result["photos"] = describe(photos)
    model = ensure_model(args.cache / "model", args.data, args.backbone)
    card = resolve(model.repository, model.name, model.version).card
    spec = card.preprocessing
    result["model"] = {"backbone": model.backbone, "ref": model.ref,
                       "onnx": str(model.onnx_path.relative_to(REPO_ROOT))
                       if model.onnx_path.is_relative_to(REPO_ROOT) else str(model.onnx_path),
                       "onnx_bytes": model.onnx_path.stat().st_size,
                       "preprocessing": spec.model_dump(mode="json"),
                       "weights": "random init + 1 epoch (speed does not depend on weights)"}

    arrays = limit_mod.preprocess_all(photos, spec)  # onnxruntime's input, start and probes
    result["limit"] = _limits(args, photos, arrays, model, spec, quick)
    if args.no_batch_job:
        result["batch_job"] = {"status": "skipped", "reason": "--no-batch-job"}
    else:
        # quick: a harness check only (the row's own target needs >= 4,000 inputs)
        result["batch_job"] = batchjob.measure(
            args.data, model.repository, model.ref, work_dir,
            sizes=(256, 768) if quick else (512, 4608), shard_size=128 if quick else 256,
            probe=_probe(result, model, photos, arrays, spec, quick))
    result["preprocessing"] = preproc.draft_mode_table(photos, spec,
                                                       seconds=0.5 if quick else 2.0)

    builders = {"cnn_codes": contenders.cnn_codes_system,
                "fastapi_torch": contenders.fastapi_system,
                "torchserve": contenders.torchserve_system,
                "torchserve_tuned": contenders.torchserve_tuned_system,
                "triton": contenders.triton_system,
                "ray_serve": contenders.ray_serve_system}
    shared: dict[str, Any] = {"service_env": dict(kv.split("=", 1) for kv in args.service_env)}
    result["service_env"] = shared["service_env"]
    result["systems"] = {}
    for group in _groups(wanted):
        built = []
        for key in group:
            try:
                built.append(builders[key](model, photos, work_dir, shared,
                                           profile=not args.no_profile
                                           and key != "torchserve_tuned"))
            except Exception as exc:  # e.g. TorchServe / Triton / Ray Serve not installed
                logger.exception("cannot set up %s", key)
                result["systems"][key] = {"key": key, "title": key, "status": "failed",
                                          "reason": f"{type(exc).__name__}: {exc}"[:3000]}
        if not built:
            continue
        # the limit again beside our own cells (the targets are set against it)
        probe = (_probe(result, model, photos, arrays, spec, quick)
                 if "cnn_codes" in group else None)
        result["systems"].update(systems.measure_together(built, plan, work_dir, probe=probe))
    for key in SYSTEMS:
        result["systems"].setdefault(key, {"key": key, "title": key, "status": "skipped",
                                           "reason": "not selected with --systems"})
    result["systems"] = {key: result["systems"][key] for key in SYSTEMS}
    result["grpc"] = _grpc_status(result)

    result["load_average_end"] = load_average()
    result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["wall_s"] = round(time.monotonic() - started, 1)
    ratios, at, targets = report.compute_ratios(result)
    result["ratios"], result["ratios_at_concurrency"], result["targets"] = ratios, at, targets
    _write(result, args.out)
    return result


def _write(result: dict[str, Any], out: Path) -> None:
    """latest.json, latest.md and throughput.png under ``out`` (atomic renames)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("latest.json", json.dumps(result, indent=2, default=str) + "\n"),
                       ("latest.md", report.markdown(result))):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    tmp_png = out / "throughput.png.tmp"
    plot.throughput_plot(result, tmp_png)
    tmp_png.replace(out / "throughput.png")
    logger.info("wrote %s/latest.json, latest.md, throughput.png", out)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.run``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.render_only:
        result = json.loads((args.out / "latest.json").read_text())
        result["ratios"], result["ratios_at_concurrency"], result["targets"] = \
            report.compute_ratios(result)
        _write(result, args.out)
    else:
        result = run(args)
    print(report.markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
