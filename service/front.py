"""The in-memory HTTP front of ``POST /classify`` and ``POST /embed``: the serving hot path.

BentoML 1.4.39 answers a request to one of its routes by parsing the multipart body with
starlette's form parser, copying every file into an on-disk ``NamedTemporaryFile``
(``_bentoml_sdk/validators.py``), validating the whole input model with pydantic, and
re-validating the answer against the output model; and the Gateway had to re-encode JSON and raw
bodies into multipart for it, only for them to be parsed again. The Gateway already holds the
body in memory (it enforces ``max_request_bytes``), so for these two routes it hands the body
here instead:

* multipart is parsed in memory with python-multipart's ``MultipartParser`` (the parser
  starlette and BentoML use), JSON ``{"images": [{"b64"}]}`` and raw image bodies are read
  directly (:func:`service.gateway.parse_json_images`), with no re-encoding;
* the options (``top_k``; ``layer``, ``normalize``, ``dtype``, ``encoding``) are validated by a
  pydantic model derived from the BentoML route's own input model (:func:`options_model`), so
  the route signature stays their one declaration, and a bad option is the same 400
  ``{"error", "detail"}`` BentoML gives;
* the images go through the shared pipeline (:class:`service.pipeline.InferencePipeline`) and
  the shared post stage (:mod:`service.responses`), exactly as the BentoML route does
  (:meth:`service.service.CNNCodes.answer`); its JSON bytes, written from the numpy rows, are
  the answer, with no response model built and dumped (the BentoML route parses them into
  its declared model, which BentoML then validates and dumps again).

Read as BentoML reads them: text fields are JSON-decoded when they parse (:func:`field_value`,
BentoML's own client JSON-encodes every field) and file names keep their last path component
(:func:`client_name`). BentoML still serves the request around this: its middlewares
(request metrics, tracing, access log, the request timeout) wrap the Gateway; its CORS
middleware (off unless ``http.cors`` is configured) sits inside it and does not see these
answers; the routes stay declared (OpenAPI,
``bentoml build``, BentoML's clients) and ``/search`` and every other route are BentoML's.
Measured before it was made the default: see README "Performance".
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Protocol

from pydantic import BaseModel, ValidationError, create_model
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import JSONResponse, Response

from models.errors import CNNCodesError, RequestError
from service.bentoml_compat.uploads import FILE_FIELD_REFUSED, check_filename

logger = logging.getLogger(__name__)

#: routes answered here (everything else goes to BentoML's routes)
FRONT_PATHS = frozenset({"/classify", "/embed"})
FILE_FIELD = "images"

Files = list[tuple[str, bytes]]  # (file name as sent, encoded image)


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # as starlette's form parser: fall back to latin-1
        return raw.decode("latin-1")


def client_name(name: str | None) -> str | None:
    """The file name echoed to the client: its last path component, as BentoML keeps it
    (``os.path.basename`` in ``_bentoml_sdk/validators.py``); None for none or empty.

    Raises:
        RequestError: ``bad_request`` when it is longer than
            :data:`service.bentoml_compat.uploads.MAX_FILENAME_BYTES`.
    """
    if not name:
        return None
    base = os.path.basename(name)
    check_filename(base)
    return base or None


def field_value(text: str) -> Any:
    """A text field as BentoML's multipart serde reads it (``_bentoml_impl/serde.py``): its
    JSON value when it parses (``"3"`` -> 3, ``"false"`` -> False, ``'"features"'`` ->
    ``"features"``: BentoML's own HTTP client JSON-encodes every field), else the text."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def parse_multipart(body: bytes, content_type: str) -> tuple[Files, dict[str, str]]:
    """A ``multipart/form-data`` body (RFC 7578), parsed in memory.

    Args:
        body: the whole body (already bounded by ``max_request_bytes``).
        content_type: the request's ``Content-Type`` with its ``boundary`` parameter.

    Returns:
        ``(files, fields)``: ``(filename as sent, bytes)`` of every part named ``images``, in
        body order, and the last value of every other (text) part.

    Raises:
        RequestError: ``bad_request`` for a missing boundary, a malformed body, a part without
            a name, or an ``images`` part without a file name (a text value: BentoML would
            fetch it as a URL, we never do).
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError("bad_request", "malformed multipart/form-data body: Missing "
                                          "boundary in multipart.")
    files: Files = []
    fields: dict[str, str] = {}
    part: dict[str, Any] = {}
    header = [b"", b""]

    def on_part_begin() -> None:
        part.clear()
        part.update(disposition=b"", data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        if header[0].lower() == b"content-disposition":
            part["disposition"] = header[1]
        header[0] = header[1] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["data"].append(data[start:end])

    def on_part_end() -> None:
        _, options = parse_options_header(part["disposition"])
        if b"name" not in options:
            raise RequestError("bad_request", "malformed multipart/form-data body: The "
                               'Content-Disposition header field "name" must be provided.')
        name, data = _text(options[b"name"]), b"".join(part["data"])
        if name == FILE_FIELD:
            if b"filename" not in options:
                raise RequestError("bad_request", FILE_FIELD_REFUSED)
            files.append((_text(options[b"filename"]), data))
        else:
            fields[name] = _text(data)

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise RequestError("bad_request",
                           f"malformed multipart/form-data body: {exc}") from None
    return files, fields


def options_model(input_spec: type[BaseModel]) -> type[BaseModel]:
    """The pydantic model of a BentoML route's options: its input model without the
    ``images`` field, same name (so a validation error reads as BentoML's), lax mode (form
    values are strings: ``"3"`` -> 3, ``"false"`` -> False)."""
    fields = {name: (info.annotation, info) for name, info in input_spec.model_fields.items()
              if name != FILE_FIELD}
    return create_model(input_spec.__name__, **fields)  # type: ignore[call-overload]


def validation_error_response(exc: ValidationError) -> JSONResponse:
    """A pydantic validation error as BentoML 1.4.39 answers it (``api_endpoint_wrapper`` in
    ``_bentoml_impl/server/app.py``): 400 ``{"error": "N validation error for Input",
    "detail": [...]}``."""
    return JSONResponse({"error": f"{exc.error_count()} validation error for {exc.title}",
                         "detail": exc.errors(include_context=False, include_input=False)},
                        status_code=400)


class Answering(Protocol):
    """What the front needs of the service (:class:`service.service.CNNCodes`)."""

    async def answer(self, endpoint: str, payloads: list[bytes], filenames: list[str | None],
                     **options: Any) -> bytes:
        """Run the images through the pipeline; the route's JSON answer (UTF-8)."""
        ...


class HttpFront:
    """Answers ``/classify`` and ``/embed`` from an in-memory body (see the module).

    Args:
        get_service: the API worker's service instance (``bentoml.get_current_service``),
            read per request (it exists only once the worker has started).
        options: ``{path: options model}`` (:func:`options_model` of each route).
    """

    def __init__(self, get_service: Callable[[], Answering],
                 options: dict[str, type[BaseModel]]) -> None:
        self._service = get_service
        self._options = options

    async def answer(self, path: str, files: Files, fields: dict[str, str]) -> Response:
        """The JSON answer of ``path`` for ``files`` ``(filename, bytes)`` and text ``fields``.

        Raises:
            CNNCodesError: ``no_images``, ``too_many_images`` (from the pipeline), ``internal``
                (anything unexpected, logged); the Gateway answers them with their status.
        """
        names = [client_name(name) for name, _ in files]
        try:
            options = self._options[path].model_validate(
                {key: field_value(value) for key, value in fields.items()}).model_dump()
        except ValidationError as exc:
            return validation_error_response(exc)
        try:
            answer = await self._service().answer(
                path.lstrip("/"), [data for _, data in files], names, **options)
        except CNNCodesError:
            raise
        except Exception:  # a bug or a dead inference core: logged, a JSON 500, worker goes on
            logger.exception("%s failed", path)
            raise CNNCodesError("internal", f"{path} failed unexpectedly (logged)") from None
        return Response(answer, media_type="application/json")

