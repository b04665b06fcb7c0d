"""Adaptive batching inside the API worker: concurrent callers' images, one model run per batch.

Callers ``await submit(images)`` with ``(n, S, S, 3)`` uint8 arrays; one runner task takes what
is queued, up to ``max_batch_size`` images, runs it on a dedicated thread (onnxruntime releases
the GIL, so decoding in other threads goes on meanwhile) and hands each caller its own rows. Up
to ``runs`` batches run at once on one session (``InferenceSession.run`` is thread-safe), like
the ``count`` of a Triton ``instance_group`` without a second copy of the weights; while every
run slot is busy, new requests queue and form the next batch, as in Triton's dynamic batcher
with no queue delay (https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/
docs/user_guide/model_configuration.html#dynamic-batcher). The runner waits for more (at most
``max_wait_s``) only when the pipeline says images are being decoded right now and will arrive
shortly (``pending()``), so a lone request at concurrency 1 never waits.

Why two runs by default (``Settings.batch_runs``): one run of MobileNetV3-Large on 2 intra-op
threads leaves a core idle between its many small operators; a second batch in flight fills
those gaps. Measured with ``python -m bench.configs "r1:" "r2:BATCH_RUNS=2" ... --protocols
grpc,http --concurrency 1,32 --duration 10`` (README "Performance"): gRPC at c=32 (one
channel, so one API worker) 113-158 -> 142-159 images/s over five alternations, HTTP unchanged
within this machine's noise, c=1 unchanged; the price is the tail (gRPC p99 at c=32 about 323
-> 379 ms), since a batch now shares the cores with the one beside it.

Why a second session for a batch beside another (``run_beside``, :class:`service.core.Sessions`):
two runs in flight on one session with 2 intra-op threads each put four compute threads on two
cores. A batch that starts while another is running goes to a session with one intra-op thread
(``Settings.beside_intra_op_threads``); a batch alone keeps the 2-thread session, so a lone
request at concurrency 1 is as fast as before. Measured with ``python -m bench.configs
"one_a:BESIDE_INTRA_OP_THREADS=0" "pair_a:" ... --protocols http,grpc --concurrency 1,8,32,64``,
three alternations, 2026-12-02 01:02-01:10 UTC (README "Performance"): means over the three,
HTTP c=32 149.3 -> 154.8 images/s, c=64 150.6 -> 154.0; gRPC c=32 151.5 -> 162.7, c=64 157.6 ->
163.7; c=1 p50 unchanged (13.0 vs 13.1 ms HTTP); p99 at c=32 lower (about 300-325 -> 288-297 ms
HTTP).

Why a lone request may run on its own thread (:meth:`AdaptiveBatcher.claim_lone`): with
nothing queued, forming or running, a request of one image would go decode thread -> event loop
-> runner -> batcher thread -> event loop; instead its caller takes a run slot at once and runs
the ``run`` session itself, right after decoding, on the decode thread, unless other requests
arrived while it decoded (:attr:`LoneSlot.alone`; then it joins their batch, so a burst at c=8
is not split into 1 + 7). The slot is counted like any batch's (a batch that starts meanwhile
runs beside it, on ``run_beside``) and the run is observed like a batch of one. Measured at
concurrency 1 (README "Performance", "A lone request on its decode thread"): about 0.5 ms less
per request outside decode and onnxruntime.

Why not BentoML's own dispatcher: it lives in a separate Encoder process behind an aiohttp call
with pickle-5 bodies (see ``service.encoder``); measured on 2 cores (``make bench``, README
"Performance"), the in-process batcher is what lets the service approach the decode +
onnxruntime limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class _Job:
    images: np.ndarray
    future: asyncio.Future = field(repr=False)


@dataclass
class LoneSlot:
    """A run slot held by one caller that runs its own images (:meth:`AdaptiveBatcher.
    claim_lone`): call :attr:`run` on any thread, then :meth:`release` on the event loop, once,
    whether or not it ran.

    Attributes:
        run: the session of a batch alone: ``(n, S, S, 3)`` uint8 -> ``(n, F)`` float32.
        alone: True while nothing is queued and no other batch holds a slot; safe to call
            from another thread (it reads two counters; a stale answer only costs a split
            batch or a hand-off).
    """

    run: RunFn
    alone: Callable[[], bool]
    _release: Callable[[int, float], None] = field(repr=False)
    _released: bool = field(default=False, repr=False)

    def release(self, images: int = 0, seconds: float = 0.0) -> None:
        """Free the slot; ``images`` > 0: the run of that many images took ``seconds`` (the
        batcher's ``observe``, as for a batch). A second call does nothing."""
        if not self._released:
            self._released = True
            self._release(images, seconds)


class AdaptiveBatcher:
    """Forms batches from concurrent :meth:`submit` calls and runs up to ``runs`` at a time.

    Args:
        run: ``(B, S, S, 3)`` uint8 -> ``(B, F)`` float32, called on one of the batcher's own
            ``runs`` threads, on several at once when ``runs`` > 1 (so it must be thread-safe, as
            onnxruntime's ``InferenceSession.run`` is; read the model reference inside it, so a
            hot reload applies from the next batch).
        run_beside: the same contract as ``run``, called instead of it for a batch that starts
            while another batch is still running (e.g. a session with fewer intra-op threads,
            so two runs share the cores without oversubscribing them); None = always ``run``.
        max_batch_size: most images per run; a submit of more is split by the caller.
        max_wait_s: longest a batch waits for images still being decoded, seconds.
        runs: batches in flight at once (>= 1).
        pending: how many images are being decoded right now (will be submitted soon).
        observe: called with ``(batch_size, seconds)`` after every run (metrics).

    Raises:
        ValueError: ``max_batch_size`` or ``runs`` below 1.
    """

    def __init__(self, run: RunFn, *, max_batch_size: int, max_wait_s: float, runs: int = 1,
                 run_beside: RunFn | None = None,
                 pending: Callable[[], int] = lambda: 0,
                 observe: Callable[[int, float], None] = lambda n, s: None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if runs < 1:
            raise ValueError(f"runs must be >= 1, got {runs}")
        self._run = run
        self._run_beside = run_beside or run
        self._running = 0  # batches dispatched and not yet finished
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_s)
        self._pending = pending
        self._observe = observe
        self._queue: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self.runs = runs
        self._slots: asyncio.Semaphore | None = None
        self._held = 0  # run slots taken: batches forming or running, and lone slots
        self._threads = ThreadPoolExecutor(max_workers=runs, thread_name_prefix="batcher")

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Run ``images`` ``(n, S, S, 3)`` uint8 (``1 <= n <= max_batch_size``) in the next
        batch with room for them; returns their ``(n, F)`` float32 rows.

        Raises:
            ValueError: ``n`` is 0 or above ``max_batch_size``.
            Exception: whatever the model run raised (every caller of that batch gets it).
        """
        if not 1 <= len(images) <= self.max_batch_size:
            raise ValueError(f"submit 1..{self.max_batch_size} images, got {len(images)}")
        loop = self._start()
        job = _Job(images, loop.create_future())
        self._queue.append(job)
        self._wake.set()
        return await job.future

    def _start(self) -> asyncio.AbstractEventLoop:
        """The running loop, after starting the runner task on it if it is not running."""
        loop = asyncio.get_running_loop()
        if self._runner is None or self._runner.done():
            self._wake = asyncio.Event()
            self._slots = asyncio.Semaphore(self.runs)
            self._held = 0
            self._runner = loop.create_task(self._serve(), name="adaptive-batcher")
        return loop

    async def claim_lone(self) -> LoneSlot | None:
        """A run slot for a caller that runs its own images (one request alone), or None.

        Only when the batcher is idle: nothing queued and no batch forming or running, so the
        caller's run is a batch alone and gets ``run`` (not ``run_beside``). The slot counts
        like a running batch until :meth:`LoneSlot.release`: a batch that starts meanwhile
        runs beside it. The caller saves the hand-offs to and from the batcher's thread.
        """
        self._start()
        if self._held or self._queue or self._slots.locked():
            return None
        await self._slots.acquire()  # free and nobody waiting: returns without yielding
        self._held += 1
        self._running += 1
        return LoneSlot(self._run, lambda: self._held == 1 and not self._queue,
                        self._release_lone)

    def _release_lone(self, images: int, seconds: float) -> None:
        self._running -= 1
        self._held -= 1
        self._slots.release()
        if images:
            self._observe(images, seconds)

    def _take(self) -> list[_Job]:
        """Queued jobs, oldest first, while they fit in one batch."""
        jobs, size = [], 0
        while self._queue and size + len(self._queue[0].images) <= self.max_batch_size:
            job = self._queue.popleft()
            if job.future.cancelled():
                continue
            jobs.append(job)
            size += len(job.images)
        return jobs

    async def _gather(self) -> list[_Job]:
        """One batch: what is queued now, plus what arrives within ``max_wait_s`` while images
        are still being decoded and the batch has room."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        jobs = self._take()
        size = sum(len(j.images) for j in jobs)
        while size < self.max_batch_size and self._pending() > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
            more = self._take()
            jobs += more
            size += sum(len(j.images) for j in more)
            if not more and self._queue:  # the next job does not fit: run this batch
                break
        return jobs

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        in_flight: set[asyncio.Task] = set()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._slots.acquire()  # while every run slot is busy, the queue grows
            self._held += 1
            jobs = await self._gather()
            if not jobs:
                self._held -= 1
                self._slots.release()
                continue
            fn = self._run_beside if self._running else self._run
            self._running += 1
            run = loop.create_task(self._run_batch(jobs, self._slots, fn))
            in_flight.add(run)  # a strong reference until it is done
            run.add_done_callback(in_flight.discard)

    async def _run_batch(self, jobs: list[_Job], slots: asyncio.Semaphore, fn: RunFn) -> None:
        """Run one batch with ``fn`` on a free thread and hand each caller its rows; frees its
        slot."""
        loop = asyncio.get_running_loop()
        try:
            batch = (jobs[0].images if len(jobs) == 1
                     else np.concatenate([j.images for j in jobs]))
            # perf_counter, not loop.time(): uvloop's is libuv's millisecond clock
            started = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._threads, fn, batch)
            except Exception as exc:  # every caller of this batch gets the failure
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                return
            self._observe(len(batch), time.perf_counter() - started)
            offset = 0
            for job in jobs:
                n = len(job.images)
                if not job.future.done():
                    job.future.set_result(out[offset:offset + n])
                offset += n
        finally:
            self._running -= 1
            self._held -= 1
            slots.release()

    def close(self) -> None:
        """Stop the runner and its threads (batches in flight finish first)."""
        if self._runner is not None:
            self._runner.cancel()
        self._threads.shutdown(wait=True)
