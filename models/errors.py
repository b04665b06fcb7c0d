"""The one error table: every error code with its HTTP status, gRPC status and meaning.

Every front maps failures through this table and nothing else: the HTTP routes and their
gateway, the Open Inference Protocol over HTTP (``/v2``) and gRPC, and batch jobs (whose error
rows carry the same codes). Two kinds of code:

* **per-image** codes (``ImageError``): one input could not be used. On ``/classify`` and
  ``/embed`` it is that item's ``error`` (the other images succeed); in a batch job it is that
  row's ``error_code``; on the Open Inference Protocol, whose response is one tensor per
  request, the request fails with ``images_failed`` listing each bad image's index and code.
* **request** codes (``RequestError``): the request as a whole is refused.

gRPC status names are those of ``grpc.StatusCode`` (https://grpc.github.io/grpc/core/
md_doc_statuscodes.html); HTTP statuses follow RFC 9110 (and RFC 6585 for 429).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErrorCode:
    """One row of the error table.

    Attributes:
        code: stable machine-readable name (``truncated``, ``too_many_images``...).
        http_status: status of an HTTP answer that fails with it.
        grpc_status: ``grpc.StatusCode`` member name of a gRPC answer that fails with it.
        meaning: what it means, for documentation and as the default message.
        per_image: True for codes about one image (an item/row error), False for codes that
            refuse a whole request.
    """

    code: str
    http_status: int
    grpc_status: str
    meaning: str
    per_image: bool = False


_TABLE: tuple[ErrorCode, ...] = (
    # per-image: one input is unusable; the other images of the request go on
    ErrorCode("empty", 400, "INVALID_ARGUMENT", "the file is empty (0 bytes)", True),
    ErrorCode("not_an_image", 400, "INVALID_ARGUMENT", "not a recognised image format", True),
    ErrorCode("unsupported_format", 400, "INVALID_ARGUMENT",
              "an image format the service does not accept", True),
    ErrorCode("truncated", 400, "INVALID_ARGUMENT",
              "the image data is incomplete or corrupt", True),
    ErrorCode("too_many_pixels", 400, "INVALID_ARGUMENT",
              "more pixels than max_image_pixels (decompression bomb guard)", True),
    ErrorCode("too_small", 400, "INVALID_ARGUMENT",
              "a side is shorter than min_image_side", True),
    ErrorCode("decode_failed", 400, "INVALID_ARGUMENT",
              "the decoder failed on this file in an unexpected way", True),
    ErrorCode("too_large", 400, "INVALID_ARGUMENT",
              "the file has more bytes than max_file_bytes", True),
    ErrorCode("not_a_file", 400, "INVALID_ARGUMENT",
              "not a regular file (a directory, FIFO, device or socket)", True),
    ErrorCode("unreadable", 400, "INVALID_ARGUMENT", "the file cannot be read", True),
    # request: the whole request is refused
    ErrorCode("bad_request", 400, "INVALID_ARGUMENT", "the request is malformed"),
    ErrorCode("no_images", 400, "INVALID_ARGUMENT", "the request carries no images"),
    ErrorCode("images_failed", 400, "INVALID_ARGUMENT",
              "one or more images of a one-tensor request could not be used"),
    ErrorCode("unauthenticated", 401, "UNAUTHENTICATED", "missing or invalid API key"),
    ErrorCode("admin_disabled", 403, "PERMISSION_DENIED", "the admin API is disabled"),
    ErrorCode("not_found", 404, "NOT_FOUND", "no such model, version or route"),
    ErrorCode("reload_refused", 409, "FAILED_PRECONDITION",
              "the requested model version cannot be loaded; the old one keeps serving"),
    ErrorCode("index_mismatch", 409, "FAILED_PRECONDITION",
              "the search index holds codes of another model version than the one served"),
    ErrorCode("too_many_images", 413, "RESOURCE_EXHAUSTED",
              "more images than max_images_per_request"),
    ErrorCode("body_too_large", 413, "RESOURCE_EXHAUSTED",
              "the request has more bytes than max_request_bytes"),
    ErrorCode("unsupported_media_type", 415, "INVALID_ARGUMENT",
              "a content type the route does not accept"),
    ErrorCode("overloaded", 429, "RESOURCE_EXHAUSTED",
              "too many requests in flight; retry after Retry-After seconds"),
    ErrorCode("not_ready", 503, "UNAVAILABLE", "the model is not ready yet"),
    ErrorCode("timeout", 504, "DEADLINE_EXCEEDED", "the request took longer than its deadline"),
    ErrorCode("internal", 500, "INTERNAL", "an unexpected server error (logged)"),
)

ERRORS: dict[str, ErrorCode] = {row.code: row for row in _TABLE}
IMAGE_ERROR_CODES: frozenset[str] = frozenset(r.code for r in _TABLE if r.per_image)


def lookup(code: str) -> ErrorCode:
    """The table row of ``code``.

    Raises:
        KeyError: ``code`` is not in the table (a programming error: every raise site names a
            code from the table).
    """
    return ERRORS[code]


class CNNCodesError(Exception):
    """A failure with a code from the error table and a message naming the problem.

    Args:
        code: a key of :data:`ERRORS`.
        message: human-readable, names the offending field, image, limit or version; defaults
            to the table's meaning.
        details: machine-readable extras (e.g. ``{"errors": [{"index", "code", "message"}]}``).
        headers: HTTP headers the answer must carry (``Retry-After``, ``WWW-Authenticate``).

    Raises:
        KeyError: ``code`` is not in the table.
    """

    def __init__(self, code: str, message: str | None = None, *,
                 details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.spec = lookup(code)
        self.code = code
        self.message = message or self.spec.meaning
        self.details = details or {}
        self.headers = headers or {}
        super().__init__(f"{code}: {self.message}")

    @property
    def http_status(self) -> int:
        """HTTP status of this error (from the table)."""
        return self.spec.http_status

    @property
    def grpc_status(self) -> str:
        """``grpc.StatusCode`` member name of this error (from the table)."""
        return self.spec.grpc_status

    def body(self) -> dict[str, Any]:
        """The JSON error body every HTTP front answers: ``{"error", "code", **details}``."""
        return {"error": self.message, "code": self.code, **self.details}


class ImageError(CNNCodesError):
    """One image cannot be used (a per-image code); the request or job goes on without it."""

    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(code, message)
        if not self.spec.per_image:
            raise ValueError(f"{code!r} is a request error code, not a per-image one")


class RequestError(CNNCodesError):
    """A whole request is refused (a request code of the table)."""
