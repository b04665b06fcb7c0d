"""The systems under load: our service and the alternatives, each started, measured, stopped.

A :class:`System` knows how to start its server, when it is ready, and which requests each of
its endpoints takes. :func:`measure` runs every (endpoint, concurrency) cell against it with
the memory sampler running, reads the batch sizes from ``/metrics`` where the system has them,
optionally profiles one extra cell with py-spy, and always stops the server.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx
import numpy as np

from bench import profiling
from bench.loadgen import HttpRequest, multipart_request, raw_request, run_cell
from bench.model import REPO_ROOT, BenchModel, offline_env
from bench.photos import Photo
from bench.procs import ManagedServer, MemorySampler, free_port, http_ok
from bench.promscrape import batch_summary, scrape_histogram

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
    sanity: Callable[[], dict[str, Any]] | None = None
    ready_timeout_s: float = 240.0
    notes: list[str] = field(default_factory=list)
    profile: bool = False


def _pause_until_idle(seconds: float = 2.0) -> None:
    """A short gap between cells so one cell's queue does not spill into the next."""
    time.sleep(seconds)


def measure(system: System, plan: Plan, work_dir: Path) -> dict[str, Any]:
    """Start ``system``, run every cell, stop it (always). Never raises for a server failure:
    the failure is returned as ``{"status": "failed", "reason": ...}``."""
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
            # Ramp up: every endpoint at c=1, then every endpoint at c=8, ... so no cell follows
            # a heavier one (adaptive batching remembers recent queueing; see after_burst).
            for concurrency in plan.concurrency:
                for endpoint in live:
                    cell = _measured_cell(system, endpoint, concurrency, plan)
                    result["endpoints"][endpoint.label]["cells"].append(cell)
                    _pause_until_idle()
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


def _measured_cell(system: System, endpoint: Endpoint, concurrency: int, plan: Plan
                   ) -> dict[str, Any]:
    """One cell plus the batch sizes the server formed during it (where it reports them)."""
    before = (scrape_histogram(system.url, system.batch_metric)
              if system.batch_metric else None)
    cell = _drive(system, endpoint, concurrency, plan, plan.duration_s, plan.warmup_s)
    if before is not None and system.batch_metric:
        after = scrape_histogram(system.url, system.batch_metric)
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


# --- the systems -----------------------------------------------------------------------------


def _embed_requests(photos: Sequence[Photo]) -> list[HttpRequest]:
    return [multipart_request("/embed", [p], {"layer": "embedding", "normalize": "true"})
            for p in photos]


def _classify_requests(photos: Sequence[Photo]) -> list[HttpRequest]:
    return [multipart_request("/classify", [p], {"top_k": "2"}) for p in photos]


def _reference_photo(photos: Sequence[Photo]) -> Photo:
    return next(p for p in photos if p.format == "JPEG")


def _embedding(url: str, photo: Photo) -> np.ndarray:
    files = [("images", (photo.name.rsplit("/", 1)[-1], photo.data, photo.content_type))]
    body = httpx.post(f"{url}/embed", files=files, data={"layer": "embedding"},
                      timeout=60).raise_for_status().json()
    return np.asarray(body["results"][0]["embedding"], dtype=np.float64)


def cnn_codes_system(model: BenchModel, photos: Sequence[Photo], work_dir: Path,
                     shared: dict[str, Any], profile: bool) -> System:
    """Our service: ``cnn-codes serve`` with default settings and its own ``BENTOML_HOME``."""
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = offline_env(BENTOML_HOME=str(work_dir / f"bentoml-{port}"),
                      CNN_CODES_GRPC_PORT=str(grpc_port), **shared.get("service_env", {}))
    argv = [sys.executable, "-m", "cnn_codes.cli", "serve", "--host", "127.0.0.1", "--port",
            str(port), "--repository", str(model.repository), "--model", model.ref]
    server = ManagedServer("cnn-codes", argv, env, REPO_ROOT, work_dir / "logs" / "cnn-codes.log")

    def sanity() -> dict[str, Any]:
        vector = _embedding(url, _reference_photo(photos))
        shared["reference_embedding"] = vector
        return {"embedding_dim": int(vector.size),
                "embedding_norm": round(float(np.linalg.norm(vector)), 4)}

    endpoints = [Endpoint("embed", _embed_requests(photos)),
                 Endpoint("classify", _classify_requests(photos))]
    grpc = grpc_endpoint(model, photos, grpc_port)
    if grpc is not None:
        endpoints.append(grpc)
    return System("cnn_codes", "cnn-codes (BentoML + onnxruntime)", server, url,
                  lambda: http_ok(f"{url}/readyz"), endpoints,
                  batch_metric="cnn_codes_batch_size", sanity=sanity, profile=profile,
                  notes=["default settings: 1 API worker, max_batch_size 32, "
                         "onnxruntime intra-op threads = all cores"])


def grpc_front_files() -> list[str]:
    """The service's gRPC front modules, if it has one (``service/grpc*``, ``service/kserve``)."""
    service = REPO_ROOT / "service"
    found = [*service.glob("grpc*"), *service.glob("kserve/grpc*")]
    return sorted(str(p.relative_to(REPO_ROOT)) for p in found)


def grpc_endpoint(model: BenchModel, photos: Sequence[Photo], port: int) -> Endpoint | None:
    """KServe v2 ``ModelInfer`` (BYTES input, ``embedding`` output), when the front exists."""
    if not grpc_front_files():
        return None
    try:
        from bench import grpcload

        requests = grpcload.infer_requests(photos, model.name)
    except Exception as exc:  # the front exists but its stubs do not import (yet)
        logger.warning("gRPC front present but not usable: %s", exc)
        return None
    return Endpoint("grpc_embed", requests, protocol="grpc", target=f"127.0.0.1:{port}")


def fastapi_system(model: BenchModel, photos: Sequence[Photo], work_dir: Path,
                   shared: dict[str, Any], profile: bool) -> System:
    """FastAPI + uvicorn (1 worker) + torch eager per request, same weights and decode."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = offline_env(BENCH_RUN_DIR=str(model.run_dir))
    argv = [sys.executable, "-m", "uvicorn", "bench.baselines.fastapi_torch:app", "--host",
            "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    server = ManagedServer("fastapi+torch", argv, env, REPO_ROOT,
                           work_dir / "logs" / "fastapi.log")

    def sanity() -> dict[str, Any]:
        vector = _embedding(url, _reference_photo(photos))
        ref = shared.get("reference_embedding")
        cosine = None
        if ref is not None:
            cosine = float(vector @ ref / (np.linalg.norm(vector) * np.linalg.norm(ref)))
        return {"embedding_dim": int(vector.size),
                "cosine_vs_cnn_codes": None if cosine is None else round(cosine, 6)}

    return System("fastapi_torch", "FastAPI + torch eager", server, url,
                  lambda: http_ok(f"{url}/readyz"), [Endpoint("embed", _embed_requests(photos))],
                  sanity=sanity, profile=profile,
                  notes=["uvicorn, 1 worker; sync endpoint in FastAPI's thread pool; one "
                         "torch forward per request (no batching); torch default threads"])


def torchserve_tuned_system(model: BenchModel, photos: Sequence[Photo], work_dir: Path,
                            shared: dict[str, Any], profile: bool) -> System:
    """TorchServe as above with one thread per worker (``OMP_NUM_THREADS=1``), the setting
    TorchServe's CPU performance guide recommends; not in the default run."""
    system = torchserve_system(model, photos, work_dir, shared, profile,
                               threads_per_worker=1)
    system.key, system.title = "torchserve_tuned", "TorchServe (1 thread per worker)"
    system.notes.append("OMP_NUM_THREADS=1 in every worker (TorchServe CPU tuning advice)")
    return system


def torchserve_system(model: BenchModel, photos: Sequence[Photo], work_dir: Path,
                      shared: dict[str, Any], profile: bool,
                      threads_per_worker: int | None = None) -> System:
    """TorchServe, stock image classifier handler (see :mod:`bench.baselines.torchserve`).

    Args:
        threads_per_worker: ``OMP_NUM_THREADS`` for the workers; None = stock (torch's
            default, one per core in every worker).

    Raises:
        TorchServeUnavailable: it cannot be installed or archived here (the reason says why).
    """
    from bench.baselines import torchserve as ts

    reason = ts.unavailable_reason()
    if reason is not None:
        raise ts.TorchServeUnavailable(reason)
    store = ts.build_archive(model.run_dir, work_dir)
    extra = {} if threads_per_worker is None else {"OMP_NUM_THREADS": str(threads_per_worker)}
    instance = ts.make_server(store, work_dir, offline_env(**extra))
    path = f"/predictions/{ts.MODEL_NAME}"
    probe_photo = _reference_photo(photos)

    def ready() -> bool:
        response = httpx.post(f"{instance.url}{path}", content=probe_photo.data,
                              headers={"Content-Type": "image/jpeg"}, timeout=10)
        return response.status_code == 200

    def sanity() -> dict[str, Any]:
        body = httpx.get(f"{instance.management_url}/models/{ts.MODEL_NAME}", timeout=10).json()
        workers = body[0].get("workers", []) if isinstance(body, list) and body else []
        return {"workers": len(workers), "batch_size": body[0].get("batchSize")
                if isinstance(body, list) and body else None}

    return System("torchserve", "TorchServe (stock image_classifier)", instance.server,
                  instance.url, ready,
                  [Endpoint("classify", [raw_request(path, p) for p in photos])],
                  sanity=sanity, ready_timeout_s=300, profile=profile,
                  notes=["TorchServe 0.12.0, stock defaults: batch size 1, workers = cores; "
                         "handler = stock ImageClassifier with topk 2 (K=2)",
                         "stock preprocessing: Resize(256) (ours: 232 for this preset), no "
                         "JPEG draft mode, no RGB conversion (the palette GIF fails)"])
