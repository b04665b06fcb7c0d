"""CPU milliseconds per image, by process and thread, of a ``cnn-codes serve`` under load
(not a test).

A profile's samples say where a thread *is*, not how much CPU it used: on 2 cores a thread
waiting for a core or for the GIL is sampled as busy. This counts what the kernel charged
each thread (``utime + stime``, psutil) over a load window and divides by the images served,
so the stages can be added up and set against the limit (``bench.limit``: onnxruntime alone
and decode alone, in CPU ms per image). Python threads are named from ``py-spy dump``
(``MainThread`` = the event loop, ``asyncio_N`` = decode threads, ``batcher_N`` = the threads
that call ``InferenceSession.run``); onnxruntime's own intra-op threads have no Python name
and show as ``native``.

usage (from the repository root, with a published model)::

    .venv/bin/python -m bench.threadcpu --protocol grpc --concurrency 32 --seconds 10
    .venv/bin/python -m bench.threadcpu --protocol http --env BATCH_RUNS=1 --env API_WORKERS=1

Environment: ``REPOSITORY`` (default ``model_repository``), ``MODEL`` (default ``default``),
``CNN_CODES_SAMPLE_DATA``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

from bench.configs import DEFAULT_DATA, Server, load_cell, protocol_requests, settings_env
from bench.photos import load_photos
from bench.profiling import py_spy_path

logger = logging.getLogger("bench.threadcpu")
_THREAD = re.compile(r'^Thread (\d+) \(\w+\): "([^"]+)"', re.M)

Key = tuple[int, str]  # (process id, thread name)


def python_thread_names(pids: list[int]) -> dict[int, str]:
    """Native thread id -> Python thread name (trailing digits dropped), by ``py-spy dump``;
    empty when py-spy is missing."""
    exe = py_spy_path()
    names: dict[int, str] = {}
    if exe is None:
        logger.warning("py-spy not installed: threads are not named")
        return names
    for pid in pids:
        out = subprocess.run([exe, "dump", "--pid", str(pid), "--nonblocking"],
                             capture_output=True, text=True, timeout=30).stdout
        for tid, name in _THREAD.findall(out):
            names[int(tid)] = re.sub(r"[_-]?\d+$", "", name)
    return names


def thread_cpu(root: int, names: dict[int, str]) -> Counter[Key]:
    """CPU seconds (user + system) so far of every thread of ``root``'s process tree."""
    seconds: Counter[Key] = Counter()
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return seconds
    for proc in procs:
        try:
            for thread in proc.threads():
                seconds[(proc.pid, names.get(thread.id, "native"))] += (thread.user_time
                                                                         + thread.system_time)
        except psutil.NoSuchProcess:
            continue
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Serve, warm up, count CPU per thread over one load window; prints a table, returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=V",
                        help="a CNN_CODES_ setting of the server (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    photos = load_photos(Path(os.environ.get("CNN_CODES_SAMPLE_DATA", DEFAULT_DATA)))
    repository = Path(os.environ.get("REPOSITORY", "model_repository"))
    model = os.environ.get("MODEL", "default")
    env = settings_env(args.env)
    server = Server(repository, model, Path(tempfile.mkdtemp(prefix="cnn-codes-cpu-")), **env)
    try:
        server.wait_ready(300)
        requests = protocol_requests(photos, model, [args.protocol])[args.protocol]

        def load(seconds: float, warmup: float):
            return load_cell(server, args.protocol, requests, args.concurrency,
                             warmup_s=warmup, duration_s=seconds)

        load(2.0, 1.0)  # warm: sessions, threads and connections exist
        root = server.proc.pid
        names = python_thread_names([root, *(p.pid for p in
                                             psutil.Process(root).children(recursive=True))])
        before, started = thread_cpu(root, names), time.perf_counter()
        cell = load(args.seconds, 0.0)
        after, wall = thread_cpu(root, names), time.perf_counter() - started
    finally:
        server.stop()
    images = cell.images_per_s * args.seconds
    used = {key: after[key] - before.get(key, 0.0) for key in after}
    total = sum(used.values())
    rows = [{"pid": pid, "thread": name, "cpu_s": round(s, 2),
             "ms_per_image": round(1000 * s / images, 2) if images else None}
            for (pid, name), s in sorted(used.items(), key=lambda kv: -kv[1]) if s >= 0.05]
    print(f"{args.protocol} c={args.concurrency} {' '.join(args.env)}: {cell.images_per_s:.1f}"
          f" images/s, {cell.errors} errors; {total:.2f} CPU s in {wall:.1f} s"
          f" ({total / wall:.2f} cores), {1000 * total / images:.2f} CPU ms per image")
    for row in rows:
        print(f"  pid {row['pid']:>7}  {row['thread']:28s} {row['cpu_s']:7.2f} s"
              f"  {row['ms_per_image']:6.2f} ms/image")
    if args.out:
        args.out.write_text(json.dumps({"protocol": args.protocol, "env": env,
                                        "concurrency": args.concurrency,
                                        "images_per_s": cell.images_per_s,
                                        "cores": round(total / wall, 2),
                                        "cpu_ms_per_image": round(1000 * total / images, 2),
                                        "threads": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
