"""Protocol-independent inference pipeline: pre (decode) / core (Encoder) / post.

HTTP routes and the gRPC front both call :class:`InferencePipeline`, so both protocols share
one decode path, one Encoder and therefore one adaptive batcher.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from cnn_codes.settings import Settings
from models.card import ModelCard
from service import metrics
from service.decode import DecodedBatch, decode_images
from service.runtime import split_outputs

EncodeFn = Callable[[np.ndarray], Awaitable[np.ndarray]]
logger = logging.getLogger(__name__)

try:  # BentoML's inter-service client is aiohttp; a broken connection surfaces as these
    from aiohttp import ClientConnectionError as _AiohttpConnectionError

    ConnectionError_: tuple[type[BaseException], ...] = (_AiohttpConnectionError,
                                                         ConnectionError)
except ImportError:  # pragma: no cover - aiohttp comes with BentoML
    ConnectionError_ = (ConnectionError,)


class RequestTooLarge(ValueError):
    """Too many images (or bytes) in one request; HTTP 413 / gRPC RESOURCE_EXHAUSTED."""


class EmptyRequest(ValueError):
    """A request without images; HTTP 400 / gRPC INVALID_ARGUMENT."""


@dataclass(frozen=True)
class PipelineResult:
    """Decoded request plus the model outputs of its decodable images.

    Attributes:
        decoded: positions and per-image errors (see :class:`service.decode.DecodedBatch`).
        outputs: ``{"logits": (M, K), "embedding": (M, D), "features": (M, C)}`` float32 for
            the M decodable images, in ``decoded.positions`` order; None when M == 0.
    """

    decoded: DecodedBatch
    outputs: dict[str, np.ndarray] | None


class InferencePipeline:
    """Decode -> batched inference -> outputs, for any protocol.

    Args:
        card: the served model's card (preprocessing, dims, classes).
        settings: limits (images per request, pixels) and ``max_batch_size``.
        encode: async call into the Encoder: ``(n, S, S, 3)`` uint8 -> ``(n, K+D+C)`` float32,
            with ``n <= settings.max_batch_size``.
    """

    def __init__(self, card: ModelCard, settings: Settings, encode: EncodeFn) -> None:
        self.card = card
        self.settings = settings
        self._encode = encode

    def check_count(self, count: int) -> None:
        """Raise :class:`EmptyRequest` / :class:`RequestTooLarge` for a bad image count."""
        if count == 0:
            raise EmptyRequest("no images: send one or more images")
        limit = self.settings.max_images_per_request
        if count > limit:
            raise RequestTooLarge(f"{count} images in one request; the limit is {limit}")

    async def encode_arrays(self, arrays: np.ndarray) -> dict[str, np.ndarray]:
        """``(M, S, S, 3)`` uint8 (already preprocessed) -> split outputs, in chunks that each
        fit one batch; the chunks go to the Encoder concurrently."""
        step = self.settings.max_batch_size
        chunks = [arrays[i:i + step] for i in range(0, len(arrays), step)]
        packed = await asyncio.gather(*(self._encode_once_more(chunk) for chunk in chunks))
        return split_outputs(np.concatenate([np.asarray(p) for p in packed]), self.card)

    async def _encode_once_more(self, chunk: np.ndarray) -> np.ndarray:
        """Call the Encoder; retry once when the connection to it broke (encoding has no side
        effects, so a repeat is safe). See the Encoder's ``runner_connection`` note."""
        try:
            return await self._encode(chunk)
        except ConnectionError_ as exc:
            logger.warning("Encoder connection failed (%s); retrying once", exc)
            return await self._encode(chunk)

    async def run(self, payloads: list[bytes], *, endpoint: str,
                  protocol: str = "http") -> PipelineResult:
        """Decode every payload on its own, encode the good ones, count them in metrics.

        Raises:
            EmptyRequest, RequestTooLarge: see :meth:`check_count`.
        """
        self.check_count(len(payloads))
        metrics.REQUEST_IMAGES.labels(endpoint=endpoint).observe(len(payloads))
        decoded = await asyncio.to_thread(decode_images, payloads, self.card.preprocessing,
                                          max_pixels=self.settings.max_image_pixels,
                                          min_side=self.settings.min_image_side)
        outputs = await self.encode_arrays(decoded.arrays) if len(decoded.arrays) else None
        self.count(endpoint, protocol, ok=len(decoded.positions), failed=len(decoded.errors))
        return PipelineResult(decoded=decoded, outputs=outputs)

    @staticmethod
    def count(endpoint: str, protocol: str, *, ok: int, failed: int) -> None:
        """Add to ``cnn_codes_images_total`` by endpoint, protocol and outcome."""
        if ok:
            metrics.IMAGES.labels(endpoint=endpoint, protocol=protocol, outcome="ok").inc(ok)
        if failed:
            metrics.IMAGES.labels(endpoint=endpoint, protocol=protocol,
                                  outcome="error").inc(failed)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, ``(N, K)`` -> ``(N, K)`` float64 probabilities summing to 1."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest per row, descending (ties: lower index first), ``(N, k)``."""
    return np.argsort(-probabilities, axis=1, kind="stable")[:, :k]


def l2_normalize(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero); ``(N, D)`` float32."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)
