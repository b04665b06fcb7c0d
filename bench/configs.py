"""Serving configurations side by side (not a test): which core, how many workers and threads.

Each configuration is one ``cnn-codes serve`` of a published model with some ``CNN_CODES_*``
settings, driven over loopback by the bench's closed-loop clients (one photo per request to
HTTP ``/embed`` and/or gRPC ``ModelInfer`` on one channel, as ``make bench`` sends them, the
sample photos' natural mix) at each concurrency; the servers run one at a time.

usage (from the repository root, with a published model, e.g. after ``make model``)::

    .venv/bin/python -m bench.configs                       # the default set below
    .venv/bin/python -m bench.configs "name:KEY=V,KEY=V" ... # your own
    .venv/bin/python -m bench.configs --protocols http,grpc ...
    .venv/bin/python -m bench.configs --rounds 3 "a:" "b:KEY=V"  # A B, B A, A B + means

Environment: ``REPOSITORY`` (default ``model_repository``), ``MODEL`` (default ``default``),
``CNN_CODES_SAMPLE_DATA``. Prints one line per cell and writes ``bench/results/configs.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from bench import grpcload
from bench.contenders import embed_requests
from bench.loadgen import CellResult, run_cell
from bench.machine import machine_info
from bench.photos import Photo, load_photos

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DEFAULT_DATA, Server  # noqa: E402  (the tests' harness: own home, free port)

logger = logging.getLogger("bench.configs")
RESULTS = Path(__file__).resolve().parent / "results" / "configs.json"
DEFAULT_CONFIGS = [
    "encoder_1x0:BATCHING=encoder,API_WORKERS=1,INTRA_OP_THREADS=0",
    "in_process_1x2:BATCHING=in_process,API_WORKERS=1,INTRA_OP_THREADS=2",
    "in_process_2x1:BATCHING=in_process,API_WORKERS=2,INTRA_OP_THREADS=1",
    "in_process_2x2:BATCHING=in_process,API_WORKERS=2,INTRA_OP_THREADS=2",
    "default:",
]


def settings_env(pairs: Iterable[str]) -> dict[str, str]:
    """``["KEY=V", ...]`` -> ``{"CNN_CODES_KEY": "V", ...}`` (empty items skipped)."""
    env = {}
    for pair in filter(None, pairs):
        key, _, value = pair.partition("=")
        env[f"CNN_CODES_{key}"] = value
    return env


def parse(config: str) -> tuple[str, dict[str, str]]:
    """``"name:KEY=V,KEY=V"`` -> ``(name, {"CNN_CODES_KEY": "V"})``."""
    name, _, pairs = config.partition(":")
    return name, settings_env(pairs.split(","))


def schedule(configs: Sequence[str], rounds: int) -> list[tuple[str, str]]:
    """``(run name, config)`` for ``rounds`` rounds of ``configs``, every second round in
    reverse order (A B, B A, A B, ...), so that a machine drifting during the comparison moves
    every configuration alike instead of always favouring the one run first; with one round the
    configurations as given, under their own names, else ``name_rN``."""
    if rounds <= 1:
        return [(parse(config)[0], config) for config in configs]
    plan = []
    for index in range(rounds):
        for config in (configs if index % 2 == 0 else list(reversed(configs))):
            plan.append((f"{parse(config)[0]}_r{index + 1}", config))
    return plan


def means(results: dict[str, Any], rounds: int) -> list[str]:
    """Per configuration, protocol and concurrency: mean images/s and p50 over the rounds
    (lines to print; empty with one round)."""
    if rounds <= 1:
        return []
    cells: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    for run, entry in results["configs"].items():
        name = run.rsplit("_r", 1)[0]
        for cell in entry["cells"]:
            cells.setdefault((name, cell["protocol"], cell["concurrency"]), []).append(
                (cell["images_per_s"], cell["latency_ms"]["p50"]))
    return [f"{name:16s} {protocol:4s} c={c:<3d} {sum(v[0] for v in got) / len(got):7.1f} "
            f"images/s  p50 {sum(v[1] for v in got) / len(got):6.1f} ms  (mean of {len(got)})"
            for (name, protocol, c), got in cells.items()]


def protocol_requests(photos: Sequence[Photo], model: str, protocols: Iterable[str]
                      ) -> dict[str, list[Any]]:
    """One request per photo for each protocol: HTTP multipart ``/embed``, gRPC
    ``ModelInfer`` of ``model`` (``BYTES [1]`` in, ``embedding`` out)."""
    requests: dict[str, list[Any]] = {}
    for protocol in protocols:
        requests[protocol] = (grpcload.infer_requests(photos, model) if protocol == "grpc"
                              else embed_requests(photos))
    return requests


def load_cell(server: Server, protocol: str, requests: Sequence[Any], concurrency: int, *,
              warmup_s: float, duration_s: float) -> CellResult:
    """One closed-loop cell against ``server``: gRPC on one channel, or HTTP."""
    if protocol == "grpc":
        return grpcload.run_cell(server.grpc_url, requests, concurrency, warmup_s=warmup_s,
                                 duration_s=duration_s)
    return run_cell(server.url, requests, concurrency, warmup_s=warmup_s,
                    duration_s=duration_s)


def main(argv: list[str] | None = None) -> int:
    """Run every configuration; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--protocols", default="http", help="http, grpc or http,grpc")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the configurations this many times, alternating their order "
                             "(A B, B A, ...), and print the means")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    photos = load_photos(Path(os.environ.get("CNN_CODES_SAMPLE_DATA", DEFAULT_DATA)))
    repository = Path(os.environ.get("REPOSITORY", "model_repository"))
    model = os.environ.get("MODEL", "default")
    protocols = args.protocols.split(",")
    requests = protocol_requests(photos, model, protocols)
    results = {"machine": machine_info(), "model": model, "configs": {}}
    for name, config in schedule(args.configs, args.rounds):
        env = parse(config)[1]
        server = Server(repository, model, Path(tempfile.mkdtemp(prefix="cnn-codes-cfg-")), **env)
        try:
            server.wait_ready(300)
            cells = []
            for protocol in protocols:
                for c in map(int, args.concurrency.split(",")):
                    cell = load_cell(server, protocol, requests[protocol], c,
                                     warmup_s=args.warmup, duration_s=args.duration)
                    cells.append({"protocol": protocol, **cell.as_dict()})
                    print(f"{name:16s} {protocol:4s} c={c:<3d} {cell.images_per_s:7.1f} images/s"
                          f"  p50 {cell.latency_ms['p50']:6.1f} ms  p99 "
                          f"{cell.latency_ms['p99']:6.1f} ms  errors {cell.errors}", flush=True)
        finally:
            server.stop()
        results["configs"][name] = {"env": env, "cells": cells}
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for line in means(results, args.rounds):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
