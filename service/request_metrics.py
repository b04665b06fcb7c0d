"""HTTP request metrics with bounded labels: every answer counted under a route template.

``endpoint`` labels come from a fixed set (the routes, ``/v2`` templates) and every other path
shares ``other``, so junk requests cannot grow the number of series. :func:`endpoint_label` is
the one mapping, for our metrics and for BentoML's own request metrics
(:func:`service.bentoml_compat.install_bounded_endpoint_labels`).
"""

from __future__ import annotations

import re
import time

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics


_V2_MODEL = re.compile(r"^/v2/models/[^/]+(?:/versions/[^/]+)?(/ready|/config|/infer)?$")
_KNOWN_PATHS = frozenset({"/classify", "/embed", "/metadata", "/readyz", "/livez", "/healthz",
                          "/metrics", "/v2", "/v2/health/live", "/v2/health/ready",
                          "/admin/reload", "/", "/docs.json", "/schema.json",
                          "/search"})
# the page's templated paths (service/page.py): one label each, whatever follows the prefix
_PREFIXES = (("/thumbnails/", "/thumbnails/{row}"), ("/static/", "/static/{file}"))

CONNECTIONS_CLOSED = Counter(
    "cnn_codes_http_connections_closed",
    "HTTP connections the server closed on its own, by reason: idle (no request within "
    "http_idle_timeout_s), header_timeout (headers incomplete after http_header_timeout_s), "
    "evicted (longest-idle connection closed above http_max_connections), refused (new "
    "connection closed above http_max_connections, none idle).",
    ["reason"])


def endpoint_label(path: str) -> str:
    """Bounded ``endpoint`` label for a request path: the route template, or ``other``."""
    if path in _KNOWN_PATHS:
        return path
    match = _V2_MODEL.match(path)
    if match:
        return "/v2/models/{name}" + (match.group(1) or "")
    return next((label for prefix, label in _PREFIXES if path.startswith(prefix)), "other")


class RequestMetricsMiddleware:
    """Count every HTTP request in ``cnn_codes_requests_total{protocol="http"}`` and time it
    in ``cnn_codes_request_seconds``, as the gRPC server does for ``protocol="grpc"``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            endpoint = endpoint_label(scope.get("path", ""))
            metrics.REQUESTS.labels(protocol="http", endpoint=endpoint, status=str(status)).inc()
            metrics.REQUEST_SECONDS.labels(protocol="http", endpoint=endpoint).observe(
                time.perf_counter() - started)
