"""A bounded closed-loop HTTP load generator (asyncio + aiohttp) for loopback services.

``concurrency`` workers each send one request, wait for the answer, and send the next, over a
fixed list of pre-encoded requests (one photo each, cycled in the photos' shuffled order).
Every cell is bounded in time (warm-up + measuring window + request timeout) and in count
(``max_requests``). Bodies are built once, so the client spends its CPU on sockets only.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from bench.photos import Photo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpRequest:
    """One pre-encoded request.

    Attributes:
        method: ``POST`` / ``PUT``.
        path: absolute path on the server (``/embed``).
        body: the full request body.
        headers: at least the content type.
        images: images the request carries (for images/s).
    """

    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    images: int = 1


def multipart_request(path: str, photos: Sequence[Photo], fields: dict[str, str]
                      ) -> HttpRequest:
    """A ``multipart/form-data`` POST with files under ``images`` plus plain ``fields``."""
    boundary = f"cnncodesbench{uuid.uuid4().hex}"
    parts: list[bytes] = []
    for photo in photos:
        filename = photo.name.rsplit("/", 1)[-1]
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
            f'filename="{filename}"\r\nContent-Type: {photo.content_type}\r\n\r\n'.encode()
            + photo.data + b"\r\n")
    for key, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'
                     f"{value}\r\n".encode())
    parts.append(f"--{boundary}--\r\n".encode())
    return HttpRequest("POST", path, b"".join(parts),
                       {"Content-Type": f"multipart/form-data; boundary={boundary}"},
                       images=len(photos))


def raw_request(path: str, photo: Photo) -> HttpRequest:
    """A POST whose body is the encoded image itself (TorchServe's ``/predictions``)."""
    return HttpRequest("POST", path, photo.data, {"Content-Type": photo.content_type})


def kserve_binary_request(path: str, photo: Photo, input_name: str, output: str,
                          shape: Sequence[int] = (1, 1)) -> HttpRequest:
    """A KServe v2 HTTP ``infer`` POST with Triton's binary tensor data extension: a JSON header
    (``Inference-Header-Content-Length`` bytes) then the ``BYTES`` input, one encoded photo as a
    4-byte little-endian length + the file; the ``output`` comes back as binary data too."""
    header = json.dumps({
        "inputs": [{"name": input_name, "shape": list(shape), "datatype": "BYTES",
                    "parameters": {"binary_data_size": 4 + len(photo.data)}}],
        "outputs": [{"name": output, "parameters": {"binary_data": True}}],
    }).encode()
    return HttpRequest("POST", path, header + struct.pack("<I", len(photo.data)) + photo.data,
                       {"Content-Type": "application/octet-stream",
                        "Inference-Header-Content-Length": str(len(header))})


RETRY_AFTER_CAP_S = 1.0


def _retry_after(value: str | None) -> float:
    """Seconds from a ``Retry-After`` header (delta-seconds form), 0 when absent or odd."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


@dataclass
class CellResult:
    """What one (system, endpoint, concurrency) cell measured.

    Throughput counts successful responses completed inside the measuring window; latency
    percentiles are over the same responses (client side: send to last byte read).
    ``ok_latencies_ms`` (those responses' latencies, ms; not in :meth:`as_dict`) and
    ``ok_images`` let :func:`combine` pool several passes of one cell.
    """

    concurrency: int
    window_s: float
    completed: int
    ok: int
    errors: int
    images_per_s: float
    latency_ms: dict[str, float]
    client_cpu_s: float
    error_samples: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    ok_latencies_ms: np.ndarray | None = field(default=None, repr=False)
    ok_images: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"concurrency": self.concurrency, "window_s": self.window_s,
                "completed": self.completed, "ok": self.ok, "errors": self.errors,
                "images_per_s": self.images_per_s, "latency_ms": self.latency_ms,
                "client_cpu_s": self.client_cpu_s, "error_samples": self.error_samples,
                **self.extra}


async def _run_cell(base_url: str, requests: Sequence[HttpRequest], concurrency: int,
                    warmup_s: float, duration_s: float, max_requests: int,
                    timeout_s: float, drain_s: float) -> CellResult:
    records: list[tuple[float, float, int, int]] = []  # start, end, status, images
    samples: list[str] = []
    counter = itertools.count()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    cpu0 = time.process_time()
    started = time.perf_counter()
    warm_end, end = started + warmup_s, started + warmup_s + duration_s
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            while time.perf_counter() < end:
                index = next(counter)
                if index >= max_requests:
                    return
                request = requests[index % len(requests)]
                t0 = time.perf_counter()
                try:
                    async with session.request(request.method, request.path, data=request.body,
                                               headers=request.headers) as response:
                        payload = await response.read()
                        status = response.status
                        retry_after = _retry_after(response.headers.get("Retry-After"))
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    status, payload, retry_after = -1, repr(exc).encode(), 0.0
                if status != 200 and len(samples) < 3:
                    samples.append(f"{status}: {payload[:300].decode(errors='replace')}")
                records.append((t0, time.perf_counter(), status, request.images))
                if status == 429:  # a polite client honours Retry-After (capped: bounded cell)
                    await asyncio.sleep(min(retry_after, RETRY_AFTER_CAP_S))

        tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        client = asyncio.ensure_future(window_client_cores(warm_end, end))
        # Requests still queued at the end of the window only matter for the next cell: let
        # them drain for up to ``drain_s``, then cancel them (the cell stays bounded in time).
        _, pending = await asyncio.wait(tasks, timeout=warmup_s + duration_s + drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        cancelled = len(pending)
        client_cores = await client
    return summarise(records, concurrency, warm_end, end, duration_s, time.process_time() - cpu0,
                     samples, cancelled, client_cores)


def _percentiles(latencies: np.ndarray) -> dict[str, float]:
    """p50 / p95 / p99 / mean of ``latencies`` (ms; NaN when empty)."""
    if latencies.size == 0:
        latencies = np.array([np.nan])
    return {"p50": round(float(np.percentile(latencies, 50)), 1),
            "p95": round(float(np.percentile(latencies, 95)), 1),
            "p99": round(float(np.percentile(latencies, 99)), 1),
            "mean": round(float(np.mean(latencies)), 1)}


async def window_client_cores(warm_end: float, end: float) -> float:
    """Cores this process (the load generator) used between ``warm_end`` and ``end``
    (``time.perf_counter`` instants): its CPU seconds over that window (``time.process_time``,
    every thread, grpc's own included) / the window's seconds. Run it as a task beside the
    cell's clients; it returns at ``end``.

    The load generator shares the machine's cores with the server it drives, while the limit
    (:mod:`bench.limit`) is measured with nothing else running: this is its share."""
    await asyncio.sleep(max(0.0, warm_end - time.perf_counter()))
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    return round((time.process_time() - cpu0) / max(time.perf_counter() - t0, 1e-9), 3)


def summarise(records: Sequence[tuple[float, float, int | str, int]], concurrency: int,
              warm_end: float, end: float, duration_s: float, cpu_s: float,
              samples: list[str], cancelled: int,
              client_cores: float | None = None) -> CellResult:
    """Throughput and latency of the successes completed inside ``[warm_end, end]``.

    Args:
        records: ``(start, end, status, images)`` per request; status 200 or ``"OK"`` = ok.
        client_cores: the load generator's cores inside the window
            (:func:`window_client_cores`), kept in ``extra["client_cores"]``.
    """
    in_window = [r for r in records if warm_end <= r[1] <= end]
    good = [r for r in in_window if r[2] in (200, "OK")]
    rejected = sum(1 for r in in_window if r[2] in (429, "RESOURCE_EXHAUSTED"))
    latencies = np.array([(r[1] - r[0]) * 1000 for r in good], dtype=np.float64)
    images = sum(r[3] for r in good)
    return CellResult(
        concurrency=concurrency, window_s=round(duration_s, 2), completed=len(in_window),
        ok=len(good), errors=len(in_window) - len(good),
        images_per_s=round(images / duration_s, 2), latency_ms=_percentiles(latencies),
        client_cpu_s=round(cpu_s, 2), error_samples=samples,
        extra={"rejected_overload": rejected, "cancelled_after_window": cancelled,
               "client_cores": client_cores},
        ok_latencies_ms=latencies, ok_images=images)


def combine(passes: Sequence[CellResult]) -> CellResult:
    """Several passes of one cell (same endpoint and concurrency, measured at different
    moments) as one cell: counts and windows summed, images/s = all successful images / all
    window seconds, latency percentiles over every pass's successful responses. Each pass's
    headline figures stay in ``extra["passes"]``.

    Raises:
        ValueError: no passes, or passes of different concurrency.
    """
    if not passes:
        raise ValueError("combine needs at least one pass")
    if len({p.concurrency for p in passes}) != 1:
        raise ValueError("passes of one cell must share the concurrency")
    if len(passes) == 1:
        return passes[0]
    window = sum(p.window_s for p in passes)
    images = sum(p.ok_images for p in passes)
    latencies = np.concatenate([p.ok_latencies_ms for p in passes
                                if p.ok_latencies_ms is not None] or [np.array([])])
    extra: dict[str, Any] = {
        key: sum(p.extra.get(key, 0) for p in passes)
        for key in ("rejected_overload", "cancelled_after_window")}
    cores = [(p.extra.get("client_cores"), p.window_s) for p in passes]
    extra["client_cores"] = (None if any(c is None for c, _ in cores) else
                             round(sum(c * w for c, w in cores) / window, 3))
    extra["passes"] = [{"images_per_s": p.images_per_s, "p50": p.latency_ms["p50"],
                        "p99": p.latency_ms["p99"], **p.extra} for p in passes]
    return CellResult(
        concurrency=passes[0].concurrency, window_s=round(window, 2),
        completed=sum(p.completed for p in passes), ok=sum(p.ok for p in passes),
        errors=sum(p.errors for p in passes), images_per_s=round(images / window, 2),
        latency_ms=_percentiles(latencies),
        client_cpu_s=round(sum(p.client_cpu_s for p in passes), 2),
        error_samples=[s for p in passes for s in p.error_samples][:3], extra=extra,
        ok_latencies_ms=latencies, ok_images=images)


def run_cell(base_url: str, requests: Sequence[HttpRequest], concurrency: int, *,
             warmup_s: float, duration_s: float, max_requests: int = 50_000,
             timeout_s: float = 60.0, drain_s: float = 15.0) -> CellResult:
    """Drive ``base_url`` (loopback only) with ``concurrency`` closed-loop clients.

    Args:
        base_url: ``http://127.0.0.1:PORT``; anything but loopback is refused.
        requests: pre-encoded requests, cycled.
        concurrency: clients in flight at once.
        warmup_s: seconds of load before the measuring window opens.
        duration_s: the measuring window, seconds.
        max_requests: hard cap on requests sent in this cell.
        timeout_s: per-request timeout.
        drain_s: after the window, how long in-flight requests may finish before they are
            cancelled.

    Raises:
        ValueError: ``base_url`` is not on 127.0.0.1.
    """
    if urlsplit(base_url).hostname != "127.0.0.1":
        raise ValueError(f"refusing to send load anywhere but 127.0.0.1: {base_url}")
    return logged(asyncio.run(_run_cell(base_url, requests, concurrency, warmup_s, duration_s,
                                        max_requests, timeout_s, drain_s)))


def logged(result: CellResult, label: str = "") -> CellResult:
    """``result``, after logging its headline figures (``label`` starts the line)."""
    logger.info("%sc=%d: %.1f images/s, p50 %.1f ms, p99 %.1f ms, %d errors", label,
                result.concurrency, result.images_per_s, result.latency_ms["p50"],
                result.latency_ms["p99"], result.errors)
    return result
