"""Reading ``cnn-codes embed`` output folders (:mod:`batch.job`) as a stream of vectors.

Memory stays bounded whatever the number of rows: parts are read in record batches of at most
``chunk_rows`` rows, and only the columns asked for. Error rows (no vector) are skipped and
counted. Several folders are one dataset only if their jobs agree on the model version (name,
version, ONNX sha256), the layer, the normalisation and the width; mixing is refused, naming
what differs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batch.folder import JOB_FILE, PART_PATTERN, EmbedJobSpec, count_complete_parts
from models.postprocess import l2_normalize

#: Fields of the job spec that must agree across the folders of one index.
SAME_FIELDS = ("model_name", "model_version", "onnx_sha256", "layer", "normalize", "dim")


class SourceError(ValueError):
    """An embed folder that cannot be indexed (missing, unfinished), or folders that mix model
    versions or layers."""


@dataclass(frozen=True)
class EmbeddingSource:
    """One finished ``cnn-codes embed`` output folder.

    Attributes:
        folder: the folder (absolute).
        spec: its job (``_job.json``).
        parts: its part files, in order.
    """

    folder: Path
    spec: EmbedJobSpec
    parts: tuple[Path, ...]


@dataclass
class Chunk:
    """Consecutive usable rows of the dataset.

    Attributes:
        start: dataset row id (vectors only, over all folders in order) of the first row.
        paths: image paths.
        vectors: ``(n, dim)`` float32, unit length.
    """

    start: int
    paths: list[str]
    vectors: np.ndarray


def open_sources(folders: Sequence[str | Path]) -> list[EmbeddingSource]:
    """The finished embed jobs in ``folders``, checked to be one model version and layer.

    Raises:
        SourceError: a folder is not an embed output, its job is unfinished, or two folders
            differ in a field of :data:`SAME_FIELDS` (each difference is named).
    """
    if not folders:
        raise SourceError("no embed folders given")
    sources = []
    for folder in folders:
        path = Path(folder).resolve()
        job_file = path / JOB_FILE
        if not job_file.is_file():
            raise SourceError(f"{folder} is not a cnn-codes embed output: no {JOB_FILE}")
        spec = EmbedJobSpec.model_validate_json(job_file.read_bytes())
        complete = count_complete_parts(path, spec)
        if complete != spec.num_shards:
            raise SourceError(f"the job in {folder} is unfinished ({complete} of "
                              f"{spec.num_shards} parts): run the same cnn-codes embed "
                              "command again to finish it")
        parts = tuple(path / PART_PATTERN.format(i) for i in range(spec.num_shards))
        sources.append(EmbeddingSource(folder=path, spec=spec, parts=parts))
    first = sources[0]
    for other in sources[1:]:
        differ = [f"{name}: {getattr(first.spec, name)!r} in {first.folder}, "
                  f"{getattr(other.spec, name)!r} in {other.folder}"
                  for name in SAME_FIELDS if getattr(first.spec, name) != getattr(other.spec, name)]
        if differ:
            raise SourceError("the embed folders are not one model version and layer ("
                              + "; ".join(differ) + "): index each model version on its own")
    return sources


def count_vectors(source: EmbeddingSource) -> tuple[int, int]:
    """``(vectors, error rows)`` of ``source`` (reads only the ``error_code`` column)."""
    import pyarrow.parquet as pq

    vectors = errors = 0
    for part in source.parts:
        column = pq.read_table(part, columns=["error_code"]).column("error_code")
        errors += len(column) - column.null_count
        vectors += column.null_count
    return vectors, errors


def open_counted(folders: Sequence[str | Path], what: str
                 ) -> tuple[list[EmbeddingSource], list[tuple[int, int]], int]:
    """:func:`open_sources` and :func:`count_vectors` of each, for a job that needs vectors.

    Args:
        folders: ``cnn-codes embed`` output folders of one model version and layer.
        what: what the vectors are for, for the error message (e.g. ``"to index"``).

    Returns:
        ``(sources, (vectors, error rows) per source, total vectors)``.

    Raises:
        SourceError: see :func:`open_sources`; or no vector at all (every row an error row).
    """
    sources = open_sources(folders)
    counts = [count_vectors(s) for s in sources]
    total = sum(c[0] for c in counts)
    if total == 0:
        raise SourceError(f"no vectors {what}: every row of the embed folders is an error row")
    return sources, counts, total


def _vectors(column, dim: int) -> np.ndarray:
    """``fixed_size_list<float>[dim]`` without nulls -> ``(n, dim)`` float32."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim).astype(np.float32, copy=False)


def iter_chunks(sources: Sequence[EmbeddingSource], *, chunk_rows: int = 16384,
                with_paths: bool = True) -> Iterator[Chunk]:
    """Every usable row of ``sources``, in order, as chunks of at most ``chunk_rows`` rows.

    Vectors are L2-normalised here when the job did not (``--no-normalize``), so every
    consumer gets unit vectors (inner product = cosine).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    start = 0
    columns = ["path", "embedding"] if with_paths else ["embedding"]
    for source in sources:
        dim, normalize = source.spec.dim, not source.spec.normalize
        for part in source.parts:
            for batch in pq.ParquetFile(part).iter_batches(batch_size=chunk_rows,
                                                           columns=columns):
                embedding = batch.column("embedding")
                valid = pc.is_valid(embedding)
                if valid.false_count:
                    batch = batch.filter(valid)
                    embedding = batch.column("embedding")
                if batch.num_rows == 0:
                    continue
                vectors = _vectors(embedding, dim)
                if normalize:
                    vectors = l2_normalize(vectors)
                paths = batch.column("path").to_pylist() if with_paths else []
                yield Chunk(start=start, paths=paths, vectors=vectors)
                start += batch.num_rows


def gather_rows(sources: Sequence[EmbeddingSource], ids: np.ndarray, *,
                chunk_rows: int = 16384) -> np.ndarray:
    """The vectors of dataset rows ``ids`` (sorted, unique), ``(len(ids), dim)`` float32, in
    one streaming pass (memory: the rows asked for plus one chunk)."""
    dim = sources[0].spec.dim
    out = np.empty((len(ids), dim), dtype=np.float32)
    filled = 0
    for chunk in iter_chunks(sources, chunk_rows=chunk_rows, with_paths=False):
        stop = chunk.start + len(chunk.vectors)
        lo, hi = np.searchsorted(ids, [chunk.start, stop])
        if hi > lo:
            out[lo:hi] = chunk.vectors[ids[lo:hi] - chunk.start]
            filled += hi - lo
        if filled == len(ids):
            break
    if filled != len(ids):
        raise SourceError(f"the embed folders changed while being read ({filled} of "
                          f"{len(ids)} sampled rows found)")
    return out
