"""Run a batch embedding job on this machine or on a Ray cluster (``cnn-codes embed``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from pydantic import BaseModel

from batch.job import (INPUTS_FILE, DType, EmbedJobSpec, Layer, ShardEmbedder, make_spec,
                       prepare, read_inputs)
from batch.options import JobOptions
from batch.sources import list_inputs
from models.repository import PublishedModel

logger = logging.getLogger(__name__)


class JobReport(BaseModel):
    """Summary of one run of a job (printed as JSON by ``cnn-codes embed``).

    Attributes:
        out_dir: the output folder.
        spec: the job.
        parts_total, parts_written, parts_skipped: part files in the job, written by this run,
            already complete before it (a resumed job skips those).
        images: images embedded or failed by this run.
        errors: images that failed in this run (rows with ``error_code``).
        seconds: wall time of this run, s.
        images_per_s: ``images / seconds``.
    """

    out_dir: str
    spec: EmbedJobSpec
    parts_total: int
    parts_written: int
    parts_skipped: int
    images: int
    errors: int
    seconds: float
    images_per_s: float


def run_job(sources: Sequence[str | Path], out_dir: str | Path, model: PublishedModel, *,
            layer: Layer = "embedding", normalize: bool = True, dtype: DType = "float32",
            shard_size: int = 1024, options: JobOptions = JobOptions()) -> JobReport:
    """Embed every image the sources name into ``out_dir`` (see :mod:`batch.job`).

    Starting it again with the same arguments after a crash finishes the job: complete parts
    are kept, missing ones written, nothing duplicated. If the sources now list different files
    (new uploads), the stored input list of the first run still defines the job and a warning
    says so; start a new output folder to embed the new files.

    Raises:
        batch.sources.SourceError: a source names nothing.
        batch.job.JobMismatchError: ``out_dir`` holds a different job.
        models.runtime.ProviderUnavailableError: requested execution provider missing.
    """
    started = time.perf_counter()
    inputs = list_inputs(sources)
    out = Path(out_dir)
    if (out / INPUTS_FILE).is_file():
        stored = read_inputs(out)
        if stored != inputs:
            logger.warning("the sources now list %d files, the job in %s has %d; finishing "
                           "the stored list (a new output folder embeds the new files)",
                           len(inputs), out, len(stored))
            inputs = stored
    spec = make_spec(model, inputs, layer=layer, normalize=normalize, shard_size=shard_size,
                     dtype=dtype)
    pending = prepare(out, spec, inputs)
    done_images = spec.num_inputs - sum(spec.shard_rows(i) for i in pending)
    logger.info("job %s: %d inputs in %d parts, %d to write, model %s:%d", out,
                spec.num_inputs, spec.num_shards, len(pending), spec.model_name,
                spec.model_version)
    bar = _progress_bar(spec.num_inputs, done_images, options.progress)
    try:
        if options.engine == "ray":
            from batch.ray_engine import run_parts_on_ray

            results = run_parts_on_ray(out, model, spec, pending, options, bar.update)
        else:
            embedder = ShardEmbedder(model, spec, batch_size=options.batch_size,
                                     decode_workers=options.decode_workers,
                                     limits=options.limits,
                                     session_config=options.session_config)
            try:
                results = [embedder.write_part(out, i, inputs, bar.update) for i in pending]
            finally:
                embedder.close()
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    images = sum(r.rows for r in results)
    return JobReport(out_dir=str(out), spec=spec, parts_total=spec.num_shards,
                     parts_written=len(results), parts_skipped=spec.num_shards - len(pending),
                     images=images, errors=sum(r.errors for r in results),
                     seconds=round(seconds, 3), images_per_s=round(images / seconds, 2))


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="embed", disable=not enabled,
                dynamic_ncols=True)
