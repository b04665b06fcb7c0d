"""KServe v2 / Open Inference Protocol over HTTP: the ``/v2`` routes, plus request metrics.

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

import base64
import binascii
import json
import logging
import re
import time
from typing import Any, Callable

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from models.errors import RequestError
from service.kserve.protocol import InferenceFront, ServedModel
from service.kserve.tensors import InferRequest, InputTensor, RequestedOutput

logger = logging.getLogger("cnn_codes.kserve.http")

HEADER_LENGTH = "inference-header-content-length"


def _error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.http_status, headers=exc.headers)


def _bad_request(message: str) -> RequestError:
    return RequestError("bad_request", message)


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
        body = await _read_body(request, oip.settings.max_request_bytes)
        parsed, want_binary = _parse_infer(body, request.headers.get(HEADER_LENGTH),
                                           name, version)
        response = await oip.infer(parsed, protocol="http")
        return _infer_response(response, want_binary)

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


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (declared or streamed)."""
    too_large = RequestError("body_too_large",
                             f"the request body exceeds the limit of {limit} bytes "
                             "(CNN_CODES_MAX_REQUEST_BYTES)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_infer(body: bytes, header_length: str | None, name: str,
                 version: str) -> tuple[InferRequest, dict[str, bool]]:
    """JSON (+ binary tensors) -> :class:`InferRequest` and, per output name, whether the
    answer should carry it as binary data (``"*"`` = default for unlisted outputs)."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _bad_request(f"Inference-Header-Content-Length {header_length!r} is not a "
                               f"byte count within the {len(body)}-byte body")
        split = int(header_length)
        head, binary = body[:split], body[split:]
    else:
        head, binary = body, b""
    try:
        document = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad_request(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise _bad_request("the inference request must be a JSON object with 'inputs'")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad_request("'inputs' must be a non-empty list of tensors")
    inputs: list[InputTensor] = []
    offset = 0
    for index, item in enumerate(raw_inputs):
        tensor, offset = _parse_input(item, index, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise _bad_request(f"{len(binary) - offset} byte(s) of binary data after the last "
                           "input's binary_data_size")
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad_request("'parameters' must be an object")
    want_binary = {"*": parameters.get("binary_data_output") is True}
    outputs: list[RequestedOutput] = []
    raw_outputs = document.get("outputs") or []
    if not isinstance(raw_outputs, list):
        raise _bad_request("'outputs' must be a list")
    for index, item in enumerate(raw_outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _bad_request(f"outputs[{index}] must be an object with a string 'name'")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise _bad_request(f"outputs[{index}].parameters must be an object")
        count = params.get("classification", 0)
        if isinstance(count, bool) or not isinstance(count, int):
            raise _bad_request(f"outputs[{index}].parameters.classification must be an "
                               f"integer, got {count!r}")
        outputs.append(RequestedOutput(item["name"], count))
        want_binary[item["name"]] = params.get("binary_data", want_binary["*"]) is True
    request_id = document.get("id", "")
    return InferRequest(model_name=name, model_version=version, inputs=inputs,
                        outputs=outputs, id=str(request_id)), want_binary


def _parse_input(item: Any, index: int, binary: bytes, offset: int) -> tuple[InputTensor, int]:
    where = f"inputs[{index}]"
    if not isinstance(item, dict):
        raise _bad_request(f"{where} must be an object")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise _bad_request(f"{where} needs a string 'name' and 'datatype'")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise _bad_request(f"{where} ({name!r}) needs 'shape', a list of integers")
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad_request(f"{where}.parameters must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 \
                or offset + size > len(binary):
            raise _bad_request(f"{where} ({name!r}): binary_data_size {size!r} does not fit "
                               f"the {len(binary) - offset} binary byte(s) left")
        raw = binary[offset:offset + size]
        return InputTensor(name, datatype, tuple(shape), raw=raw,
                           source=f"{where} binary data"), offset + size
    if "data" not in item:
        raise _bad_request(f"{where} ({name!r}) has neither 'data' nor binary_data_size")
    data = item["data"]
    source = f"{where}.data"
    if datatype == "BYTES":
        elements = [_b64(value, f"{source}[{i}]") for i, value in enumerate(_flatten(data))]
        return InputTensor(name, datatype, tuple(shape), elements=elements,
                           source=source), offset
    try:
        values = np.asarray(data).reshape(-1)
    except ValueError:
        raise _bad_request(f"{source} is not a regular (non-ragged) array") from None
    return InputTensor(name, datatype, tuple(shape), elements=values, source=source), offset


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item))
    return flat


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise _bad_request(f"{where}: BYTES elements in JSON must be base64 strings of the "
                           "image files")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_request(f"{where} is not valid base64 (JSON BYTES elements carry the image "
                           "file base64-encoded; or send binary data with "
                           "Inference-Header-Content-Length)") from None


def _infer_response(response: Any, want_binary: dict[str, bool]) -> Response:
    document: dict[str, Any] = {"model_name": response.model_name,
                                "model_version": response.model_version, "outputs": []}
    if response.id:
        document["id"] = response.id
    blobs: list[bytes] = []
    for out in response.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype,
                                 "shape": out.shape}
        if want_binary.get(out.name, want_binary["*"]):
            blob = out.raw()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = out.json_data()
        document["outputs"].append(entry)
    head = json.dumps(document).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


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
