"""KServe v2 / Open Inference Protocol over HTTP: the ``/v2`` routes.

Routes (``[/versions/<v>]`` optional everywhere; mounted beside ``/metadata`` in
``service.service``; authentication, overload (429) are the API service's gateway's job):

============================================  ======  =========================================
path                                          verb    answer
============================================  ======  =========================================
``/v2``                                       GET     server metadata
``/v2/health/live``                           GET     200 ``{"live": true}``
``/v2/health/ready``                          GET     200 / 503 ``{"ready": bool}``
``/v2/models/<name>``                         GET     model metadata (404 for another model)
``/v2/models/<name>/ready``                   GET     200 / 503 ``{"name", "ready"}``
``/v2/models/<name>/config``                  GET     Triton model configuration (JSON)
``/v2/models/<name>/infer``                   POST    inference (JSON, or binary extension)
============================================  ======  =========================================

Inference bodies follow the OIP REST spec
(https://github.com/kserve/open-inference-protocol ``specification/protocol/inference_rest.md``)
and Triton's binary tensor data extension (``docs/protocol/extension_binary_data.md`` in
https://github.com/triton-inference-server/server): with the ``Inference-Header-Content-Length``
header, the body is that many bytes of JSON followed by the binary tensors, each input with a
``binary_data_size`` parameter; outputs asked for with ``"binary_data": true`` (or request
parameter ``binary_data_output``) come back the same way. In plain JSON, ``BYTES`` elements
of ``images`` are **base64** strings of the image files (JSON cannot carry raw bytes) and
``UINT8`` data is a flat or nested list of integers. Errors are ``{"error": "..."}`` with the
HTTP status of :class:`models.errors.RequestError` (images that fail to decode are
listed in ``"errors": [{"index", "code", "message"}]``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from models.errors import RequestError
from service.gateway import read_body
from service.kserve.http_codec import infer_response, parse_infer
from service.kserve.protocol import InferenceFront, ServedModel

logger = logging.getLogger("cnn_codes.kserve.http")

HEADER_LENGTH = "inference-header-content-length"


def _error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.http_status, headers=exc.headers)



def routes(get_service: Callable[[], ServedModel]) -> list[Route]:
    """The ``/v2`` routes, answering for the service ``get_service()`` returns.

    Args:
        get_service: e.g. ``bentoml.get_current_service`` (resolved per request: the
            instance exists only once the worker runs).
    """

    def front() -> InferenceFront:
        return InferenceFront.for_service(get_service())

    def handler(fn: Callable[[Request, InferenceFront], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request, front())
            except RequestError as exc:
                return _error_response(exc)
        endpoint.__name__ = endpoint.__qualname__ = fn.__name__
        endpoint.__doc__ = fn.__doc__
        return endpoint

    async def server_metadata(request: Request, oip: InferenceFront) -> Response:
        """``GET /v2``: server name, version, extensions."""
        return JSONResponse(oip.server_metadata())

    async def live(request: Request, oip: InferenceFront) -> Response:
        """``GET /v2/health/live``: the process answers."""
        return JSONResponse({"live": True})

    async def ready(request: Request, oip: InferenceFront) -> Response:
        """``GET /v2/health/ready``: 200 once the canary inference succeeded, else 503."""
        is_ready = await oip.ready()
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    def _model(request: Request) -> tuple[str, str]:
        return request.path_params["name"], request.path_params.get("version", "")

    async def model_metadata(request: Request, oip: InferenceFront) -> Response:
        """``GET /v2/models/<name>[/versions/<v>]``: tensors, versions, platform."""
        return JSONResponse(oip.model_metadata(*_model(request)))

    async def model_ready(request: Request, oip: InferenceFront) -> Response:
        """``GET /v2/models/<name>[/versions/<v>]/ready``: 200 ready, 503 not yet."""
        name, version = _model(request)
        is_ready = await oip.model_ready(name, version)
        return JSONResponse({"name": name, "ready": is_ready},
                            status_code=200 if is_ready else 503)

    async def model_config(request: Request, oip: InferenceFront) -> Response:
        """``GET /v2/models/<name>[/versions/<v>]/config``: Triton model configuration."""
        return JSONResponse(oip.model_config(*_model(request)))

    async def infer(request: Request, oip: InferenceFront) -> Response:
        """``POST /v2/models/<name>[/versions/<v>]/infer``."""
        name, version = _model(request)
        oip.resolve(name, version)
        body = await read_body(request.stream(), request.headers.get("content-length"),
                               oip.settings.max_request_bytes)
        parsed, want_binary = parse_infer(body, request.headers.get(HEADER_LENGTH),
                                           name, version)
        response = await oip.infer(parsed, protocol="http")
        return infer_response(response, want_binary)

    prefix = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    table: list[Route] = [
        Route("/v2", handler(server_metadata), methods=["GET"]),
        Route("/v2/health/live", handler(live), methods=["GET"]),
        Route("/v2/health/ready", handler(ready), methods=["GET"]),
    ]
    for base in (prefix, versioned):
        table += [
            Route(base, handler(model_metadata), methods=["GET"]),
            Route(base + "/ready", handler(model_ready), methods=["GET"]),
            Route(base + "/config", handler(model_config), methods=["GET"]),
            Route(base + "/infer", handler(infer), methods=["POST"]),
        ]
    return table
