"""Response schemas of the HTTP API (they appear in the OpenAPI document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from models.postprocess import VectorDType, VectorEncoding

Layer = Literal["embedding", "features"]


class ItemError(BaseModel):
    """Why one image of a request has no result.

    ``code`` is stable: one of the per-image codes of the error table (:mod:`models.errors`):
    ``empty``, ``not_an_image``, ``truncated``, ``too_many_pixels``, ``unsupported_format``,
    ``too_small``, ``too_large``, ``decode_failed``.
    """

    code: str
    message: str


class ModelRef(BaseModel):
    """The model that produced a response."""

    name: str
    version: int
    backbone: str


class ClassScore(BaseModel):
    """One of the top-k classes: label, class index, softmax probability in [0, 1]."""

    label: str
    index: int
    probability: float


class ClassifyItem(BaseModel):
    """Result for the image at ``index`` in the request: ``predictions`` or ``error``."""

    index: int
    filename: str | None = None
    predictions: list[ClassScore] | None = None
    error: ItemError | None = None


class ClassifyResponse(BaseModel):
    """``POST /classify`` response: one item per image, in request order."""

    model: ModelRef
    top_k: int
    results: list[ClassifyItem]


class EmbedItem(BaseModel):
    """Result for the image at ``index``: the ``dim``-long vector, or ``error``.

    ``embedding`` is a JSON list of numbers (``encoding=list``) or the base64 of the vector's
    little-endian bytes (``encoding=base64``; decode with
    ``numpy.frombuffer(base64.b64decode(s), dtype="<f4" or "<f2")``).
    """

    index: int
    filename: str | None = None
    embedding: list[float] | str | None = None
    error: ItemError | None = None


class EmbedResponse(BaseModel):
    """``POST /embed`` response: CNN codes, one item per image, in request order."""

    model: ModelRef
    layer: Layer
    dim: int = Field(description="length of every vector")
    dtype: VectorDType = "float32"
    encoding: VectorEncoding = "list"
    normalized: bool = Field(description="vectors are L2-normalised")
    results: list[EmbedItem]
