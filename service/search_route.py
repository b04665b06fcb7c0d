"""``POST /search``: the k nearest indexed images of each query image (or vector), and the
holder of the index an API worker answers from.

Queries go through the service's one pipeline (:class:`service.pipeline.InferencePipeline`:
the same decode, limits, Encoder and batcher as ``/embed``; the Gateway gives ``/search`` the
same three input forms), then their codes are looked up in a FAISS index built by
``cnn-codes index build`` (:mod:`search`).

**An index answers only for the model version it was built with** (name, version and ONNX
sha256 of the served card; layer width): the codes of two versions are never compared.

* At start-up (setting ``index``) an index of another version is a start-up error naming both
  versions (:class:`IndexMismatchError`): the service does not start.
* After a hot reload to another version (``/admin/reload``, an alias poll), ``/search``
  answers **409** ``index_mismatch`` naming both versions, and checks the index folder again
  on every such request: as soon as the folder holds an index of the served version (built
  with ``cnn-codes index build --out <the same folder> --overwrite``, published atomically),
  it is loaded and ``/search`` answers again. An index of another version on disk is never
  loaded (the one in memory keeps answering while it matches).
* An index replaced on disk for the same version is picked up within ``reload_poll_s``
  (loaded in the background; the old one answers meanwhile).
* ``{"vectors": ...}`` queries are answered under the same rule, and a request naming a
  ``model_version`` other than the index's is refused with ``index_mismatch``.

Every answer names the model and the index it came from. The Open Inference Protocol has no
search RPC: gRPC is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, Field

from models.card import ModelCard
from models.errors import RequestError
from models.postprocess import prepare_vectors
from service import metrics
from service.bentoml_compat import client_filename
from service.responses import item_error
from service.schemas import ItemError, Layer, ModelRef

if TYPE_CHECKING:
    from search.index import SearchIndex

logger = logging.getLogger(__name__)


class Neighbor(BaseModel):
    """One indexed image near the query: rank (1 = nearest), its row in the index (what
    ``GET /thumbnails/{row}`` takes), its path as indexed, cosine similarity in [-1, 1]
    (approximate for ``ivfpq`` indexes)."""

    rank: int
    row: int = Field(description="row of the index (GET /thumbnails/{row})")
    path: str
    score: float


class SearchItem(BaseModel):
    """Result for the query at ``index`` in the request: ``neighbors`` or ``error``."""

    index: int
    filename: str | None = None
    neighbors: list[Neighbor] | None = None
    error: ItemError | None = None


class IndexRef(BaseModel):
    """The index that answered: the model version its codes come from, kind, size."""

    model_name: str
    model_version: int
    layer: Layer
    kind: str
    count: int = Field(description="indexed images")
    dim: int
    build_id: str


class SearchResponse(BaseModel):
    """``POST /search`` response: one item per query, in request order."""

    model: ModelRef
    index: IndexRef
    k: int = Field(description="neighbours per query (at most the index's count)")
    results: list[SearchItem]


class IndexMismatchError(RuntimeError):
    """At start-up: the index holds codes of another model version than the one served."""


def _card_problems(index: "SearchIndex", card: ModelCard) -> list[str]:
    return index.manifest.problems_with(card.name, card.version, card.onnx_sha256,
                                        {o.name: o.shape[-1] for o in card.outputs})


def _signature(folder: Path) -> tuple[int, int, int] | None:
    from search.manifest import MANIFEST_FILE

    try:
        info = (folder / MANIFEST_FILE).stat()
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


class IndexHolder:
    """The index an API worker answers ``/search`` from (see the module for the rules).

    Args:
        folder: the index folder (setting ``index``); None = search is off.
        poll_s: how often, seconds, a matching index is checked for a newer build on disk
            (0 = only when versions differ).
    """

    def __init__(self, folder: Path | None, poll_s: float = 5.0) -> None:
        self.folder = folder
        self.poll_s = poll_s
        self._index: SearchIndex | None = None
        self._signature: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._lock = asyncio.Lock()
        self._background: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        """Whether an index folder is configured."""
        return self.folder is not None

    @property
    def index(self) -> "SearchIndex | None":
        """The loaded index (None before :meth:`load_for`)."""
        return self._index

    def _install(self, index: "SearchIndex", signature) -> None:
        self._index, self._signature = index, signature
        metrics.INDEX_VECTORS.set(index.manifest.count)
        metrics.INDEX_BYTES.set(index.nbytes)
        logger.info("search index %s: %d %s vectors of %s (%s, build %s)", index.folder,
                    index.manifest.count, index.manifest.layer, index.manifest.model_ref,
                    index.manifest.factory, index.manifest.build_id)

    def load_for(self, card: ModelCard) -> None:
        """Load the configured index at start-up; it must match ``card``.

        Raises:
            IndexMismatchError: it holds codes of another model version (both are named).
            FileNotFoundError, search.index.IndexDamagedError: no or a damaged index.
        """
        if self.folder is None:
            return
        import faiss

        from search.index import SearchIndex

        faiss.omp_set_num_threads(1)  # queries are few per request; the cores are the model's
        signature = _signature(self.folder)
        index = SearchIndex.open(self.folder)
        problems = _card_problems(index, card)
        if problems:
            raise IndexMismatchError(
                f"index {self.folder} cannot answer for the served model {card.name}:"
                f"{card.version}: {'; '.join(problems)}. Build an index of version "
                f"{card.version} (cnn-codes embed ... --model {card.name}:{card.version}, then "
                f"cnn-codes index build ... --out {self.folder} --overwrite) or serve "
                f"{index.manifest.model_ref}")
        self._install(index, signature)

    def mismatch(self, card: ModelCard) -> RequestError:
        """The ``index_mismatch`` error for a request served by ``card``."""
        index = self._index
        loaded = index.manifest.model_ref if index is not None else "nothing"
        problems = _card_problems(index, card) if index is not None else []
        return RequestError(
            "index_mismatch",
            f"the search index holds codes of {loaded}, the service now serves {card.name}:"
            f"{card.version} ({'; '.join(problems) or 'no index loaded'}); /search answers "
            f"again once {self.folder} holds an index of version {card.version}",
            details={"index_model": loaded, "served_model": f"{card.name}:{card.version}"})

    async def for_card(self, card: ModelCard) -> "SearchIndex":
        """The index to answer a request served by ``card`` with.

        Raises:
            RequestError: ``not_found`` (search is off) or ``index_mismatch``.
        """
        if self.folder is None:
            raise RequestError("not_found", "search is off: start the service with "
                                            "CNN_CODES_INDEX=<folder of cnn-codes index build>")
        index = self._index
        if index is None or _card_problems(index, card):
            await self._refresh(card)
            index = self._index
            if index is None or _card_problems(index, card):
                raise self.mismatch(card)
        elif self.poll_s > 0 and time.monotonic() - self._checked >= self.poll_s and \
                not self._lock.locked():
            self._checked = time.monotonic()
            self._background = asyncio.create_task(self._refresh(card))
        return index

    async def _refresh(self, card: ModelCard) -> None:
        """Load the folder's index if it changed on disk and matches ``card``."""
        from search.index import SearchIndex
        from search.manifest import read_manifest

        assert self.folder is not None
        async with self._lock:
            self._checked = time.monotonic()
            signature = _signature(self.folder)
            if signature is None or signature == self._signature:
                return
            try:
                manifest = await asyncio.to_thread(read_manifest, self.folder)
                if manifest.problems_with(card.name, card.version, card.onnx_sha256):
                    return  # an index of another version: never loaded for this one
                index = await asyncio.to_thread(SearchIndex.open, self.folder)
            except Exception:  # a half-replaced or damaged folder: keep what is loaded
                logger.exception("could not load the search index at %s", self.folder)
                return
            if not _card_problems(index, card):
                self._install(index, signature)

    def describe(self, card: ModelCard) -> dict[str, Any] | None:
        """``/metadata``'s ``index``: the manifest, the folder and whether it answers for
        ``card`` now; None when search is off."""
        if self.folder is None:
            return None
        index = self._index
        if index is None:
            return {"folder": str(self.folder), "answers": False}
        return {**index.manifest.public(), "folder": str(self.folder),
                "answers": not _card_problems(index, card)}


def _query_vectors(vectors: list[list[float]], index: "SearchIndex", limit: int) -> np.ndarray:
    """Client vectors as ``(n, dim)`` float32, or a ``bad_request`` / ``too_many_images``."""
    if not vectors:
        raise RequestError("no_images", "vectors is empty: send one or more vectors")
    if len(vectors) > limit:
        raise RequestError("too_many_images",
                           f"{len(vectors)} vectors in one request; the limit is {limit}")
    dim = index.manifest.dim
    bad = next((i for i, v in enumerate(vectors) if len(v) != dim), None)
    if bad is not None:
        raise RequestError("bad_request", f"vectors[{bad}] has {len(vectors[bad])} values; the "
                                          f"index holds {dim}-d {index.manifest.layer} codes")
    array = np.asarray(vectors, dtype=np.float32)
    if not np.isfinite(array).all():
        raise RequestError("bad_request", "vectors must be finite numbers")
    zero = np.flatnonzero(~np.any(array != 0, axis=1))
    if len(zero):
        raise RequestError("bad_request", f"vectors[{int(zero[0])}] is all zeros (no direction)")
    return array


async def search(service: Any, images: list[Path] | None, vectors: list[list[float]] | None,
                 k: int, model_version: int | None) -> SearchResponse:
    """Answer ``POST /search`` for the ``CNNCodes`` instance ``service``.

    Raises:
        RequestError: ``not_found`` (no index configured), ``bad_request`` (images and vectors
            both, or bad vectors), ``no_images``, ``too_many_images``, ``index_mismatch``.
    """
    holder: IndexHolder = service.index
    card = service.holder.card
    index = await holder.for_card(card)  # refuse before any inference
    if images and vectors is not None:
        raise RequestError("bad_request", "send images or vectors, not both")
    if images:
        pipeline = service.pipeline
        pipeline.check_count(len(images))
        payloads = await asyncio.to_thread(lambda: [p.read_bytes() for p in images])
        result = await pipeline.run(payloads, endpoint="search")
        card = result.card  # the version the codes came from
        index = await holder.for_card(card)
        positions, errors = result.decoded.positions, result.decoded.errors
        queries = None if result.outputs is None else \
            prepare_vectors(result.outputs[index.manifest.layer], normalize=True)
        filenames = [client_filename(p) for p in images]
    elif vectors is not None:
        if model_version is not None and model_version != index.manifest.model_version:
            raise RequestError(
                "index_mismatch", f"the vectors are codes of version {model_version}, the "
                f"index holds codes of {index.manifest.model_ref}",
                details={"index_model": index.manifest.model_ref,
                         "served_model": f"{card.name}:{card.version}"})
        queries = _query_vectors(vectors, index, service.settings.max_images_per_request)
        positions, errors = list(range(len(queries))), {}
        filenames = [None] * len(queries)
    else:
        raise RequestError("no_images", "no images and no vectors: send images (as for "
                                        '/embed) or a JSON body {"vectors": [[...]], "k": 10}')
    found: dict[int, list] = {}
    if queries is not None and len(positions):
        started = time.perf_counter()
        neighbours = await asyncio.to_thread(index.search, queries, k)
        metrics.SEARCH_SECONDS.observe(time.perf_counter() - started)
        found = dict(zip(positions, neighbours))
    results = [SearchItem(index=i, filename=name,
                          neighbors=None if i not in found else
                          [Neighbor(rank=n.rank, row=n.row, path=n.path, score=n.score)
                           for n in found[i]],
                          error=item_error(errors.get(i)))
               for i, name in enumerate(filenames)]
    manifest = index.manifest
    return SearchResponse(
        model=ModelRef(name=card.name, version=card.version, backbone=card.backbone),
        index=IndexRef(model_name=manifest.model_name, model_version=manifest.model_version,
                       layer=manifest.layer, kind=manifest.kind, count=manifest.count,
                       dim=manifest.dim, build_id=manifest.build_id),
        k=min(k, manifest.count), results=results)
