"""The inference core of the service, and the two places it can run.

A core answers three calls, whatever process it lives in (:class:`Core`):
``encode((n, S, S, 3) uint8) -> (n, K + D + C) float32``, ``model_ref()`` and ``load(version)``.

- :class:`LocalCore` (``batching = "in_process"``, the default): the session and an
  :class:`service.batcher.AdaptiveBatcher` inside each API worker, shared by its HTTP routes,
  ``/v2`` and gRPC.
- the ``Encoder`` BentoML service (``batching = "encoder"``, :mod:`service.encoder`): one
  separate worker process with BentoML's adaptive batching, called over BentoML's
  inter-service client.

Both open, canary-check and hot-swap a version with the same two functions,
:func:`open_core` and :func:`load_version`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Protocol

import numpy as np

from cnn_codes.settings import Settings
from models.card import compatibility_problems
from models.repository import PublishedModel, resolve
from models.runtime import OnnxEncoder, SessionConfig
from service import metrics
from service.batcher import AdaptiveBatcher

logger = logging.getLogger(__name__)


class Core(Protocol):
    """What the API worker needs from an inference core (local or the Encoder service)."""

    async def encode(self, images: np.ndarray) -> np.ndarray: ...

    async def model_ref(self) -> dict[str, Any]: ...

    async def load(self, version: int) -> dict[str, Any]: ...


def open_core(published: PublishedModel, settings: Settings) -> OnnxEncoder:
    """Open a session on ``published`` and run a canary batch through it.

    Raises:
        ProviderUnavailableError: see :func:`models.runtime.open_session`.
        RuntimeError: the canary produced non-finite outputs.
    """
    card = published.card
    core = OnnxEncoder.create(str(published.onnx_path), card,
                              SessionConfig.from_settings(settings))
    size = card.preprocessing.crop_size
    canary = core.run(np.full((1, size, size, 3), 127, dtype=np.uint8))
    if not np.isfinite(canary).all():
        raise RuntimeError(f"canary inference of {card.name}:{card.version} "
                           "produced non-finite outputs")
    model_info(core, 1)
    return core


def model_info(core: OnnxEncoder, value: int) -> None:
    """Set ``cnn_codes_model_info`` of ``core``'s model to ``value`` (1 serving, 0 not)."""
    card = core.card
    metrics.MODEL_INFO.labels(name=card.name, version=str(card.version), backbone=card.backbone,
                              precision=card.precision, provider=core.provider).set(value)


def load_version(current: OnnxEncoder, version: int, settings: Settings
                 ) -> tuple[OnnxEncoder, dict[str, Any]]:
    """Verify, check compatibility, open and canary ``version`` of ``current``'s model.

    Returns:
        ``(core to serve from now on, {"ok": True, "version": v})``, or ``(current,
        {"ok": False, "error": "..."})`` when any step fails (nothing changes then).
    """
    if version == current.card.version:
        return current, {"ok": True, "version": version}
    try:
        published = resolve(settings.repository, current.card.name, version)
        problems = compatibility_problems(current.card, published.card)
        if problems:
            raise ValueError(f"version {version} is not compatible with version "
                             f"{current.card.version}: {', '.join(problems)}")
        new = open_core(published, settings)
    except Exception as exc:  # any failure keeps the old model serving
        logger.error("refused to load %s:%s: %s", current.card.name, version, exc)
        return current, {"ok": False, "error": str(exc)}
    model_info(current, 0)
    logger.info("now serving %s:%d (was %d)", new.card.name, new.card.version,
                current.card.version)
    return new, {"ok": True, "version": new.card.version}


def observe_batch(size: int, seconds: float) -> None:
    """Inference metrics of one batch: ``size`` images in ``seconds``."""
    metrics.INFERENCE_SECONDS.observe(seconds)
    metrics.BATCH_SIZE.observe(size)


class LocalCore:
    """The session and adaptive batcher inside this API worker process.

    Args:
        published: the verified version to serve (:func:`models.repository.resolve`).
        settings: session options, ``max_batch_size``, ``max_batch_wait_ms`` (and the
            repository, for :meth:`load`).
        pending: images being decoded right now in this worker (the batcher waits for them,
            at most ``max_batch_wait_ms``, only while there are some).

    Raises:
        ModelNotFoundError, ModelIntegrityError, ProviderUnavailableError, RuntimeError: the
            configured version cannot be opened (see :func:`open_core`).
    """

    def __init__(self, published: PublishedModel, settings: Settings,
                 pending: Callable[[], int] = lambda: 0) -> None:
        # intra-op threads per worker session: Settings.core_threads (2x each worker's core share)
        self.settings = settings.model_copy(update={"intra_op_threads": settings.core_threads()})
        self.session = open_core(published, self.settings)
        self.batcher = AdaptiveBatcher(
            lambda batch: self.session.run(batch),  # one reference read per batch
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1000, runs=settings.batch_runs,
            pending=pending,
            observe=observe_batch)
        self._lock = asyncio.Lock()

    async def encode(self, images: np.ndarray) -> np.ndarray:
        """``(n, S, S, 3)`` uint8, ``n <= max_batch_size`` -> ``(n, K + D + C)`` float32."""
        return await self.batcher.submit(images)

    async def model_ref(self) -> dict[str, Any]:
        """Name and version of the loaded model."""
        return {"name": self.session.card.name, "version": self.session.card.version}

    async def load(self, version: int) -> dict[str, Any]:
        """Hot-swap to ``version`` (see :func:`load_version`); batches in flight finish on the
        old session."""
        async with self._lock:
            started = time.perf_counter()
            self.session, result = await asyncio.to_thread(
                load_version, self.session, version, self.settings)
            logger.info("load(%d): %s in %.2f s", version, result, time.perf_counter() - started)
            return result

    def close(self) -> None:
        """Stop the batcher's runner and thread."""
        self.batcher.close()


class RemoteCore:
    """The ``Encoder`` BentoML service as a :class:`Core` (calls over BentoML's client).

    Args:
        client: returns the dependency's client (``service.encoder``), resolved per call
            because BentoML creates it only once the worker runs.
    """

    def __init__(self, client: Callable[[], Any]) -> None:
        self._client = client

    async def encode(self, images: np.ndarray) -> np.ndarray:
        """See :meth:`service.encoder.Encoder.encode`."""
        return await self._client().to_async.encode(images)

    async def model_ref(self) -> dict[str, Any]:
        """See :meth:`service.encoder.Encoder.model_ref`."""
        return await self._client().to_async.model_ref()

    async def load(self, version: int) -> dict[str, Any]:
        """See :meth:`service.encoder.Encoder.load`."""
        return await self._client().to_async.load(version)
