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
from models.card import ModelCard
from models.repository import resolve
from service.bentoml_compat import RUNNER_CONNECTION, cap_learned_wait
from service.core import load_version, observe_batch, open_core

logger = logging.getLogger("cnn_codes.encoder")

# Read once at import: BentoML's decorators below need the numbers when the class is defined.
SETTINGS = Settings()


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
        observe_batch(len(images), time.perf_counter() - started)
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
        self.core, result = load_version(self.core, version, self.settings)
        return result
