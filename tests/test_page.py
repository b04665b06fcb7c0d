"""The page at ``/`` (issue 15) in a real browser, and ``GET /thumbnails/{row}``.

A real ``cnn-codes serve`` of the shared published model with the shared index of the real
photos (conftest ``published`` and ``index``) and an API key. Debian's headless ``chromium``,
driven by Selenium through Debian's ``chromium-driver`` with the functions of
``scripts/page_screenshot.py`` (the ones that make the README's screenshot), opens ``/``, types
the key, uploads a real val photo and a text file, and must show the classes, the CNN code's
dimension and sparkline, and the photo's nearest indexed images as thumbnails (the photo
itself first), and the text file's ``not_an_image`` error. Thumbnails exist only for rows of
the loaded index: paths (``../``, absolute, URL-encoded), signs, fractions and rows out of
range get a JSON 4xx from the error table. With ``CI=true`` a missing browser, driver or
selenium is a failure, never a skip (the sample data's fixture does the same).
"""

from __future__ import annotations

import http.client
import importlib.util
import io
import json
import os
import sys
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import REPO_ROOT, Server
from models.errors import lookup

KEY = "page-test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = httpx.Timeout(60.0)


def _page_driver():
    """``scripts/page_screenshot.py`` as a module (scripts/ is not a package)."""
    name = "page_screenshot"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, REPO_ROOT / "scripts" / "page_screenshot.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


page_driver = _page_driver()


def missing(message: str) -> None:
    """Fail under ``CI=true``, skip otherwise."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium under Selenium (chromium-driver), for this module."""
    if importlib.util.find_spec("selenium") is None:
        missing("selenium is not installed (pip install -e '.[test]')")
    try:
        page_driver.find_chromium()
    except FileNotFoundError as exc:
        missing(str(exc))
    driver = page_driver.headless_chromium()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page_server(published, index, tmp_path_factory):
    """The published model with the shared index of the real photos and an API key."""
    srv = Server(published["repository"], f"{published['name']}:{published['version']}",
                 tmp_path_factory.mktemp("page"), CNN_CODES_INDEX=str(index["dir"]),
                 CNN_CODES_API_KEYS=json.dumps([KEY]), CNN_CODES_RELOAD_POLL_S="0")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def raw_get(url: str, path: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
    """GET ``path`` exactly as written (no client-side normalisation of ``..`` or ``%2F``):
    status, content type, body."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        connection.close()


def test_page_is_open_and_the_api_it_calls_is_not(page_server):
    url = page_server.url
    page = httpx.get(f"{url}/", timeout=TIMEOUT)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in page.text and 'id="key"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for asset, kind in (("app.js", "javascript"), ("page.css", "text/css")):
        answer = httpx.get(f"{url}/static/{asset}", timeout=TIMEOUT)
        assert answer.status_code == 200 and kind in answer.headers["content-type"], asset
    assert "/thumbnails/" in httpx.get(f"{url}/static/app.js").text

    for method, path in (("GET", "/metadata"), ("GET", "/thumbnails/0"),
                         ("POST", "/classify"), ("POST", "/search")):
        refused = httpx.request(method, f"{url}{path}", timeout=TIMEOUT)
        assert refused.status_code == 401, (path, refused.text)
        assert refused.json()["code"] == "unauthenticated"
    # the static mount serves its own folder only
    status, _, body = raw_get(url, "/static/..%2Fpage.py", AUTH)
    assert status == 404 and b"def routes" not in body


def test_thumbnails_only_for_rows_of_the_index(page_server, index, data_dir):
    url = page_server.url
    indexed = (index["dir"] / "paths.txt").read_text().splitlines()
    count = len(indexed)
    photo = sorted((data_dir / "val" / "bees").glob("*.jpg"))[0].resolve()
    row = indexed.index(str(photo))

    answer = httpx.get(f"{url}/thumbnails/{row}", headers=AUTH, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/jpeg"
    thumbnail = Image.open(io.BytesIO(answer.content))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) == 160
    with Image.open(photo) as original:  # the row's photo, not another one
        expected = ImageOps.exif_transpose(original).convert("RGB")
        expected.thumbnail(thumbnail.size)
    height, width = min(expected.height, thumbnail.height), min(expected.width, thumbnail.width)
    difference = np.abs(np.asarray(thumbnail, np.float32)[:height, :width] -
                        np.asarray(expected, np.float32)[:height, :width]).mean()
    assert difference < 12, difference
    last = httpx.get(f"{url}/thumbnails/{count - 1}", headers=AUTH, timeout=TIMEOUT)
    assert last.status_code == 200 and last.content[:3] == b"\xff\xd8\xff"

    absolute = quote(str(photo), safe="/")
    refused = {
        "bad_request": ["/thumbnails/../../etc/passwd", "/thumbnails/..%2F..%2Fetc%2Fpasswd",
                        "/thumbnails/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/thumbnails//etc/passwd",
                        "/thumbnails/%2Fetc%2Fpasswd", f"/thumbnails/{absolute}",
                        f"/thumbnails/{quote(str(photo), safe='')}", f"/thumbnails/{row}/../0",
                        f"/thumbnails/..%2F{photo.name}", "/thumbnails/-1", "/thumbnails/%2D1",
                        "/thumbnails/+1", "/thumbnails/1.5", "/thumbnails/0x1", "/thumbnails/1e3",
                        "/thumbnails/abc", "/thumbnails/%D9%A1", "/thumbnails/", "/thumbnails/1%00",
                        "/thumbnails/" + "9" * 13],
        "not_found": [f"/thumbnails/{count}", f"/thumbnails/{count + 1000}",
                      "/thumbnails/999999999999"],
    }
    for code, paths in refused.items():
        for path in paths:
            status, content_type, body = raw_get(url, path, AUTH)
            assert status == lookup(code).http_status, (path, status, body[:300])
            assert content_type.startswith("application/json"), (path, content_type)
            error = json.loads(body)
            assert error["code"] == code and isinstance(error["error"], str), (path, error)
            assert not body.startswith(b"\xff\xd8"), path


def test_page_in_headless_chromium(page_server, browser, data_dir, index, tmp_path):
    url = page_server.url
    photo = sorted((data_dir / "val" / "bees").glob("*.jpg"))[0].resolve()
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image, a text file\n")
    indexed = (index["dir"] / "paths.txt").read_text().splitlines()

    without_key = page_driver.open_page(browser, url)  # /metadata needs the key
    assert without_key["state"] == "error", without_key
    assert "401" in without_key["status"] and "unauthenticated" in without_key["status"]

    shown = page_driver.open_page(browser, url, KEY)
    assert f"index: {len(indexed)} images" in shown["index"], shown
    shown = page_driver.analyse(browser, [photo, junk])
    assert shown["state"] == "done", shown
    good, bad = shown["cards"]

    # the classes are the API's, in its order, with its probabilities
    api = httpx.post(f"{url}/classify", headers=AUTH, data={"top_k": "5"}, timeout=TIMEOUT,
                     files=[("images", (photo.name, photo.read_bytes()))]).json()
    expected = api["results"][0]["predictions"]
    assert good["filename"] == photo.name and good["error_code"] is None
    assert [c["label"] for c in good["classes"]] == [p["label"] for p in expected]
    assert [c["probability"] for c in good["classes"]] == \
        pytest.approx([p["probability"] for p in expected], abs=1e-4)
    # the CNN code: its dimension and one sparkline point per value
    assert good["dim"] == "1024" and good["sparkline_points"] == 1024
    # the neighbours: the photo itself first, each thumbnail that row's, loaded
    neighbors = good["neighbors"]
    assert len(neighbors) == 8, good
    assert neighbors[0]["path"] == str(photo) and neighbors[0]["score"] >= 0.999
    assert all(indexed[n["row"]] == n["path"] for n in neighbors)
    scores = [n["score"] for n in neighbors]
    assert scores == sorted(scores, reverse=True)
    for n in neighbors:
        assert n["thumbnail"].startswith("blob:") and n["thumbnail_width"] > 0, n
        assert n["thumbnail_error"] is None, n
    # the text file: the API's per-image error, nothing else
    assert bad["filename"] == "notes.txt" and bad["error_code"] == "not_an_image", bad
    assert bad["error"].startswith("not_an_image: ") and bad["classes"] == []
    assert bad["neighbors"] == []

    # the README's screenshot is made this way (scripts/page_screenshot.py)
    out = page_driver.save_screenshot(browser, tmp_path / "page.png")
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width == 1280 and picture.height >= 500
        pixels = np.asarray(picture.convert("L"))
    assert pixels.std() > 20  # not blank


def test_thumbnail_route_logic_without_a_server(data_dir, tmp_path):
    """``service.page.thumbnail`` against a stand-in service: search off, a vanished or
    non-image indexed file (404 naming the image code), and the row parser."""
    import asyncio
    from types import SimpleNamespace

    from cnn_codes.settings import Settings
    from models.errors import RequestError
    from service.page import THUMBNAIL_SIDE, parse_row, thumbnail
    from service.search_route import IndexHolder

    photo = sorted((data_dir / "val" / "ants").glob("*.jpg"))[0]
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    rows = [str(photo), str(tmp_path / "gone.jpg"), str(text), str(tmp_path)]

    class Holder:
        async def for_card(self, card):
            return SimpleNamespace(manifest=SimpleNamespace(count=len(rows)), paths=rows)

    service = SimpleNamespace(index=Holder(), holder=SimpleNamespace(card=None),
                              settings=Settings())

    def answer(row: str, on=service):
        return asyncio.run(thumbnail(on, row))

    image = Image.open(io.BytesIO(answer("0")))
    assert image.format == "JPEG" and max(image.size) == THUMBNAIL_SIDE
    for row, image_code in (("1", "unreadable"), ("2", "not_an_image"), ("3", "not_a_file")):
        with pytest.raises(RequestError) as refused:
            answer(row)
        assert refused.value.code == "not_found", row
        assert refused.value.body()["image_code"] == image_code, row
    with pytest.raises(RequestError, match="rows 0 to 3") as beyond:
        answer("4")
    assert beyond.value.code == "not_found"
    off = SimpleNamespace(index=IndexHolder(None), holder=service.holder, settings=Settings())
    with pytest.raises(RequestError, match="search is off"):
        answer("0", off)
    assert parse_row("0") == 0 and parse_row("000123") == 123
    for text_row in ("", "-1", "+1", " 1", "1 ", "1\n", "١", "²", "0x1", "1_000", "9" * 13):
        with pytest.raises(RequestError) as bad:
            parse_row(text_row)
        assert bad.value.code == "bad_request", text_row
