"""Every workaround that reaches into BentoML internals, in one module.

Checked against **BentoML 1.4.39** (``pip show bentoml``); a BentoML upgrade re-checks this
file and nothing else. Each piece names the upstream code or issue it works around:

1. :func:`cap_learned_wait`: a cap on adaptive batching's learned wait
   (``bentoml/_internal/marshal/dispatcher.py``, ``Optimizer``).
2. :class:`NoFetchMultipartSerde` / :class:`NoFetchJSONSerde` / :func:`install_no_fetch`: file
   fields are never fetched from URLs (``_bentoml_impl/serde.py``, SSRF).
3. :class:`ErrorEnvelopeMiddleware`: one JSON error shape (``_bentoml_impl/server/app.py``
   answers a ``BentoMLException`` < 500 as a one-element list).
4. :func:`client_filename`: the client's file name recovered from BentoML's upload temp file
   (``_bentoml_sdk/validators.py``).
5. :data:`RUNNER_CONNECTION`: one connection pool for the API -> Encoder client for the
   worker's lifetime (bentoml/BentoML#5540).
6. :func:`to_bentoml`: our error table's errors as ``BentoMLException`` with the table's HTTP
   status, so BentoML answers them as 4xx instead of 500.
"""

from __future__ import annotations

import json
import logging
import typing as t
from http import HTTPStatus
from pathlib import Path

from _bentoml_impl import serde as bentoml_serde
from bentoml.exceptions import BentoMLException, InvalidArgument
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import CNNCodesError

logger = logging.getLogger(__name__)

CHECKED_BENTOML_VERSION = "1.4.39"


def check_version() -> bool:
    """True when the installed BentoML is the version this module was checked against; logs
    a warning naming both versions otherwise (the service still starts)."""
    from importlib.metadata import version

    installed = version("bentoml")
    if installed != CHECKED_BENTOML_VERSION:
        logger.warning("BentoML %s is installed; service/bentoml_compat.py was checked against "
                       "%s: re-check its workarounds", installed, CHECKED_BENTOML_VERSION)
    return installed == CHECKED_BENTOML_VERSION


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


# --- 2. No URL fetching -----------------------------------------------------------------
# Close BentoML's server-side request forgery hole: file fields are never fetched from URLs.
#
# BentoML 1.4 fetches a URL with httpx when a file-typed field arrives as a string (multipart or
# url-encoded form value, ``MultipartSerde.ensure_file``) or when a JSON body is a URL
# (``JSONSerde.parse_request``), see ``_bentoml_impl/serde.py``. A service must never fetch a URL
# on a client's behalf, so :func:`install` swaps those two serdes in BentoML's ``ALL_SERDE``
# registry for subclasses that refuse (400) instead. Call it once per API worker.

class NoFetchMultipartSerde(bentoml_serde.MultipartSerde):
    """Multipart/form serde whose file fields must be uploaded files, and whose malformed
    bodies (no boundary, broken parts) are a 400, not BentoML's 500."""

    async def parse_request(self, request: Request, cls: type) -> t.Any:
        """Parse the form; malformed multipart becomes :class:`InvalidArgument` (400)."""
        try:
            return await super().parse_request(request, cls)
        except (HTTPException, MultiPartException, UnicodeDecodeError) as exc:
            detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or exc
            raise InvalidArgument(f"malformed multipart/form-data body: {detail}") from None

    @staticmethod
    async def ensure_file(obj: t.Any) -> UploadFile:
        """Accept an uploaded file; refuse a string (BentoML would fetch it as a URL).

        Raises:
            InvalidArgument: HTTP 400.
        """
        if isinstance(obj, UploadFile):
            return obj
        raise InvalidArgument("file fields must be uploaded files (multipart parts with a "
                              "filename); URLs and text values are not fetched")


class NoFetchJSONSerde(bentoml_serde.JSONSerde):
    """JSON serde that never treats the body as a URL to download."""

    async def parse_request(self, request: Request, cls: type) -> t.Any:
        """Parse the body as JSON only (no URL download)."""
        body = await request.body()
        return self.deserialize_model(bentoml_serde.Payload((body,), metadata=request.headers),
                                      cls)


def install_no_fetch() -> None:
    """Register the no-fetch serdes for JSON, multipart and url-encoded bodies."""
    registry = t.cast(dict, bentoml_serde.ALL_SERDE)
    registry["application/json"] = NoFetchJSONSerde
    registry["multipart/form-data"] = NoFetchMultipartSerde
    registry["application/x-www-form-urlencoded"] = NoFetchMultipartSerde


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


# --- 4. The client's file name ------------------------------------------------------------

def client_filename(path: Path) -> str | None:
    """The file name the client sent, recovered from BentoML's upload temp file.

    BentoML stores each uploaded file as ``tempfile.NamedTemporaryFile(suffix=<client name>)``,
    i.e. ``tmp`` + 8 random characters + the client's name (``_bentoml_sdk/validators.py``).
    """
    name = path.name
    if name.startswith("tmp") and len(name) >= 11:
        return name[11:] or None
    return name


# --- 5. The API -> Encoder connection pool ------------------------------------------------
# BentoML 1.4.39's client to a ``bentoml.depends`` service closes its connection pool every 100
# calls or 300 s while calls are still in flight on it (bentoml/BentoML#5540), failing them
# with ServerDisconnectedError: under load 16-46 % of responses (bench/, c=32..64). Keep one
# pool for the worker's lifetime; the pipeline also retries such a failure once.
RUNNER_CONNECTION = {"max_requests": 2**31 - 1, "max_age": 1e12}


# --- 6. Our errors as BentoML's ---------------------------------------------------------------

def to_bentoml(error: CNNCodesError) -> BentoMLException:
    """``error`` as a ``BentoMLException`` carrying the error table's HTTP status.

    BentoML answers it with that status and ``{"error": message}`` (unwrapped by
    :class:`ErrorEnvelopeMiddleware`).
    """
    return BentoMLException(error.message, error_code=HTTPStatus(error.http_status))
