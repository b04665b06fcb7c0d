"""The batch-job row: ``cnn-codes embed`` over thousands of inputs, start-up excluded.

The path for millions of images is the batch job, not the service, so the benchmark runs the
real command (a subprocess, as a user runs it) over a manifest that repeats the sample photos
(:func:`write_manifest`), on the local engine and on the Ray engine with 1 and 2 actors.

Start-up (listing the inputs, opening the onnxruntime session, starting Ray and its actors) is
excluded by timing each configuration at two sizes: the images/s reported is
``(n_large - n_small) / (seconds_large - seconds_small)``, with ``seconds`` the job's own wall
time from its JSON report (:class:`batch.runner.JobReport`: from the start of ``run_job`` to the
last part written, so the interpreter's own start is outside it too). What the two runs share,
start-up, cancels out; the difference is the steady state. The start-up estimate is
``seconds_small - n_small / rate``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from bench.limit import recorded_probe
from bench.model import _cli
from bench.photos import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

#: (engine, Ray actors) measured; None = the local engine.
CONFIGS: tuple[tuple[str, int | None], ...] = (("local", None), ("ray", 1), ("ray", 2))


def write_manifest(data_dir: Path, folder: Path, count: int) -> Path:
    """A ``.txt`` manifest of ``count`` inputs cycling the photos under ``data_dir``.

    The job de-duplicates its input list by path, so each repetition is its own symbolic link
    (``folder/links/NNNNNN-<name>`` -> the photo; :func:`models.decode.read_file` follows links).

    Returns:
        The manifest path (``folder/manifest-<count>.txt``, one relative path per line).

    Raises:
        FileNotFoundError: no photo under ``data_dir``.
    """
    photos = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        raise FileNotFoundError(f"no sample photos under {data_dir}")
    links = folder / "links"
    links.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        photo = photos[index % len(photos)]
        link = links / f"{index:06d}-{photo.name}"
        if not link.is_symlink():
            link.symlink_to(photo.resolve())
        lines.append(str(link.relative_to(folder)))
    manifest = folder / f"manifest-{count}.txt"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _run(manifest: Path, out: Path, repository: Path, model_ref: str, shard_size: int,
         engine: str, actors: int | None, timeout_s: float) -> dict[str, Any]:
    """One ``cnn-codes embed`` into a fresh ``out``; its report plus the subprocess wall time."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["embed", str(manifest), "--out", str(out), "--repository", str(repository),
            "--model", model_ref, "--no-progress", "--shard-size", str(shard_size)]
    if engine == "ray":
        args += ["--engine", "ray", "--ray-actors", str(actors)]
    started = time.perf_counter()
    report = json.loads(_cli(*args, timeout=timeout_s).strip().splitlines()[-1])
    wall = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)  # the vectors are not needed, only the timing
    return {"images": report["images"], "errors": report["errors"],
            "job_seconds": report["seconds"], "process_seconds": round(wall, 2),
            "images_per_s_incl_startup": report["images_per_s"],
            "command": "cnn-codes " + " ".join(args)}


def measure(data_dir: Path, repository: Path, model_ref: str, work_dir: Path, *,
            sizes: Sequence[int] = (512, 4608), shard_size: int = 256,
            configs: Sequence[tuple[str, int | None]] = CONFIGS,
            timeout_s: float = 1800,
            probe: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Images/s of ``cnn-codes embed`` per configuration, start-up excluded (module docstring).

    Args:
        data_dir: the sample photos.
        repository, model_ref: the published model (``name:version``).
        work_dir: scratch space (manifests, links, job folders; removed afterwards).
        sizes: (small, large) input counts; the large one is the job the row reports.
        shard_size: images per part file (``--shard-size``): parts are the unit the Ray
            actors share out. Both sizes must be whole rounds of parts for every actor count
            (multiples of ``shard_size`` x the largest actor count): a small job that leaves an
            actor idle would make the difference count that actor's images as free.
        configs: ``(engine, actors)`` pairs.
        timeout_s: per job.
        probe: measures the limit again (:func:`bench.limit.probe`); when given it runs before
            the first configuration and after each one (a failed probe is recorded, not
            raised: :func:`bench.limit.recorded_probe`), and every configuration's row holds
            the probes around it (``probes``) and, when both worked, the mean of their
            shared-cores limits (``limit_beside_images_per_s``), as the service's cells are
            set against the probes
            beside them: this machine's speed moves by a quarter within minutes, so the
            start-of-run limit, measured a minute or more before the job, mixes the job's speed
            with the moment.

    Returns:
        ``{"sizes", "shard_size", "configs": {label: {"images_per_s", "startup_s", "runs":
        {"small": ..., "large": ...}, "probes"?, "limit_beside_images_per_s"?, ...}}}``; a
        configuration that failed holds ``{"status": "failed", "reason"}`` and the others are
        still measured.
    """
    small, large = sizes
    round_size = shard_size * max([a or 1 for _, a in configs])
    if small % round_size or large % round_size or not 0 < small < large:
        raise ValueError(f"sizes {sizes} must be increasing multiples of {round_size} "
                         "(shard size x largest actor count)")
    folder = work_dir / "batch-job"
    manifests = {n: write_manifest(data_dir, folder, n) for n in (small, large)}
    rows: dict[str, Any] = {}
    before = recorded_probe(probe) if probe is not None else None
    for engine, actors in configs:
        label = "local" if engine == "local" else f"ray_{actors}_actor" + ("s" if actors != 1
                                                                          else "")
        try:
            runs = {key: _run(manifests[n], folder / f"out-{label}-{n}", repository, model_ref,
                              shard_size, engine, actors, timeout_s)
                    for key, n in (("small", small), ("large", large))}
        except Exception as exc:  # e.g. Ray missing: record why, measure the others
            logger.exception("batch job %s failed", label)
            rows[label] = {"status": "failed", "engine": engine, "ray_actors": actors,
                           "reason": f"{type(exc).__name__}: {exc}"[:3000]}
            continue
        after = recorded_probe(probe) if probe is not None else None
        delta_images = runs["large"]["images"] - runs["small"]["images"]
        delta_s = runs["large"]["job_seconds"] - runs["small"]["job_seconds"]
        rate = delta_images / delta_s if delta_s > 0 else None
        rows[label] = {
            "status": "ok", "engine": engine, "ray_actors": actors,
            "images": runs["large"]["images"], "errors": runs["large"]["errors"],
            "images_per_s": None if rate is None else round(rate, 1),
            "startup_s": None if rate is None else
            round(runs["small"]["job_seconds"] - runs["small"]["images"] / rate, 2),
            "runs": runs}
        if before is not None and after is not None:
            rows[label]["probes"] = {"before": before, "after": after}
            if before["status"] == after["status"] == "ok":
                rows[label]["limit_beside_images_per_s"] = round(
                    (before["shared_cores_images_per_s"]
                     + after["shared_cores_images_per_s"]) / 2, 1)
            before = after
        logger.info("batch job %s: %s images/s start-up excluded (%d images: %.2f s, %d: %.2f s)",
                    label, rows[label]["images_per_s"], runs["small"]["images"],
                    runs["small"]["job_seconds"], runs["large"]["images"],
                    runs["large"]["job_seconds"])
    shutil.rmtree(folder, ignore_errors=True)
    return {"sizes": [small, large], "shard_size": shard_size, "cores": os.cpu_count(),
            "method": "(n_large - n_small) / (job_seconds_large - job_seconds_small), "
                      "job_seconds from the job's JSON report", "configs": rows}
