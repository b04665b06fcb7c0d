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

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from batch.folder import (DISK_FULL_ERRNOS, INPUTS_FILE, JOB_FILE, PART_PATTERN,  # noqa: F401
                          DiskFullError, DType, EmbedJobSpec, JobMismatchError, Layer,
                          ShardResult, atomic_file, count_complete_parts, disk_full_cause,
                          inputs_digest, make_spec, prepare, read_inputs)
from cnn_codes.settings import usable_cores
from models.decode import DecodeLimits, decode_file
from models.errors import ImageError
from models.postprocess import l2_normalize
from models.repository import PublishedModel
from models.runtime import OnnxEncoder, SessionConfig, split_outputs

logger = logging.getLogger(__name__)

@dataclass
class ShardEmbedder:
    """Runs whole batches on ``decode_workers`` pipeline threads; writes part files.

    Each pipeline thread takes one batch of paths, decodes it (Pillow) and runs it through
    onnxruntime itself, so with one pipeline per core exactly one thread per core is busy and
    one pipeline's decoding overlaps another's inference (Pillow and onnxruntime both release
    the GIL). Unless ``session_config`` sets them, the session's intra-op threads are the
    cores shared out among the pipelines (1 with one pipeline per core): onnxruntime's
    threads never fight the decoders for the cores. One instance per process (or Ray actor).

    Why (``cnn-codes embed`` over 2,304 inputs of the sample photos, 2 cores, 2026-12-01; the
    command is in README "Batch embedding jobs"): the previous design, two decoding threads one
    batch ahead of an onnxruntime session on both cores (four busy threads on two cores), ran
    151-169 images/s including start-up; this one 176-188 at batch 8.

    Attributes:
        model: the verified published model.
        spec: the job's spec (layer, normalisation, dim).
        batch_size: images per onnxruntime run.
        decode_workers: pipeline threads (each decodes a batch, then runs it).
        limits: per-image limits.
        session_config: onnxruntime providers and threads.
    """

    model: PublishedModel
    spec: EmbedJobSpec
    batch_size: int = 8
    decode_workers: int = 2
    limits: DecodeLimits = field(default_factory=DecodeLimits.default)
    session_config: SessionConfig = SessionConfig()
    _encoder: OnnxEncoder | None = field(default=None, init=False, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.decode_workers < 1:
            raise ValueError("batch_size and decode_workers must be >= 1")
        config = self.session_config
        if not config.intra_op_threads:
            config = replace(config, intra_op_threads=max(1, usable_cores()
                                                          // self.decode_workers))
        self._encoder = OnnxEncoder.create(str(self.model.onnx_path), self.model.card, config)
        self._pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="pipeline")

    def close(self) -> None:
        """Stop the pipeline threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _decode(self, path: str) -> np.ndarray | ImageError:
        try:
            return decode_file(path, self.model.card.preprocessing, self.limits)
        except ImageError as exc:
            return exc

    def _run_batch(self, paths: Sequence[str]
                   ) -> tuple[np.ndarray | None, list[tuple[str, str] | None]]:
        """One pipeline step, on a pipeline thread: decode ``paths``, run the good ones.

        Returns:
            ``(M, D)`` float32 values of the M decodable images (None when M == 0), and per
            path ``None`` or ``(error_code, message)``.
        """
        assert self._encoder is not None
        decoded = [self._decode(p) for p in paths]
        good = [item for item in decoded if isinstance(item, np.ndarray)]
        errors = [None if isinstance(item, np.ndarray) else (item.code, item.message)
                  for item in decoded]
        if not good:
            return None, errors
        values = split_outputs(self._encoder.run(np.stack(good)), self.model.card)
        chosen = values[self.spec.layer]
        return (l2_normalize(chosen) if self.spec.normalize else chosen), errors

    def embed(self, paths: Sequence[str], progress: Callable[[int], None] | None = None
              ) -> tuple[np.ndarray, list[tuple[str, str] | None]]:
        """CNN codes of ``paths``.

        Returns:
            ``(N, D)`` float32 (rows of failed images are zeros) and, per path, ``None`` or
            ``(error_code, message)``.
        """
        assert self._pool is not None
        out = np.zeros((len(paths), self.spec.dim), dtype=np.float32)
        errors: list[tuple[str, str] | None] = []
        batches = [paths[i:i + self.batch_size] for i in range(0, len(paths), self.batch_size)]
        row = 0
        # every batch of the part is queued at once (a part is bounded: --shard-size inputs);
        # results come back in order
        for values, batch_errors in self._pool.map(self._run_batch, batches):
            good = [row + i for i, e in enumerate(batch_errors) if e is None]
            if values is not None:
                out[good] = values
            errors.extend(batch_errors)
            row += len(batch_errors)
            if progress is not None:
                progress(len(batch_errors))
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
        with atomic_file(Path(out_dir) / PART_PATTERN.format(index)) as handle:
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
