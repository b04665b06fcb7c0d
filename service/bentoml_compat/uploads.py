"""Uploads: no URL fetching, bounded file names, the client's file name.

Checked against BentoML 1.4.39 (see :mod:`service.bentoml_compat`).
"""

from __future__ import annotations

import errno
import logging
import typing as t
from pathlib import Path

from _bentoml_impl import serde as bentoml_serde
from bentoml.exceptions import InvalidArgument
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from models.errors import RequestError

logger = logging.getLogger(__name__)


# --- 2. No URL fetching -----------------------------------------------------------------
# Close BentoML's server-side request forgery hole: file fields are never fetched from URLs.
#
# BentoML 1.4 fetches a URL with httpx when a file-typed field arrives as a string (multipart or
# url-encoded form value, ``MultipartSerde.ensure_file``) or when a JSON body is a URL
# (``JSONSerde.parse_request``), see ``_bentoml_impl/serde.py``. A service must never fetch a URL
# on a client's behalf, so :func:`install` swaps those two serdes in BentoML's ``ALL_SERDE``
# registry for subclasses that refuse (400) instead. Call it once per API worker.

# The longest client file name an upload may carry: NAME_MAX (255 bytes on Linux) less
# NamedTemporaryFile's ``tmp`` + 8 random characters (see :func:`client_filename`).
MAX_FILENAME_BYTES = 244
#: the answer to a file field sent as a text value (BentoML would fetch it as a URL)
FILE_FIELD_REFUSED = ("file fields must be uploaded files (multipart parts with a filename); "
                      "URLs and text values are not fetched")
NAME_TOO_LONG = ("an uploaded file's name is too long: send file names of at most "
                 f"{MAX_FILENAME_BYTES} bytes")


def check_filename(name: str) -> None:
    """Refuse a client file name longer than :data:`MAX_FILENAME_BYTES` (UTF-8 bytes), on every
    HTTP path alike (BentoML's temp file could not hold it; the in-memory front refuses it too).

    Raises:
        RequestError: ``bad_request``.
    """
    if len(name.encode("utf-8", "surrogatepass")) > MAX_FILENAME_BYTES:
        raise RequestError("bad_request", NAME_TOO_LONG)


class NoFetchMultipartSerde(bentoml_serde.MultipartSerde):
    """Multipart/form serde whose file fields must be uploaded files, and whose malformed
    bodies (no boundary, broken parts) are a 400, not BentoML's 500."""

    async def parse_request(self, request: Request, cls: type) -> t.Any:
        """Parse the form; malformed multipart becomes :class:`InvalidArgument` (400)."""
        try:
            return await super().parse_request(request, cls)
        except (HTTPException, MultiPartException, UnicodeDecodeError) as exc:
            detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or exc
            raise InvalidArgument(f"malformed multipart/form-data body: {detail}") from None
        except RecursionError:  # json.loads of a form field (``MultipartSerde.parse_request``)
            raise InvalidArgument("a form field's JSON value is nested too deeply") from None
        except OSError as exc:
            # BentoML stores each upload as NamedTemporaryFile(suffix=<client file name>)
            # (``_bentoml_sdk/validators.py``): a name past the file system's limit fails there
            if exc.errno != errno.ENAMETOOLONG:
                raise
            raise InvalidArgument(NAME_TOO_LONG) from None

    @staticmethod
    async def ensure_file(obj: t.Any) -> UploadFile:
        """Accept an uploaded file; refuse a string (BentoML would fetch it as a URL).

        Raises:
            InvalidArgument: HTTP 400.
        """
        if isinstance(obj, UploadFile):
            return obj
        raise InvalidArgument(FILE_FIELD_REFUSED)


class NoFetchJSONSerde(bentoml_serde.JSONSerde):
    """JSON serde that never treats the body as a URL to download."""

    async def parse_request(self, request: Request, cls: type) -> t.Any:
        """Parse the body as JSON only (no URL download)."""
        body = await request.body()
        try:
            return self.deserialize_model(
                bentoml_serde.Payload((body,), metadata=request.headers), cls)
        except RecursionError:
            raise InvalidArgument("the JSON body is nested too deeply") from None


def install_no_fetch() -> None:
    """Register the no-fetch serdes for JSON, multipart and url-encoded bodies."""
    registry = t.cast(dict, bentoml_serde.ALL_SERDE)
    registry["application/json"] = NoFetchJSONSerde
    registry["multipart/form-data"] = NoFetchMultipartSerde
    registry["application/x-www-form-urlencoded"] = NoFetchMultipartSerde

# --- 4. The client's file name ------------------------------------------------------------

def client_filename(path: Path) -> str | None:
    """The file name the client sent, recovered from BentoML's upload temp file.

    BentoML stores each uploaded file as ``tempfile.NamedTemporaryFile(suffix=<client name>)``,
    i.e. ``tmp`` + 8 random characters + the client's name (``_bentoml_sdk/validators.py``).
    """
    name = path.name
    if name.startswith("tmp") and len(name) >= 11:
        return name[11:] or None
    return name
