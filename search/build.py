"""``cnn-codes index build``: embed folders -> an index folder, published atomically.

Memory stays bounded by the index itself plus one chunk: the Parquet parts are streamed in
chunks of ``chunk_rows`` rows (three passes: count, sample, add); IVF-PQ is trained on a random
sample of at most ``max_train_rows`` vectors; the exact neighbours of the recall queries are
kept as a running top-k while the chunks are added, never as an ``N x N`` matrix.

Kinds (FAISS ``index_factory`` strings, inner product on unit vectors = cosine):

* ``exact``: ``Flat``, brute force; 4 * D bytes per vector; scores are exact cosines.
* ``ivfpq``: ``IVF{nlist},PQ{m}x4fsr``, an inverted file of ``nlist`` lists, each vector's
  residual to its list centre compressed to ``m`` 4-bit codes (fast-scan); ``nprobe`` lists
  searched per query; about ``m / 2`` bytes per vector, scores approximate. Measured here
  (``bench/search.py``): 8-bit PQ trained for minutes where 4-bit took seconds, and encoding
  residuals ("fsr") doubled recall@10 over encoding the vectors.
* ``hnsw``: ``HNSW{M},Flat``, a graph over the full vectors; 4 * D + 8 * M bytes per vector.

The folder is written under a hidden staging name beside ``out`` and renamed into place when
complete (like a model version, :func:`models.repository.publish`), so a reader sees the whole
index or none; ``overwrite`` replaces an existing index the same way (rename aside, rename in,
remove the old one).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.repository import fsync_dir_files
from search.index import apply_search_params
from search.manifest import (INDEX_FILE, MANIFEST_FILE, PATHS_FILE, IndexManifest, Kind,
                             SourceRef)
from search.sources import (EmbeddingSource, SourceError, gather_rows, iter_chunks,
                            open_counted)

logger = logging.getLogger(__name__)

RECALL_K = 10


def _divisor_near(dim: int, target: float) -> int:
    """The divisor of ``dim`` closest to ``target`` (ties: the larger one)."""
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - target), -m))


def default_params(kind: Kind, count: int, dim: int) -> dict[str, int]:
    """The parameters ``kind`` gets for ``count`` vectors of ``dim`` values unless given.

    ``ivfpq``: ``nlist`` = 4 sqrt(N) (at most N / 39, FAISS's points-per-centroid floor),
    ``m`` = the divisor of D nearest D / 4 (e.g. 320 for D = 1280: 160 bytes per vector, 1/32
    of exact),
    ``nprobe`` = max(16, nlist / 32). ``hnsw``: ``M`` 32, ``ef_construction`` 80,
    ``ef_search`` 64.
    """
    if kind == "ivfpq":
        nlist = max(1, min(round(4 * math.sqrt(count)), count // 39))
        return {"nlist": nlist, "m": _divisor_near(dim, dim / 4), "nbits": 4,
                "nprobe": min(nlist, max(16, nlist // 32))}
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 80, "ef_search": 64}
    return {}


def check_trainable(kind: Kind, count: int, params: dict) -> None:
    """Raise :class:`SourceError` when ``count`` vectors cannot train ``kind`` (IVF-PQ needs at
    least ``2 ** nbits`` of them, one per PQ centroid)."""
    if kind == "ivfpq" and count < 2 ** int(params["nbits"]):
        raise SourceError(f"{count} vectors are too few to train ivfpq (at least "
                          f"{2 ** int(params['nbits'])}): use --kind exact")


def factory_string(kind: Kind, params: dict) -> str:
    """The FAISS ``index_factory`` string of ``kind`` with ``params``."""
    if kind == "ivfpq":
        return f"IVF{params['nlist']},PQ{params['m']}x{params['nbits']}fsr"
    if kind == "hnsw":
        return f"HNSW{params['M']},Flat"
    return "Flat"


def new_index(kind: Kind, dim: int, params: dict):
    """An empty (untrained) FAISS index of ``kind``, inner-product metric."""
    import faiss

    index = faiss.index_factory(dim, factory_string(kind, params), faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index.hnsw.efConstruction = int(params["ef_construction"])
    return index


def _merge_top(best_s: np.ndarray, best_i: np.ndarray, scores: np.ndarray,
               ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Running top-k (k = ``best_s.shape[1]``) of ``best`` and a new block of scores."""
    k = best_s.shape[1]
    merged_s = np.concatenate([best_s, scores], axis=1)
    merged_i = np.concatenate([best_i, np.broadcast_to(ids, scores.shape)], axis=1)
    top = np.argpartition(-merged_s, k - 1, axis=1)[:, :k]
    return (np.take_along_axis(merged_s, top, 1), np.take_along_axis(merged_i, top, 1))


def _without_self(scores: np.ndarray, ids: np.ndarray, query_ids: np.ndarray,
                  k: int) -> list[list[int]]:
    """Per query, the ids of its ``k`` best other rows (best first)."""
    out = []
    for row_s, row_i, own in zip(scores, ids, query_ids):
        order = np.argsort(-row_s, kind="stable")
        out.append([int(i) for i in row_i[order] if i >= 0 and i != own][:k])
    return out


def recall_at(approx: list[list[int]], exact: list[list[int]]) -> float | None:
    """Mean fraction of each exact list found in the approximate one (None when empty)."""
    fractions = [len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact) if e]
    return float(np.mean(fractions)) if fractions else None


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="vec", desc=desc, disable=not enabled, dynamic_ncols=True)


def _staging_for(out: Path) -> Path:
    return out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:12]}"


def publish_folder(staging: Path, out: Path, *, overwrite: bool) -> None:
    """Rename the complete ``staging`` folder to ``out`` (files synced first).

    Raises:
        FileExistsError: ``out`` exists and not ``overwrite``.
    """
    fsync_dir_files(staging)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists: choose another --out or pass --overwrite")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)


def build_index(folders: Sequence[str | Path], out: str | Path, kind: Kind = "exact", *,
                params: dict | None = None, recall_queries: int = 500,
                max_train_rows: int = 65536, chunk_rows: int = 16384, seed: int = 0,
                overwrite: bool = False, progress: bool = True) -> IndexManifest:
    """Build an index of every vector in the embed folders ``folders`` and publish it at
    ``out``.

    Args:
        folders: finished ``cnn-codes embed`` outputs of one model version and layer.
        out: the index folder to create.
        kind: ``exact``, ``ivfpq`` or ``hnsw`` (see the module).
        params: overrides of :func:`default_params`.
        recall_queries: rows drawn at random whose 10 nearest other rows are compared with
            exact search (0 = skip; recall is then null).
        max_train_rows: at most this many vectors train IVF-PQ.
        chunk_rows: rows read and added at a time.
        seed: of the random draws (queries, training sample).
        overwrite: replace an existing index at ``out``.
        progress: progress bars on stderr.

    Returns:
        The manifest written.

    Raises:
        SourceError: see :func:`search.sources.open_sources`; or no row has a vector.
        FileExistsError: ``out`` exists and not ``overwrite``.
    """
    import faiss

    started = time.perf_counter()
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another --out or pass --overwrite")
    sources, counts, total = open_counted(folders, "to index")
    spec = sources[0].spec
    chosen = {**default_params(kind, total, spec.dim), **(params or {})}
    check_trainable(kind, total, chosen)
    rng = np.random.default_rng(seed)
    query_ids = np.sort(rng.choice(total, size=min(recall_queries, total), replace=False))
    train_ids = np.empty(0, np.int64)
    if kind == "ivfpq":
        train_ids = np.sort(rng.choice(total, size=min(max_train_rows, total), replace=False))
    index = new_index(kind, spec.dim, chosen)

    sample_ids = np.union1d(query_ids, train_ids)
    sample = gather_rows(sources, sample_ids, chunk_rows=chunk_rows) if len(sample_ids) else \
        np.empty((0, spec.dim), np.float32)
    queries = sample[np.searchsorted(sample_ids, query_ids)]
    if kind == "ivfpq":
        logger.info("training %s on %d vectors", factory_string(kind, chosen), len(train_ids))
        index.train(sample[np.searchsorted(sample_ids, train_ids)])
    del sample

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_for(out)
    staging.mkdir()
    try:
        k1 = min(RECALL_K + 1, total)
        best_s = np.full((len(queries), k1), -np.inf, np.float32)
        best_i = np.full((len(queries), k1), -1, np.int64)
        hashes = np.empty(total, np.int64)
        bar = _progress(total, f"index {kind}", progress)
        with open(staging / PATHS_FILE, "w", encoding="utf-8", newline="\n") as paths_file:
            for chunk in iter_chunks(sources, chunk_rows=chunk_rows):
                bad = next((p for p in chunk.paths if "\n" in p), None)
                if bad is not None:
                    raise SourceError(f"a path with a newline cannot be indexed: {bad!r}")
                paths_file.write("".join(f"{p}\n" for p in chunk.paths))
                hashes[chunk.start:chunk.start + len(chunk.paths)] = [hash(p) for p in chunk.paths]
                index.add(chunk.vectors)
                if len(queries):
                    ids = np.arange(chunk.start, chunk.start + len(chunk.vectors))
                    best_s, best_i = _merge_top(best_s, best_i, queries @ chunk.vectors.T, ids)
                bar.update(len(chunk.vectors))
        bar.close()
        if index.ntotal != total:
            raise SourceError(f"the embed folders changed while being read ({index.ntotal} "
                              f"vectors, {total} counted)")
        apply_search_params(index, kind, chosen)
        recall = None
        if len(queries) and total > 1:
            found_s, found_i = index.search(queries, k1)
            recall = recall_at(_without_self(found_s, found_i, query_ids, RECALL_K),
                               _without_self(best_s, best_i, query_ids, RECALL_K))
        faiss.write_index(index, str(staging / INDEX_FILE))
        index_bytes = (staging / INDEX_FILE).stat().st_size
        manifest = IndexManifest(
            model_name=spec.model_name, model_version=spec.model_version,
            onnx_sha256=spec.onnx_sha256, layer=spec.layer, source_dtype=spec.dtype,
            source_normalized=spec.normalize, dim=spec.dim, count=total,
            skipped=sum(c[1] for c in counts),
            duplicate_paths=int(total - len(np.unique(hashes))),
            kind=kind, factory=factory_string(kind, chosen), params=chosen,
            bytes_per_vector=round(index_bytes / total, 2), index_bytes=index_bytes,
            build_seconds=round(time.perf_counter() - started, 3),
            train_rows=len(train_ids), recall_at_10=None if recall is None else round(recall, 4),
            recall_queries=len(queries) if recall is not None else 0, seed=seed,
            faiss_version=faiss.__version__, build_id=uuid.uuid4().hex,
            sources=[_source_ref(s, c) for s, c in zip(sources, counts)])
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        publish_folder(staging, out, overwrite=overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("index %s: %d vectors (%s), recall@10 %s, %.1f s", out, total,
                manifest.factory, manifest.recall_at_10, manifest.build_seconds)
    return manifest


def _source_ref(source: EmbeddingSource, counts: tuple[int, int]) -> SourceRef:
    return SourceRef(path=str(source.folder), inputs_sha256=source.spec.inputs_sha256,
                     rows=source.spec.num_inputs, vectors=counts[0], errors=counts[1])
