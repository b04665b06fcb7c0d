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
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

import numpy as np

from cnn_codes.settings import Settings
from models.card import compatibility_problems
from models.repository import PublishedModel, resolve
from models.runtime import OnnxEncoder, SessionConfig
from service import metrics
from service.batcher import AdaptiveBatcher, LoneSlot

logger = logging.getLogger(__name__)

Served = TypeVar("Served", "OnnxEncoder", "Sessions")  # what load_version swaps


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


def model_info(core: OnnxEncoder | Sessions, value: int) -> None:
    """Set ``cnn_codes_model_info`` of ``core``'s model to ``value`` (1 serving, 0 not)."""
    card = core.card
    metrics.MODEL_INFO.labels(name=card.name, version=str(card.version), backbone=card.backbone,
                              precision=card.precision, provider=core.provider).set(value)


def load_version(current: Served, version: int, settings: Settings,
                 opener: Callable[[PublishedModel, Settings], Served] = open_core
                 ) -> tuple[Served, dict[str, Any]]:
    """Verify, check compatibility, open (``opener``, :func:`open_core` by default) and canary
    ``version`` of ``current``'s model.

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
        new = opener(published, settings)
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


@dataclass(frozen=True)
class Sessions:
    """The sessions of the version one API worker serves, swapped together on a reload.

    Attributes:
        alone: the session of a batch that runs by itself, on the worker's
            :meth:`cnn_codes.settings.Settings.core_threads` intra-op threads (a lone request
            at concurrency 1 gets both cores).
        beside: the session of a batch that starts while another is still running, on
            ``beside_intra_op_threads`` (1): two such runs share the cores one thread each
            instead of four intra-op threads contending for two cores; None = ``alone``
            serves every batch (a GPU provider, one batch in flight, or the setting 0).
    """

    alone: OnnxEncoder
    beside: OnnxEncoder | None = None

    @property
    def card(self):
        """The served version's card."""
        return self.alone.card

    @property
    def provider(self) -> str:
        """The execution provider the sessions run on."""
        return self.alone.provider

    def run(self, images: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 -> ``(N, K + D + C)`` float32 on ``alone``
        (:meth:`models.runtime.OnnxEncoder.run`; raises ``ValueError`` as it does)."""
        return self.alone.run(images)

    def run_beside(self, images: np.ndarray) -> np.ndarray:
        """The same as :meth:`run`, on ``beside`` (``alone`` without one)."""
        return (self.beside or self.alone).run(images)


class LocalCore:
    """The sessions and adaptive batcher inside this API worker process.

    Args:
        published: the verified version to serve (:func:`models.repository.resolve`).
        settings: session options, ``max_batch_size``, ``max_batch_wait_ms``,
            ``batch_runs``, ``beside_intra_op_threads`` (and the repository, for
            :meth:`load`).
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
        self.sessions = self.open_sessions(published)
        self.batcher = AdaptiveBatcher(
            self._run_alone, run_beside=self._run_beside,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1000, runs=settings.batch_runs,
            pending=pending,
            observe=observe_batch)
        self._lock = asyncio.Lock()

    def _run_alone(self, batch: np.ndarray) -> np.ndarray:
        sessions = self.sessions  # one reference read per batch (a reload swaps both)
        metrics.BATCH_RUNS.labels(session="alone").inc()
        return sessions.run(batch)

    def _run_beside(self, batch: np.ndarray) -> np.ndarray:
        sessions = self.sessions
        metrics.BATCH_RUNS.labels(session="beside" if sessions.beside else "alone").inc()
        return sessions.run_beside(batch)

    def open_sessions(self, published: PublishedModel) -> Sessions:
        """:func:`open_core` of ``published``, and its ``beside`` session where it applies
        (CPU provider, ``batch_runs`` > 1, ``0 < beside_intra_op_threads <`` the main
        session's threads).

        Raises:
            see :func:`open_core`.
        """
        alone = open_core(published, self.settings)
        threads = self.settings.beside_intra_op_threads
        if (self.settings.batch_runs < 2 or not 0 < threads < self.settings.intra_op_threads
                or alone.provider != "CPUExecutionProvider"):
            return Sessions(alone)
        beside = open_core(published,
                           self.settings.model_copy(update={"intra_op_threads": threads}))
        logger.info("a batch beside another runs on %d intra-op thread(s), one alone on %d",
                    threads, self.settings.intra_op_threads)
        return Sessions(alone, beside)

    async def encode(self, images: np.ndarray) -> np.ndarray:
        """``(n, S, S, 3)`` uint8, ``n <= max_batch_size`` -> ``(n, K + D + C)`` float32."""
        return await self.batcher.submit(images)

    async def claim_lone(self) -> LoneSlot | None:
        """The batcher's run slot for a request alone (:meth:`service.batcher.
        AdaptiveBatcher.claim_lone`); always None with ``lone_runs`` off."""
        return await self.batcher.claim_lone() if self.settings.lone_runs else None

    async def model_ref(self) -> dict[str, Any]:
        """Name and version of the loaded model."""
        return {"name": self.sessions.card.name, "version": self.sessions.card.version}

    async def load(self, version: int) -> dict[str, Any]:
        """Hot-swap to ``version`` (see :func:`load_version`; both sessions at once); batches
        in flight finish on the old sessions."""
        async with self._lock:
            started = time.perf_counter()
            self.sessions, result = await asyncio.to_thread(
                load_version, self.sessions, version, self.settings,
                opener=lambda published, _settings: self.open_sessions(published))
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
