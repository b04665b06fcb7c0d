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
import logging
from http import HTTPStatus
from importlib import metadata as importlib_metadata
from typing import Any, Awaitable, Callable, Protocol

import numpy as np

from cnn_codes.settings import Settings
from models.card import INPUT_NAME, OUTPUT_NAMES, ModelCard
from models.errors import RequestError
from models.postprocess import top_k
from service import metrics
from service.kserve import model_config
from service.kserve.tensors import (InferRequest, InferResponse, InputTensor, OutputTensor,
                                    RequestedOutput, deserialize_bytes)
from service.pipeline import InferencePipeline
from service.served import ModelHolder

logger = logging.getLogger("cnn_codes.kserve")

SERVER_NAME = "cnn-codes"
# Extensions in the sense of ServerMetadata.extensions (Triton's names).
EXTENSIONS: tuple[str, ...] = ("classification", "model_configuration", "binary_tensor_data")
ENDPOINT = "infer"  # ``endpoint`` label of the shared image metrics



class ServedModel(Protocol):
    """What the front needs from the BentoML service instance (``CNNCodes``)."""

    holder: ModelHolder
    settings: Settings
    pipeline: InferencePipeline

    async def serving_now(self) -> bool: ...


def server_version() -> str:
    """This package's version (``cnn-codes`` distribution), or ``unknown``."""
    try:
        return importlib_metadata.version("cnn-codes")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


class InferenceFront:
    """The Open Inference Protocol over one served model, for every transport.

    Args:
        holder: the worker's model holder (:class:`service.served.ModelHolder`): the served
            card (names, dims, classes, input size), swapped whole by a hot reload.
        settings: limits (images per request) and batching numbers shown in the config.
        pipeline: the shared decode -> Encoder pipeline (one adaptive batcher for all
            protocols).
        is_ready: coroutine telling whether the service is ready (canary inference done).
    """

    def __init__(self, holder: ModelHolder, settings: Settings, pipeline: InferencePipeline,
                 is_ready: Callable[[], Awaitable[bool]]) -> None:
        self.holder = holder
        self.settings = settings
        self.pipeline = pipeline
        self._is_ready = is_ready

    @property
    def card(self) -> ModelCard:
        """The served card now (follows hot reloads)."""
        return self.holder.card

    @property
    def version(self) -> str:
        """The served version, as a string (follows hot reloads: the card is replaced)."""
        return str(self.card.version)

    @classmethod
    def for_service(cls, service: ServedModel) -> "InferenceFront":
        """The front of a service instance, created once and kept on the instance."""
        front = getattr(service, "_oip_front", None)
        if front is None:
            front = cls(service.holder, service.settings, service.pipeline,
                        service.serving_now)
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
            RequestError: ``not_found`` naming the model or version this server serves.
        """
        if name != self.card.name:
            raise RequestError("not_found", f"unknown model {name!r}: this server serves "
                                           f"{self.card.name!r} (version {self.version})")
        if version not in ("", self.version):
            raise RequestError("not_found", f"model {name!r} has no version {version!r}: this "
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
        """OIP model metadata of the served card (see :func:`model_config.model_metadata`).

        Raises:
            RequestError: ``not_found``.
        """
        self.resolve(name, version)
        return model_config.model_metadata(self.card)

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        """Triton model configuration of the served card (see
        :func:`model_config.model_config`).

        Raises:
            RequestError: ``not_found``.
        """
        self.resolve(name, version)
        return model_config.model_config(self.card, self.settings)

    # -- inference -----------------------------------------------------------------------

    async def infer(self, request: InferRequest, *, protocol: str) -> InferResponse:
        """Validate, run through the shared pipeline, and build the requested outputs.

        Args:
            request: the decoded request.
            protocol: ``grpc`` or ``http``: the ``protocol`` label of the image metrics.

        Raises:
            RequestError: ``not_found`` (model/version), ``not_ready``, ``bad_request``
                (tensor problems), ``images_failed`` (images that cannot be used, each named
                with its index and code), ``too_many_images``, ``overloaded``.
        """
        self.resolve(request.model_name, request.model_version)
        wanted = self._requested_outputs(request.outputs)
        tensor = self._single_input(request.inputs)
        if not await self.ready():
            raise RequestError("not_ready", f"model {self.card.name!r} is not ready yet "
                                             "(start-up canary inference pending); retry")
        try:
            if tensor.datatype == "BYTES":
                outputs = await self._infer_encoded(tensor, protocol)
            else:
                outputs = await self._infer_pixels(tensor, protocol)
        except RequestError as exc:
            if exc.code in ("no_images", "too_many_images"):
                raise RequestError(exc.code, f"input {tensor.name!r}: {exc.message}") from None
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status = getattr(exc, "error_code", None)
            if status is not None and int(status) in (HTTPStatus.TOO_MANY_REQUESTS,
                                                      HTTPStatus.SERVICE_UNAVAILABLE):
                raise RequestError("overloaded", "the encoder is overloaded "
                               f"({int(status)}); retry later") from None
            logger.exception("inference failed")
            raise RequestError("internal", f"inference failed: {type(exc).__name__}") from None
        return InferResponse(model_name=self.card.name, model_version=self.version,
                             id=request.id,
                             outputs=[self._output(out, outputs[out.name]) for out in wanted])

    def _requested_outputs(self, outputs: list[RequestedOutput]) -> list[RequestedOutput]:
        if not outputs:
            return [RequestedOutput(name) for name in OUTPUT_NAMES]
        seen: set[str] = set()
        for out in outputs:
            if out.name not in OUTPUT_NAMES:
                raise RequestError("bad_request",
                               f"unknown output {out.name!r}: the model's outputs are "
                               f"{', '.join(OUTPUT_NAMES)}")
            if out.name in seen:
                raise RequestError("bad_request", f"output {out.name!r} requested twice")
            if out.class_count < 0:
                raise RequestError("bad_request",
                               f"output {out.name!r}: classification count must be >= 1, "
                               f"got {out.class_count}")
            seen.add(out.name)
        return outputs

    def _single_input(self, inputs: list[InputTensor]) -> InputTensor:
        if len(inputs) != 1:
            raise RequestError("bad_request",
                           f"expected exactly 1 input tensor {INPUT_NAME!r}, got {len(inputs)}")
        tensor = inputs[0]
        if tensor.name != INPUT_NAME:
            raise RequestError("bad_request", f"unknown input {tensor.name!r}: the "
                                                  f"model's input is {INPUT_NAME!r}")
        if tensor.datatype not in ("BYTES", "UINT8"):
            size = self.card.preprocessing.crop_size
            raise RequestError("bad_request",
                           f"input {tensor.name!r} has datatype {tensor.datatype!r}: send "
                           f"UINT8 [N,{size},{size},3] pixels or BYTES [N] encoded images")
        if any(d < 0 for d in tensor.shape):
            raise RequestError("bad_request",
                           f"input {tensor.name!r} has a negative dimension in shape "
                           f"{list(tensor.shape)}")
        return tensor

    async def _infer_encoded(self, tensor: InputTensor, protocol: str) -> dict[str, np.ndarray]:
        shape = tensor.shape
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise RequestError("bad_request",
                           f"BYTES input {tensor.name!r} must have shape [N] or [N, 1] (one "
                           f"encoded image per element), got {list(shape)}")
        count = shape[0]
        self.pipeline.check_count(count)
        if tensor.raw is not None:
            payloads = deserialize_bytes(tensor.raw, source=tensor.source)
        else:
            payloads = [bytes(item) for item in (tensor.elements or [])]
        if len(payloads) != count:
            raise RequestError("bad_request",
                           f"input {tensor.name!r} has shape {list(shape)} ({count} elements) "
                           f"but {tensor.source} holds {len(payloads)}")
        result = await self.pipeline.run(payloads, endpoint=ENDPOINT, protocol=protocol)
        if result.decoded.errors:
            errors = [{"index": i, "code": e.code, "message": e.message}
                      for i, e in sorted(result.decoded.errors.items())]
            listed = "; ".join(f"[{e['index']}] {e['code']}: {e['message']}" for e in errors)
            raise RequestError("images_failed",
                           f"{len(errors)} of {count} image(s) in {tensor.name!r} could not be "
                           f"used: {listed}", details={"errors": errors})
        assert result.outputs is not None  # every image decoded
        return result.outputs

    async def _infer_pixels(self, tensor: InputTensor, protocol: str) -> dict[str, np.ndarray]:
        size = self.card.preprocessing.crop_size
        expected = (size, size, 3)
        shape = tensor.shape
        if len(shape) != 4 or tuple(shape[1:]) != expected:
            raise RequestError("bad_request",
                           f"UINT8 input {tensor.name!r} must have shape [N, {size}, {size}, 3] "
                           f"(RGB at the model's input size), got {list(shape)}")
        count = shape[0]
        self.pipeline.check_count(count)
        elements = count * size * size * 3
        if tensor.raw is not None:
            if len(tensor.raw) != elements:
                raise RequestError("bad_request",
                               f"{tensor.source} holds {len(tensor.raw)} bytes but UINT8 shape "
                               f"{list(shape)} needs {elements}")
            pixels = np.frombuffer(tensor.raw, dtype=np.uint8)
        else:
            values = np.asarray(tensor.elements if tensor.elements is not None else [])
            if values.size != elements:
                raise RequestError("bad_request",
                               f"{tensor.source} holds {values.size} values but UINT8 shape "
                               f"{list(shape)} needs {elements}")
            if values.dtype.kind not in "iu" or (values.size and (
                    values.min() < 0 or values.max() > 255)):
                raise RequestError("bad_request",
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
        order = top_k(values, k)
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
