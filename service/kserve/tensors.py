"""Wire-independent tensors of the Open Inference Protocol (KServe v2) front.

The gRPC server and the HTTP ``/v2`` routes translate their wire format into these plain
objects and back; :class:`service.kserve.protocol.InferenceFront` works on them only.
BYTES elements are serialised as in the protocol: 4-byte little-endian length + bytes
(https://github.com/kserve/open-inference-protocol, ``inference_rest.md``, binary data).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from models.errors import RequestError
from models.postprocess import json_numbers


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
        return json_numbers(flat)


@dataclass(frozen=True)
class InferResponse:
    """An inference answer for :attr:`model_name` version :attr:`model_version`."""

    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements -> the raw form: each as ``uint32`` little-endian length + bytes."""
    return b"".join(struct.pack("<I", len(item)) + bytes(item) for item in items)


def deserialize_bytes(raw: bytes, *, source: str = "raw contents") -> list[bytes]:
    """Inverse of :func:`serialize_bytes`.

    Raises:
        RequestError: ``bad_request`` when a length prefix runs past the end of ``raw``.
    """
    items: list[bytes] = []
    offset, size, view = 0, len(raw), memoryview(raw)
    while offset < size:
        if size - offset < 4:
            raise RequestError("bad_request",
                           f"{source} is not a valid BYTES tensor: {size - offset} stray "
                           f"byte(s) after element {len(items)} where a 4-byte length "
                           "prefix was expected")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if length > size - offset:
            raise RequestError("bad_request",
                           f"{source} is not a valid BYTES tensor: element {len(items)} "
                           f"declares {length} bytes but only {size - offset} remain")
        items.append(bytes(view[offset:offset + length]))
        offset += length
    return items
