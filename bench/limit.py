"""The limit: raw onnxruntime throughput and decode + preprocess throughput on these cores.

Both stages are measured on the real photos: onnxruntime on batches of already preprocessed
photos with the served model and the service's own session options, and
``models.decode.decode_image`` (the one decode every path uses, with the service's limits) on
the encoded files.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.photos import Photo
from models.decode import DecodeLimits, decode_batch, decode_image
from models.errors import ImageError
from models.preprocessing import PreprocessSpec

logger = logging.getLogger(__name__)


def preprocess_all(photos: Sequence[Photo], spec: PreprocessSpec) -> np.ndarray:
    """``(M, S, S, 3)`` uint8: every decodable photo through the service's decode path
    (:func:`models.decode.decode_batch` with the service's limits)."""
    decoded = decode_batch([p.data for p in photos], spec, DecodeLimits.default())
    for index, error in sorted(decoded.errors.items()):  # none expected in the sample data
        logger.warning("skipping %s: %s", photos[index].name, error)
    return decoded.arrays


def onnx_throughput(onnx_path: Path, repository: Path, name: str, version: int,
                    arrays: np.ndarray, batch_sizes: Sequence[int], seconds: float,
                    *, allow_spinning: bool | None = None) -> list[dict[str, Any]]:
    """Images/s of the served model in onnxruntime, one figure per batch size.

    The session is made exactly as the service makes it (:meth:`OnnxEncoder.create` with the
    service's settings: by default all cores for intra-op threads, full graph optimisation,
    no spinning).

    Args:
        onnx_path: unused beyond logging; the card is resolved from the repository.
        repository, name, version: the published model.
        arrays: preprocessed photos, cycled to fill each batch.
        batch_sizes: e.g. ``(1, 8, 32, 64)``.
        seconds: measuring time per batch size (after two warm-up runs).
        allow_spinning: onnxruntime's intra-op threads busy-wait between operators; None = the
            service's setting (``CNN_CODES_ORT_ALLOW_SPINNING``, off by default). The other
            value measures the same session otherwise unchanged (context).

    Returns:
        ``[{"batch": b, "images_per_s", "ms_per_batch_p50", "runs", "allow_spinning"}]``.
    """
    from cnn_codes.settings import Settings
    from models.repository import resolve
    from models.runtime import OnnxEncoder, SessionConfig

    config = SessionConfig.from_settings(Settings())
    if allow_spinning is not None:
        config = dataclasses.replace(config, allow_spinning=allow_spinning)
    published = resolve(repository, name, version)
    encoder = OnnxEncoder.create(str(published.onnx_path), published.card, config)
    logger.info("onnxruntime limit on %s (%s)", onnx_path, encoder.provider)
    rows = []
    for batch in batch_sizes:
        index = np.arange(batch) % len(arrays)
        images = np.ascontiguousarray(arrays[index])
        for _ in range(2):
            encoder.run(images)
        times: list[float] = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds or len(times) < 3:
            t0 = time.perf_counter()
            encoder.run(images)
            times.append(time.perf_counter() - t0)
        elapsed = sum(times)
        rows.append({"batch": batch, "images_per_s": round(batch * len(times) / elapsed, 1),
                     "ms_per_batch_p50": round(statistics.median(times) * 1000, 2),
                     "runs": len(times), "allow_spinning": config.allow_spinning})
        logger.info("onnxruntime batch %d: %.1f images/s", batch, rows[-1]["images_per_s"])
    return rows


def _decode_loop(payloads: Sequence[bytes], spec: PreprocessSpec, limits: DecodeLimits,
                 seconds: float) -> tuple[int, float]:
    """Decode ``payloads`` round-robin for ``seconds``; returns (images, busy seconds)."""
    count, started = 0, time.perf_counter()
    while True:
        for data in payloads:
            try:
                decode_image(data, spec, limits)
            except ImageError:  # a refused image costs what the service spends on it
                pass
            count += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds and count >= len(payloads):
                return count, elapsed


def _decode_worker(args: tuple[list[bytes], dict, DecodeLimits, float]) -> tuple[int, float]:
    payloads, spec_json, limits, seconds = args
    return _decode_loop(payloads, PreprocessSpec.model_validate(spec_json), limits, seconds)


def decode_throughput(photos: Sequence[Photo], spec: PreprocessSpec, seconds: float,
                      processes: int) -> dict[str, Any]:
    """Decode + preprocess images/s: one core, and ``processes`` cores at once.

    The one-core figure loops over every photo at least once (their natural mix); the
    all-cores figure runs ``processes`` spawned workers side by side on the same mix, each
    starting at a different photo.

    Returns:
        ``{"per_core_images_per_s", "all_cores_images_per_s", "processes",
        "ms_per_image_mean"}``.
    """
    payloads = [p.data for p in photos]
    limits = DecodeLimits.default()
    count, elapsed = _decode_loop(payloads, spec, limits, seconds)
    per_core = count / elapsed
    logger.info("decode + preprocess, 1 core: %.1f images/s", per_core)
    spec_json = spec.model_dump(mode="json")
    jobs = [(payloads[i * len(payloads) // processes:] + payloads[:i * len(payloads) // processes],
             spec_json, limits, seconds) for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_decode_worker, jobs)
    all_cores = sum(c / e for c, e in results)
    logger.info("decode + preprocess, %d processes: %.1f images/s", processes, all_cores)
    return {"per_core_images_per_s": round(per_core, 1),
            "all_cores_images_per_s": round(all_cores, 1), "processes": processes,
            "ms_per_image_mean": round(1000 / per_core, 2)}


def pipeline_limit(onnx_rows: list[dict[str, Any]], decode: dict[str, Any]) -> dict[str, Any]:
    """The pipeline limit two ways.

    ``images_per_s``: the issue's definition, the smaller of the best onnxruntime throughput
    and the all-cores decode throughput, each measured alone on the same cores.
    ``shared_cores_images_per_s``: both stages on the same cores at once, i.e. the CPU time
    of one image is the sum of both stages' (``1 / (1/onnx + 1/decode)``): what a pipeline
    that wastes nothing could reach on this machine.
    """
    best = max(onnx_rows, key=lambda r: r["images_per_s"])
    onnx_best, dec = best["images_per_s"], decode["all_cores_images_per_s"]
    return {
        "images_per_s": round(min(onnx_best, dec), 1),
        "bound_by": "onnxruntime" if onnx_best <= dec else "decode",
        "onnx_best_images_per_s": onnx_best,
        "onnx_best_batch": best["batch"],
        "decode_all_cores_images_per_s": dec,
        "shared_cores_images_per_s": round(1.0 / (1.0 / onnx_best + 1.0 / dec), 1),
    }


def probe(onnx_path: Path, repository: Path, name: str, version: int,
          photos: Sequence[Photo], arrays: np.ndarray, spec: PreprocessSpec, *, batch: int,
          seconds: float, processes: int) -> dict[str, Any]:
    """The limit measured again, briefly, right beside a group of the service's cells.

    This machine's speed moves by a quarter within minutes (three ``make bench`` runs on
    2026-12-01 measured onnxruntime batch 8 alone at 231.9, 201.7 and 268.7 images/s), so a
    ratio against a limit taken once at the start of the run mixes our speed with the moment.
    ``bench.systems.measure`` calls this before the first concurrency level and after every
    level, with our server up and idle; each level's cells are then set against the mean of
    the probe before and the probe after them (:mod:`bench.report`).

    Args:
        onnx_path, repository, name, version: the published model (as
            :func:`onnx_throughput` takes it; the service's session options).
        photos: the sample photos (decode: the natural mix, one core and ``processes``).
        arrays: ``(M, S, S, 3)`` uint8 preprocessed photos (onnxruntime input).
        batch: the batch size that was fastest in the start-of-run limit (only that one and
            batch 1 are measured, so the best of several noisy figures is not picked again).
        seconds: measuring time per figure.
        processes: decode processes for the all-cores figure.

    Returns:
        ``{"at": ISO time, "onnxruntime": [rows of batch 1 and batch], "decode": {...},
        "shared_cores_images_per_s", "c1_alone_ms"}``, the last being decode (mean, one core)
        + onnxruntime batch 1 (p50), ms: the c=1 latency target's denominator.
    """
    sizes = (1,) if batch == 1 else (1, batch)
    onnx_rows = onnx_throughput(onnx_path, repository, name, version, arrays, sizes,
                                seconds=seconds)
    decode = decode_throughput(photos, spec, seconds=seconds, processes=processes)
    pipe = pipeline_limit([r for r in onnx_rows if r["batch"] == batch], decode)
    return {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "onnxruntime": onnx_rows, "decode": decode,
            "shared_cores_images_per_s": pipe["shared_cores_images_per_s"],
            "c1_alone_ms": round(onnx_rows[0]["ms_per_batch_p50"]
                                 + decode["ms_per_image_mean"], 2)}


def recorded_probe(probe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one limit probe (:func:`probe` with its arguments bound): its figures with
    ``status: ok``, or ``status: failed`` and the reason; a failed probe is recorded, not
    raised, so the cells or the batch job beside it keep their numbers."""
    try:
        return {"status": "ok", **probe()}
    except Exception as exc:
        logger.exception("limit probe failed")
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:1000]}
