"""The manifest of an index folder: what the vectors are, where they came from, how good the
index is. Written by :mod:`search.build`, read by every user of the index.

Torch-free and FAISS-free (pydantic only), so reading a manifest costs nothing.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
PATHS_FILE = "paths.txt"

Kind = Literal["exact", "ivfpq", "hnsw"]
KINDS: tuple[str, ...] = ("exact", "ivfpq", "hnsw")


class SourceRef(BaseModel):
    """One ``cnn-codes embed`` output folder an index was built from.

    Attributes:
        path: the folder (absolute).
        inputs_sha256: its job's input-list hash (``_job.json``).
        rows: rows in the folder; vectors: rows with a vector (indexed); errors: error rows
            (images that failed to embed: not indexed).
    """

    path: str
    inputs_sha256: str
    rows: int
    vectors: int
    errors: int


class IndexManifest(BaseModel):
    """``INDEX/manifest.json``.

    Attributes:
        model_name, model_version, onnx_sha256: the published model whose codes are indexed;
            the index answers only for this version (codes of two versions are never
            compared).
        layer: ``embedding`` or ``features``.
        source_dtype: value type of the Parquet vectors (``float32`` / ``float16``).
        source_normalized: whether the Parquet vectors were L2-normalised by the job.
        normalized: the indexed vectors are unit length (always: they are normalised here when
            the job did not), so inner product = cosine.
        metric: ``cosine`` (scores are cosine similarities in [-1, 1]; approximate for
            ``ivfpq``, whose codes are compressed).
        dim: values per vector.
        count: vectors in the index (= rows of ``paths.txt``).
        skipped: error rows of the sources (no vector, not indexed).
        duplicate_paths: paths that appear in more than one row (several sources naming the
            same file; each row is indexed).
        kind: ``exact`` (flat inner product), ``ivfpq`` (inverted file + product quantisation
            of the residuals, 4-bit fast-scan codes) or ``hnsw`` (graph over the full
            vectors).
        factory: the FAISS ``index_factory`` string.
        params: the kind's parameters (``nlist``, ``m``, ``nbits``, ``nprobe``; ``M``,
            ``ef_construction``, ``ef_search``), search-time ones included.
        bytes_per_vector: index file bytes / count.
        index_bytes: size of ``index.faiss``.
        build_seconds: wall time of the build.
        train_rows: vectors the index was trained on (``ivfpq``; 0 for the others).
        recall_at_10: mean fraction of the 10 exact nearest neighbours (by cosine, the query's
            own row excluded) that the index returns among its first 10, over
            ``recall_queries`` rows drawn at random (seed ``seed``); 1.0 for ``exact`` up to
            ties.
        recall_queries: queries of that measurement.
        faiss_version: the FAISS that built it.
        build_id: unique per build (readers check it did not change while they read).
        sources: the embed folders, in order (row order follows them).
        created_at: UTC build time.
    """

    schema_version: Literal[1] = 1
    model_name: str
    model_version: int = Field(ge=1)
    onnx_sha256: str
    layer: Literal["embedding", "features"]
    source_dtype: Literal["float32", "float16"] = "float32"
    source_normalized: bool
    normalized: bool = True
    metric: Literal["cosine"] = "cosine"
    dim: int = Field(ge=1)
    count: int = Field(ge=1)
    skipped: int = Field(ge=0)
    duplicate_paths: int = Field(default=0, ge=0)
    kind: Kind
    factory: str
    params: dict[str, int | float | str] = Field(default_factory=dict)
    bytes_per_vector: float
    index_bytes: int
    build_seconds: float
    train_rows: int = 0
    recall_at_10: float | None
    recall_queries: int
    seed: int = 0
    faiss_version: str
    build_id: str
    sources: list[SourceRef]
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def model_ref(self) -> str:
        """``name:version`` of the model whose codes are indexed."""
        return f"{self.model_name}:{self.model_version}"

    def problems_with(self, name: str, version: int, onnx_sha256: str,
                      dims: dict[str, int] | None = None) -> list[str]:
        """Why this index cannot answer for the model ``name:version`` (empty = it can).

        Args:
            name, version, onnx_sha256: the model (e.g. the served card's).
            dims: the model's output widths by name, to check this index's layer.
        """
        problems = []
        if (name, version) != (self.model_name, self.model_version):
            problems.append(f"the index was built with {self.model_ref}, the model is "
                            f"{name}:{version}")
        elif onnx_sha256 != self.onnx_sha256:
            problems.append(f"{name}:{version} has ONNX sha256 {onnx_sha256[:12]}..., the index "
                            f"was built from {self.onnx_sha256[:12]}...")
        if dims is not None and dims.get(self.layer) != self.dim:
            problems.append(f"the index holds {self.dim}-d {self.layer} codes, the model's "
                            f"{self.layer} has {dims.get(self.layer)} values")
        return problems

    def public(self) -> dict[str, Any]:
        """JSON-serialisable form (``GET /metadata``'s ``index``)."""
        return self.model_dump(mode="json")


def read_manifest(folder: str | Path) -> IndexManifest:
    """The manifest of the index folder ``folder``.

    Raises:
        FileNotFoundError: no ``manifest.json`` there (not an index folder).
        pydantic.ValidationError: a damaged manifest.
    """
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an index folder: no {MANIFEST_FILE} "
                                "(build one with cnn-codes index build)")
    return IndexManifest.model_validate_json(path.read_bytes())
