"""The page at ``/`` (try the service in a browser) and ``GET /thumbnails/{row}``.

* ``/`` and its assets (``/static/app.js``, ``/static/page.css``, in ``service/static/``: plain
  HTML, CSS and JavaScript, no build step, nothing from a CDN) need no API key
  (:data:`PAGE_PATHS`, open in :class:`service.gateway.Gateway`). Every API call the page makes
  (``/metadata``, ``/classify``, ``/embed``, ``/search``, ``/thumbnails``) carries the key typed
  into its key field as ``Authorization: Bearer <key>``, so with keys configured the page shows
  nothing without one.
* ``GET /thumbnails/{row}``: a small JPEG (longest side :data:`THUMBNAIL_SIDE`) of the indexed
  image at ``row`` of the loaded search index (``/search`` answers carry each neighbour's
  ``row``). A thumbnail is only ever made for a row of that index, never for a path a client
  names: ``row`` must be a plain decimal number below the index's count (``bad_request`` 400
  otherwise, ``not_found`` 404 beyond the count or with search off, ``index_mismatch`` 409 as
  for ``/search``). The file is read and decoded by :mod:`models.decode` (regular files only,
  the same byte and pixel limits as uploads).
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from pathlib import Path
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from models.decode import DecodeLimits, load_rgb, read_file
from models.errors import ImageError, RequestError

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
#: the page's assets under ``/static/`` (the files of :data:`STATIC_DIR` besides index.html)
ASSETS = ("app.js", "page.css")
#: paths that need no API key: the page and its assets, nothing else
PAGE_PATHS = frozenset({"/", *(f"/static/{name}" for name in ASSETS)})
#: longest side of a thumbnail, pixels
THUMBNAIL_SIDE = 160
THUMBNAIL_QUALITY = 85

# The page loads only its own files; thumbnails arrive as blob: URLs (fetched with the key).
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; style-src 'self'; "
                               "script-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_ROW = re.compile(r"[0-9]{1,12}")


def parse_row(text: str) -> int:
    """The row number of a ``/thumbnails/{row}`` path: ASCII decimal digits only.

    Raises:
        RequestError: ``bad_request`` for anything else (a path, ``../``, a sign, a fraction).
    """
    if not _ROW.fullmatch(text):
        raise RequestError("bad_request", "a thumbnail is addressed by its row in the search "
                                          "index (a non-negative integer, neighbors[].row of "
                                          f"/search), not by {text[:80]!r}")
    return int(text)


def thumbnail_jpeg(path: str | Path, limits: DecodeLimits, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of the image file ``path``, its longest side at most ``side`` pixels.

    Read and decoded by :mod:`models.decode` (regular files only, ``limits`` applied, JPEGs in
    draft mode); blocking.

    Raises:
        ImageError: a per-image code (``unreadable``, ``not_a_file``, ``truncated``, ...).
    """
    data = read_file(path, limits.max_file_bytes)
    image = load_rgb(data, draft_size=side, max_pixels=limits.max_pixels,
                     min_side=limits.min_side, formats=limits.formats)
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


async def thumbnail(service: Any, row_text: str) -> bytes:
    """The thumbnail of row ``row_text`` of the index the ``CNNCodes`` instance ``service``
    answers ``/search`` from.

    Raises:
        RequestError: ``bad_request`` (not a row number), ``not_found`` (search off, row out
            of range, the indexed file unreadable now), ``index_mismatch``.
    """
    row = parse_row(row_text)
    index = await service.index.for_card(service.holder.card)
    count = index.manifest.count
    if row >= count:
        raise RequestError("not_found", f"row {row} is not in the search index (rows 0 to "
                                        f"{count - 1})")
    path = index.paths[row]
    limits = DecodeLimits.from_settings(service.settings)
    try:
        return await asyncio.to_thread(thumbnail_jpeg, path, limits)
    except ImageError as exc:
        logger.warning("no thumbnail for index row %d (%s): %s", row, path, exc)
        raise RequestError("not_found", f"row {row} of the search index cannot be shown: "
                                        f"{exc.message}",
                           details={"image_code": exc.code}) from None


def routes(get_service: Callable[[], Any]) -> list[BaseRoute]:
    """``/``, ``/static/...`` and ``/thumbnails/{row}``, answering for ``get_service()``
    (e.g. ``bentoml.get_current_service``, resolved per request)."""

    async def page(request: Request) -> Response:
        """``GET /``: the page."""
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers=_PAGE_HEADERS)

    async def thumbnails(request: Request) -> Response:
        """``GET /thumbnails/{row}``: image/jpeg, or the error table's JSON body."""
        try:
            jpeg = await thumbnail(get_service(), request.path_params["row"])
        except RequestError as exc:
            return JSONResponse(exc.body(), status_code=exc.http_status, headers=exc.headers)
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    return [Route("/", page, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
            # ``path``: every path under /thumbnails/ (``../x``, ``/etc/passwd``) reaches
            # parse_row and gets its JSON 400, rather than falling through to a bare 404
            Route("/thumbnails/{row:path}", thumbnails, methods=["GET"])]
