"""Hardening against junk traffic, on real ``cnn-codes serve`` processes over loopback.

* /metrics stays bounded: BentoML's request metrics and ours label routes, never raw paths, so
  requests to distinct junk paths (401 without a valid key, 404 with one or with no keys
  configured) share ``endpoint="other"`` (service/bentoml_compat/, piece 7).
* Connections (piece 8): every server process raises its soft open-file limit to the hard
  limit, so more than 1024 idle sockets do not starve real clients of a server started under a
  soft limit of 1024; connections that stay silent, or send their headers too slowly, are
  closed by the server.
"""

from __future__ import annotations

import resource
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server, metric

KEY = "hardening-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
IDLE_S = 6.0  # CNN_CODES_HTTP_IDLE_TIMEOUT_S of the `limited` server
HEADER_S = 4.0  # CNN_CODES_HTTP_HEADER_TIMEOUT_S of the `limited` server
SPAWN_SOFT_NOFILE = 1024  # the common default soft limit the `limited` server starts under
IDLE_SOCKETS = 1100
MARK = "zzjunk"  # in every junk path: a label containing it is a raw path


@contextmanager
def soft_nofile(limit: int):
    """This process's soft RLIMIT_NOFILE set to ``limit`` (children started inside inherit
    it), restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def nofile_headroom(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to hold ``needed`` more descriptors, or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed + 512
    if hard != resource.RLIM_INFINITY and hard < target:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} < {target}: cannot open {needed} sockets")
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@pytest.fixture(scope="module")
def limited(published: dict, tmp_path_factory: pytest.TempPathFactory):
    """A server started under a soft open-file limit of 1024 (hard limit above it), with an API
    key configured and short idle / header timeouts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= SPAWN_SOFT_NOFILE + 200:
        pytest.skip(f"hard RLIMIT_NOFILE {hard}: no room above a soft limit of 1024")
    with soft_nofile(SPAWN_SOFT_NOFILE):
        srv = Server(published["repository"], f"{published['name']}:{published['version']}",
                     tmp_path_factory.mktemp("limited"),
                     CNN_CODES_API_KEYS=f'["{KEY}"]',
                     CNN_CODES_HTTP_IDLE_TIMEOUT_S=str(IDLE_S),
                     CNN_CODES_HTTP_HEADER_TIMEOUT_S=str(HEADER_S))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def server_processes(srv: Server) -> list[psutil.Process]:
    """BentoML's arbiter (``bentoml serve``) and every worker it started (not the
    ``cnn-codes serve`` process supervising them): the arbiter and the API worker (which holds
    the session with the default ``batching = in_process``)."""
    root = psutil.Process(srv.proc.pid)
    found = [p for p in [root, *root.children(recursive=True)]
             if any("bentoml" in arg for arg in p.cmdline())]
    assert len(found) >= 2, [p.cmdline() for p in [root, *root.children(recursive=True)]]
    return found


def api_workers(srv: Server) -> list[psutil.Process]:
    """The API service's worker processes (``--service-name cnn_codes``; one per core by
    default)."""
    found = []
    for proc in server_processes(srv):
        cmd = proc.cmdline()
        if "--service-name" in cmd and cmd[cmd.index("--service-name") + 1] == "cnn_codes":
            found.append(proc)
    assert found, f"no API worker among {[p.cmdline() for p in server_processes(srv)]}"
    return found


def scrape(url: str) -> tuple[int, set[str]]:
    """Number of samples on ``url/metrics`` and every ``endpoint`` label value among them."""
    text = httpx.get(f"{url}/metrics", timeout=60).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return len(samples), {s.labels["endpoint"] for s in samples if "endpoint" in s.labels}


def junk(url: str, first: int, count: int, headers_cycle: list[dict]) -> None:
    """GET ``count`` distinct junk paths (several shapes, each containing :data:`MARK`),
    cycling through ``headers_cycle``."""
    shapes = [f"/{MARK}-{{i}}", f"/{MARK}/{{i}}/deeper", f"/classify{MARK}{{i}}",
              f"/v2/models/{MARK}{{i}}/nothing", f"/metrics{MARK}{{i}}",
              f"/%C3%A9t%C3%A9-{MARK}-{{i}}"]
    with httpx.Client(timeout=30) as client:
        for i in range(first, first + count):
            path = shapes[i % len(shapes)].format(i=i)
            answer = client.get(url + path, headers=headers_cycle[i % len(headers_cycle)])
            assert answer.status_code in (401, 404), (path, answer.status_code, answer.text)


@pytest.mark.parametrize("which", ["server", "limited"])
def test_junk_paths_share_one_metric_label(which, request):
    """300 distinct junk paths: no junk path becomes a label, the series count does not grow
    with the number of paths, and ``endpoint="other"`` counts them (BentoML's and ours)."""
    srv = request.getfixturevalue(which)
    if which == "limited":  # API keys configured: no key / wrong key -> 401, valid key -> 404
        cycle = [{}, {"Authorization": "Bearer wrong"}, AUTH]
    else:  # no keys configured -> 404
        cycle = [{}]
    scrape(srv.url)  # our own /metrics series exist from here on
    junk(srv.url, 0, 30, cycle)
    n_before, labels = scrape(srv.url)
    assert not [label for label in labels if MARK in label], sorted(labels)

    bentoml_before = metric(srv.url, "bentoml_service_request_total", endpoint="other",
                            service_name="cnn_codes")
    ours_before = metric(srv.url, "cnn_codes_requests_total", protocol="http", endpoint="other")
    junk(srv.url, 30, 270, cycle)
    n_after, labels = scrape(srv.url)

    assert "other" in labels
    assert not [label for label in labels if MARK in label], sorted(labels)
    # 270 more distinct paths add no series (a few for unrelated lazily created ones at most)
    assert n_after <= n_before + 5, (n_before, n_after)
    assert metric(srv.url, "bentoml_service_request_total", endpoint="other",
                  service_name="cnn_codes") - bentoml_before == 270
    assert metric(srv.url, "cnn_codes_requests_total", protocol="http",
                  endpoint="other") - ours_before == 270


def test_open_file_limit_raised_in_every_process(limited):
    """Started with a soft NOFILE of 1024, every server process runs with soft == hard."""
    for proc in server_processes(limited):
        soft, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
        assert soft == hard and soft > SPAWN_SOFT_NOFILE, (proc.cmdline(), soft, hard)


def test_many_idle_sockets_do_not_starve_clients(limited, data_dir: Path):
    """1,100 idle sockets from one client to a server started under a soft NOFILE of 1024: a
    normal client still gets /readyz and an /embed answer, in bounded time."""
    nofile_headroom(IDLE_SOCKETS)
    image = sorted((data_dir / "val" / "ants").glob("*.jpg"))[0]
    sockets: list[socket.socket] = []
    try:
        for _ in range(IDLE_SOCKETS):
            sockets.append(socket.create_connection(("127.0.0.1", limited.port), timeout=10))
        started = time.monotonic()
        ready = httpx.get(f"{limited.url}/readyz", timeout=IDLE_S)
        elapsed = time.monotonic() - started
        assert ready.status_code == 200
        # answered before the idle timeout could have freed descriptors for it
        assert elapsed < IDLE_S - 1, elapsed
        # the idle sockets are really held by the API worker: more than 1024 descriptors
        fds = sum(p.num_fds() for p in api_workers(limited))  # the workers share the sockets
        assert fds > IDLE_SOCKETS, fds
        embed = httpx.post(f"{limited.url}/embed", headers=AUTH, timeout=30,
                           files=[("images", (image.name, image.read_bytes(), "image/jpeg"))])
        assert embed.status_code == 200, embed.text
        assert [bool(r["embedding"]) for r in embed.json()["results"]] == [True]
    finally:
        for sock in sockets:
            sock.close()


def _peer_closed(sock: socket.socket) -> bool:
    """The server closed non-blocking ``sock`` (EOF or reset); False while it is open and
    silent."""
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def _read_response(sock: socket.socket) -> bytes:
    """One complete HTTP/1.1 response with a Content-Length from ``sock``."""
    data = b""
    sock.settimeout(30)
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(4096)
    return head


def test_idle_and_slow_header_connections_are_closed(limited):
    """A silent new connection and an idle keep-alive one are closed after the idle timeout;
    one that keeps sending header bytes but never ends its headers is closed after the header
    timeout, although bytes keep arriving."""
    address = ("127.0.0.1", limited.port)
    idle_before = metric(limited.url, "cnn_codes_http_connections_closed_total", reason="idle")
    header_before = metric(limited.url, "cnn_codes_http_connections_closed_total",
                           reason="header_timeout")

    silent = socket.create_connection(address, timeout=10)
    opened = time.monotonic()
    kept = socket.create_connection(address, timeout=10)
    kept.sendall(b"GET /livez HTTP/1.1\r\nHost: test\r\n\r\n")
    assert b" 200 " in _read_response(kept).split(b"\r\n")[0]
    answered = time.monotonic()
    slow = socket.create_connection(address, timeout=10)
    slow.sendall(b"GET /livez HTTP/1.1\r\nHost: test\r\nX-Slow: ")
    first_byte = time.monotonic()
    for sock in (silent, kept, slow):
        sock.setblocking(False)

    closed: dict[str, float] = {}
    deadline = first_byte + IDLE_S + HEADER_S + 10
    try:
        while len(closed) < 3 and time.monotonic() < deadline:
            time.sleep(0.25)
            now = time.monotonic()
            for name, sock in [("silent", silent), ("kept", kept)]:
                if name not in closed and _peer_closed(sock):
                    closed[name] = now
            if "slow" not in closed:
                try:
                    slow.send(b"a")  # never a complete header line
                except ConnectionError:
                    closed["slow"] = now
                except BlockingIOError:  # send buffer full: nothing sent this round
                    pass
                else:
                    if _peer_closed(slow):
                        closed["slow"] = now
    finally:
        for sock in (silent, kept, slow):
            sock.close()

    assert set(closed) == {"silent", "kept", "slow"}, (closed, limited.log()[-3000:])
    assert IDLE_S - 1 <= closed["silent"] - opened <= IDLE_S + 5, closed["silent"] - opened
    assert IDLE_S - 1 <= closed["kept"] - answered <= IDLE_S + 5, closed["kept"] - answered
    assert HEADER_S - 1 <= closed["slow"] - first_byte <= HEADER_S + 5, \
        closed["slow"] - first_byte
    assert metric(limited.url, "cnn_codes_http_connections_closed_total",
                  reason="idle") - idle_before >= 2
    assert metric(limited.url, "cnn_codes_http_connections_closed_total",
                  reason="header_timeout") - header_before >= 1


def test_connections_above_the_bound_close_the_longest_idle(published: dict,
                                                            tmp_path_factory):
    """With ``http_max_connections`` 64, 200 idle sockets leave 64 open: each new connection
    above the bound closes the longest-idle one (the oldest sockets), and a normal client is
    still served. The bound is per API worker, so the server runs one worker (with several,
    the sockets split among them in whatever way the kernel hands out accepts)."""
    bound, count = 64, 200
    srv = Server(published["repository"], f"{published['name']}:{published['version']}",
                 tmp_path_factory.mktemp("crowded"), CNN_CODES_API_WORKERS="1",
                 CNN_CODES_HTTP_MAX_CONNECTIONS=str(bound),
                 CNN_CODES_HTTP_IDLE_TIMEOUT_S="120", CNN_CODES_HTTP_HEADER_TIMEOUT_S="120")
    sockets: list[socket.socket] = []
    try:
        srv.wait_ready()
        evicted_before = metric(srv.url, "cnn_codes_http_connections_closed_total",
                                reason="evicted")
        for _ in range(count):
            sockets.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
        assert httpx.get(f"{srv.url}/readyz", timeout=10).status_code == 200
        for sock in sockets:
            sock.setblocking(False)
        deadline = time.monotonic() + 15
        closed = [False] * count
        while time.monotonic() < deadline:
            closed = [c or _peer_closed(s) for c, s in zip(closed, sockets)]
            if sum(closed) >= count - bound:
                break
            time.sleep(0.25)
        assert count - bound <= sum(closed) <= count - bound + 5, sum(closed)
        assert all(closed[:count - bound - 5]) and not any(closed[-(bound - 10):]), closed
        assert metric(srv.url, "cnn_codes_http_connections_closed_total",
                      reason="evicted") - evicted_before >= count - bound
    finally:
        for sock in sockets:
            sock.close()
        srv.stop()


HTTP11_PROTOCOLS = ("h11", "httptools")  # uvicorn's HTTP/1.1 protocols: http="h11" / "httptools"


def _pauses_reading(http: str, body_bytes: int) -> bool:
    """Feed uvicorn's real ``http`` protocol (h11's or httptools') one request with a
    ``body_bytes`` body in one ``data_received`` (the app never reads it) and say whether it
    paused the socket."""
    import asyncio
    from unittest import mock

    from uvicorn.config import Config
    from uvicorn.server import ServerState

    if http == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol as Protocol
    else:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Protocol

    async def app(scope, receive, send):  # holds the request without reading its body
        await asyncio.sleep(3600)

    loop = asyncio.new_event_loop()
    try:
        proto = Protocol(Config(app=app, http=http, lifespan="off"), ServerState(), {},
                         _loop=loop)
        transport = mock.MagicMock()
        transport.is_closing.return_value = False
        addresses = {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 3000)}
        transport.get_extra_info.side_effect = lambda name, default=None: addresses.get(
            name, default)
        proto.connection_made(transport)
        head = (b"POST /embed HTTP/1.1\r\nhost: test\r\ncontent-type: image/jpeg\r\n"
                b"content-length: %d\r\n\r\n" % body_bytes)
        proto.data_received(head + b"\xff" * body_bytes)
        return transport.pause_reading.called
    finally:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()


@pytest.mark.parametrize("http", HTTP11_PROTOCOLS)
def test_read_high_water_lets_a_photo_in_without_pausing_the_socket(http: str):
    """Piece 10: uvicorn pauses a connection's socket above its 64 KiB read buffer; a typical
    photo (median 107 KiB in the sample data) no longer does, a body above the raised mark
    still does, and a mark below uvicorn's own is refused; in both of uvicorn's HTTP/1.1
    protocols (httptools' is the one the service runs, h11's the fallback)."""
    from uvicorn.protocols.http import flow_control, h11_impl, httptools_impl

    from cnn_codes.settings import Settings
    from service.bentoml_compat import set_read_high_water

    before = h11_impl.HIGH_WATER_LIMIT, httptools_impl.HIGH_WATER_LIMIT
    module = h11_impl if http == "h11" else httptools_impl
    try:
        set_read_high_water(flow_control.HIGH_WATER_LIMIT)  # uvicorn's own
        assert _pauses_reading(http, 200_000)
        limit = Settings().http_read_high_water_bytes
        assert set_read_high_water(limit) == limit == module.HIGH_WATER_LIMIT
        assert not _pauses_reading(http, 200_000)
        assert _pauses_reading(http, limit + 100_000)  # flow control still bounds a connection
        with pytest.raises(ValueError, match="below uvicorn"):
            set_read_high_water(1000)
    finally:
        h11_impl.HIGH_WATER_LIMIT, httptools_impl.HIGH_WATER_LIMIT = before


def test_uvicorn_runs_on_uvloop_and_httptools():
    """The serving install brings uvloop and httptools, so uvicorn's ``loop="auto"`` and
    ``http="auto"`` (what BentoML's worker leaves them at) pick them, and piece 8 and 10 patch
    the httptools protocol the worker runs (README "Performance": the event loop's CPU per
    image with and without them)."""
    import uvloop
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from service.bentoml_compat.connections import _http11_protocols

    config = Config(app=lambda scope, receive, send: None, lifespan="off")
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    loop = config.get_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert HttpToolsProtocol in [cls for _, cls in _http11_protocols()]
