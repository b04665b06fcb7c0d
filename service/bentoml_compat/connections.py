"""Connection limits of BentoML's HTTP server and the open-file limit.

Checked against BentoML 1.4.39 (see :mod:`service.bentoml_compat`).
"""

from __future__ import annotations

import logging
import time
import typing as t
from pathlib import Path

logger = logging.getLogger(__name__)


# --- 8. Connection limits of BentoML's HTTP server -------------------------------------------
# BentoML 1.4.39's worker (``_bentoml_impl/worker/service.py``, ``main``) builds
# ``uvicorn.Config`` itself and exposes only ``--timeout-keep-alive`` (``bentoml serve
# --timeout-keep-alive``, whole seconds, default 5); no ``limit_concurrency``, no header timeout.
# uvicorn 0.54.0's HTTP protocol (``uvicorn/protocols/http/httptools_impl.py``
# ``HttpToolsProtocol``, the one ``http="auto"`` picks with httptools installed, as the serving
# install has it since 2026-12-07; ``h11_impl.py`` ``H11Protocol``, its fallback, alike) arms
# that keep-alive timer only in ``on_response_complete`` and cancels it on any byte received
# (``data_received``): a connection that never sends a request (Kludex/uvicorn#1192) or sends
# its headers a byte at a time is never closed. Each holds a file descriptor; under
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


def _now() -> float:
    """The time of a connection's last activity, s: ``time.monotonic``, not the event loop's
    ``loop.time()``, which uvloop reads from libuv's clock, cached once per loop iteration at
    millisecond resolution, so that connections accepted in one iteration would tie and the
    longest-idle one could not be told apart."""
    return time.monotonic()


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
        self._cnn_active = _now()
        if transport.is_closing():
            return
        # uvicorn arms this timer only after a response: arm it for the first request too
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)
        _evict(self, int(limits["max_connections"]))

    def data_received(self: t.Any, data: bytes) -> None:
        self._cnn_active = _now()
        if getattr(self, "_cnn_header_timer", None) is None and not _busy(self):
            self._cnn_header_timer = self.loop.call_later(
                limits["header_timeout_s"], _header_timeout, self)
        received(self, data)
        if _busy(self):  # headers complete, request dispatched
            _stop_header_timer(self)

    def on_response_complete(self: t.Any) -> None:
        _stop_header_timer(self)
        self._cnn_active = _now()
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


def _http11_protocols() -> list[tuple[t.Any, type]]:
    """uvicorn's HTTP/1.1 protocol modules and classes: h11's, and httptools' when installed."""
    import importlib

    found = []
    for module_name, class_name in (("h11_impl", "H11Protocol"),
                                    ("httptools_impl", "HttpToolsProtocol")):
        try:
            module = importlib.import_module(f"uvicorn.protocols.http.{module_name}")
        except ImportError:  # httptools not installed: uvicorn uses h11
            if module_name == "h11_impl":
                raise
            continue
        found.append((module, getattr(module, class_name)))
    return found


def install_connection_limits(idle_timeout_s: float, header_timeout_s: float,
                              max_connections: int) -> int:
    """Patch uvicorn's HTTP/1.1 protocols (h11, and httptools when installed) as described
    above; return the effective connection bound (``max_connections``, capped at the soft
    open-file limit less :data:`FD_RESERVE`, so call :func:`raise_nofile_limit` first).
    A second call only updates the numbers."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        max_connections = min(max_connections, max(16, soft - FD_RESERVE))
    limits = {"idle_timeout_s": idle_timeout_s, "header_timeout_s": header_timeout_s,
              "max_connections": max_connections}
    for cls in (protocol for _, protocol in _http11_protocols()):
        current = getattr(cls, _CONN_MARK, None)
        if current is not None:
            current.update(limits)
        else:
            _patch_protocol(cls, limits)
    _startup_log.info("HTTP connections: idle timeout %.1f s, header timeout %.1f s, at most %d "
                      "per worker", idle_timeout_s, header_timeout_s, max_connections)
    return max_connections


# --- 10. uvicorn's read buffer per connection -------------------------------------------------
# uvicorn 0.54.0 (``uvicorn/protocols/http/h11_impl.py`` ``H11Protocol.handle_events``, and
# ``httptools_impl.py`` ``HttpToolsProtocol.on_body`` alike) pauses reading a connection's
# socket once more than ``HIGH_WATER_LIMIT`` (64 KiB, ``flow_control.py``) of its request body
# is buffered, and resumes it when the app calls ``receive()``: ``transport.pause_reading()``
# / ``resume_reading()``, an epoll unregister and register on the event loop. 345 of the 397
# sample photos are larger than 64 KiB (median 107 KiB), so nearly every upload paused and
# resumed its socket; in a py-spy profile of the API worker's event loop at HTTP c=32
# (2026-12-06) the re-registration was 8.6 % of its samples. BentoML builds uvicorn's config
# itself and exposes no such option; uvicorn has none either (a module constant).
# Measured (``bench.threadcpu --protocol http --concurrency 32 --seconds 10 --env
# HTTP_READ_HIGH_WATER_BYTES=65536|1048576``, bench model, three alternations in the order
# A B B A A B, 2026-12-06 23:41-23:43 UTC): event-loop CPU 1.25 / 1.23 / 1.33 ms per image with
# uvicorn's 64 KiB, 1.08 / 1.28 / 1.25 with 1 MiB (means 1.27 vs 1.20); images/s 209.8 / 214.5 /
# 195.9 vs 227.9 / 201.3 / 198.1 (means 206.7 vs 209.1: within this machine's noise). A small
# saving of the thread that separates the HTTP front from gRPC, kept because it costs nothing:
# the Gateway holds a whole body in memory anyway (up to ``max_request_bytes``). Those figures
# are of h11, before uvloop and httptools were installed; the mark is the same in both.

def set_read_high_water(limit: int) -> int:
    """Set uvicorn's per-connection read high-water mark (``HIGH_WATER_LIMIT`` as its HTTP/1.1
    protocols read it, h11 and httptools when installed) to ``limit`` bytes; returns it.

    Raises:
        ValueError: ``limit`` below uvicorn's own 64 KiB.
    """
    from uvicorn.protocols.http import flow_control

    if limit < flow_control.HIGH_WATER_LIMIT:
        raise ValueError(f"read high-water mark {limit} is below uvicorn's "
                         f"{flow_control.HIGH_WATER_LIMIT} bytes")
    for module, _ in _http11_protocols():
        module.HIGH_WATER_LIMIT = limit
    return limit
