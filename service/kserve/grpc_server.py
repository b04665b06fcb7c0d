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
import logging

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cnn_codes.settings import Settings
from models.errors import RequestError
from service.kserve.grpc_calls import (SERVICE_NAME, ApiKeyInterceptor, observed,
                                       request_from_proto)
from service.kserve.protocol import InferenceFront, ServedModel
from service.kserve.proto import grpc_predict_v2_pb2 as pb
from service.kserve.proto import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger("cnn_codes.kserve.grpc")

# gRPC methods that are open when their HTTP twin is in ``settings.open_paths``.
_HTTP_TWINS: dict[str, tuple[str, ...]] = {
    f"/{SERVICE_NAME}/ServerLive": ("/v2/health/live",),
    f"/{SERVICE_NAME}/ServerReady": ("/v2/health/ready",),
    f"/{health.SERVICE_NAME}/Check": ("/healthz", "/readyz", "/livez"),
    f"/{health.SERVICE_NAME}/Watch": ("/healthz", "/readyz", "/livez"),
}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over an :class:`InferenceFront`."""

    def __init__(self, front: InferenceFront, settings: Settings) -> None:
        self.front = front
        self.settings = settings
        self._in_flight = 0

    @observed
    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @observed
    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.front.ready())

    @observed
    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=await self.front.model_ready(request.name, request.version))

    @observed
    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.front.server_metadata())

    @observed
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        meta = self.front.model_metadata(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]])

    @observed
    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        config = self.front.model_config(request.name, request.version)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

    @observed
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

    async def _watch_ready(self, interval_s: float = 1.0) -> None:
        """Keep gRPC health in step with readiness: NOT_SERVING until the service is ready,
        SERVING while the Encoder answers, NOT_SERVING again while it does not (frozen or
        restarting), probed every ``interval_s`` seconds."""
        serving = False
        while True:
            await asyncio.sleep(interval_s)
            now = await self.front.ready()
            if now != serving:
                status = (health_pb2.HealthCheckResponse.SERVING if now
                          else health_pb2.HealthCheckResponse.NOT_SERVING)
                for service in ("", SERVICE_NAME):
                    await self.health.set(service, status)
                logger.info("gRPC health: %s", "SERVING" if now else "NOT_SERVING")
                serving = now

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
