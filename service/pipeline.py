"""Protocol-independent inference pipeline: pre (decode) / core (Encoder) / post.

HTTP routes and the Open Inference Protocol front (gRPC and ``/v2``) both call
:class:`InferencePipeline`, so every protocol shares one decode path
(:func:`models.decode.decode_batch`), one Encoder and therefore one adaptive batcher.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence

import numpy as np

from cnn_codes.settings import Settings
from models.card import ModelCard
from models.decode import DecodedBatch, DecodeLimits, decode_batch
from models.errors import RequestError
from models.preprocessing import PreprocessSpec
from models.runtime import split_outputs
from service import metrics

if TYPE_CHECKING:
    from service.batcher import LoneSlot
    from service.served import ModelHolder

EncodeFn = Callable[[np.ndarray], Awaitable[np.ndarray]]
ClaimLoneFn = Callable[[], Awaitable["LoneSlot | None"]]
logger = logging.getLogger(__name__)

try:  # BentoML's inter-service client is aiohttp; a broken connection surfaces as these
    from aiohttp import ClientConnectionError as _AiohttpConnectionError

    ConnectionError_: tuple[type[BaseException], ...] = (_AiohttpConnectionError,
                                                         ConnectionError)
except ImportError:  # pragma: no cover - aiohttp comes with BentoML
    ConnectionError_ = (ConnectionError,)


@dataclass(frozen=True)
class PipelineResult:
    """Decoded request plus the model outputs of its decodable images.

    Attributes:
        card: the model card the request was served with (one snapshot for the request, so
            a hot reload in the middle never mixes two versions in one answer).
        decoded: positions and per-image errors (see :class:`models.decode.DecodedBatch`).
        outputs: ``{"logits": (M, K), "embedding": (M, D), "features": (M, C)}`` float32 for
            the M decodable images, in ``decoded.positions`` order; None when M == 0.
    """

    card: ModelCard
    decoded: DecodedBatch
    outputs: dict[str, np.ndarray] | None


def _observe_decode(code: str | None, seconds: float) -> None:
    metrics.DECODE_SECONDS.observe(seconds)
    if code is not None:
        metrics.DECODE_ERRORS.labels(code=code).inc()


def _decode(payloads: Sequence[bytes | Path], spec: PreprocessSpec, limits: DecodeLimits
            ) -> DecodedBatch:
    """On a decode thread: every payload decoded on its own (:func:`models.decode.
    decode_batch`), timed and its errors counted in the decode metrics."""
    return decode_batch(payloads, spec, limits, observe=_observe_decode)


def _decode_then_run(payloads: Sequence[bytes | Path], spec: PreprocessSpec,
                     limits: DecodeLimits, run: Callable[[np.ndarray], np.ndarray],
                     still_alone: Callable[[], bool]
                     ) -> tuple[DecodedBatch, np.ndarray | None, float]:
    """On a decode thread: :func:`_decode`, then, if ``still_alone()``, ``run`` the
    decodable ones, ``(n, S, S, 3)`` uint8 -> ``(n, K + D + C)`` float32; returns ``(decoded,
    outputs or None when none decoded or not run, seconds the run took)``."""
    decoded = _decode(payloads, spec, limits)
    if not decoded.positions or not still_alone():
        return decoded, None, 0.0
    started = time.perf_counter()
    packed = run(decoded.arrays)
    return decoded, packed, time.perf_counter() - started


def _release_when_done(lone: "LoneSlot", work: asyncio.Future) -> None:
    """Free ``lone`` once its decode thread finished ``work`` (:func:`_decode_then_run`),
    observing the run when there was one."""
    if work.cancelled() or work.exception() is not None:
        lone.release()
        return
    decoded, packed, seconds = work.result()
    lone.release(0 if packed is None else len(decoded.positions), seconds)


class InferencePipeline:
    """Decode -> batched inference -> outputs, for any protocol.

    Args:
        holder: the worker's model holder (:class:`service.served.ModelHolder`); the card is
            read once per request.
        settings: limits (images per request, pixels, bytes), ``max_batch_size`` and
            ``decode_thread_count`` (the pipeline's own decode threads: a request's images are
            decoded on one of them).
        encode: async call into the Encoder: ``(n, S, S, 3)`` uint8 -> ``(n, K+D+C)`` float32,
            with ``n <= settings.max_batch_size``.
        claim_lone: the in-process core's :meth:`service.batcher.AdaptiveBatcher.claim_lone`
            (None: every image goes through ``encode``): a request of one image that finds
            nothing else decoding, queued or running decodes and runs it on one decode thread.
    """

    def __init__(self, holder: "ModelHolder", settings: Settings, encode: EncodeFn,
                 claim_lone: ClaimLoneFn | None = None) -> None:
        self.holder = holder
        self.settings = settings
        self.limits = DecodeLimits.from_settings(settings)
        self._encode = encode
        self._claim_lone = claim_lone
        self.decoding = 0  # images being decoded now (the in-process batcher waits for them)
        self._decoders = ThreadPoolExecutor(settings.decode_thread_count,
                                            thread_name_prefix="decode")

    @property
    def card(self) -> ModelCard:
        """The served model's card now."""
        return self.holder.card

    def check_count(self, count: int) -> None:
        """Refuse a request with no images or more than ``max_images_per_request``.

        Raises:
            RequestError: ``no_images`` or ``too_many_images``.
        """
        if count == 0:
            raise RequestError("no_images", "no images: send one or more images")
        limit = self.settings.max_images_per_request
        if count > limit:
            raise RequestError("too_many_images",
                               f"{count} images in one request; the limit is {limit}")

    async def encode_arrays(self, arrays: np.ndarray, card: ModelCard | None = None
                            ) -> dict[str, np.ndarray]:
        """``(M, S, S, 3)`` uint8 (already preprocessed) -> split outputs, in chunks that each
        fit one batch; the chunks go to the Encoder concurrently.

        Returns:
            ``{"logits": (M, K), "embedding": (M, D), "features": (M, C)}`` float32.
        """
        step = self.settings.max_batch_size
        chunks = [arrays[i:i + step] for i in range(0, len(arrays), step)]
        packed = await asyncio.gather(*(self._encode_once_more(chunk) for chunk in chunks))
        return split_outputs(np.concatenate([np.asarray(p) for p in packed]), card or self.card)

    async def _encode_once_more(self, chunk: np.ndarray) -> np.ndarray:
        """Call the Encoder; retry once when the connection to it broke (encoding has no side
        effects, so a repeat is safe). See :data:`service.bentoml_compat.RUNNER_CONNECTION`."""
        try:
            return await self._encode(chunk)
        except ConnectionError_ as exc:
            logger.warning("Encoder connection failed (%s); retrying once", exc)
            return await self._encode(chunk)

    async def run(self, payloads: Sequence[bytes | Path], *, endpoint: str,
                  protocol: str = "http") -> PipelineResult:
        """Decode every payload on its own, encode the good ones, count them in metrics.

        Args:
            payloads: encoded image files, or paths of files (read in the decode thread with
                :func:`models.decode.read_file`), in request order.
            endpoint, protocol: labels of the image metrics.

        Raises:
            RequestError: ``no_images``, ``too_many_images`` (see :meth:`check_count`).
        """
        self.check_count(len(payloads))
        card = self.card
        metrics.REQUEST_IMAGES.labels(endpoint=endpoint).observe(len(payloads))
        lone = (await self._claim_lone() if self._claim_lone is not None
                and len(payloads) == 1 and self.decoding == 0 else None)
        packed = None
        if lone is not None:
            decoded, packed = await self._decode_lone(lone, payloads, card)
        else:
            self.decoding += len(payloads)
            try:
                decoded = await asyncio.get_running_loop().run_in_executor(
                    self._decoders, _decode, payloads, card.preprocessing, self.limits)
            finally:
                self.decoding -= len(payloads)
        if packed is not None:
            outputs = split_outputs(packed, card)
        else:  # through the batcher (also a lone request that others joined meanwhile)
            outputs = (await self.encode_arrays(decoded.arrays, card) if decoded.positions
                       else None)
        self.count(endpoint, protocol, ok=len(decoded.positions), failed=len(decoded.errors))
        return PipelineResult(card=card, decoded=decoded, outputs=outputs)

    async def _decode_lone(self, lone: "LoneSlot", payloads: Sequence[bytes | Path],
                           card: ModelCard) -> tuple[DecodedBatch, np.ndarray | None]:
        """A request alone: decode and model run on one decode thread, in the run slot
        ``lone`` holds (released when the thread is done, run or not, failed or not, and even
        when this request is cancelled before that). Returns ``(decoded, (n, K + D + C)
        float32 outputs)``, or ``(decoded, None)`` when nothing decoded or requests arrived
        while it was decoding (a burst: they are decoding now, or queued), so that it joins
        their batch instead of splitting the burst into 1 + the rest."""
        work = asyncio.get_running_loop().run_in_executor(
            self._decoders, functools.partial(
                _decode_then_run, payloads, card.preprocessing, self.limits, lone.run,
                lambda: self.decoding == 0 and lone.alone()))
        # the slot is freed when the thread is done, even if this request is cancelled first
        work.add_done_callback(functools.partial(_release_when_done, lone))
        decoded, packed, _ = await asyncio.shield(work)
        return decoded, packed

    def close(self) -> None:
        """Stop the decode threads (decodes in progress finish first)."""
        self._decoders.shutdown(wait=True)

    @staticmethod
    def count(endpoint: str, protocol: str, *, ok: int, failed: int) -> None:
        """Add to ``cnn_codes_images_total`` by endpoint, protocol and outcome."""
        if ok:
            metrics.IMAGES.labels(endpoint=endpoint, protocol=protocol, outcome="ok").inc(ok)
        if failed:
            metrics.IMAGES.labels(endpoint=endpoint, protocol=protocol,
                                  outcome="error").inc(failed)
