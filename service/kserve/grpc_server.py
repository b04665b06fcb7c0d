"""The gRPC server: KServe v2 / Open Inference Protocol, health checking, reflection.

Runs inside every API service worker: ``CNNCodes``'s BentoML ``on_startup`` hook calls
:func:`start` (a ``grpc.aio`` server on the worker's own event loop, so gRPC calls go through
the same :class:`~service.pipeline.InferencePipeline`, the same Encoder client and therefore
the same adaptive batcher as HTTP); ``on_shutdown`` calls :func:`stop`. With several workers
all bind ``settings.host:settings.grpc_port`` with SO_REUSEPORT (gRPC's default) and the
kernel spreads connections over them.

Services (``grpc_predict_v2.proto`` in ``proto/``):

* ``inference.GRPCInferenceService``: ``ServerLive``, ``ServerReady``, ``ModelReady``,
  ``ServerMetadata``, ``ModelMetadata``, ``ModelInfer``, ``ModelConfig`` (Triton extension).
* ``grpc.health.v1.Health`` (https://github.com/grpc/grpc/blob/master/doc/health-checking.md):
  ``""`` and ``inference.GRPCInferenceService`` are NOT_SERVING until the service is ready (the
  canary inference), then SERVING; NOT_SERVING again from shutdown on.
* ``grpc.reflection.v1alpha.ServerReflection`` (``grpcurl list`` works).

Status codes (gRPC names; see https://grpc.github.io/grpc/core/md_doc_statuscodes.html):
INVALID_ARGUMENT for bad tensors and undecodable images (the message lists
``[index] code: message`` with the HTTP API's error codes, also sent as JSON in the trailing
metadata key ``cnn-codes-errors``), NOT_FOUND for another model or version,
RESOURCE_EXHAUSTED for too many images, a message above ``grpc_max_message_bytes`` (gRPC's own
check) or more than ``grpc_max_concurrency`` ``ModelInfer`` calls in progress in the worker,
UNAUTHENTICATED without a valid ``authorization: Bearer <key>`` metadata entry when
``api_keys`` are set (the same keys as HTTP; methods whose HTTP twin is in ``open_paths``,
i.e. health, ``ServerLive`` and ``ServerReady``, are open), UNAVAILABLE until ready,
DEADLINE_EXCEEDED after ``request_timeout_s``.

Every ``GRPCInferenceService`` call is counted in ``cnn_codes_requests_total{protocol="grpc",
endpoint=<method>, status=<code>}`` and timed in ``cnn_codes_request_seconds``; images in
``cnn_codes_images_total{protocol="grpc"}``, like HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from typing import Any, Awaitable, Callable, Iterable

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cnn_codes.settings import Settings
from service import metrics
from service.auth import check_api_key
from models.errors import RequestError
from service.kserve.protocol import InferenceFront, ServedModel
from service.kserve.tensors import InferRequest, InputTensor, RequestedOutput
from service.kserve.proto import grpc_predict_v2_pb2 as pb
from service.kserve.proto import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger("cnn_codes.kserve.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
METHODS = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods)
ERRORS_METADATA_KEY = "cnn-codes-errors"
# gRPC methods that are open when their HTTP twin is in ``settings.open_paths``.
_HTTP_TWINS: dict[str, tuple[str, ...]] = {
    f"/{SERVICE_NAME}/ServerLive": ("/v2/health/live",),
    f"/{SERVICE_NAME}/ServerReady": ("/v2/health/ready",),
    f"/{health.SERVICE_NAME}/Check": ("/healthz", "/readyz", "/livez"),
    f"/{health.SERVICE_NAME}/Watch": ("/healthz", "/readyz", "/livez"),
}


def _method_label(full_method: str) -> str:
    """``/inference.GRPCInferenceService/ModelInfer`` -> ``ModelInfer``; others -> ``other``."""
    service, _, method = full_method.lstrip("/").partition("/")
    return method if service == SERVICE_NAME and method in METHODS else "other"


def _record(method: str, code: grpc.StatusCode, started: float) -> None:
    metrics.REQUESTS.labels(protocol="grpc", endpoint=method, status=code.name).inc()
    metrics.REQUEST_SECONDS.labels(protocol="grpc", endpoint=method).observe(
        time.perf_counter() - started)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for calls without one of the API keys (``authorization`` metadata,
    ``Bearer <key>``, compared in constant time by :func:`service.auth.check_api_key`)."""

    def __init__(self, keys: Iterable[Any], open_methods: Iterable[str]) -> None:
        self._keys = list(keys)
        self._open = frozenset(open_methods)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method in self._open:
            return await continuation(handler_call_details)
        header = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
                break
        if check_api_key(header, self._keys):
            return await continuation(handler_call_details)
        started = time.perf_counter()
        _record(_method_label(method), grpc.StatusCode.UNAUTHENTICATED, started)
        handler = await continuation(handler_call_details)
        return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                        "missing or invalid API key: send metadata 'authorization: Bearer <key>'")


def _refusal(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode,
             message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that aborts with ``code``."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def streaming(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    if handler is None or handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(unary)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(streaming)
    return grpc.stream_stream_rpc_method_handler(streaming)


def _observed(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Map :class:`models.errors.RequestError` (and surprises) to gRPC statuses; count and time every call."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: "InferenceServicer", request: Any,
                      context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            response = await method(self, request, context)
        except RequestError as exc:
            _record(name, getattr(grpc.StatusCode, exc.grpc_status), started)
            trailing = ()
            if exc.details.get("errors"):
                trailing = ((ERRORS_METADATA_KEY, json.dumps(exc.details["errors"])),)
            await context.abort(getattr(grpc.StatusCode, exc.grpc_status), exc.message,
                                trailing_metadata=trailing)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            logger.exception("gRPC %s failed", name)
            _record(name, grpc.StatusCode.INTERNAL, started)
            await context.abort(grpc.StatusCode.INTERNAL, f"{name} failed on the server")
        _record(name, grpc.StatusCode.OK, started)
        return response

    return wrapper


def request_from_proto(request: pb.ModelInferRequest) -> InferRequest:
    """``ModelInferRequest`` -> :class:`InferRequest` (raw or typed contents per tensor).

    Raises:
        RequestError: ``bad_request`` when ``raw_input_contents`` does not pair with ``inputs``
            or a classification parameter is not an integer.
    """
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestError("bad_request",
                       f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} "
                       "input tensor(s); send one per input, in order")
    inputs: list[InputTensor] = []
    for index, tensor in enumerate(request.inputs):
        shape = tuple(int(d) for d in tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise RequestError("bad_request",
                               f"inputs[{index}] ({tensor.name!r}) has contents although "
                               "raw_input_contents is used")
            inputs.append(InputTensor(tensor.name, tensor.datatype, shape, raw=raw[index],
                                      source=f"raw_input_contents[{index}]"))
            continue
        if tensor.datatype == "BYTES":
            elements: Any = list(tensor.contents.bytes_contents)
        elif tensor.datatype == "UINT8":
            elements = tensor.contents.uint_contents
        else:
            elements = []
        inputs.append(InputTensor(tensor.name, tensor.datatype, shape, elements=elements,
                                  source=f"inputs[{index}].contents"))
    outputs: list[RequestedOutput] = []
    for index, out in enumerate(request.outputs):
        count = 0
        if "classification" in out.parameters:
            param = out.parameters["classification"]
            kind = param.WhichOneof("parameter_choice")
            if kind not in ("int64_param", "uint64_param"):
                raise RequestError("bad_request",
                               f"outputs[{index}] ({out.name!r}): the classification "
                               f"parameter must be int64_param, got {kind}")
            count = int(getattr(param, kind))
        outputs.append(RequestedOutput(out.name, count))
    return InferRequest(model_name=request.model_name, model_version=request.model_version,
                        inputs=inputs, outputs=outputs, id=request.id)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over an :class:`InferenceFront`."""

    def __init__(self, front: InferenceFront, settings: Settings) -> None:
        self.front = front
        self.settings = settings
        self._in_flight = 0

    @_observed
    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_observed
    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.front.ready())

    @_observed
    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=await self.front.model_ready(request.name, request.version))

    @_observed
    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.front.server_metadata())

    @_observed
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        meta = self.front.model_metadata(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]])

    @_observed
    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        config = self.front.model_config(request.name, request.version)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

    @_observed
    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        limit = self.settings.grpc_max_concurrency
        if self._in_flight >= limit:
            raise RequestError("overloaded",
                           f"overloaded: {self._in_flight} ModelInfer calls in progress in this "
                           f"worker (limit {limit}, CNN_CODES_GRPC_MAX_CONCURRENCY); retry later")
        self._in_flight += 1
        try:
            parsed = request_from_proto(request)
            try:
                async with asyncio.timeout(self.settings.request_timeout_s):
                    answer = await self.front.infer(parsed, protocol="grpc")
            except TimeoutError:
                raise RequestError("timeout",
                               f"inference took longer than {self.settings.request_timeout_s} s "
                               "(CNN_CODES_REQUEST_TIMEOUT_S)") from None
        finally:
            self._in_flight -= 1
        tensor = pb.ModelInferResponse.InferOutputTensor
        return pb.ModelInferResponse(
            model_name=answer.model_name, model_version=answer.model_version, id=answer.id,
            outputs=[tensor(name=o.name, datatype=o.datatype, shape=o.shape)
                     for o in answer.outputs],
            raw_output_contents=[o.raw() for o in answer.outputs])


class GrpcFront:
    """One worker's ``grpc.aio`` server: inference, health, reflection, auth.

    Args:
        front: the protocol core shared with the HTTP ``/v2`` routes.
        settings: host, ``grpc_port``, message size, concurrency, keys, grace period.
    """

    def __init__(self, front: InferenceFront, settings: Settings) -> None:
        self.front = front
        self.settings = settings
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._watcher: asyncio.Task | None = None

    def _open_methods(self) -> list[str]:
        open_paths = set(self.settings.open_paths)
        return [method for method, twins in _HTTP_TWINS.items() if open_paths & set(twins)]

    async def start(self) -> int:
        """Bind and start; health is NOT_SERVING until the service is ready.

        Returns:
            The bound port.

        Raises:
            RuntimeError: the address could not be bound.
        """
        size = self.settings.grpc_max_message_bytes
        interceptors = []
        if self.settings.api_keys:
            interceptors.append(ApiKeyInterceptor(self.settings.api_keys, self._open_methods()))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", size),
                     ("grpc.max_send_message_length", size),
                     ("grpc.so_reuseport", 1)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.front, self.settings), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        port = server.add_insecure_port(address)
        if not port:
            raise RuntimeError(f"gRPC could not bind {address}")
        await server.start()
        self.server, self.port = server, port
        self._watcher = asyncio.get_running_loop().create_task(self._watch_ready())
        logger.info("gRPC (Open Inference Protocol) listening on %s, max message %d bytes, "
                    "auth %s", address, size, "on" if self.settings.api_keys else "off")
        return port

    async def _watch_ready(self, interval_s: float = 0.5) -> None:
        """Flip health to SERVING once the service is ready (readiness is sticky)."""
        while True:
            await asyncio.sleep(interval_s)
            if await self.front.ready():
                for service in ("", SERVICE_NAME):
                    await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
                logger.info("gRPC health: SERVING")
                return

    async def stop(self) -> None:
        """Health NOT_SERVING, then stop with ``grpc_grace_s`` for in-flight calls."""
        if self._watcher is not None:
            self._watcher.cancel()
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(self.settings.grpc_grace_s)
            logger.info("gRPC server on port %s stopped", self.port)


async def start(service: ServedModel) -> GrpcFront | None:
    """Start the gRPC front of a service instance (``CNNCodes``' ``on_startup`` hook).

    Returns:
        The running front (also kept on the instance for :func:`stop`), or None when
        ``settings.grpc_enabled`` is false.
    """
    if not service.settings.grpc_enabled:
        logger.info("gRPC disabled (CNN_CODES_GRPC_ENABLED=false)")
        return None
    front = GrpcFront(InferenceFront.for_service(service), service.settings)
    await front.start()
    setattr(service, "_grpc_front", front)
    return front


async def stop(service: ServedModel) -> None:
    """Stop the gRPC front started by :func:`start` (``on_shutdown`` hook); no-op if none."""
    front: GrpcFront | None = getattr(service, "_grpc_front", None)
    if front is not None:
        await front.stop()
