"""Errors: one JSON error envelope, our error table's errors as BentoML's.

Checked against BentoML 1.4.39 (see :mod:`service.bentoml_compat`).
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from bentoml.exceptions import BentoMLException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import CNNCodesError

logger = logging.getLogger(__name__)


# --- 3. One error envelope --------------------------------------------------------------
# ASGI middleware of the API service.

class ErrorEnvelopeMiddleware:
    """Give every 4xx JSON error the body ``{"error": "...", ...}``.

    BentoML 1.4 answers a ``BentoMLException`` with status < 500 as a one-element JSON *list*
    (``[{"error": "..."}]``, ``_bentoml_impl/server/app.py``: ``detail = ({"error": ...},)``),
    unlike its validation errors (``{"error": ..., "detail": [...]}``). This unwraps the list so
    clients see one error shape. Other responses pass through untouched (bodies of non-error
    responses are never buffered).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if 400 <= message["status"] < 500 and headers.get(
                        b"content-type", b"").startswith(b"application/json"):
                    start = message
                    return
                await send(message)
            elif start is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await send_unwrapped(start, b"".join(chunks))
            else:
                await send(message)

        async def send_unwrapped(first: Message, body: bytes) -> None:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict):
                body = json.dumps(parsed[0]).encode()
            headers = [(k, v) for k, v in first.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**first, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, capture)

# --- 6. Our errors as BentoML's ---------------------------------------------------------------

def to_bentoml(error: CNNCodesError) -> BentoMLException:
    """``error`` as a ``BentoMLException`` carrying the error table's HTTP status.

    BentoML answers it with that status and ``{"error": message}`` (unwrapped by
    :class:`ErrorEnvelopeMiddleware`).
    """
    return BentoMLException(error.message, error_code=HTTPStatus(error.http_status))
