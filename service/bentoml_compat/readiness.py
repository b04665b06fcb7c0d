"""A bounded /readyz.

Checked against BentoML 1.4.39 (see :mod:`service.bentoml_compat`).
"""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import RequestError

logger = logging.getLogger(__name__)


# --- 9. A bounded /readyz ---------------------------------------------------------------------
# BentoML 1.4.39's ``/readyz`` (``ServiceAppFactory.readyz``, ``_bentoml_impl/server/app.py``)
# awaits ``__is_ready__``, then probes every ``bentoml.depends`` service with
# ``RemoteProxy.is_ready(5)`` (``api_server.runner_probe.enabled``, on by default). Against a
# frozen (SIGSTOP) or restarting Encoder the probe's connection is accepted by the socket's
# backlog and never answered; after 5 s aiohttp raises a plain ``asyncio.TimeoutError``, which
# ``AsyncClient.is_ready`` (``_bentoml_impl/client/proxy2.py``) does not catch (it expects
# ``aiohttp.ServerTimeoutError``), so ``readyz`` raises instead of answering 503. And
# ``TimeoutMiddleware`` (``bentoml/_internal/server/http/traffic.py``) waits for the first
# response message, not for the app: a request whose handler raised before answering is held
# until ``traffic.timeout`` (60 s) and then ends without an answer. Measured: ``/readyz``
# unanswered after 40 s with the Encoder stopped.
#
# :func:`bounded_readiness` runs the readiness route under a deadline and answers 503
# ``not_ready`` when the deadline passes or the route fails before answering (the Gateway uses
# it for :data:`READINESS_PATHS`). An answer the route gives in time (200, or its own 503)
# passes through unchanged.

READINESS_PATHS = frozenset({"/readyz"})


async def bounded_readiness(app: ASGIApp, scope: Scope, receive: Receive, send: Send,
                            timeout_s: float) -> None:
    """Run ``app`` (BentoML's readiness route) for one request, bounded by ``timeout_s``.

    Raises:
        RequestError: ``not_ready`` (503) when ``app`` gave no answer within ``timeout_s`` or
            failed before answering; the caller sends it.
    """
    started = False

    async def tracking_send(message: Message) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        async with asyncio.timeout(timeout_s):
            await app(scope, receive, tracking_send)
        return
    except TimeoutError:
        if started:
            raise
        reason = f"no answer within {timeout_s:g} s"
    except Exception as exc:  # the dependency probe's own failures (connection refused...)
        if started:
            raise
        reason = f"{type(exc).__name__}: {exc}"
    logger.warning("readiness check failed: %s", reason)
    raise RequestError("not_ready", f"not ready: the Encoder did not answer the readiness "
                                    f"check ({reason})")
