"""Run a batch embedding job on this machine or on a Ray cluster (``cnn-codes embed``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from pydantic import BaseModel

from batch.job import (INPUTS_FILE, DiskFullError, DType, EmbedJobSpec, Layer, ShardEmbedder,
                       count_complete_parts, disk_full_cause, make_spec, prepare, read_inputs)
from batch.lock import OutputFolderLock
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

    The run holds the folder's lock (:class:`batch.lock.OutputFolderLock`) from start to end:
    a second job on the same folder is refused at once instead of corrupting this one.

    Raises:
        batch.sources.SourceError: a source names nothing.
        batch.job.JobMismatchError: ``out_dir`` holds a different job.
        batch.lock.JobLockedError: another job is running on ``out_dir``.
        batch.job.DiskFullError: the disk (or quota) of ``out_dir`` filled up; the complete
            parts are kept and a later run finishes the job.
        models.runtime.ProviderUnavailableError: requested execution provider missing.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    # an existing folder is locked before the (maybe long) listing, so a busy one is refused at
    # once; a new one only after it, so that a bad source leaves no empty folder behind
    inputs = None if out.is_dir() else list_inputs(sources)
    spec: EmbedJobSpec | None = None
    try:
        with OutputFolderLock(out):
            if inputs is None:
                inputs = list_inputs(sources)
            if (out / INPUTS_FILE).is_file():
                stored = read_inputs(out)
                if stored != inputs:
                    logger.warning("the sources now list %d files, the job in %s has %d; "
                                   "finishing the stored list (a new output folder embeds the "
                                   "new files)", len(inputs), out, len(stored))
                    inputs = stored
            spec = make_spec(model, inputs, layer=layer, normalize=normalize,
                             shard_size=shard_size, dtype=dtype)
            return _run_locked(out, model, spec, inputs, options, started)
    except Exception as exc:
        cause = disk_full_cause(exc)
        if cause is None or isinstance(exc, DiskFullError):
            raise
        complete = count_complete_parts(out, spec) if spec is not None else None
        raise DiskFullError(out, cause, complete,
                            spec.num_shards if spec is not None else None) from exc


def _run_locked(out: Path, model: PublishedModel, spec: EmbedJobSpec, inputs: list[str],
                options: JobOptions, started: float) -> JobReport:
    """The body of :func:`run_job`, run holding the folder's lock."""
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
