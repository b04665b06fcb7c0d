"""The Open Inference Protocol's HTTP/REST body codec: JSON tensors and Triton's binary tensor
data extension (``Inference-Header-Content-Length``), to and from the wire-independent tensors.

References: ``inference_rest.md`` of https://github.com/kserve/open-inference-protocol and
Triton's ``extension_binary_data.md``.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from starlette.responses import Response

from models.errors import RequestError
from service.kserve.tensors import InferRequest, InputTensor, RequestedOutput


def _bad_request(message: str) -> RequestError:
    return RequestError("bad_request", message)


def parse_infer(body: bytes, header_length: str | None, name: str,
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
    except RecursionError:
        raise _bad_request("the inference request's JSON is nested too deeply") from None
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
    """The leaves of nested lists, in order (iterative: any depth JSON allows is fine)."""
    flat: list[Any] = []
    stack: list[Any] = [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
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


def infer_response(response: Any, want_binary: dict[str, bool]) -> Response:
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
