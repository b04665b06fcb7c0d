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
7. :func:`install_bounded_endpoint_labels`: BentoML's request metrics labelled by route, not
   by raw path (``bentoml/_internal/server/http/instruments.py``).
8. :func:`install_connection_limits` / :func:`raise_nofile_limit`: idle and slow-header
   connections closed, connections per worker bounded, the open-file limit raised (BentoML's
   uvicorn worker, ``_bentoml_impl/worker/service.py``; ``uvicorn/protocols/http/h11_impl.py``
   0.54.0, Kludex/uvicorn#1192).
9. :func:`bounded_readiness`: ``/readyz`` answers 503 within ``readiness_timeout_s`` instead of
   hanging when the Encoder is frozen or restarting (``_bentoml_impl/server/app.py``
   ``readyz``, ``_bentoml_impl/client/proxy2.py`` ``AsyncClient.is_ready``,
   ``bentoml/_internal/server/http/traffic.py`` ``TimeoutMiddleware``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import typing as t
from http import HTTPStatus
from pathlib import Path

from _bentoml_impl import serde as bentoml_serde
from bentoml._internal.context import server_context
from bentoml.exceptions import BentoMLException, InvalidArgument
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import CNNCodesError, RequestError

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

# The longest client file name an upload may carry: NAME_MAX (255 bytes on Linux) less
# NamedTemporaryFile's ``tmp`` + 8 random characters (see :func:`client_filename`).
MAX_FILENAME_BYTES = 244


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
        except RecursionError:  # json.loads of a form field (``MultipartSerde.parse_request``)
            raise InvalidArgument("a form field's JSON value is nested too deeply") from None
        except OSError as exc:
            # BentoML stores each upload as NamedTemporaryFile(suffix=<client file name>)
            # (``_bentoml_sdk/validators.py``): a name past the file system's limit fails there
            if exc.errno != errno.ENAMETOOLONG:
                raise
            raise InvalidArgument("an uploaded file's name is too long: send file names of "
                                  f"at most {MAX_FILENAME_BYTES} bytes") from None

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
        try:
            return self.deserialize_model(
                bentoml_serde.Payload((body,), metadata=request.headers), cls)
        except RecursionError:
            raise InvalidArgument("the JSON body is nested too deeply") from None


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


# --- 7. Bounded endpoint labels on BentoML's request metrics ----------------------------------
# BentoML 1.4.39 labels its request metrics with the raw request path: ``endpoint =
# scope["path"]`` in ``RunnerTrafficMetricsMiddleware.__call__`` (the metrics middleware of
# new-style services, added by ``ServiceAppFactory.middlewares`` in ``_bentoml_impl/server/
# app.py``) and in ``HTTPTrafficMetricsMiddleware.__call__`` (legacy services), both in
# ``bentoml/_internal/server/http/instruments.py``. Every distinct path, 401s and 404s
# included, adds series to ``bentoml_service_request_total`` / ``_request_duration_seconds``
# (a histogram) / ``_request_in_progress``, about 20 per path, each an entry in the files under
# ``PROMETHEUS_MULTIPROC_DIR``: 5,000 junk GETs made /metrics 19 MB with 100,193 series,
# a scrape 6.6-11 s, the API worker 125 -> 442 MiB.
#
# :func:`install_bounded_endpoint_labels` wraps both middlewares' ``_setup`` (which creates the
# metric objects) so that every one of them labelled ``endpoint`` maps the value through
# :func:`service.request_metrics.endpoint_label`, the function our own metrics use: routes keep
# their path, every other path is ``other``. The worker's own API routes
# (``server_context.service_routes``, set by the worker's ``main``: the Encoder's ``/encode``,
# ``/load``... in the Encoder worker) keep theirs too: a fixed set as well.

_LABELS_MARK = "_cnn_codes_bounded_labels"


class _BoundedEndpoint:
    """A prometheus_client metric whose ``endpoint`` label value goes through ``label``; all
    else is delegated to the metric."""

    def __init__(self, metric: t.Any, label: t.Callable[[str], str]) -> None:
        self._metric = metric
        self._label = label

    def labels(self, *values: t.Any, **labels: t.Any) -> t.Any:
        if "endpoint" in labels:
            path = str(labels["endpoint"])
            if path not in (server_context.service_routes or ()):
                labels["endpoint"] = self._label(path)
        return self._metric.labels(*values, **labels)

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._metric, name)


def install_bounded_endpoint_labels(label: t.Callable[[str], str] | None = None) -> None:
    """Make BentoML's HTTP metrics middlewares label ``endpoint`` with the path when it is one
    of the worker's API routes, else ``label(path)`` (default
    :func:`service.request_metrics.endpoint_label`). Idempotent; call it in every worker before
    its first request (``_setup`` runs on the first request)."""
    from bentoml._internal.server.http import instruments

    if label is None:
        from service.request_metrics import endpoint_label as label

    for cls in (instruments.RunnerTrafficMetricsMiddleware,
                instruments.HTTPTrafficMetricsMiddleware):
        original = cls._setup
        if getattr(original, _LABELS_MARK, False):
            continue

        def _setup(self: t.Any, *args: t.Any, _original: t.Any = original,
                   **kwargs: t.Any) -> None:
            _original(self, *args, **kwargs)
            for name, value in list(vars(self).items()):
                if name.startswith("metrics_") and "endpoint" in getattr(value, "_labelnames",
                                                                          ()):
                    setattr(self, name, _BoundedEndpoint(value, label))

        setattr(_setup, _LABELS_MARK, True)
        _setup.__doc__ = original.__doc__
        cls._setup = _setup


# --- 8. Connection limits of BentoML's HTTP server -------------------------------------------
# BentoML 1.4.39's worker (``_bentoml_impl/worker/service.py``, ``main``) builds
# ``uvicorn.Config`` itself and exposes only ``--timeout-keep-alive`` (``bentoml serve
# --timeout-keep-alive``, whole seconds, default 5); no ``limit_concurrency``, no header timeout.
# uvicorn 0.54.0's HTTP protocol (``uvicorn/protocols/http/h11_impl.py`` ``H11Protocol``, the
# one ``http="auto"`` picks without httptools; ``httptools_impl.py`` ``HttpToolsProtocol``
# alike) arms that keep-alive timer only in ``on_response_complete`` and cancels it on any byte
# received (``data_received``): a connection that never sends a request (Kludex/uvicorn#1192)
# or sends its headers a byte at a time is never closed. Each holds a file descriptor; under
# the common soft open-file limit of 1024, 1,100 idle sockets from one client made ``accept()``
# fail (EMFILE) and every request, /readyz included, time out. (uvicorn's
# ``limit_concurrency`` would not help: it counts idle connections and answers real requests
# 503.)
#
# :func:`install_connection_limits` patches the protocol classes (every connection, every
# worker) so that:
#
# * a connection with no request in progress that receives nothing for ``idle_timeout_s`` is
#   closed: uvicorn's keep-alive timer, armed from ``connection_made`` too, with
#   ``idle_timeout_s`` as its ``timeout_keep_alive``;
# * a request's headers must be complete ``header_timeout_s`` after its first byte, or the
#   connection is closed (the timer stops once the request is dispatched: slow bodies and long
#   responses are the request timeout's business);
# * above ``max_connections`` open connections a new one closes the longest-idle connection
#   (no request in progress), or itself when none is idle.
#
# :func:`raise_nofile_limit` lifts the process's soft ``RLIMIT_NOFILE`` to its hard limit (not
# BentoML's: it gives the above headroom; workers inherit it from the arbiter and call it too).

_CONN_MARK = "_cnn_codes_connection_limits"
FD_RESERVE = 256  # descriptors kept for everything but client connections (files, pools, gRPC)
# BentoML's server logging (``bentoml/_internal/log.py``, ``configure_server_logging``) shows
# INFO only for the ``bentoml`` logger tree (the root logger is at WARNING): the start-up lines
# of this piece go there so that the server log shows them.
_startup_log = logging.getLogger("bentoml.cnn_codes")


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; return ``(soft, hard)``
    as they are afterwards. Logs a change; a refusal is a warning (the limit stays)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:  # Linux refuses infinity; fs.nr_open is the ceiling
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("open-file limit: could not raise the soft limit %d to %d: %s",
                           soft, target, exc)
        else:
            _startup_log.info("open-file limit: soft RLIMIT_NOFILE raised from %d to %d "
                              "(hard %s)", soft, target,
                              "unlimited" if hard == resource.RLIM_INFINITY else hard)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _busy(proto: t.Any) -> bool:
    """A request of ``proto`` is being handled (its headers were complete)."""
    cycle = getattr(proto, "cycle", None)
    return cycle is not None and not cycle.response_complete


def _closed(reason: str) -> None:
    from service.request_metrics import CONNECTIONS_CLOSED

    CONNECTIONS_CLOSED.labels(reason=reason).inc()


def _stop_header_timer(proto: t.Any) -> None:
    timer = getattr(proto, "_cnn_header_timer", None)
    if timer is not None:
        timer.cancel()
        proto._cnn_header_timer = None


def _header_timeout(proto: t.Any) -> None:
    proto._cnn_header_timer = None
    transport = proto.transport
    # an upgraded connection (WebSocket) belongs to another protocol object by now
    if _busy(proto) or transport.is_closing() or transport.get_protocol() is not proto:
        return
    logger.debug("closing %s: request headers incomplete after the header timeout",
                 proto.client)
    _closed("header_timeout")
    transport.close()


def _evict(proto: t.Any, max_connections: int) -> None:
    """Above ``max_connections``: close the longest-idle other connection, else ``proto``."""
    connections = proto.connections
    if len(connections) <= max_connections:  # the cheap test first: no scan below the bound
        return
    # connections closed but not yet lost (evicted a moment ago) no longer count
    live = [c for c in connections if c.transport is not None and not c.transport.is_closing()]
    if len(live) <= max_connections:
        return
    idle = [c for c in live if c is not proto and not _busy(c)]
    victim = min(idle, key=lambda c: getattr(c, "_cnn_active", 0.0), default=None)
    if victim is None:
        _closed("refused")
        proto.transport.close()
    else:
        _closed("evicted")
        victim.transport.close()


def _patch_protocol(cls: type, limits: dict[str, float]) -> None:
    made, received = cls.connection_made, cls.data_received
    complete, lost = cls.on_response_complete, cls.connection_lost
    keep_alive_expired = cls.timeout_keep_alive_handler

    def connection_made(self: t.Any, transport: t.Any) -> None:
        made(self, transport)
        self.timeout_keep_alive = limits["idle_timeout_s"]
        self._cnn_header_timer = None
        self._cnn_active = self.loop.time()
        if transport.is_closing():
            return
        # uvicorn arms this timer only after a response: arm it for the first request too
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)
        _evict(self, int(limits["max_connections"]))

    def data_received(self: t.Any, data: bytes) -> None:
        self._cnn_active = self.loop.time()
        if getattr(self, "_cnn_header_timer", None) is None and not _busy(self):
            self._cnn_header_timer = self.loop.call_later(
                limits["header_timeout_s"], _header_timeout, self)
        received(self, data)
        if _busy(self):  # headers complete, request dispatched
            _stop_header_timer(self)

    def on_response_complete(self: t.Any) -> None:
        _stop_header_timer(self)
        self._cnn_active = self.loop.time()
        complete(self)

    def connection_lost(self: t.Any, exc: Exception | None) -> None:
        _stop_header_timer(self)
        lost(self, exc)

    def timeout_keep_alive_handler(self: t.Any) -> None:
        if not self.transport.is_closing():
            _closed("idle")
        keep_alive_expired(self)

    for name, function in [("connection_made", connection_made),
                           ("data_received", data_received),
                           ("on_response_complete", on_response_complete),
                           ("connection_lost", connection_lost),
                           ("timeout_keep_alive_handler", timeout_keep_alive_handler)]:
        function.__doc__ = getattr(cls, name).__doc__
        setattr(cls, name, function)
    setattr(cls, _CONN_MARK, limits)


def install_connection_limits(idle_timeout_s: float, header_timeout_s: float,
                              max_connections: int) -> int:
    """Patch uvicorn's HTTP/1.1 protocols (h11, and httptools when installed) as described
    above; return the effective connection bound (``max_connections``, capped at the soft
    open-file limit less :data:`FD_RESERVE`, so call :func:`raise_nofile_limit` first).
    A second call only updates the numbers."""
    import resource

    from uvicorn.protocols.http.h11_impl import H11Protocol

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        max_connections = min(max_connections, max(16, soft - FD_RESERVE))
    limits = {"idle_timeout_s": idle_timeout_s, "header_timeout_s": header_timeout_s,
              "max_connections": max_connections}
    classes: list[type] = [H11Protocol]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools not installed: uvicorn uses h11
        pass
    else:
        classes.append(HttpToolsProtocol)
    for cls in classes:
        current = getattr(cls, _CONN_MARK, None)
        if current is not None:
            current.update(limits)
        else:
            _patch_protocol(cls, limits)
    _startup_log.info("HTTP connections: idle timeout %.1f s, header timeout %.1f s, at most %d "
                      "per worker", idle_timeout_s, header_timeout_s, max_connections)
    return max_connections


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
