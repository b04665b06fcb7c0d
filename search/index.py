"""An opened index folder: k nearest neighbours by cosine, with the paths of the rows.

Used by ``cnn-codes index query`` and the service's ``POST /search``. Queries are CNN codes of
the index's model version and layer; they are L2-normalised here (the index holds unit
vectors), so a score is the cosine similarity (approximate for ``ivfpq``).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.postprocess import l2_normalize
from search.manifest import INDEX_FILE, MANIFEST_FILE, PATHS_FILE, IndexManifest, read_manifest


class IndexDamagedError(ValueError):
    """An index folder whose files disagree with its manifest."""


@dataclass(frozen=True)
class Neighbor:
    """One neighbour: its rank (1 = nearest), its row in the index (``paths.txt`` line, what
    the service's ``GET /thumbnails/{row}`` takes), its path, its cosine similarity to the
    query."""

    rank: int
    row: int
    path: str
    score: float

    def as_dict(self) -> dict:
        """``{"rank", "row", "path", "score"}``."""
        return {"rank": self.rank, "row": self.row, "path": self.path, "score": self.score}


class PathTable:
    """Row -> path of ``paths.txt`` (one path per line), memory-mapped: only the line offsets
    (8 bytes per row) live in memory, a path is decoded when asked for."""

    SCAN_BYTES = 1 << 26  # the newlines are found 64 MiB at a time

    def __init__(self, path: str | Path) -> None:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        view = np.frombuffer(self._map, dtype=np.uint8) if size else np.empty(0, np.uint8)
        ends = np.concatenate([np.empty(0, np.int64)] + [
            np.flatnonzero(view[start:start + self.SCAN_BYTES] == 10).astype(np.int64) + start
            for start in range(0, size, self.SCAN_BYTES)])
        self._ends = ends
        self._starts = np.concatenate([np.zeros(min(1, len(ends)), np.int64), ends[:-1] + 1])
        self.nbytes = size

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, row: int) -> str:
        return bytes(self._map[self._starts[row]:self._ends[row]]).decode("utf-8")


def apply_search_params(index, kind: str, params: dict) -> None:
    """Set the search-time parameters of ``params`` on a FAISS ``index`` of ``kind``
    (``nprobe`` of IVF, ``ef_search`` of HNSW)."""
    import faiss

    if kind == "ivfpq" and "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif kind == "hnsw" and "ef_search" in params:
        index.hnsw.efSearch = int(params["ef_search"])


class SearchIndex:
    """An index folder loaded in memory. Thread-safe for concurrent searches.

    Attributes:
        folder: where it was loaded from.
        manifest: its manifest.
        paths: row -> path.
    """

    def __init__(self, folder: Path, manifest: IndexManifest, index, paths: PathTable) -> None:
        self.folder = folder
        self.manifest = manifest
        self._index = index
        self.paths = paths

    @classmethod
    def open(cls, folder: str | Path) -> "SearchIndex":
        """Load the index folder ``folder``.

        The manifest is read before and after the index and the paths: if it changed (the
        folder was replaced by a new build meanwhile), the load starts again, so the three
        files always come from one build.

        Raises:
            FileNotFoundError: not an index folder.
            IndexDamagedError: the index or path table does not match the manifest.
        """
        import faiss

        folder = Path(folder)
        for _ in range(5):
            manifest = read_manifest(folder)
            index = faiss.read_index(str(folder / INDEX_FILE))
            paths = PathTable(folder / PATHS_FILE)
            if read_manifest(folder).build_id == manifest.build_id:
                break
        else:
            raise IndexDamagedError(f"{folder} kept changing while being loaded")
        if index.ntotal != manifest.count or len(paths) != manifest.count or \
                index.d != manifest.dim:
            raise IndexDamagedError(
                f"{folder} is damaged: {MANIFEST_FILE} says {manifest.count} vectors of "
                f"{manifest.dim} values, {INDEX_FILE} has {index.ntotal} of {index.d}, "
                f"{PATHS_FILE} {len(paths)} rows")
        apply_search_params(index, manifest.kind, manifest.params)
        return cls(folder, manifest, index, paths)

    @property
    def nbytes(self) -> int:
        """Bytes of the index file plus the path table (what a search process holds)."""
        return self.manifest.index_bytes + self.paths.nbytes

    def search_ids(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS search of unit-normalised ``vectors``: ``(scores, ids)``, each
        ``(n, min(k, count))``; ids of missing results are -1."""
        queries = l2_normalize(np.asarray(vectors, dtype=np.float32))
        k = max(1, min(int(k), self.manifest.count))
        return self._index.search(np.ascontiguousarray(queries), k)

    def search(self, vectors: np.ndarray, k: int) -> list[list[Neighbor]]:
        """The ``k`` nearest indexed rows of each query, nearest first.

        Args:
            vectors: ``(n, dim)`` CNN codes of the index's model version and layer (any
                scale: they are L2-normalised here).
            k: neighbours per query (at most the index's count).

        Raises:
            ValueError: ``vectors`` is not ``(n, dim)``.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.manifest.dim:
            raise ValueError(f"queries must be (n, {self.manifest.dim}), got {vectors.shape}")
        scores, ids = self.search_ids(vectors, k)
        return [[Neighbor(rank=rank + 1, row=int(i), path=self.paths[int(i)],
                          score=round(float(min(1.0, max(-1.0, s))), 6))
                 for rank, (s, i) in enumerate((s, i) for s, i in zip(row_s, row_i) if i >= 0)]
                for row_s, row_i in zip(scores, ids)]
