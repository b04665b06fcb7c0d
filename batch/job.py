"""Batch embedding jobs: CNN codes for many files, written as a resumable Parquet dataset.

Layout of an output folder ``OUT``::

    OUT/_job.json          the job's spec (model, layer, normalisation, shard size, inputs hash)
    OUT/_inputs.txt        the input paths, sorted, one per line (fixed at the first run)
    OUT/part-00000.parquet rows for inputs [0, S), S = shard size
    OUT/part-00001.parquet rows for inputs [S, 2S) ...

    OUT/_lock              held (``flock``) by the job running on the folder (:mod:`batch.lock`)

Each part is written to a temporary name and renamed into place once complete (an atomic
``os.replace`` on POSIX), so a part either exists whole or not at all. A job killed at any
moment and started again with the same arguments redoes only the missing parts: every input
appears in exactly one row, whatever crashed and when. The same holds when the disk fills up
(:class:`DiskFullError`): the part being written is dropped, the complete ones stay. Only one
job runs on a folder at a time (:class:`batch.lock.OutputFolderLock`). Readers take the folder
as one dataset (``pyarrow.dataset.dataset(OUT)``; files starting with ``_`` are skipped by
pyarrow).

Rows: ``path`` (str), ``embedding`` (``fixed_size_list<float32>[D]``, or ``<float16>`` when
asked, to halve the storage; L2-normalised unless asked otherwise; null when the image failed),
``error_code`` / ``error`` (str, null when it worked; the codes of :mod:`models.errors`, the
same as the HTTP API's, with ``unreadable``, ``not_a_file`` and ``too_large`` for files that
cannot or must not be read), ``model_name`` (str), ``model_version`` (int32).

Torch-free: onnxruntime, numpy, pillow, pyarrow.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from batch.lock import holds_lock
from models.decode import DecodeLimits, decode_file
from models.errors import ImageError
from models.postprocess import l2_normalize
from models.repository import PublishedModel
from models.runtime import OnnxEncoder, SessionConfig, split_outputs

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
        with _atomic_file(out / INPUTS_FILE) as handle:
            handle.write("".join(f"{p}\n" for p in inputs).encode("utf-8"))
        with _atomic_file(job_file) as handle:
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
def _atomic_file(path: Path) -> Iterator:
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


@dataclass
class ShardEmbedder:
    """Decodes files on a thread pool and runs onnxruntime on batches; writes part files.

    Decoding of batch k+1 overlaps inference on batch k (Pillow and onnxruntime both release
    the GIL). One instance per process (or Ray actor).

    Attributes:
        model: the verified published model.
        spec: the job's spec (layer, normalisation, dim).
        batch_size: images per onnxruntime run.
        decode_workers: decoding threads.
        limits: per-image limits.
        session_config: onnxruntime providers and threads.
    """

    model: PublishedModel
    spec: EmbedJobSpec
    batch_size: int = 32
    decode_workers: int = 2
    limits: DecodeLimits = field(default_factory=DecodeLimits.default)
    session_config: SessionConfig = SessionConfig()
    _encoder: OnnxEncoder | None = field(default=None, init=False, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.decode_workers < 1:
            raise ValueError("batch_size and decode_workers must be >= 1")
        self._encoder = OnnxEncoder.create(str(self.model.onnx_path), self.model.card,
                                           self.session_config)
        self._pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode")

    def close(self) -> None:
        """Stop the decoding threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _decode(self, path: str) -> np.ndarray | ImageError:
        try:
            return decode_file(path, self.model.card.preprocessing, self.limits)
        except ImageError as exc:
            return exc

    def _decoded_batches(self, paths: Sequence[str]
                         ) -> Iterator[list[np.ndarray | ImageError]]:
        assert self._pool is not None
        batches = [paths[i:i + self.batch_size] for i in range(0, len(paths), self.batch_size)]
        pending: list[list[Future]] = []
        for batch in batches[:2]:
            pending.append([self._pool.submit(self._decode, p) for p in batch])
        for k in range(len(batches)):
            current = pending.pop(0)
            if k + 2 < len(batches):  # keep one batch decoding ahead of the one in inference
                pending.append([self._pool.submit(self._decode, p) for p in batches[k + 2]])
            yield [f.result() for f in current]

    def embed(self, paths: Sequence[str], progress: Callable[[int], None] | None = None
              ) -> tuple[np.ndarray, list[tuple[str, str] | None]]:
        """CNN codes of ``paths``.

        Returns:
            ``(N, D)`` float32 (rows of failed images are zeros) and, per path, ``None`` or
            ``(error_code, message)``.
        """
        assert self._encoder is not None
        out = np.zeros((len(paths), self.spec.dim), dtype=np.float32)
        errors: list[tuple[str, str] | None] = []
        row = 0
        for decoded in self._decoded_batches(paths):
            good = [i for i, item in enumerate(decoded) if isinstance(item, np.ndarray)]
            errors.extend(None if isinstance(item, np.ndarray) else (item.code, item.message)
                          for item in decoded)
            if good:
                packed = self._encoder.run(np.stack([decoded[i] for i in good]))
                values = split_outputs(packed, self.model.card)[self.spec.layer]
                if self.spec.normalize:
                    values = l2_normalize(values)
                out[[row + i for i in good]] = values
            row += len(decoded)
            if progress is not None:
                progress(len(decoded))
        return out, errors

    def write_part(self, out_dir: str | Path, index: int, inputs: Sequence[str],
                   progress: Callable[[int], None] | None = None) -> ShardResult:
        """Embed part ``index`` of the job and write it atomically.

        Args:
            out_dir: the job's output folder (see :func:`prepare`).
            index: part number.
            inputs: the job's whole input list (``_inputs.txt``).
            progress: called with the number of images done after every batch.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        start, stop = self.spec.shard_bounds(index)
        paths = list(inputs[start:stop])
        values, errors = self.embed(paths, progress)
        failed = np.array([e is not None for e in errors], dtype=bool)
        schema = _schema(self.spec)
        embedding = pa.FixedSizeListArray.from_arrays(
            pa.array(values.reshape(-1).astype(self.spec.dtype),
                     type=schema.field("embedding").type.value_type),
            self.spec.dim, mask=pa.array(failed))
        table = pa.table({
            "path": pa.array(paths, type=pa.string()),
            "embedding": embedding,
            "error_code": pa.array([e[0] if e else None for e in errors], type=pa.string()),
            "error": pa.array([e[1] if e else None for e in errors], type=pa.string()),
            "model_name": pa.array([self.spec.model_name] * len(paths), type=pa.string()),
            "model_version": pa.array([self.spec.model_version] * len(paths), type=pa.int32()),
        }, schema=schema)
        with _atomic_file(Path(out_dir) / PART_PATTERN.format(index)) as handle:
            pq.write_table(table, handle, compression="zstd")
        return ShardResult(index=index, rows=len(paths), errors=int(failed.sum()))


def _schema(spec: EmbedJobSpec):
    import pyarrow as pa

    return pa.schema([
        pa.field("path", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float16() if spec.dtype == "float16"
                                       else pa.float32(), spec.dim)),
        pa.field("error_code", pa.string()),
        pa.field("error", pa.string()),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.int32(), nullable=False),
    ], metadata={"cnn_codes.job": spec.model_dump_json()})
