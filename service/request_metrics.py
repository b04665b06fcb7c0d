"""HTTP request metrics with bounded labels: every answer counted under a route template.

``endpoint`` labels come from a fixed set (the routes, ``/v2`` templates) and every other path
shares ``other``, so junk requests cannot grow the number of series.
"""

from __future__ import annotations

import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics


_V2_MODEL = re.compile(r"^/v2/models/[^/]+(?:/versions/[^/]+)?(/ready|/config|/infer)?$")
_KNOWN_PATHS = frozenset({"/classify", "/embed", "/metadata", "/readyz", "/livez", "/healthz",
                          "/metrics", "/v2", "/v2/health/live", "/v2/health/ready"})


def endpoint_label(path: str) -> str:
    """Bounded ``endpoint`` label for a request path: the route template, or ``other``."""
    if path in _KNOWN_PATHS:
        return path
    match = _V2_MODEL.match(path)
    if match:
        return "/v2/models/{name}" + (match.group(1) or "")
    return "other"


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
