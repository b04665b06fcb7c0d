"""Reliability figures of the README (not a test): /metrics growth from junk paths, and the
service under many idle sockets, on a real server over loopback.

usage (from the repository root, with a published model)::

    .venv/bin/python -m bench.hardening junk N [keys]   # N GETs to distinct junk paths
    .venv/bin/python -m bench.hardening idle M          # M idle sockets, soft NOFILE 1024

Environment: ``REPOSITORY`` (default ``model_repository``), ``MODEL`` (default ``default``),
``SAME=1`` (one repeated junk path instead of distinct ones).
"""
import resource
import socket
import sys
import time
from pathlib import Path

import httpx
import psutil

import os
import tempfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import Server  # noqa: E402  (the tests' server harness: own home, free port)

SAME = os.environ.get("SAME") == "1"
REPO = Path(os.environ.get("REPOSITORY", "model_repository"))
MODEL = os.environ.get("MODEL", "default")
WORK = Path(tempfile.mkdtemp(prefix="cnn-codes-hardening-"))
IMG = sorted(Path(os.environ.get("CNN_CODES_SAMPLE_DATA", "../shared/data/hymenoptera"))
             .glob("val/ants/*.jpg"))[0]


def api_worker(srv):
    for p in psutil.Process(srv.proc.pid).children(recursive=True):
        cmd = p.cmdline()
        if "--fd" in cmd and "--service-name" in cmd and cmd[cmd.index("--service-name") + 1] == "cnn_codes":
            return p
    raise SystemExit("no api worker")


def scrape(url):
    t0 = time.perf_counter()
    text = httpx.get(f"{url}/metrics", timeout=120).text
    dt = time.perf_counter() - t0
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    return len(text), series, dt


def junk(n, keys):
    env = {"CNN_CODES_API_KEYS": '["k1"]'} if keys else {}
    srv = Server(REPO, MODEL, WORK, **env)
    try:
        srv.wait_ready(300)
        w = api_worker(srv)
        print("before: metrics bytes=%d series=%d scrape=%.2fs rss=%.0fMiB"
              % (*scrape(srv.url), w.memory_info().rss / 2**20))
        t0 = time.perf_counter()
        with httpx.Client(timeout=30) as c:
            for i in range(n):
                c.get(f"{srv.url}/junk-{i}/x{i}" if not SAME else f"{srv.url}/junk")
        print("%d junk GETs in %.1fs" % (n, time.perf_counter() - t0))
        print("after:  metrics bytes=%d series=%d scrape=%.2fs rss=%.0fMiB"
              % (*scrape(srv.url), w.memory_info().rss / 2**20))
    finally:
        srv.stop()


def idle(m):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        srv = Server(REPO, MODEL, WORK,
                     CNN_CODES_HTTP_IDLE_TIMEOUT_S="30")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = []
    try:
        srv.wait_ready(300)
        w = api_worker(srv)
        print("api worker NOFILE", w.rlimit(psutil.RLIMIT_NOFILE))
        for _ in range(m):
            socks.append(socket.create_connection(("127.0.0.1", srv.port)))
        print("opened", len(socks), "idle sockets")
        for what, call in [("readyz", lambda c: c.get(f"{srv.url}/readyz")),
                           ("embed", lambda c: c.post(f"{srv.url}/embed", files=[(
                               "images", (IMG.name, IMG.read_bytes()))]))]:
            t0 = time.perf_counter()
            try:
                with httpx.Client(timeout=10) as c:
                    r = call(c)
                print(what, r.status_code, "%.2fs" % (time.perf_counter() - t0))
            except httpx.HTTPError as exc:
                print(what, "FAILED", type(exc).__name__, "%.2fs" % (time.perf_counter() - t0))
        print("api worker fds", w.num_fds())
    finally:
        for s in socks:
            s.close()
        srv.stop()


if __name__ == "__main__":
    if sys.argv[1] == "junk":
        junk(int(sys.argv[2]), len(sys.argv) > 3)
    else:
        idle(int(sys.argv[2]))
