"""The ``Encoder`` BentoML service: the inference core behind adaptive batching.

One worker process holds one :class:`models.runtime.OnnxEncoder` (card + onnxruntime session);
a hot reload opens and canary-checks the new version first and then swaps that one object, so
batches in flight finish on the old session (they hold their own reference).
"""

from __future__ import annotations

import logging
import time

import bentoml
import numpy as np

from cnn_codes.settings import Settings
from models.card import ModelCard, compatibility_problems
from models.repository import PublishedModel, resolve
from models.runtime import OnnxEncoder, SessionConfig
from service import metrics
from service.bentoml_compat import RUNNER_CONNECTION, cap_learned_wait

logger = logging.getLogger("cnn_codes.encoder")

# Read once at import: BentoML's decorators below need the numbers when the class is defined.
SETTINGS = Settings()


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
    _model_info(core, 1)
    return core


def _model_info(core: OnnxEncoder, value: int) -> None:
    card = core.card
    metrics.MODEL_INFO.labels(name=card.name, version=str(card.version), backbone=card.backbone,
                              precision=card.precision, provider=core.provider).set(value)


@bentoml.service(name="cnn_codes_encoder", workers=1,
                 traffic={"timeout": SETTINGS.request_timeout_s},
                 runner_connection=RUNNER_CONNECTION)
class Encoder:
    """The inference core: onnxruntime on uint8 batches, adaptive batching by BentoML."""

    def __init__(self) -> None:
        self.settings = Settings()
        cap_learned_wait(self.settings.max_batch_wait_ms / 1000)
        self.core = open_core(resolve(self.settings.repository, self.settings.model_name,
                                      self.settings.model_version), self.settings)

    @property
    def card(self) -> ModelCard:
        """The card of the model serving now."""
        return self.core.card

    @bentoml.on_startup
    def keep_serving_after_sigterm(self) -> None:
        """Outlive the API workers' drain at shutdown (see :mod:`service.lifecycle`)."""
        from service.lifecycle import delay_sigterm

        if not delay_sigterm(self.settings.shutdown_grace_s):
            logger.warning("could not defer SIGTERM; requests in flight at shutdown may fail")

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def encode(self, images: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 -> ``(N, K + D + C)`` float32 (logits|embedding|features)."""
        started = time.perf_counter()
        packed = self.core.run(images)  # one reference read: a reload swaps self.core whole
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(images))
        return packed

    @bentoml.api
    def model_ref(self) -> dict:
        """Name and version of the loaded model (the API service checks it matches its own)."""
        return {"name": self.card.name, "version": self.card.version}

    @bentoml.api
    def load(self, version: int) -> dict:
        """Hot-swap to ``version``: verify, check compatibility, open, canary, then swap.

        Nothing changes when any step fails.

        Returns:
            ``{"ok": True, "version": v}`` or ``{"ok": False, "error": "..."}``.
        """
        current = self.core
        if version == current.card.version:
            return {"ok": True, "version": version}
        try:
            published = resolve(self.settings.repository, current.card.name, version)
            problems = compatibility_problems(current.card, published.card)
            if problems:
                raise ValueError(f"version {version} is not compatible with version "
                                 f"{current.card.version}: {', '.join(problems)}")
            new = open_core(published, self.settings)
        except Exception as exc:  # any failure keeps the old model serving
            logger.error("refused to load %s:%s: %s", current.card.name, version, exc)
            return {"ok": False, "error": str(exc)}
        self.core = new
        _model_info(current, 0)
        logger.info("now serving %s:%d (was %d)", new.card.name, new.card.version,
                    current.card.version)
        return {"ok": True, "version": new.card.version}
