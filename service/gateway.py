"""The API service's front door (ASGI middleware): auth, overload, body limit, input formats.

In order, for every HTTP request:

1. **Auth**: when API keys are configured, paths outside ``open_paths`` need
   ``Authorization: Bearer <key>`` (401 otherwise, RFC 6750); ``/admin/*`` always needs one
   of ``admin_keys`` (403 when none are configured). The page at ``/`` and its assets
   (:data:`service.page.PAGE_PATHS`) are always open; the API calls it makes are not.
2. **Overload**: at most ``max_concurrency`` requests in flight per worker; the next one gets
   429 with ``Retry-After`` at once instead of queueing (Infinity/Triton behaviour).
3. **Body limit**: bodies above ``max_request_bytes`` get 413 (BentoML has no limit of its own).
4. **Bounded readiness**: ``/readyz`` answers within ``readiness_timeout_s`` (503
   ``not_ready`` otherwise), see :func:`service.bentoml_compat.bounded_readiness`.
5. **Input formats** for ``/classify``, ``/embed`` and ``/search``: multipart, a raw image
   body (``image/*`` or ``application/octet-stream``, options as query parameters) or JSON
   ``{"images": [{"b64": "..."}], ...options}``. Other content types get 415.
   ``/classify`` and ``/embed`` (the hot path) are answered from the body in memory by the
   in-memory front (:mod:`service.front`). For ``/search`` (a BentoML route) JSON and raw
   bodies are transcoded to the multipart form the route declares (a ``/search`` JSON body
   of ``{"vectors": [[...]]}`` goes to the route as JSON: no file in it).

Every error body is JSON ``{"error": "...", "code": "..."}`` with a code and status from the
one error table (:mod:`models.errors`).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import Any, AsyncIterator
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnn_codes.settings import Settings
from models.errors import CNNCodesError, RequestError
from service.auth import check_api_key
from service.bentoml_compat import READINESS_PATHS, bounded_readiness
from service.front import FRONT_PATHS, HttpFront, parse_multipart
from service.page import PAGE_PATHS

INFER_PATHS = frozenset({"/classify", "/embed", "/search"})
#: ``/search`` also takes ``{"vectors": [[...]], ...}``: such a JSON body goes to the route as is.
VECTOR_PATHS = frozenset({"/search"})
ADMIN_PREFIX = "/admin/"
RAW_TYPES = ("image/", "application/octet-stream")


def encode_multipart(files: list[tuple[str, bytes]], fields: dict[str, str]) -> tuple[bytes, str]:
    """``multipart/form-data`` body (RFC 7578) with each file as a part named ``images``.

    Returns:
        (body, content type with boundary).
    """
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for name, value in fields.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                      .encode() + value.encode() + b"\r\n")
    for filename, data in files:
        safe = filename.replace('"', "").replace("\r", "").replace("\n", "")
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
                      f'filename="{safe}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                      .encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def _field_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def parse_json_images(body: bytes) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """``{"images": [{"b64": ..., "filename"?: ...}], **options}`` -> ``(files, options)``:
    ``(filename, bytes)`` per image (filename ``images[i]`` when none is given) and every other
    key as text (a JSON value other than a string is its JSON text).

    Raises:
        RequestError: ``bad_request`` naming what is wrong (not JSON, no images, bad base64).
    """
    try:
        document = json.loads(body)
    except RecursionError:
        raise RequestError("bad_request", "the JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError("bad_request", f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise RequestError("bad_request", 'expected a JSON object {"images": [{"b64": "..."}], ...}')
    files: list[tuple[str, bytes]] = []
    for index, item in enumerate(document["images"]):
        if not isinstance(item, dict) or not isinstance(item.get("b64"), str):
            raise RequestError("bad_request", f'images[{index}] must be an object {{"b64": "..."}}')
        try:
            data = base64.b64decode(item["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("bad_request", f"images[{index}].b64 is not valid base64") from None
        filename = item.get("filename")
        files.append((filename if isinstance(filename, str) else f"images[{index}]", data))
    try:
        options = {k: _field_text(v) for k, v in document.items() if k != "images"}
    except RecursionError:
        raise RequestError("bad_request", "an option's JSON value is nested too deeply") from None
    return files, options


def transcode_json(body: bytes) -> tuple[bytes, str]:
    """:func:`parse_json_images` re-encoded as multipart (for the BentoML route ``/search``).

    Raises:
        RequestError: as :func:`parse_json_images`.
    """
    files, options = parse_json_images(body)
    return encode_multipart(files, options)


def _is_vector_query(body: bytes) -> bool:
    """A JSON object with ``vectors`` and no ``images`` (``/search`` by CNN codes)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(document, dict) and "vectors" in document and "images" not in document


def parse_raw_image(body: bytes, query_string: bytes
                    ) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """A raw image body plus ``?option=value`` query parameters -> ``(files, options)``: one
    file named ``body`` and the query's options as text."""
    return [("body", body)], dict(parse_qsl(query_string.decode("latin-1")))


def transcode_raw(body: bytes, query_string: bytes) -> tuple[bytes, str]:
    """:func:`parse_raw_image` re-encoded as multipart (for the BentoML route ``/search``)."""
    return encode_multipart(*parse_raw_image(body, query_string))


async def read_body(chunks: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """A request body of at most ``limit`` bytes, refused as soon as the declared
    ``Content-Length`` or the bytes received so far exceed it (every HTTP front reads bodies
    through this).

    Raises:
        RequestError: ``body_too_large``.
    """
    too_large = RequestError("body_too_large", f"the request body exceeds the limit of {limit} "
                                               "bytes (CNN_CODES_MAX_REQUEST_BYTES)")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large
        parts.append(chunk)
    return b"".join(parts)


async def _asgi_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The body chunks of an ASGI ``http.request`` stream.

    Raises:
        RequestError: ``bad_request`` when the client disconnects before the body ended.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError("bad_request", "the client disconnected before the body ended")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


class Gateway:
    """ASGI middleware implementing the module's steps; one instance per API worker.

    Args:
        app: the downstream ASGI app (BentoML's routes).
        settings: limits, keys, open paths.
        front: answers ``/classify`` and ``/embed`` from the body in memory
            (:mod:`service.front`); None sends them to BentoML's routes too.
    """

    def __init__(self, app: ASGIApp, settings: Settings, front: HttpFront | None = None) -> None:
        self.app = app
        self.settings = settings
        self.front = front
        self.open_paths = frozenset(settings.open_paths) | PAGE_PATHS
        self._in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self._handle(scope, receive, send)
        except CNNCodesError as exc:
            response = JSONResponse(exc.body(), status_code=exc.http_status,
                                    headers=exc.headers)
            await response(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        # readiness answers within readiness_timeout_s (503 otherwise), open path or not
        app = self._bounded_readiness if path in READINESS_PATHS else self.app
        if path in self.open_paths:
            await app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if path.startswith(ADMIN_PREFIX):
            if not self.settings.admin_keys:
                raise RequestError("admin_disabled", "the admin API is disabled: set admin_keys")
            if not check_api_key(headers.get("authorization"), self.settings.admin_keys):
                raise RequestError("unauthenticated", "missing or invalid admin key",
                                   headers={"WWW-Authenticate": "Bearer"})
        elif not check_api_key(headers.get("authorization"), self.settings.api_keys):
            raise RequestError("unauthenticated", "missing or invalid API key: send "
                               "'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})
        if self._in_flight >= self.settings.max_concurrency:
            raise RequestError(
                "overloaded", f"overloaded: {self._in_flight} requests in flight; retry later",
                headers={"Retry-After": str(self.settings.retry_after_s)})
        self._in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._in_flight -= 1

        async def send_then_release(message: Message) -> None:
            # the slot is free once the last body chunk is out: a client that sends its next
            # request on receiving the answer must not find its own old request counted
            if message["type"] == "http.response.body" and not message.get("more_body"):
                release()
            await send(message)

        try:
            if scope["method"] == "POST" and path in FRONT_PATHS and self.front is not None:
                await self._answer_in_memory(scope, receive, send_then_release, headers)
                return
            if scope["method"] == "POST" and path in INFER_PATHS:
                scope, receive = await self._normalise_body(scope, receive, headers)
            await app(scope, receive, send_then_release)
        finally:
            release()

    async def _read_images_body(self, receive: Receive,
                                headers: dict[str, str]) -> tuple[str, str, bytes]:
        """``(content type, media type, body)`` of an image request, the body read within
        ``max_request_bytes``.

        Raises:
            RequestError: ``body_too_large``; ``unsupported_media_type`` for a content type
                other than multipart, JSON or a raw image.
        """
        content_type = headers.get("content-type", "")
        media_type = content_type.split(";")[0].strip().lower()
        body = await read_body(_asgi_chunks(receive), headers.get("content-length"),
                               self.settings.max_request_bytes)
        if media_type not in ("multipart/form-data", "application/json") and \
                not media_type.startswith(RAW_TYPES):
            raise RequestError(
                "unsupported_media_type", f"unsupported content type {media_type or '(none)'}: "
                "send multipart/form-data, application/json with base64 images, or a raw "
                "image/* body")
        return content_type, media_type, body

    async def _answer_in_memory(self, scope: Scope, receive: Receive, send: Send,
                                headers: dict[str, str]) -> None:
        """``/classify`` and ``/embed`` through the in-memory front (:mod:`service.front`)."""
        assert self.front is not None
        content_type, media_type, body = await self._read_images_body(receive, headers)
        if media_type == "multipart/form-data":
            files, fields = parse_multipart(body, content_type)
        elif media_type == "application/json":
            files, fields = parse_json_images(body)
        else:
            files, fields = parse_raw_image(body, scope.get("query_string", b""))
        response = await self.front.answer(scope["path"], files, fields)
        await response(scope, receive, send)

    async def _bounded_readiness(self, scope: Scope, receive: Receive, send: Send) -> None:
        await bounded_readiness(self.app, scope, receive, send,
                                self.settings.readiness_timeout_s)

    async def _normalise_body(self, scope: Scope, receive: Receive,
                              headers: dict[str, str]) -> tuple[Scope, Receive]:
        """Read the body within the limit; transcode JSON / raw images to multipart."""
        content_type, media_type, body = await self._read_images_body(receive, headers)
        if media_type == "multipart/form-data":
            new_type = content_type
        elif media_type == "application/json" and scope["path"] in VECTOR_PATHS and \
                _is_vector_query(body):
            new_type = content_type
        elif media_type == "application/json":
            body, new_type = transcode_json(body)
        else:
            body, new_type = transcode_raw(body, scope.get("query_string", b""))
        replaced = [(k, v) for k, v in scope["headers"]
                    if k.lower() not in (b"content-type", b"content-length")]
        replaced += [(b"content-type", new_type.encode("latin-1")),
                     (b"content-length", str(len(body)).encode())]
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return {**scope, "headers": replaced}, replay
