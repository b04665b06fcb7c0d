"""Adaptive batching: a cap on the learned wait.

Checked against BentoML 1.4.39 (see :mod:`service.bentoml_compat`).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


# --- 1. Adaptive batching: a cap on the learned wait ------------------------------------
# A bound on how long BentoML's adaptive batching holds a request to grow its batch.
#
# BentoML 1.4's ``CorkDispatcher`` (``bentoml/_internal/marshal/dispatcher.py``) keeps a request
# queued while ``n * (wn + dt + o_a) <= optimizer.wait * 0.95``, where ``optimizer.wait`` is the
# mean time the first request of the last 50 batches spent queued. Under a burst that mean grows
# to hundreds of ms; afterwards every lone request is held about that long, and its own wait is
# logged as the next sample, so the learned wait feeds itself and decays only slowly. `make
# bench` measured a single client's p50 going from 16 to 233 ms after a c=64 burst. Between
# bursts, batches still form without any wait: requests queue while the previous batch runs
# (one batch at a time per Encoder worker).
#
# :func:`cap_learned_wait` clamps the learned wait to ``max_wait_s`` after every refresh of the
# optimizer's parameters. Nothing else of the algorithm changes (its latency model, the
# ``max_latency_ms`` deadline, batch splitting).

_MARK = "_cnn_codes_wait_cap_s"


def cap_learned_wait(max_wait_s: float) -> None:
    """Clamp ``Optimizer.wait`` of BentoML's adaptive batching to ``max_wait_s`` seconds.

    Idempotent per process (a second call only updates the cap). Call it in the process that
    runs the batchable API (the Encoder worker) before requests arrive.

    Raises:
        ValueError: ``max_wait_s`` is negative.
    """
    if max_wait_s < 0:
        raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
    from bentoml._internal.marshal import dispatcher

    optimizer = dispatcher.Optimizer
    refresh = optimizer.trigger_refresh
    if hasattr(refresh, _MARK):
        setattr(refresh, _MARK, max_wait_s)
        return

    def trigger_refresh(self) -> None:
        refresh(self)
        self.wait = min(self.wait, getattr(trigger_refresh, _MARK))

    setattr(trigger_refresh, _MARK, max_wait_s)
    trigger_refresh.__doc__ = refresh.__doc__
    optimizer.trigger_refresh = trigger_refresh
    logger.info("adaptive batching: learned wait capped at %.1f ms", max_wait_s * 1000)
