"""The systems under load: our service and the alternatives, each started, measured, stopped.

A :class:`System` knows how to start its server, when it is ready, and which requests each of
its endpoints takes (the systems themselves are built in :mod:`bench.contenders`).
:func:`measure` runs every (endpoint, concurrency) cell against it with the memory sampler
running, reads the batch sizes from ``/metrics`` where the system has them, optionally
profiles one extra cell with py-spy, and always stops the server.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from bench import profiling
from bench.limit import recorded_probe
from bench.loadgen import CellResult, combine, run_cell
from bench.procs import ManagedServer, MemorySampler, tree_cpu_seconds
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
        passes_together: passes of each cell when several systems are up at once (mirrored
            rounds, see :func:`measure_together`); 2 until 2026-12-07, when the two passes of
            one cell differed by up to 1.55x (166.0 and 258.0 images/s, our HTTP c=64 cell of
            that morning's 04:12 run) and the verdicts against Triton flipped between runs.
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
    passes_together: int = 4


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
    """Start ``system``, run every cell, stop it (always): :func:`measure_together` of one
    system. Never raises for a server failure: the failure is returned as
    ``{"status": "failed", "reason": ...}``."""
    return measure_together([system], plan, work_dir, probe=probe)[system.key]


@dataclass
class _Pass:
    """One pass of a cell: what the load generator measured, the batch totals the server
    reported meanwhile (None where it reports none), the cores the idle systems used."""

    cell: CellResult
    batches: HistogramTotals | None
    others_cores: float


@dataclass
class _Up:
    """A started system during :func:`measure_together`: its result so far, its memory
    sampler, the endpoints that can take load."""

    system: System
    result: dict[str, Any]
    memory: MemorySampler
    live: list[Endpoint] = field(default_factory=list)


def measure_together(systems: Sequence[System], plan: Plan, work_dir: Path,
                     probe: Callable[[], dict[str, Any]] | None = None
                     ) -> dict[str, dict[str, Any]]:
    """Start every system in ``systems``, measure them side by side, stop them (always).

    With one system: each concurrency level runs its endpoints in order, one pass per cell of
    ``plan.duration_s``. With several (our service and the peer it is compared with): all are
    up at once, each idle while another is loaded, and each level runs every (system,
    endpoint) cell ``plan.passes_together`` times in mirrored rounds, A B ... B A A B ... B A,
    each pass an equal share of ``plan.duration_s`` after its own warm-up; a cell is its
    passes pooled (:func:`bench.loadgen.combine`). A linear drift of the machine's speed
    within the level then moves both systems' cells alike, so their ratio is measured at the
    same moment, which one system after another, 8 minutes apart, is not (this machine moves
    10-25 % within minutes). What the idle systems used while another was loaded is kept per
    cell (``others_cpu_cores``).

    ``probe`` (the limit measured again, :func:`bench.limit.probe`) runs with every system up
    and idle before the first concurrency level and after every level; its results are
    ``limit_beside`` of each system (one more entry than levels).

    Returns:
        ``{system.key: result}``; a system that fails to start or fails during a cell is
        ``{"status": "failed", "reason": ...}`` and the others go on.
    """
    results: dict[str, dict[str, Any]] = {
        s.key: {"key": s.key, "title": s.title, "status": "ok", "notes": s.notes,
                "endpoints": {}} for s in systems}
    together = len(systems) > 1
    if together:
        for s in systems:
            results[s.key]["measured_with"] = [o.key for o in systems if o is not s]
    up: list[_Up] = []
    with contextlib.ExitStack() as stack:
        for system in systems:
            stack.callback(system.server.stop)
            try:
                up.append(_start(system, results[system.key], stack))
            except Exception as exc:  # one system failing must not lose the others' numbers
                _failed(results[system.key], exc)
        try:
            _ramp(up, plan, probe, passes=plan.passes_together if len(up) > 1 else 1)
        except Exception as exc:  # a harness bug: keep what was measured, say what broke
            for entry in up:
                _failed(entry.result, exc)
        for entry in up:
            entry.memory.sample()
        for entry in up:
            if entry.result["status"] == "ok" and entry.system.profile and plan.profile_s > 0:
                entry.memory.phase = "profile"
                try:
                    entry.result["profile"] = _profile(entry.system, plan, work_dir)
                except Exception as exc:
                    _failed(entry.result, exc)
    for entry in up:  # the samplers stopped with the stack
        entry.result["memory"] = entry.memory.summary()
    return results


def _failed(result: dict[str, Any], exc: BaseException) -> None:
    logger.error("%s failed", result["title"], exc_info=exc)
    result.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:3000])


def _start(system: System, result: dict[str, Any], stack: contextlib.ExitStack) -> _Up:
    """Start ``system``, wait until it serves, run its sanity check, start its memory
    sampler (stopped with ``stack``), find which endpoints can take load."""
    system.server.start()
    result["startup_s"] = round(system.server.wait_ready(system.ready, system.ready_timeout_s),
                                1)
    logger.info("%s ready after %.1f s", system.title, result["startup_s"])
    if system.sanity is not None:
        result["sanity"] = system.sanity()
    return _Up(system, result, stack.enter_context(MemorySampler(system.server.pid)))


def _ramp(up: list[_Up], plan: Plan, probe: Callable[[], dict[str, Any]] | None, *,
          passes: int) -> None:
    """Every level's cells for every started system, the probes, the after-burst cells."""
    if not up:
        return
    time.sleep(plan.idle_s)
    for entry in up:
        entry.memory.sample()
        entry.memory.phase = "load"
        for endpoint in entry.system.endpoints:
            problem = _unavailable(endpoint)
            if problem is not None:
                entry.result["endpoints"][endpoint.label] = {
                    "status": "failed", "reason": problem, "protocol": endpoint.protocol}
            else:
                entry.live.append(endpoint)
                entry.result["endpoints"][endpoint.label] = {
                    "status": "ok", "cells": [], "protocol": endpoint.protocol}
    beside: list[dict[str, Any]] = []
    if probe is not None:
        for entry in up:
            entry.result["limit_beside"] = beside
        beside.append(recorded_probe(probe))
    # Ramp up: every endpoint at c=1, then every endpoint at c=8, ... so no cell follows a
    # heavier one (adaptive batching remembers recent queueing; see after_burst).
    for concurrency in plan.concurrency:
        order = [(entry, endpoint) for entry in up for endpoint in entry.live]
        schedule = [cell for round_ in range(passes)
                    for cell in (order if round_ % 2 == 0 else order[::-1])]
        measured: dict[tuple[str, str], list[_Pass]] = {}
        for entry, endpoint in schedule:
            if entry.result["status"] != "ok":
                continue
            try:
                one = _measured_pass(entry, endpoint, concurrency, plan,
                                     plan.duration_s / passes, up)
            except Exception as exc:
                _failed(entry.result, exc)
                continue
            measured.setdefault((entry.system.key, endpoint.label), []).append(one)
            _pause_until_idle()
        for entry, endpoint in order:
            cells = measured.get((entry.system.key, endpoint.label))
            if cells and entry.result["status"] == "ok":
                entry.result["endpoints"][endpoint.label]["cells"].append(_pooled(cells))
        if probe is not None:
            beside.append(recorded_probe(probe))
    if plan.after_burst:
        for entry in up:
            if entry.live and entry.result["status"] == "ok":
                # The same c=1 cell right after the heaviest level: the latency a lone client
                # sees just after a burst.
                try:
                    cell = _pooled([_measured_pass(entry, entry.live[0], 1, plan,
                                                   plan.duration_s, up)])
                except Exception as exc:
                    _failed(entry.result, exc)
                    continue
                cell["after"] = f"{entry.live[-1].label} at c={max(plan.concurrency)}"
                entry.result["after_burst"] = {"endpoint": entry.live[0].label, **cell}


def _measured_pass(entry: _Up, endpoint: Endpoint, concurrency: int, plan: Plan,
                   duration_s: float, up: Sequence[_Up]) -> _Pass:
    """One pass of a cell on ``entry``, with the batch totals its server reported meanwhile
    and the CPU cores the other started systems in ``up`` (idle) used meanwhile."""
    system = entry.system
    others = [o for o in up if o is not entry]

    def totals() -> HistogramTotals | None:
        if system.batch_probe is not None:
            return system.batch_probe()
        return scrape_histogram(system.url, system.batch_metric) if system.batch_metric else None

    def others_cpu() -> float:
        return sum(tree_cpu_seconds(o.system.server.pid) for o in others)

    before, cpu_before, started = totals(), others_cpu(), time.monotonic()
    cell = _drive(system, endpoint, concurrency, plan, duration_s, plan.warmup_s)
    cores = (others_cpu() - cpu_before) / (time.monotonic() - started) if others else 0.0
    after = totals() if before is not None else None
    batches = after.minus(before) if before is not None and after is not None else None
    return _Pass(cell, batches, cores)


def _pooled(passes: Sequence[_Pass]) -> dict[str, Any]:
    """The JSON cell of one or more passes (:func:`bench.loadgen.combine`), with the batch
    sizes over all of them and, when other systems were up, the cores they used meanwhile."""
    pooled = combine([p.cell for p in passes])
    batches = [p.batches for p in passes if p.batches is not None]
    if batches:
        total = batches[0]
        for more in batches[1:]:
            total = total.plus(more)
        pooled.extra.update(batch_summary(total))
    out = pooled.as_dict()
    if len(passes) > 1 or any(p.others_cores for p in passes):
        out["others_cpu_cores"] = round(max(p.others_cores for p in passes), 3)
    return out


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
