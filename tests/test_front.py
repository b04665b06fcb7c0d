"""The in-memory front's parts without a server (service/front.py): the multipart parser on
bodies real clients encode (httpx), its refusals, and the options model derived from a route's
input model. The served behaviour is tests/test_http_inputs.py (both fronts answer alike)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import httpx
import pytest
from pydantic import Field, ValidationError, create_model

from models.errors import RequestError
from service.bentoml_compat.uploads import MAX_FILENAME_BYTES
from service.front import (client_name, field_value, options_model, parse_multipart,
                           validation_error_response)


def encode(files=None, data=None) -> tuple[bytes, str]:
    """What httpx sends for ``files=`` / ``data=``: (body, content type)."""
    request = httpx.Request("POST", "http://x/embed", files=files, data=data)
    return request.read(), request.headers["content-type"]


def test_parses_files_in_order_and_text_fields():
    body, content_type = encode(
        files=[("images", ("b.jpg", b"\xff\xd8second")), ("images", ("a.jpg", b"first\r\n--")),
               ("images", ("ü ñ.png", b""))],
        data={"top_k": "3", "normalize": "false"})
    files, fields = parse_multipart(body, content_type)
    assert files == [("b.jpg", b"\xff\xd8second"), ("a.jpg", b"first\r\n--"), ("ü ñ.png", b"")]
    assert fields == {"top_k": "3", "normalize": "false"}


def test_large_file_is_whole():
    payload = bytes(range(256)) * 40_000  # 10 MB, every byte value
    files, _ = parse_multipart(*encode(files=[("images", ("big.bin", payload))]))
    assert files == [("big.bin", payload)]


@pytest.mark.parametrize("case", ["no_boundary", "garbage", "text_images", "no_name"])
def test_refusals_are_bad_request(case):
    if case == "no_boundary":
        body, content_type = b"x", "multipart/form-data"
        want = "boundary"
    elif case == "garbage":
        body, content_type = b"not multipart at all", "multipart/form-data; boundary=abc"
        want = "malformed"
    elif case == "text_images":
        body, content_type = encode(files={"images": (None, "http://10.0.0.1/x.png")})
        want = "uploaded files"
    else:
        body = (b"--abc\r\nContent-Disposition: form-data\r\n\r\nvalue\r\n--abc--\r\n")
        content_type, want = "multipart/form-data; boundary=abc", "name"
    with pytest.raises(RequestError) as raised:
        parse_multipart(body, content_type)
    assert raised.value.code == "bad_request" and raised.value.http_status == 400
    assert want in raised.value.message


def test_options_model_follows_the_route_declaration():
    Input = create_model(  # what BentoML builds from a route signature
        "Input", images=(list[Path], ...),
        top_k=(Annotated[int, Field(ge=1, le=1000)], 5),
        layer=(Literal["embedding", "features"], "embedding"), normalize=(bool, True))
    options = options_model(Input)
    assert "images" not in options.model_fields
    assert options.model_validate({}).model_dump() == {"top_k": 5, "layer": "embedding",
                                                      "normalize": True}
    parsed = options.model_validate({"top_k": "7", "normalize": "false", "extra": "ignored"})
    assert parsed.model_dump() == {"top_k": 7, "layer": "embedding", "normalize": False}
    with pytest.raises(ValidationError) as raised:
        options.model_validate({"top_k": "0", "layer": "logits"})
    response = validation_error_response(raised.value)
    assert response.status_code == 400
    assert b"2 validation error for Input" in response.body  # BentoML's wording, kept
    assert b'"top_k"' in response.body and b'"layer"' in response.body


def test_file_names_and_field_values_read_as_bentoml_reads_them():
    assert client_name("photos/2024/a.jpg") == "a.jpg" and client_name("") is None
    assert client_name(None) is None and client_name("\ud800.jpg") == "\ud800.jpg"
    with pytest.raises(RequestError):
        client_name("b" * (MAX_FILENAME_BYTES + 1))
    assert client_name("b" * 300 + "/short.jpg") == "short.jpg"
    assert [field_value(v) for v in ("3", "false", '"features"', "features", "[" * 10_000)] \
        == [3, False, "features", "features", "[" * 10_000]
