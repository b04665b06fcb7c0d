"""The systems compared: our service and the alternatives, as :class:`bench.systems.System`.

Each builder returns a not yet started system (server command, readiness probe, endpoints with
their pre-encoded requests, a sanity check); :func:`bench.systems.measure` drives it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import httpx
import numpy as np

from bench.loadgen import HttpRequest, kserve_binary_request, multipart_request, raw_request
from bench.model import REPO_ROOT, BenchModel, offline_env
from bench.photos import Photo
from bench.procs import ManagedServer, free_port, http_ok
from bench.promscrape import scrape_counter_totals
from bench.systems import Endpoint, System
from models.postprocess import cosine_rows

logger = logging.getLogger(__name__)


def embed_requests(photos: Sequence[Photo]) -> list[HttpRequest]:
    """One multipart ``/embed`` request per photo (layer ``embedding``, normalised)."""
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

    endpoints = [Endpoint("embed", embed_requests(photos)),
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
            cosine = float(cosine_rows(vector[None], ref[None])[0])
        return {"embedding_dim": int(vector.size),
                "cosine_vs_cnn_codes": None if cosine is None else round(cosine, 6)}

    return System("fastapi_torch", "FastAPI + torch eager", server, url,
                  lambda: http_ok(f"{url}/readyz"), [Endpoint("embed", embed_requests(photos))],
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


def _cosine_vs_reference(vector: np.ndarray, shared: dict[str, Any]) -> float | None:
    """Cosine of ``vector`` and our service's embedding of the same photo (None before ours ran)."""
    ref = shared.get("reference_embedding")
    if ref is None:
        return None
    return round(float(cosine_rows(vector[None].astype(np.float64), ref[None])[0]), 6)


def _grpc_embedding(target: str, request: Any) -> np.ndarray:
    """The ``embedding`` row of one KServe v2 ``ModelInfer`` answer (raw FP32 contents)."""
    import grpc

    from bench import grpcload

    _, pb_grpc = grpcload.stubs()
    with grpc.insecure_channel(target, options=grpcload.GRPC_OPTIONS) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    return np.frombuffer(reply.raw_output_contents[0], dtype="<f4").astype(np.float64)


def triton_system(model: BenchModel, photos: Sequence[Photo], work_dir: Path,
                  shared: dict[str, Any], profile: bool) -> System:
    """Triton Inference Server 2.51 (PyTriton 0.7.0), dynamic batcher, onnxruntime in the bound
    ``infer_func`` (see :mod:`bench.baselines.triton`); KServe v2 over gRPC and HTTP.

    Raises:
        TritonUnavailable: ``bench/.venv-triton`` is missing or PyTriton does not import.
    """
    from bench import grpcload
    from bench.baselines import triton as tr

    reason = tr.unavailable_reason()
    if reason is not None:
        raise tr.TritonUnavailable(reason)
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{http_port}"
    home = work_dir / f"triton-{http_port}"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = offline_env(TMPDIR=str(home / "tmp"))
    argv = [str(tr.TRITON_VENV / "bin" / "python"), "-m", "bench.baselines.triton",
            "--repository", str(model.repository), "--name", model.name,
            "--version", str(model.version), "--http-port", str(http_port),
            "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
            "--workspace", str(home / "workspace")]
    server = ManagedServer("triton", argv, env, REPO_ROOT, work_dir / "logs" / "triton.log")
    target = f"127.0.0.1:{grpc_port}"
    grpc_requests = grpcload.infer_requests(photos, model.name, tr.INPUT_NAME, tr.OUTPUT_NAME,
                                            shape=(1, 1))
    infer_path = f"/v2/models/{model.name}/infer"
    http_requests = [kserve_binary_request(infer_path, p, tr.INPUT_NAME, tr.OUTPUT_NAME)
                     for p in photos]
    reference = photos.index(_reference_photo(photos))

    def sanity() -> dict[str, Any]:
        vector = _grpc_embedding(target, grpc_requests[reference])
        return {"embedding_dim": int(vector.size),
                "embedding_norm": round(float(np.linalg.norm(vector)), 4),
                "cosine_vs_cnn_codes": _cosine_vs_reference(vector, shared)}

    def batches():
        return scrape_counter_totals(f"http://127.0.0.1:{metrics_port}/metrics",
                                     "nv_inference_count", "nv_inference_exec_count",
                                     {"model": model.name})

    return System("triton", "Triton 2.51 (PyTriton, onnxruntime)", server, url,
                  lambda: http_ok(f"{url}/v2/models/{model.name}/ready"),
                  [Endpoint("grpc_embed", grpc_requests, protocol="grpc", target=target),
                   Endpoint("v2_embed", http_requests)],
                  batch_probe=batches, sanity=sanity, profile=profile, ready_timeout_s=300,
                  notes=["nvidia-pytriton 0.7.0 (Triton 2.51 server + Python backend from the "
                         "wheel), CPU only; one model instance, dynamic batcher "
                         "max_batch_size 32, max_queue_delay 0 us (stock)",
                         "infer_func (@batch): models.decode on a thread per core, then one "
                         "onnxruntime run per batch (the service's session options)",
                         "KServe v2: BYTES input 'images' shape [1, 1] (Triton needs a "
                         "non-batch dim), FP32 'embedding'; v2_embed = HTTP with the binary "
                         "tensor extension"])


def ray_serve_system(model: BenchModel, photos: Sequence[Photo], work_dir: Path,
                     shared: dict[str, Any], profile: bool) -> System:
    """Ray Serve, one replica with ``@serve.batch`` and onnxruntime, HTTP ingress, multipart
    ``/embed`` like ours (see :mod:`bench.baselines.ray_serve`).

    Raises:
        RayServeUnavailable: ``bench/.venv-ray-serve`` is missing or Ray Serve does not import.
    """
    from bench.baselines import ray_serve as rs

    reason = rs.unavailable_reason()
    if reason is not None:
        raise rs.RayServeUnavailable(reason)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = offline_env(RAY_USAGE_STATS_ENABLED="0")
    argv = [str(rs.RAY_SERVE_VENV / "bin" / "python"), "-m", "bench.baselines.ray_serve",
            "--repository", str(model.repository), "--name", model.name,
            "--version", str(model.version), "--port", str(port)]
    server = ManagedServer("ray-serve", argv, env, REPO_ROOT, work_dir / "logs" / "ray-serve.log",
                           term_root_only=True)

    def sanity() -> dict[str, Any]:
        vector = _embedding(url, _reference_photo(photos))
        return {"embedding_dim": int(vector.size),
                "cosine_vs_cnn_codes": _cosine_vs_reference(vector, shared)}

    return System("ray_serve", "Ray Serve (@serve.batch, onnxruntime)", server, url,
                  lambda: http_ok(f"{url}/readyz"), [Endpoint("embed", embed_requests(photos))],
                  sanity=sanity, profile=profile, ready_timeout_s=300,
                  notes=["ray[serve] at the batch engine's Ray version; local Ray instance "
                         "(no dashboard), Serve's HTTP proxy, 1 replica, max_ongoing_requests "
                         "64, @serve.batch max_batch_size 32, batch_wait_timeout_s 0.01 "
                         "(stock)",
                         "replica: multipart parse, models.decode in a thread pool (one per "
                         "core), onnxruntime per batch in a thread (the service's session "
                         "options)"])
