"""A batch job's output folder: its spec (``_job.json``), input list, part layout, atomic writes
and the disk-full condition. See :mod:`batch.job` for the whole layout.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from batch.lock import holds_lock
from models.repository import PublishedModel

logger = logging.getLogger(__name__)

JOB_FILE = "_job.json"
INPUTS_FILE = "_inputs.txt"
PART_PATTERN = "part-{:05d}.parquet"
Layer = Literal["embedding", "features"]
DType = Literal["float32", "float16"]


#: ``errno`` values of a write that failed for want of space: the device is full, or the
#: user's or project's disk quota is used up.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class JobMismatchError(ValueError):
    """The output folder holds a job with a different spec; resuming would mix outputs."""


class DiskFullError(OSError):
    """Writing the output folder failed for want of space (``ENOSPC`` or ``EDQUOT``).

    The parts written so far are complete and kept (each is renamed into place only when
    whole; the one being written is removed), so the same job run again once there is room
    writes only the rest.

    Attributes:
        out_dir: the job's output folder.
        parts_complete, parts_total: parts of the job on disk and complete, and in the job
            (None when the disk filled up before the job's spec was known).
    """

    def __init__(self, out_dir: Path, cause: OSError, parts_complete: int | None,
                 parts_total: int | None) -> None:
        reason = os.strerror(cause.errno) if cause.errno else str(cause)
        where = f" ({cause.filename})" if cause.filename else ""
        kept = ("the complete parts are kept" if parts_complete is None or parts_total is None
                else f"{parts_complete} of {parts_total} parts complete and kept")
        self.message = (f"{reason} writing {out_dir}{where}: {kept}; free some space (or raise "
                        "the quota) and run the same command again to finish the job")
        super().__init__(cause.errno, self.message)
        self.out_dir = out_dir
        self.parts_complete = parts_complete
        self.parts_total = parts_total

    def __str__(self) -> str:
        return self.message


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The ``ENOSPC``/``EDQUOT`` :class:`OSError` behind ``exc`` (itself, its ``__cause__`` /
    ``__context__`` chain, or the ``cause`` of a Ray task error), or None."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


class EmbedJobSpec(BaseModel):
    """What a job computes; stored in ``OUT/_job.json`` and in every part's schema metadata.

    Attributes:
        model_name, model_version, onnx_sha256: the published model (one version per job).
        layer: ``embedding`` (penultimate layer, D values) or ``features`` (pooled conv
            output, C values).
        normalize: rows L2-normalised.
        dtype: stored value type (computed in float32; ``float16`` is rounded at write time).
        dim: values per row.
        shard_size: inputs per part file.
        num_inputs: inputs in the job.
        inputs_sha256: sha256 of ``_inputs.txt``.
    """

    schema_version: int = 1
    model_name: str
    model_version: int
    onnx_sha256: str
    layer: Layer
    normalize: bool
    dtype: DType = "float32"
    dim: int = Field(ge=1)
    shard_size: int = Field(ge=1)
    num_inputs: int = Field(ge=0)
    inputs_sha256: str

    @property
    def num_shards(self) -> int:
        """Part files in a finished job."""
        return -(-self.num_inputs // self.shard_size)

    def shard_bounds(self, index: int) -> tuple[int, int]:
        """``[start, stop)`` input indices of part ``index``."""
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num_inputs)

    def shard_rows(self, index: int) -> int:
        """Rows of part ``index`` (the last part may be short)."""
        start, stop = self.shard_bounds(index)
        return stop - start


@dataclass
class ShardResult:
    """What writing one part produced: its index, rows written and rows that failed."""

    index: int
    rows: int
    errors: int


def inputs_digest(inputs: Sequence[str]) -> str:
    """sha256 (hex) of the newline-joined input list, exactly as ``_inputs.txt`` stores it."""
    digest = hashlib.sha256()
    for path in inputs:
        digest.update(path.encode("utf-8") + b"\n")
    return digest.hexdigest()


def make_spec(model: PublishedModel, inputs: Sequence[str], *, layer: Layer, normalize: bool,
              shard_size: int, dtype: DType = "float32") -> EmbedJobSpec:
    """The spec of a job of ``model`` over ``inputs``.

    Raises:
        KeyError: the model card has no output ``layer``.
    """
    card = model.card
    return EmbedJobSpec(model_name=card.name, model_version=card.version,
                        onnx_sha256=card.onnx_sha256, layer=layer, normalize=normalize,
                        dtype=dtype, dim=card.dim(layer), shard_size=shard_size,
                        num_inputs=len(inputs), inputs_sha256=inputs_digest(inputs))


def prepare(out_dir: str | Path, spec: EmbedJobSpec, inputs: Sequence[str]) -> list[int]:
    """Create or re-open an output folder; return the indices of parts still to write.

    A new folder gets ``_job.json`` and ``_inputs.txt``. An existing one must hold the same
    job: the same model version, layer, normalisation, shard size and input list. Temporary
    files left by a killed run are removed, so the caller must hold the folder's lock
    (:class:`batch.lock.OutputFolderLock`): they could be another running job's files.

    Raises:
        JobMismatchError: the folder holds a different job (each differing field is named).
        RuntimeError: this process does not hold the folder's lock.
    """
    out = Path(out_dir)
    if not holds_lock(out):
        raise RuntimeError(f"prepare({out}) needs the folder's lock: take it with "
                           "batch.lock.OutputFolderLock first")
    job_file = out / JOB_FILE
    if job_file.is_file():
        stored = EmbedJobSpec.model_validate_json(job_file.read_bytes())
        differ = [f"{name}: {getattr(stored, name)!r} in {out}, {getattr(spec, name)!r} now"
                  for name in EmbedJobSpec.model_fields
                  if getattr(stored, name) != getattr(spec, name)]
        if differ:
            raise JobMismatchError(f"{out} holds another job ({'; '.join(differ)}); "
                                   "use a new output folder or the same arguments")
    else:
        with atomic_file(out / INPUTS_FILE) as handle:
            handle.write("".join(f"{p}\n" for p in inputs).encode("utf-8"))
        with atomic_file(job_file) as handle:
            handle.write(spec.model_dump_json(indent=2).encode("utf-8"))
    for stale in out.glob(".*.tmp"):  # being written when a run died (we hold the lock)
        stale.unlink(missing_ok=True)
    return [i for i in range(spec.num_shards) if not _part_complete(out, spec, i)]


def read_inputs(out_dir: str | Path) -> list[str]:
    """The input list of the job in ``out_dir`` (``_inputs.txt``)."""
    return (Path(out_dir) / INPUTS_FILE).read_text(encoding="utf-8").splitlines()


def count_complete_parts(out_dir: str | Path, spec: EmbedJobSpec) -> int:
    """Parts of the job in ``out_dir`` that are on disk and complete."""
    return sum(_part_complete(Path(out_dir), spec, i) for i in range(spec.num_shards))


def _part_complete(out: Path, spec: EmbedJobSpec, index: int) -> bool:
    import pyarrow.parquet as pq

    part = out / PART_PATTERN.format(index)
    if not part.is_file():
        return False
    try:
        rows = pq.read_metadata(part).num_rows
    except (OSError, ValueError) as exc:
        logger.warning("rewriting unreadable part %s: %s", part, exc)
        return False
    if rows != spec.shard_rows(index):
        logger.warning("rewriting %s: %d rows, expected %d", part, rows, spec.shard_rows(index))
        return False
    return True


@contextmanager
def atomic_file(path: Path) -> Iterator:
    """A binary handle on ``.NAME.tmp`` beside ``path``; synced and renamed to ``path`` on a
    clean exit, so readers see the whole file or none of it. On an error (a full disk among
    them) the temporary file is removed, giving its space back, and the error re-raised."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove %s: %s", tmp, exc)
        raise
