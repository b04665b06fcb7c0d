"""Protocol-independent core of the Open Inference Protocol (KServe v2) front.

The gRPC server (:mod:`service.kserve.grpc_server`) and the HTTP ``/v2`` routes
(:mod:`service.kserve.http`) translate their wire format into the plain objects below, call
:class:`InferenceFront`, and translate the answer back. Everything that decides *what* is
answered lives here, once: model/version resolution, readiness, tensor validation, metadata,
model configuration, the classification extension and the error statuses.

Model tensors (from the model card, never hard-coded):

* input ``images`` in one of two forms:

  - ``UINT8`` ``[N, S, S, 3]``: RGB pixels already at the model's input size ``S``
    (``card.preprocessing.crop_size``), the ONNX graph's own input;
  - ``BYTES`` ``[N]`` (or ``[N, 1]``): N encoded image files (JPEG, PNG, ...), decoded and
    resized by the service exactly like HTTP uploads (:mod:`service.decode`).

* outputs ``logits`` ``[N, K]``, ``embedding`` ``[N, D]``, ``features`` ``[N, C]``, ``FP32``;
  with the classification extension (output parameter ``classification`` = k) an output is
  instead ``BYTES`` ``[N, k]`` of ``"<value>:<index>[:<label>]"`` strings, the k largest
  values of that output in descending order (labels from ``card.class_names`` for
  ``logits``). Triton semantics: the value is the raw output value (a logit, not a
  probability). k larger than the output width is clamped to the width.

References: Open Inference Protocol (https://github.com/kserve/open-inference-protocol,
``specification/protocol/inference_grpc.md``, ``inference_rest.md``: tensor data types,
``raw_input_contents``, BYTES elements as 4-byte little-endian length + bytes); Triton's
``docs/protocol/extension_classification.md`` and ``extension_model_configuration.md``
(https://github.com/triton-inference-server/server).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import struct
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import metadata as importlib_metadata
from typing import Any, Awaitable, Callable, Protocol, Sequence

import numpy as np

from cnn_codes.settings import Settings
from models.card import INPUT_NAME, OUTPUT_NAMES, ModelCard
from service import metrics
from service.pipeline import EmptyRequest, InferencePipeline, RequestTooLarge

logger = logging.getLogger("cnn_codes.kserve")

SERVER_NAME = "cnn-codes"
PLATFORM = "onnxruntime_onnx"  # Triton's platform name for ONNX Runtime models
BACKEND = "onnxruntime"
# Extensions in the sense of ServerMetadata.extensions (Triton's names).
EXTENSIONS: tuple[str, ...] = ("classification", "model_configuration", "binary_tensor_data")
ENDPOINT = "infer"  # ``endpoint`` label of the shared image metrics

_CARD_TO_OIP_DTYPE = {"uint8": "UINT8", "float32": "FP32", "float16": "FP16"}


class Code(enum.Enum):
    """Failure classes, each with its gRPC status code name and default HTTP status."""

    INVALID_ARGUMENT = HTTPStatus.BAD_REQUEST
    NOT_FOUND = HTTPStatus.NOT_FOUND
    RESOURCE_EXHAUSTED = HTTPStatus.TOO_MANY_REQUESTS
    UNAUTHENTICATED = HTTPStatus.UNAUTHORIZED
    UNAVAILABLE = HTTPStatus.SERVICE_UNAVAILABLE
    DEADLINE_EXCEEDED = HTTPStatus.GATEWAY_TIMEOUT
    INTERNAL = HTTPStatus.INTERNAL_SERVER_ERROR


class OIPError(Exception):
    """A request the front refuses, with a message naming the problem.

    Attributes:
        code: the failure class; ``code.name`` is the gRPC status code name.
        message: human-readable, names the offending tensor, element or limit.
        http_status: HTTP status for the ``/v2`` routes (defaults to ``code.value``; 413 for
            requests over a size limit).
        details: machine-readable extras, e.g. ``{"errors": [{"index", "code", "message"}]}``
            for images that failed to decode (codes as in the HTTP API's per-item errors).
    """

    def __init__(self, code: Code, message: str, *, http_status: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.http_status = int(http_status or code.value)
        self.details = details or {}


@dataclass(frozen=True)
class InputTensor:
    """One request input, decoupled from the wire format.

    Exactly one of ``raw`` and ``elements`` is set.

    Attributes:
        name, datatype, shape: as sent (``shape`` includes the batch dimension).
        raw: the tensor's raw bytes (gRPC ``raw_input_contents[i]``, HTTP binary extension):
            row-major little-endian elements; BYTES elements as 4-byte little-endian length
            + bytes.
        elements: typed contents, flattened row-major (gRPC ``contents.uint_contents`` /
            ``bytes_contents``, JSON ``data``): ints for UINT8, ``bytes`` for BYTES.
        source: where it came from, for error messages (e.g. ``raw_input_contents[0]``).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None = None
    elements: Sequence[Any] | None = None
    source: str = "input"


@dataclass(frozen=True)
class RequestedOutput:
    """A requested output: its name and the classification count (0 = raw tensor)."""

    name: str
    class_count: int = 0


@dataclass(frozen=True)
class InferRequest:
    """An inference request: model, optional id, one input, the requested outputs."""

    model_name: str
    model_version: str
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str = ""


@dataclass(frozen=True)
class OutputTensor:
    """One response output: ``FP32`` float32 ``(N, W)`` or ``BYTES`` object array ``(N, k)``."""

    name: str
    datatype: str
    data: np.ndarray

    @property
    def shape(self) -> list[int]:
        return [int(d) for d in self.data.shape]

    def raw(self) -> bytes:
        """Row-major little-endian bytes (BYTES: length-prefixed elements)."""
        if self.datatype == "BYTES":
            return serialize_bytes(list(self.data.reshape(-1)))
        return np.ascontiguousarray(self.data, dtype="<f4").tobytes()

    def json_data(self) -> list:
        """Flattened row-major elements for a JSON body (BYTES as UTF-8 strings)."""
        flat = self.data.reshape(-1)
        if self.datatype == "BYTES":
            return [item.decode("utf-8") for item in flat]
        return flat.astype(np.float64).tolist()


@dataclass(frozen=True)
class InferResponse:
    """An inference answer for :attr:`model_name` version :attr:`model_version`."""

    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


class ServedModel(Protocol):
    """What the front needs from the BentoML service instance (``CNNCodes``)."""

    card: ModelCard
    settings: Settings
    pipeline: InferencePipeline

    async def __is_ready__(self) -> bool: ...


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements -> the raw form: each as ``uint32`` little-endian length + bytes."""
    return b"".join(struct.pack("<I", len(item)) + bytes(item) for item in items)


def deserialize_bytes(raw: bytes, *, source: str = "raw contents") -> list[bytes]:
    """Inverse of :func:`serialize_bytes`.

    Raises:
        OIPError: INVALID_ARGUMENT when a length prefix runs past the end of ``raw``.
    """
    items: list[bytes] = []
    offset, size, view = 0, len(raw), memoryview(raw)
    while offset < size:
        if size - offset < 4:
            raise OIPError(Code.INVALID_ARGUMENT,
                           f"{source} is not a valid BYTES tensor: {size - offset} stray "
                           f"byte(s) after element {len(items)} where a 4-byte length "
                           "prefix was expected")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if length > size - offset:
            raise OIPError(Code.INVALID_ARGUMENT,
                           f"{source} is not a valid BYTES tensor: element {len(items)} "
                           f"declares {length} bytes but only {size - offset} remain")
        items.append(bytes(view[offset:offset + length]))
        offset += length
    return items


def server_version() -> str:
    """This package's version (``cnn-codes`` distribution), or ``unknown``."""
    try:
        return importlib_metadata.version("cnn-codes")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


class InferenceFront:
    """The Open Inference Protocol over one served model, for every transport.

    Args:
        card: the served model's card (names, dims, classes, input size).
        settings: limits (images per request) and batching numbers shown in the config.
        pipeline: the shared decode -> Encoder pipeline (one adaptive batcher for all
            protocols).
        is_ready: coroutine telling whether the service is ready (canary inference done).
    """

    def __init__(self, card: ModelCard, settings: Settings, pipeline: InferencePipeline,
                 is_ready: Callable[[], Awaitable[bool]]) -> None:
        self.card = card
        self.settings = settings
        self.pipeline = pipeline
        self._is_ready = is_ready

    @property
    def version(self) -> str:
        """The served version, as a string (follows hot reloads: the card is replaced)."""
        return str(self.card.version)

    @classmethod
    def for_service(cls, service: ServedModel) -> "InferenceFront":
        """The front of a service instance, created once and kept on the instance."""
        front = getattr(service, "_oip_front", None)
        if front is None:
            front = cls(service.card, service.settings, service.pipeline,
                        service.__is_ready__)
            setattr(service, "_oip_front", front)
        return front

    # -- health and metadata -------------------------------------------------------------

    async def ready(self) -> bool:
        """True once the service is ready for inference; never raises."""
        try:
            return bool(await self._is_ready())
        except Exception:  # readiness must answer, not fail; the cause is logged
            logger.exception("readiness check failed")
            return False

    def resolve(self, name: str, version: str = "") -> None:
        """Check that ``name`` (and ``version``, if given) is the served model.

        Raises:
            OIPError: NOT_FOUND naming the model or version this server serves.
        """
        if name != self.card.name:
            raise OIPError(Code.NOT_FOUND, f"unknown model {name!r}: this server serves "
                                           f"{self.card.name!r} (version {self.version})")
        if version not in ("", self.version):
            raise OIPError(Code.NOT_FOUND, f"model {name!r} has no version {version!r}: this "
                                           f"server serves version {self.version}")

    async def model_ready(self, name: str, version: str = "") -> bool:
        """Readiness of a model (NOT_FOUND for another model or version)."""
        self.resolve(name, version)
        return await self.ready()

    def server_metadata(self) -> dict[str, Any]:
        """``{"name", "version", "extensions"}`` (OIP server metadata)."""
        return {"name": SERVER_NAME, "version": server_version(),
                "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        """OIP model metadata from the card: ``name``, ``versions``, ``platform``,
        ``inputs``/``outputs`` as ``{"name", "datatype", "shape"}`` (-1 = any batch size).
        Outputs are always FP32: the Encoder returns float32 whatever the ONNX precision."""
        self.resolve(name, version)
        spec = self.card.inputs[0] if self.card.inputs else None
        size = self.card.preprocessing.crop_size
        inputs = [{"name": spec.name if spec else INPUT_NAME,
                   "datatype": _CARD_TO_OIP_DTYPE.get(spec.dtype, "UINT8") if spec else "UINT8",
                   "shape": [-1, size, size, 3]}]
        outputs = [{"name": out, "datatype": "FP32", "shape": [-1, self.card.dim(out)]}
                   for out in OUTPUT_NAMES]
        return {"name": self.card.name, "versions": [self.version], "platform": PLATFORM,
                "inputs": inputs, "outputs": outputs}

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        """Triton model configuration (JSON form of ``inference.ModelConfig``) from the card.

        ``max_batch_size`` is the largest N one request may carry
        (``max_images_per_request``); dims exclude the batch dimension, as Triton's do when
        ``max_batch_size > 0``. Parameters carry what Triton's schema has no field for
        (preprocessing, class names, the BYTES form of the input), as strings.
        """
        self.resolve(name, version)
        prep = self.card.preprocessing
        size = prep.crop_size
        gpu = self.settings.providers and self.settings.providers[0] != "cpu"
        parameters = {
            "backbone": self.card.backbone,
            "precision": self.card.precision,
            "class_names": json.dumps(self.card.class_names),
            "preprocessing": prep.model_dump_json(),
            "onnx_sha256": self.card.onnx_sha256,
            "input_forms": (f"{INPUT_NAME}: UINT8 [N,{size},{size},3] RGB pixels, or BYTES [N] "
                            "encoded image files (JPEG, PNG, ...) resized by the server"),
            "adaptive_batching": (f"BentoML, max_batch_size={self.settings.max_batch_size}, "
                                  f"max_latency_ms={self.settings.max_latency_ms}"),
        }
        return {
            "name": self.card.name,
            "platform": PLATFORM,
            "backend": BACKEND,
            "max_batch_size": self.settings.max_images_per_request,
            "input": [{"name": INPUT_NAME, "data_type": "TYPE_UINT8",
                       "format": "FORMAT_NHWC", "dims": [size, size, 3]}],
            "output": [{"name": out, "data_type": "TYPE_FP32", "dims": [self.card.dim(out)]}
                       for out in OUTPUT_NAMES],
            "dynamic_batching": {"preferred_batch_size": [self.settings.max_batch_size]},
            "instance_group": [{"name": self.card.name, "count": 1,
                                "kind": "KIND_GPU" if gpu else "KIND_CPU"}],
            "parameters": {k: {"string_value": v} for k, v in parameters.items()},
        }

    # -- inference -----------------------------------------------------------------------

    async def infer(self, request: InferRequest, *, protocol: str) -> InferResponse:
        """Validate, run through the shared pipeline, and build the requested outputs.

        Args:
            request: the decoded request.
            protocol: ``grpc`` or ``http``: the ``protocol`` label of the image metrics.

        Raises:
            OIPError: NOT_FOUND (model/version), UNAVAILABLE (not ready), INVALID_ARGUMENT
                (tensor or image problems), RESOURCE_EXHAUSTED (too many images, overload).
        """
        self.resolve(request.model_name, request.model_version)
        wanted = self._requested_outputs(request.outputs)
        tensor = self._single_input(request.inputs)
        if not await self.ready():
            raise OIPError(Code.UNAVAILABLE, f"model {self.card.name!r} is not ready yet "
                                             "(start-up canary inference pending); retry")
        try:
            if tensor.datatype == "BYTES":
                outputs = await self._infer_encoded(tensor, protocol)
            else:
                outputs = await self._infer_pixels(tensor, protocol)
        except EmptyRequest as exc:
            raise OIPError(Code.INVALID_ARGUMENT, f"input {tensor.name!r}: {exc}") from None
        except RequestTooLarge as exc:
            raise OIPError(Code.RESOURCE_EXHAUSTED, f"input {tensor.name!r}: {exc}",
                           http_status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from None
        except OIPError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status = getattr(exc, "error_code", None)
            if status is not None and int(status) in (HTTPStatus.TOO_MANY_REQUESTS,
                                                      HTTPStatus.SERVICE_UNAVAILABLE):
                raise OIPError(Code.RESOURCE_EXHAUSTED, "the encoder is overloaded "
                               f"({int(status)}); retry later") from None
            logger.exception("inference failed")
            raise OIPError(Code.INTERNAL, f"inference failed: {type(exc).__name__}") from None
        return InferResponse(model_name=self.card.name, model_version=self.version,
                             id=request.id,
                             outputs=[self._output(out, outputs[out.name]) for out in wanted])

    def _requested_outputs(self, outputs: list[RequestedOutput]) -> list[RequestedOutput]:
        if not outputs:
            return [RequestedOutput(name) for name in OUTPUT_NAMES]
        seen: set[str] = set()
        for out in outputs:
            if out.name not in OUTPUT_NAMES:
                raise OIPError(Code.INVALID_ARGUMENT,
                               f"unknown output {out.name!r}: the model's outputs are "
                               f"{', '.join(OUTPUT_NAMES)}")
            if out.name in seen:
                raise OIPError(Code.INVALID_ARGUMENT, f"output {out.name!r} requested twice")
            if out.class_count < 0:
                raise OIPError(Code.INVALID_ARGUMENT,
                               f"output {out.name!r}: classification count must be >= 1, "
                               f"got {out.class_count}")
            seen.add(out.name)
        return outputs

    def _single_input(self, inputs: list[InputTensor]) -> InputTensor:
        if len(inputs) != 1:
            raise OIPError(Code.INVALID_ARGUMENT,
                           f"expected exactly 1 input tensor {INPUT_NAME!r}, got {len(inputs)}")
        tensor = inputs[0]
        if tensor.name != INPUT_NAME:
            raise OIPError(Code.INVALID_ARGUMENT, f"unknown input {tensor.name!r}: the "
                                                  f"model's input is {INPUT_NAME!r}")
        if tensor.datatype not in ("BYTES", "UINT8"):
            size = self.card.preprocessing.crop_size
            raise OIPError(Code.INVALID_ARGUMENT,
                           f"input {tensor.name!r} has datatype {tensor.datatype!r}: send "
                           f"UINT8 [N,{size},{size},3] pixels or BYTES [N] encoded images")
        if any(d < 0 for d in tensor.shape):
            raise OIPError(Code.INVALID_ARGUMENT,
                           f"input {tensor.name!r} has a negative dimension in shape "
                           f"{list(tensor.shape)}")
        return tensor

    async def _infer_encoded(self, tensor: InputTensor, protocol: str) -> dict[str, np.ndarray]:
        shape = tensor.shape
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise OIPError(Code.INVALID_ARGUMENT,
                           f"BYTES input {tensor.name!r} must have shape [N] or [N, 1] (one "
                           f"encoded image per element), got {list(shape)}")
        count = shape[0]
        self.pipeline.check_count(count)
        if tensor.raw is not None:
            payloads = deserialize_bytes(tensor.raw, source=tensor.source)
        else:
            payloads = [bytes(item) for item in (tensor.elements or [])]
        if len(payloads) != count:
            raise OIPError(Code.INVALID_ARGUMENT,
                           f"input {tensor.name!r} has shape {list(shape)} ({count} elements) "
                           f"but {tensor.source} holds {len(payloads)}")
        result = await self.pipeline.run(payloads, endpoint=ENDPOINT, protocol=protocol)
        if result.decoded.errors:
            errors = [{"index": i, "code": e.code, "message": e.message}
                      for i, e in sorted(result.decoded.errors.items())]
            listed = "; ".join(f"[{e['index']}] {e['code']}: {e['message']}" for e in errors)
            raise OIPError(Code.INVALID_ARGUMENT,
                           f"{len(errors)} of {count} image(s) in {tensor.name!r} could not be "
                           f"used: {listed}", details={"errors": errors})
        assert result.outputs is not None  # every image decoded
        return result.outputs

    async def _infer_pixels(self, tensor: InputTensor, protocol: str) -> dict[str, np.ndarray]:
        size = self.card.preprocessing.crop_size
        expected = (size, size, 3)
        shape = tensor.shape
        if len(shape) != 4 or tuple(shape[1:]) != expected:
            raise OIPError(Code.INVALID_ARGUMENT,
                           f"UINT8 input {tensor.name!r} must have shape [N, {size}, {size}, 3] "
                           f"(RGB at the model's input size), got {list(shape)}")
        count = shape[0]
        self.pipeline.check_count(count)
        elements = count * size * size * 3
        if tensor.raw is not None:
            if len(tensor.raw) != elements:
                raise OIPError(Code.INVALID_ARGUMENT,
                               f"{tensor.source} holds {len(tensor.raw)} bytes but UINT8 shape "
                               f"{list(shape)} needs {elements}")
            pixels = np.frombuffer(tensor.raw, dtype=np.uint8)
        else:
            values = np.asarray(tensor.elements if tensor.elements is not None else [])
            if values.size != elements:
                raise OIPError(Code.INVALID_ARGUMENT,
                               f"{tensor.source} holds {values.size} values but UINT8 shape "
                               f"{list(shape)} needs {elements}")
            if values.dtype.kind not in "iu" or (values.size and (
                    values.min() < 0 or values.max() > 255)):
                raise OIPError(Code.INVALID_ARGUMENT,
                               f"{tensor.source}: UINT8 values must be integers in 0..255")
            pixels = values.astype(np.uint8)
        batch = pixels.reshape(count, size, size, 3)
        metrics.REQUEST_IMAGES.labels(endpoint=ENDPOINT).observe(count)
        outputs = await self.pipeline.encode_arrays(batch)
        self.pipeline.count(ENDPOINT, protocol, ok=count, failed=0)
        return outputs

    def _output(self, requested: RequestedOutput, values: np.ndarray) -> OutputTensor:
        values = np.asarray(values, dtype=np.float32)
        if not requested.class_count:
            return OutputTensor(requested.name, "FP32", values)
        k = min(requested.class_count, values.shape[1])
        order = np.argsort(-values, axis=1, kind="stable")[:, :k]
        labels = self.card.class_names if requested.name == "logits" else None
        data = np.empty((values.shape[0], k), dtype=object)
        for row in range(values.shape[0]):
            for rank, column in enumerate(order[row]):
                data[row, rank] = _classification(float(values[row, column]), int(column),
                                                  labels)
        return OutputTensor(requested.name, "BYTES", data)


def _classification(value: float, index: int, labels: list[str] | None) -> bytes:
    """Triton's ``"<value>:<index>[:<label>]"`` (value with float32 round-trip precision)."""
    text = f"{value:.9g}:{index}"
    if labels is not None and index < len(labels):
        text += f":{labels[index]}"
    return text.encode("utf-8")
