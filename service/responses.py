"""Post stage of the HTTP routes: pipeline results -> ``/classify`` and ``/embed`` answers.

The numbers come from :mod:`models.postprocess` (softmax, top-k, L2, float16/base64), the same
functions batch jobs and export use. An answer is built as a plain JSON document whose fields
are those of the declared response models (:class:`service.schemas.ClassifyResponse`,
:class:`service.schemas.EmbedResponse`, in their field order; a contract test checks every
variant against them), with each CNN code kept as its numpy row, and written once by
:func:`models.postprocess.json_bytes`. Building the pydantic model from Python floats and
dumping it cost 253-291 us of CPU per one-image ``/embed`` answer against 49-51 us this way
(README "Performance", "The answer written from numpy"), about a fifth of the HTTP event
loop's CPU per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from models.errors import ImageError
from models.postprocess import (VectorDType, VectorEncoding, encode_vector, json_bytes,
                                prepare_vectors, softmax)
from models.postprocess import top_k as top_k_indices
from service.pipeline import PipelineResult
from service.schemas import Layer

Document = dict[str, Any]


def item_error(error: ImageError | None) -> dict[str, str] | None:
    """The response form of a per-image error, :class:`service.schemas.ItemError`'s fields
    (None stays None)."""
    return None if error is None else {"code": error.code, "message": error.message}


def _ref(result: PipelineResult) -> dict[str, Any]:
    """:class:`service.schemas.ModelRef`'s fields."""
    card = result.card
    return {"name": card.name, "version": card.version, "backbone": card.backbone}


def classify_document(result: PipelineResult, filenames: Sequence[str | None], *,
                      top_k: int) -> Document:
    """Top-``k`` classes with softmax probabilities per image, in request order: the fields of
    :class:`service.schemas.ClassifyResponse`.

    Args:
        result: the pipeline's outcome for the request.
        filenames: the client's file name per image (None when unknown).
        top_k: classes per image (clamped to the number of classes K).
    """
    card = result.card
    k = min(top_k, len(card.class_names))
    rows: dict[int, list[dict[str, Any]]] = {}
    if result.outputs is not None:
        probs = softmax(result.outputs["logits"])
        for row, (position, order) in enumerate(zip(result.decoded.positions,
                                                    top_k_indices(probs, k))):
            rows[position] = [{"label": card.class_names[c], "index": int(c),
                               "probability": float(probs[row, c])} for c in order]
    errors = result.decoded.errors
    results = [{"index": i, "filename": name, "predictions": rows.get(i),
                "error": item_error(errors.get(i))} for i, name in enumerate(filenames)]
    return {"model": _ref(result), "top_k": k, "results": results}


def embed_document(result: PipelineResult, filenames: Sequence[str | None], *, layer: Layer,
                   normalize: bool, dtype: VectorDType, encoding: VectorEncoding) -> Document:
    """CNN codes per image, in request order: the fields of
    :class:`service.schemas.EmbedResponse`, each ``embedding`` a ``(dim,)`` ndarray of
    ``dtype`` (``encoding=list``, written as JSON numbers by
    :func:`models.postprocess.json_bytes`) or a base64 string.

    Args:
        result: the pipeline's outcome for the request.
        filenames: the client's file name per image (None when unknown).
        layer: ``embedding`` (penultimate layer, D) or ``features`` (pooled conv output, C).
        normalize: L2-normalise each vector.
        dtype: ``float32`` or ``float16``.
        encoding: ``list`` (JSON numbers) or ``base64`` (little-endian bytes).
    """
    vectors: dict[int, Any] = {}
    if result.outputs is not None:
        matrix = prepare_vectors(result.outputs[layer], normalize=normalize, dtype=dtype)
        for row, position in enumerate(result.decoded.positions):
            vectors[position] = encode_vector(matrix[row], encoding)
    errors = result.decoded.errors
    results = [{"index": i, "filename": name, "embedding": vectors.get(i),
                "error": item_error(errors.get(i))} for i, name in enumerate(filenames)]
    return {"model": _ref(result), "layer": layer, "dim": result.card.dim(layer),
            "dtype": dtype, "encoding": encoding, "normalized": normalize, "results": results}


#: the post stage of each endpoint
DOCUMENTS = {"classify": classify_document, "embed": embed_document}


def answer_json(endpoint: str, result: PipelineResult, filenames: Sequence[str | None],
                **options: Any) -> bytes:
    """The JSON answer (UTF-8 bytes) of ``endpoint`` (``classify`` or ``embed``) for
    ``result``, with the route's validated ``options``.

    Raises:
        KeyError: an unknown endpoint.
    """
    return json_bytes(DOCUMENTS[endpoint](result, filenames, **options))
