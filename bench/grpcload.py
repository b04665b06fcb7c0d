"""A bounded closed-loop gRPC load generator for the service's KServe v2 front (loopback only).

Same shape as :mod:`bench.loadgen`: ``concurrency`` workers on one channel (HTTP/2
multiplexing, as gRPC clients do), each sending ``ModelInfer`` with one encoded photo as a
``BYTES [1]`` input and asking for the ``embedding`` output, bounded in time and count.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, Sequence

from bench.loadgen import CellResult, logged, summarise, window_client_cores
from bench.photos import Photo

GRPC_OPTIONS = [("grpc.max_send_message_length", 64 * 2**20),
                ("grpc.max_receive_message_length", 64 * 2**20)]


def stubs() -> tuple[Any, Any]:
    """The generated KServe v2 modules (``pb2``, ``pb2_grpc``) of the service.

    Raises:
        ImportError: the service has no gRPC front (or grpcio is missing).
    """
    from service.kserve.proto import grpc_predict_v2_pb2 as pb
    from service.kserve.proto import grpc_predict_v2_pb2_grpc as pb_grpc

    return pb, pb_grpc


def infer_requests(photos: Sequence[Photo], model_name: str, input_name: str = "images",
                   output: str = "embedding", shape: Sequence[int] = (1,)) -> list[Any]:
    """One ``ModelInferRequest`` per photo: ``BYTES`` encoded file in, ``output`` out.

    Args:
        shape: of the one-element input, ``[1]`` (our front) or ``[1, 1]`` (Triton, whose
            batching models need a dimension besides the batch).
    """
    pb, _ = stubs()
    return [pb.ModelInferRequest(
        model_name=model_name,
        inputs=[pb.ModelInferRequest.InferInputTensor(
            name=input_name, datatype="BYTES", shape=list(shape),
            contents=pb.InferTensorContents(bytes_contents=[photo.data]))],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=output)])
        for photo in photos]


def server_ready(target: str, timeout_s: float = 2.0) -> bool:
    """True when ``ServerReady`` on ``target`` answers ready."""
    import grpc

    _, pb_grpc = stubs()
    pb, _ = stubs()

    async def probe() -> bool:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            reply = await stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout_s)
            return bool(reply.ready)

    try:
        return asyncio.run(probe())
    except grpc.aio.AioRpcError:
        return False


async def _run_cell(target: str, requests: Sequence[Any], concurrency: int, warmup_s: float,
                    duration_s: float, max_requests: int, timeout_s: float,
                    drain_s: float) -> CellResult:
    import grpc

    _, pb_grpc = stubs()
    records: list[tuple[float, float, int | str, int]] = []
    samples: list[str] = []
    counter = itertools.count()
    cpu0 = time.process_time()
    started = time.perf_counter()
    warm_end, end = started + warmup_s, started + warmup_s + duration_s
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            while time.perf_counter() < end:
                index = next(counter)
                if index >= max_requests:
                    return
                t0 = time.perf_counter()
                try:
                    await stub.ModelInfer(requests[index % len(requests)], timeout=timeout_s)
                    status: int | str = "OK"
                except grpc.aio.AioRpcError as exc:
                    status = exc.code().name
                    if len(samples) < 3:
                        samples.append(f"{status}: {(exc.details() or '')[:300]}")
                records.append((t0, time.perf_counter(), status, 1))
                if status == "RESOURCE_EXHAUSTED":
                    await asyncio.sleep(0.5)

        tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        client = asyncio.ensure_future(window_client_cores(warm_end, end))
        _, pending = await asyncio.wait(tasks, timeout=warmup_s + duration_s + drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        client_cores = await client
    return summarise(records, concurrency, warm_end, end, duration_s,
                     time.process_time() - cpu0, samples, len(pending), client_cores)


def run_cell(target: str, requests: Sequence[Any], concurrency: int, *, warmup_s: float,
             duration_s: float, max_requests: int = 50_000, timeout_s: float = 60.0,
             drain_s: float = 15.0) -> CellResult:
    """Drive the gRPC front at ``127.0.0.1:PORT`` like :func:`bench.loadgen.run_cell`.

    Raises:
        ValueError: ``target`` is not on 127.0.0.1.
    """
    if not target.startswith("127.0.0.1:"):
        raise ValueError(f"refusing to send load anywhere but 127.0.0.1: {target}")
    return logged(asyncio.run(_run_cell(target, requests, concurrency, warmup_s, duration_s,
                                        max_requests, timeout_s, drain_s)), "grpc ")
