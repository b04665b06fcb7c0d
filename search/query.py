"""Query an index folder with image files: embed them with the index's model version, search.

The one query path of image files against an index: ``cnn-codes index query`` prints its
results as JSON and ``cnn-codes viz neighbours`` draws them. The images are embedded by
:class:`batch.job.ShardEmbedder` (the batch jobs' decode and onnxruntime run, so a query sees
exactly what the indexed images went through), with the model version the index was built
from, resolved and verified in the model repository.

Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from models.decode import DecodeLimits
from models.repository import ModelIntegrityError, PublishedModel, resolve
from models.runtime import SessionConfig
from search.index import Neighbor, SearchIndex


@dataclass(frozen=True)
class QueryResult:
    """The answer for one query image.

    Attributes:
        image: the query path, as given.
        neighbors: its nearest indexed images, nearest first (None when it failed).
        error: ``(code, message)`` of :mod:`models.errors` when the image could not be used
            (``unreadable``, ``not_an_image``...), else None.
    """

    image: str
    neighbors: list[Neighbor] | None
    error: tuple[str, str] | None

    def as_dict(self) -> dict:
        """``{"image", "neighbors": [{"rank", "path", "score", ...}] | None,
        "error": {"code", "message"} | None}``."""
        return {"image": self.image,
                "neighbors": None if self.neighbors is None
                else [n.as_dict() for n in self.neighbors],
                "error": None if self.error is None
                else {"code": self.error[0], "message": self.error[1]}}


@dataclass(frozen=True)
class IndexWithModel:
    """An opened index and the verified model version its codes came from.

    Attributes:
        index: the loaded index folder.
        model: the published model the index's manifest names (sha256 and dims checked).
    """

    index: SearchIndex
    model: PublishedModel

    @classmethod
    def open(cls, index_dir: str | Path, repository: str | Path) -> "IndexWithModel":
        """Load ``index_dir`` and resolve its model version in ``repository``.

        Raises:
            FileNotFoundError: not an index folder.
            search.index.IndexDamagedError: the index files disagree with the manifest.
            models.repository.ModelNotFoundError: the index's model version is not published
                in ``repository``.
            models.repository.ModelIntegrityError: that version fails verification, or differs
                from the one the index was built with (ONNX sha256, output dims).
        """
        index = SearchIndex.open(index_dir)
        manifest = index.manifest
        model = resolve(repository, manifest.model_name, manifest.model_version)
        card = model.card
        problems = manifest.problems_with(card.name, card.version, card.onnx_sha256,
                                          {o.name: o.shape[-1] for o in card.outputs})
        if problems:
            raise ModelIntegrityError("; ".join(problems))
        return cls(index=index, model=model)

    def query(self, images: Sequence[str], k: int, *, limits: DecodeLimits | None = None,
              session_config: SessionConfig = SessionConfig()) -> list[QueryResult]:
        """The ``k`` nearest indexed images of each image file.

        Args:
            images: image file paths (read as regular files under ``limits``).
            k: neighbours per image (at most the index's count).
            limits: per-image decode limits (default :meth:`DecodeLimits.default`).
            session_config: onnxruntime providers and threads.

        Returns:
            One :class:`QueryResult` per image, in order; an image that cannot be used is a
            result with ``error``, never an exception. Scores are cosine similarities.
        """
        from batch.job import ShardEmbedder, make_spec

        images = [str(p) for p in images]
        if not images:
            return []
        manifest = self.index.manifest
        spec = make_spec(self.model, images, layer=manifest.layer, normalize=True,
                         shard_size=len(images))
        embedder = ShardEmbedder(self.model, spec, limits=limits or DecodeLimits.default(),
                                 session_config=session_config)
        try:
            vectors, errors = embedder.embed(images)
        finally:
            embedder.close()
        good = [i for i, e in enumerate(errors) if e is None]
        found = dict(zip(good, self.index.search(vectors[good], k))) if good else {}
        return [QueryResult(image=image, neighbors=found.get(i), error=errors[i])
                for i, image in enumerate(images)]
