"""A soak of the service (not a test): hours-long behaviour in minutes, on loopback.

``cnn-codes serve`` on a published model takes a closed-loop load of real photos (one per
request, ``/embed`` and ``/classify``, with one damaged JPEG in every ``bad_every`` requests,
which must come back as that image's error in a 200) for ``--minutes``, measured in one-minute
windows. Between windows the serving process tree's RSS and the API worker's RSS are sampled, so
a leak shows as a slope (bytes per request). Writes ``bench/results/soak.json``.

usage (from the repository root, with a published model, e.g. after ``make model``)::

    .venv/bin/python -m bench.soak --minutes 30 --concurrency 8
    .venv/bin/python -m bench.soak --minutes 2            # a smoke run

Environment: ``REPOSITORY`` (default ``model_repository``), ``MODEL`` (default ``default``),
``CNN_CODES_SAMPLE_DATA`` (the photos).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from bench.loadgen import HttpRequest, multipart_request, run_cell
from bench.machine import machine_info
from bench.photos import Photo, load_photos
from bench.procs import tree_memory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DEFAULT_DATA, Server  # noqa: E402  (the tests' harness: own home, free port)

logger = logging.getLogger("bench.soak")
RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"


def requests_mix(photos: list[Photo], bad_every: int) -> list[HttpRequest]:
    """Alternating ``/embed`` and ``/classify`` of one photo each; every ``bad_every``-th request
    carries a JPEG cut to its first 600 bytes instead (a per-image ``truncated`` error)."""
    mix = []
    for i, photo in enumerate(photos):
        if bad_every and i % bad_every == bad_every - 1:
            photo = Photo(name=f"cut-{photo.name}", data=photo.data[:600], width=photo.width,
                          height=photo.height, format=photo.format)
        if i % 2:
            mix.append(multipart_request("/classify", [photo], {"top_k": "2"}))
        else:
            mix.append(multipart_request("/embed", [photo], {"layer": "embedding"}))
    return mix


def service_workers(root_pid: int) -> dict[str, list[psutil.Process]]:
    """BentoML's service worker processes under ``root_pid`` by service name (``cnn_codes``,
    ``cnn_codes_encoder``)."""
    found: dict[str, list[psutil.Process]] = {}
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if "--service-name" in cmd:
            found.setdefault(cmd[cmd.index("--service-name") + 1], []).append(proc)
    return found


def api_worker_rss(root_pid: int) -> int:
    """RSS (bytes) of the ``cnn_codes`` API worker(s) under ``root_pid``, summed."""
    total = 0
    for proc in service_workers(root_pid).get("cnn_codes", []):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def soak(minutes: float, concurrency: int, bad_every: int, repository: Path, model: str,
         data_dir: Path) -> dict:
    """Run the soak; returns the report (also written to :data:`RESULTS`)."""
    photos = load_photos(data_dir)
    mix = requests_mix(photos, bad_every)
    work = Path(tempfile.mkdtemp(prefix="cnn-codes-soak-"))
    server = Server(repository, model, work)
    windows = []
    try:
        server.wait_ready(300)
        run_cell(server.url, mix, concurrency, warmup_s=10, duration_s=20)  # warm every path
        start = {"tree_rss": tree_memory(server.proc.pid)["rss"],
                 "api_rss": api_worker_rss(server.proc.pid)}
        started = time.monotonic()
        requests_so_far = 0
        pids: set[int] = set()
        while time.monotonic() - started < minutes * 60:
            cell = run_cell(server.url, mix, concurrency, warmup_s=0,
                            duration_s=min(60.0, minutes * 60), max_requests=1_000_000)
            requests_so_far += cell.completed
            sample = {"minute": round((time.monotonic() - started) / 60, 2),
                      "requests": requests_so_far, "ok": cell.ok, "failed": cell.errors,
                      "images_per_s": cell.images_per_s, "p99_ms": cell.latency_ms["p99"],
                      "tree_rss": tree_memory(server.proc.pid)["rss"],
                      "api_rss": api_worker_rss(server.proc.pid),
                      "error_samples": cell.error_samples}
            windows.append(sample)
            pids |= {p.pid for procs in service_workers(server.proc.pid).values() for p in procs}
            logger.info("minute %.1f: %d requests, %d failed, %.1f img/s, tree %.0f MiB, "
                        "API worker %.0f MiB", sample["minute"], requests_so_far,
                        cell.errors, cell.images_per_s, sample["tree_rss"] / 2**20,
                        sample["api_rss"] / 2**20)
            if server.proc.poll() is not None:
                raise RuntimeError(f"the service exited {server.proc.returncode} mid-soak")
    finally:
        server.stop()
    reqs = np.array([w["requests"] for w in windows], dtype=float)
    api = np.array([w["api_rss"] for w in windows], dtype=float)
    slope = float(np.polyfit(reqs, api, 1)[0]) if len(windows) >= 3 else None
    report = {
        "command": f"python -m bench.soak --minutes {minutes:g} --concurrency {concurrency} "
                   f"--bad-every {bad_every}",
        "machine": machine_info(), "model": model, "concurrency": concurrency,
        "minutes": round((windows[-1]["minute"] if windows else 0), 2),
        "requests": int(reqs[-1]) if windows else 0,
        "failed": sum(w["failed"] for w in windows),
        "bad_images_sent_every": bad_every,
        # every service worker process seen; more than API workers + Encoder = a restart
        "worker_processes_seen": len(pids),
        "rss_mib": {"tree_start": round(start["tree_rss"] / 2**20, 1),
                    "tree_end": round(windows[-1]["tree_rss"] / 2**20, 1),
                    "api_worker_start": round(start["api_rss"] / 2**20, 1),
                    "api_worker_end": round(windows[-1]["api_rss"] / 2**20, 1)},
        "api_worker_rss_bytes_per_request": round(slope, 1) if slope is not None else None,
        "windows": windows,
    }
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--bad-every", type=int, default=20,
                        help="one damaged JPEG in every N requests (0: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    report = soak(args.minutes, args.concurrency, args.bad_every,
                  Path(os.environ.get("REPOSITORY", "model_repository")),
                  os.environ.get("MODEL", "default"),
                  Path(os.environ.get("CNN_CODES_SAMPLE_DATA", DEFAULT_DATA)))
    print(json.dumps({k: v for k, v in report.items() if k != "windows"}, indent=1))
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
