"""Post stage of the HTTP routes: pipeline results -> ``/classify`` and ``/embed`` answers.

The numbers come from :mod:`models.postprocess` (softmax, top-k, L2, float16/base64), the same
functions batch jobs and export use.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.errors import ImageError
from models.postprocess import (VectorDType, VectorEncoding, encode_vector, prepare_vectors,
                                softmax)
from models.postprocess import top_k as top_k_indices
from service.pipeline import PipelineResult
from service.schemas import (ClassifyItem, ClassifyResponse, ClassScore, EmbedItem,
                             EmbedResponse, ItemError, Layer, ModelRef)


def item_error(error: ImageError | None) -> ItemError | None:
    """The response form of a per-image error (None stays None)."""
    return None if error is None else ItemError(code=error.code, message=error.message)


def _ref(result: PipelineResult) -> ModelRef:
    card = result.card
    return ModelRef(name=card.name, version=card.version, backbone=card.backbone)


def classify_response(result: PipelineResult, filenames: Sequence[str | None], *,
                      top_k: int) -> ClassifyResponse:
    """Top-``k`` classes with softmax probabilities per image, in request order.

    Args:
        result: the pipeline's outcome for the request.
        filenames: the client's file name per image (None when unknown).
        top_k: classes per image (clamped to the number of classes K).
    """
    card = result.card
    k = min(top_k, len(card.class_names))
    rows: dict[int, list[ClassScore]] = {}
    if result.outputs is not None:
        probs = softmax(result.outputs["logits"])
        for row, (position, order) in enumerate(zip(result.decoded.positions,
                                                    top_k_indices(probs, k))):
            rows[position] = [ClassScore(label=card.class_names[c], index=int(c),
                                         probability=float(probs[row, c])) for c in order]
    results = [ClassifyItem(index=i, filename=name, predictions=rows.get(i),
                            error=item_error(result.decoded.errors.get(i)))
               for i, name in enumerate(filenames)]
    return ClassifyResponse(model=_ref(result), top_k=k, results=results)


def embed_response(result: PipelineResult, filenames: Sequence[str | None], *, layer: Layer,
                   normalize: bool, dtype: VectorDType,
                   encoding: VectorEncoding) -> EmbedResponse:
    """CNN codes per image, in request order.

    Args:
        result: the pipeline's outcome for the request.
        filenames: the client's file name per image (None when unknown).
        layer: ``embedding`` (penultimate layer, D) or ``features`` (pooled conv output, C).
        normalize: L2-normalise each vector.
        dtype: ``float32`` or ``float16``.
        encoding: ``list`` (JSON numbers) or ``base64`` (little-endian bytes).
    """
    vectors: dict[int, list[float] | str] = {}
    if result.outputs is not None:
        matrix = prepare_vectors(result.outputs[layer], normalize=normalize, dtype=dtype)
        for row, position in enumerate(result.decoded.positions):
            vectors[position] = encode_vector(matrix[row], encoding)
    results = [EmbedItem(index=i, filename=name, embedding=vectors.get(i),
                         error=item_error(result.decoded.errors.get(i)))
               for i, name in enumerate(filenames)]
    return EmbedResponse(model=_ref(result), layer=layer, dim=result.card.dim(layer),
                         dtype=dtype, encoding=encoding, normalized=normalize, results=results)
