"""The systems under load: our service and the alternatives, each started, measured, stopped.

A :class:`System` knows how to start its server, when it is ready, and which requests each of
its endpoints takes (the systems themselves are built in :mod:`bench.contenders`).
:func:`measure` runs every (endpoint, concurrency) cell against it with the memory sampler
running, reads the batch sizes from ``/metrics`` where the system has them, optionally
profiles one extra cell with py-spy, and always stops the server.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench import profiling
from bench.loadgen import run_cell
from bench.procs import ManagedServer, MemorySampler
from bench.promscrape import HistogramTotals, batch_summary, scrape_histogram

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """How long and how hard to drive each cell.

    Attributes:
        concurrency: client concurrency levels, e.g. ``(1, 8, 32, 64)``.
        warmup_s: load before each measuring window.
        duration_s: measuring window per cell.
        idle_s: wait after readiness before the idle memory sample.
        profile_s: py-spy seconds on one extra cell (0 = no profile).
        profile_concurrency: concurrency of that cell.
        max_requests: cap on requests per cell.
        drain_s: after a window, how long in-flight requests may finish before cancellation.
        after_burst: also measure c=1 right after the heaviest cell.
    """

    concurrency: tuple[int, ...]
    warmup_s: float
    duration_s: float
    idle_s: float = 3.0
    profile_s: int = 0
    profile_concurrency: int = 32
    max_requests: int = 50_000
    drain_s: float = 15.0
    after_burst: bool = True


@dataclass
class Endpoint:
    """One route of a system and the pre-encoded requests that drive it.

    Attributes:
        label: key in the JSON (``embed``, ``classify``, ``grpc_embed``).
        requests: :class:`HttpRequest` for HTTP, ``ModelInferRequest`` for gRPC.
        protocol: ``http`` or ``grpc``.
        target: ``127.0.0.1:PORT`` of a gRPC endpoint.
    """

    label: str
    requests: list[Any]
    protocol: str = "http"
    target: str | None = None


@dataclass
class System:
    """A server to measure.

    Attributes:
        key: JSON key (``cnn_codes``, ``fastapi_torch``, ``torchserve``).
        title: for tables and the plot.
        server: the (not yet started) process.
        url: its loopback base URL.
        ready: probe returning True once it serves.
        endpoints: what to drive.
        batch_metric: name of a Prometheus histogram of batch sizes on ``/metrics``.
        batch_probe: instead of ``batch_metric``, a function returning the server's batch totals
            so far (images in ``total``, batches in ``count``), e.g. from Triton's counters.
        sanity: called once when ready; returns facts for the JSON (e.g. output checks).
        ready_timeout_s: how long start-up may take.
        notes: what is specific about this system's configuration.
        profile: whether this system gets the extra py-spy cell.
    """

    key: str
    title: str
    server: ManagedServer
    url: str
    ready: Callable[[], bool]
    endpoints: list[Endpoint]
    batch_metric: str | None = None
    batch_probe: Callable[[], HistogramTotals] | None = None
    sanity: Callable[[], dict[str, Any]] | None = None
    ready_timeout_s: float = 240.0
    notes: list[str] = field(default_factory=list)
    profile: bool = False


def _pause_until_idle(seconds: float = 2.0) -> None:
    """A short gap between cells so one cell's queue does not spill into the next."""
    time.sleep(seconds)


def measure(system: System, plan: Plan, work_dir: Path,
            probe: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Start ``system``, run every cell, stop it (always). Never raises for a server failure:
    the failure is returned as ``{"status": "failed", "reason": ...}``.

    ``probe`` (the limit measured again, :func:`bench.limit.probe`) runs with the server up
    and idle before the first concurrency level and after every level; its results are
    ``limit_beside`` (one more entry than levels), so each level's cells have a limit
    measured minutes, not a quarter of an hour, from them."""
    result: dict[str, Any] = {"key": system.key, "title": system.title, "status": "ok",
                              "notes": system.notes, "endpoints": {}}
    try:
        system.server.start()
        result["startup_s"] = round(system.server.wait_ready(system.ready,
                                                             system.ready_timeout_s), 1)
        logger.info("%s ready after %.1f s", system.title, result["startup_s"])
        if system.sanity is not None:
            result["sanity"] = system.sanity()
        with MemorySampler(system.server.pid) as memory:
            time.sleep(plan.idle_s)
            memory.sample()
            memory.phase = "load"
            live = []
            for endpoint in system.endpoints:
                problem = _unavailable(endpoint)
                if problem is not None:
                    result["endpoints"][endpoint.label] = {"status": "failed", "reason": problem,
                                                           "protocol": endpoint.protocol}
                else:
                    live.append(endpoint)
                    result["endpoints"][endpoint.label] = {"status": "ok", "cells": [],
                                                           "protocol": endpoint.protocol}
            if probe is not None:
                result["limit_beside"] = [_probe(probe)]
            # Ramp up: every endpoint at c=1, then every endpoint at c=8, ... so no cell follows
            # a heavier one (adaptive batching remembers recent queueing; see after_burst).
            for concurrency in plan.concurrency:
                for endpoint in live:
                    cell = _measured_cell(system, endpoint, concurrency, plan)
                    result["endpoints"][endpoint.label]["cells"].append(cell)
                    _pause_until_idle()
                if probe is not None:
                    result["limit_beside"].append(_probe(probe))
            if live and plan.after_burst:
                # The same c=1 cell right after the heaviest one: the latency a lone client
                # sees just after a burst.
                cell = _measured_cell(system, live[0], 1, plan)
                cell["after"] = f"{live[-1].label} at c={max(plan.concurrency)}"
                result["after_burst"] = {"endpoint": live[0].label, **cell}
            memory.sample()
            if system.profile and plan.profile_s > 0:
                memory.phase = "profile"
                result["profile"] = _profile(system, plan, work_dir)
        result["memory"] = memory.summary()
    except Exception as exc:  # one system failing must not lose the others' numbers
        logger.exception("%s failed", system.title)
        result.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:3000])
    finally:
        system.server.stop()
    return result


def _probe(probe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One limit probe; a failed one is recorded, not raised (the cells keep their numbers)."""
    try:
        return {"status": "ok", **probe()}
    except Exception as exc:
        logger.exception("limit probe failed")
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:1000]}


def _measured_cell(system: System, endpoint: Endpoint, concurrency: int, plan: Plan
                   ) -> dict[str, Any]:
    """One cell plus the batch sizes the server formed during it (where it reports them)."""
    def totals() -> HistogramTotals | None:
        if system.batch_probe is not None:
            return system.batch_probe()
        return scrape_histogram(system.url, system.batch_metric) if system.batch_metric else None

    before = totals()
    cell = _drive(system, endpoint, concurrency, plan, plan.duration_s, plan.warmup_s)
    after = totals() if before is not None else None
    if before is not None and after is not None:
        cell.extra.update(batch_summary(after.minus(before)))
    return cell.as_dict()


def _drive(system: System, endpoint: Endpoint, concurrency: int, plan: Plan,
           duration_s: float, warmup_s: float) -> Any:
    """One load cell on ``endpoint`` over its protocol."""
    if endpoint.protocol == "grpc":
        from bench import grpcload

        assert endpoint.target is not None
        return grpcload.run_cell(endpoint.target, endpoint.requests, concurrency,
                                 warmup_s=warmup_s, duration_s=duration_s,
                                 max_requests=plan.max_requests, drain_s=plan.drain_s)
    return run_cell(system.url, endpoint.requests, concurrency, warmup_s=warmup_s,
                    duration_s=duration_s, max_requests=plan.max_requests, drain_s=plan.drain_s)


def _unavailable(endpoint: Endpoint, timeout_s: float = 30.0) -> str | None:
    """None when ``endpoint`` can take load; else why not (gRPC front not serving)."""
    if endpoint.protocol != "grpc":
        return None
    from bench import grpcload

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if grpcload.server_ready(endpoint.target or ""):
                return None
        except Exception as exc:  # import errors, channel errors: report them
            return f"gRPC front not usable: {type(exc).__name__}: {exc}"[:1000]
        time.sleep(1.0)
    return f"gRPC ServerReady on {endpoint.target} not true within {timeout_s:.0f} s"


def _profile(system: System, plan: Plan, work_dir: Path) -> dict[str, Any]:
    """py-spy over the server tree during one extra cell on the first endpoint."""
    endpoint = system.endpoints[0]
    out = work_dir / "profile" / f"{system.key}-{endpoint.label}.raw.txt"
    spy = profiling.start_record(system.server.pid, plan.profile_s, out)
    if spy is None:
        return {"status": "py-spy not installed"}
    time.sleep(1.0)  # py-spy attaches
    cell = _drive(system, endpoint, plan.profile_concurrency, plan, plan.profile_s, 0.0)
    try:
        spy_out, _ = spy.communicate(timeout=plan.profile_s + 60)
    except Exception:  # a hung py-spy must not hang the run
        spy.kill()
        spy_out, _ = spy.communicate()
    if spy.returncode != 0 or not out.is_file():
        return {"status": "failed", "reason": (spy_out or "")[-1500:]}
    return {"status": "ok", "endpoint": endpoint.label,
            "concurrency": plan.profile_concurrency, "seconds": plan.profile_s,
            "images_per_s_while_profiled": cell.images_per_s, "raw": str(out),
            "processes": profiling.summarise(out)}
