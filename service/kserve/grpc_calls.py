"""What every gRPC call of the Open Inference Protocol front goes through: API-key
authentication, error mapping through the one error table (:mod:`models.errors`), metrics,
and the translation of ``ModelInferRequest`` into the wire-independent tensors.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from typing import Any, Awaitable, Callable, Iterable

import grpc

from models.errors import RequestError
from service import metrics
from service.auth import check_api_key
from service.kserve.proto import grpc_predict_v2_pb2 as pb
from service.kserve.tensors import InferRequest, InputTensor, RequestedOutput

logger = logging.getLogger("cnn_codes.kserve.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
METHODS = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods)
ERRORS_METADATA_KEY = "cnn-codes-errors"


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


def observed(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Map :class:`models.errors.RequestError` (and surprises) to gRPC statuses; count and time every call."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any,
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
