"""All settings in one pydantic-settings object (environment prefix ``CNN_CODES_``).

Torch-free: the service reads it. Lists are given as JSON in the environment, e.g.
``CNN_CODES_PROVIDERS='["cuda","cpu"]'``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Provider = Literal["tensorrt", "cuda", "cpu"]

def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Environment every entry point sets before importing BentoML / onnxruntime: neither library may
# reach the internet (BentoML usage tracking, onnxruntime telemetry look-ups).
OFFLINE_ENV = {"BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1"}


def apply_offline_env() -> None:
    """Set :data:`OFFLINE_ENV` in this process (kept if the user already set them)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


class Settings(BaseSettings):
    """cnn-codes settings; every field can be set as ``CNN_CODES_<FIELD>``.

    Attributes:
        repository: model repository root.
        model_name: model the service serves.
        model_version: integer version or ``latest``.
        sample_data: ImageFolder used to build the default model (``train/`` + ``val/``).
        default_backbone: backbone of the default model.
        default_epochs: fine-tuning epochs of the default model.
        default_lr: head learning rate of the default model (random init needs more than
            the small rates that suit pretrained weights).
        host, port: HTTP bind address (loopback by default).
        providers: onnxruntime execution providers in order of preference.
        allow_cpu_fallback: a missing GPU provider is a warning instead of a start-up error.
        intra_op_threads: onnxruntime intra-op threads; 0 = the in-process core's
            :meth:`core_threads`, one per pipeline thread in batch jobs
            (:class:`batch.job.ShardEmbedder`), onnxruntime's default (all cores) elsewhere.
        inter_op_threads: onnxruntime inter-op threads; 0 = default.
        graph_optimization: onnxruntime graph optimisation level.
        optimized_model_dir: cache of optimised graphs (faster restarts); None = off.
        ort_allow_spinning: onnxruntime idle threads busy-wait (off: decoding shares cores).
        max_batch_size: adaptive batching: largest batch, images. 8 by default: on 2 CPU cores
            with two batches in flight, batches of up to 8 served more images/s than up to 32
            with a lower p99 (``python -m bench.configs "b32:MAX_BATCH_SIZE=32"
            "b8:MAX_BATCH_SIZE=8" ... --protocols http,grpc --concurrency 32,64``, README
            "Performance"), and onnxruntime alone ran batch 8 as fast as 32 or 64 (``make
            bench``'s limit table); a GPU wants larger batches: set it.
        max_latency_ms: adaptive batching deadline, ms (generous: overload is bounded by
            ``max_concurrency`` answering 429, not by 503s).
        max_batch_wait_ms: the longest adaptive batching holds a request, ms, to let its batch
            grow (a cap on what BentoML's dispatcher learns; see :mod:`service.batching`).
        batch_runs: batches in flight at once on one in-process core's session (its adaptive
            batcher's run slots, :class:`service.batcher.AdaptiveBatcher`; figures there).
        beside_intra_op_threads: onnxruntime intra-op threads of the in-process core's second
            session, which runs a batch that starts while another is still running (the first
            keeps :meth:`core_threads` for a batch alone); 0 = one session for every batch.
            CPU provider and ``batch_runs`` > 1 only (:class:`service.core.Sessions`; figures
            in README "Performance").
        lone_runs: a request of one image that finds the in-process core idle (nothing
            decoding, queued or running) runs the model on its own decode thread, right after
            decoding, instead of handing its image to the batcher's thread and back
            (:meth:`service.batcher.AdaptiveBatcher.claim_lone`; about 0.5 ms less per lone
            request, README "Performance").
        decode_threads: threads that decode requests' images in each API worker; 0 = the
            worker's share of the usable cores (:attr:`decode_thread_count`).
        max_concurrency: concurrent requests per API worker; more get 429 + Retry-After.
        api_workers: API service worker processes; 0 = one per 6 usable cores, rounded up
            (:attr:`api_worker_count`; with the default in-process core every worker is one
            decode + batch + onnxruntime pipeline).
        batching: where the inference core and its adaptive batching run: ``in_process`` (a
            session and batcher in every API worker, :class:`service.core.LocalCore`) or
            ``encoder`` (one separate Encoder worker process with BentoML's batching,
            :mod:`service.encoder`). See README "Performance" for the figures.
        access_log: BentoML's access log, one INFO line per HTTP request (off by default: the
            per-route counts and latencies are in ``/metrics``; see README "Performance").
        trace_requests: OpenTelemetry spans (BentoML's tracing) for the image routes
            ``/classify``, ``/embed``, ``/search`` and ``/v2/.../infer``; off excludes them
            (BentoML's ``tracing.excluded_urls``), other routes keep their spans.
        http_front: who answers ``POST /classify`` and ``/embed`` over HTTP: ``in_memory``
            (the body parsed in memory and sent straight to the pipeline,
            :mod:`service.front`) or ``bentoml`` (BentoML's own routes: temp-file uploads,
            pydantic input model); the same answers either way. See README "Performance".
        max_images_per_request: images in one request before 413.
        max_image_pixels: width*height above which an image is refused (decompression bombs).
        request_timeout_s: per-request timeout, seconds (504 after it).
        http_idle_timeout_s: an HTTP connection with no request in progress that receives no
            byte for this long, seconds, is closed: new connections that send nothing as well
            as idle keep-alive ones (uvicorn's ``timeout_keep_alive``, applied per connection;
            it overrides ``bentoml serve --timeout-keep-alive``).
        http_header_timeout_s: a request's headers must be complete this many seconds after
            its first byte, or the connection is closed (slow header reads).
        http_max_connections: open HTTP connections per API worker; a new connection above it
            closes the longest-idle one (or itself if none is idle). Capped at the process's
            open-file limit less 256, which the service raises to the hard limit at start-up.
        http_read_high_water_bytes: bytes of a request body uvicorn buffers per connection
            before it stops reading the socket until the app has taken them (uvicorn's own
            mark is 64 KiB, below most photos, so almost every upload paused and resumed the
            socket: an epoll unregister and register per request on the event loop). The
            Gateway holds the whole body in memory anyway, up to ``max_request_bytes``. See
            :func:`service.bentoml_compat.set_read_high_water`.
        max_request_bytes: request body limit, bytes (413 above it).
        min_image_side: images with a side shorter than this, pixels, are ``too_small``.
        max_file_bytes: largest encoded image file, bytes, on every path (``too_large``
            above it); batch jobs read no more than this of any file.
        api_keys: accepted API keys (``Authorization: Bearer <key>``); several allow
            rotation; empty = no authentication. Given as JSON:
            ``CNN_CODES_API_KEYS='["key1","key2"]'``.
        open_paths: paths that need no API key (health and metrics by default).
        retry_after_s: ``Retry-After`` of a 429 answer, seconds.
        admin_keys: keys for ``/admin/*`` (``Authorization: Bearer``); empty = admin API off.
        shutdown_grace_s: after SIGTERM the Encoder serves this long, seconds, so requests
            in flight in the API workers can finish (below circus' 30 s SIGKILL deadline).
        reload_poll_s: how often, seconds, the service re-resolves an alias or ``latest``
            ``model_version`` and hot-reloads when it moved (0 = only ``POST /admin/reload``).
        grpc_enabled: serve the KServe v2 / Open Inference Protocol over gRPC from every API
            worker (``service/kserve``), beside HTTP.
        grpc_port: gRPC port on ``host`` (all API workers bind it with SO_REUSEPORT).
        grpc_max_message_bytes: largest gRPC request or response message, bytes (gRPC's own
            default is 4 MiB; larger messages get RESOURCE_EXHAUSTED).
        grpc_max_concurrency: ``ModelInfer`` calls in progress per API worker before
            RESOURCE_EXHAUSTED.
        grpc_grace_s: on shutdown, seconds in-flight gRPC calls get to finish.
        variant_min_cosine: ``cnn-codes export --precision int8|fp16``: smallest mean embedding
            cosine of the variant vs its fp32 reference for it to be published.
        variant_min_cosine_floor: smallest per-image (worst) embedding cosine vs fp32 (a guard
            against images the calibration did not cover, not a quality bar).
        variant_min_top1_agreement: smallest fraction of images whose top-1 class agrees.
        variant_max_prob_diff: largest absolute difference of any class probability.
        readiness_timeout_s: ``/readyz`` answers within this many seconds (503 ``not_ready``
            when the canary inference or BentoML's probe of the Encoder takes longer: a frozen
            or restarting Encoder); the canary inference behind ``/v2/health/ready`` and gRPC
            health gets as long. Keep health-check timeouts above it.
        max_worker_failures: ``cnn-codes serve`` stops (exit status 4) when service workers
            died this many times within ``worker_failure_window_s`` (a crash loop, e.g. a
            model that became unloadable after the pre-flight); 0 = restart them forever.
        worker_failure_window_s: the window, seconds, of ``max_worker_failures``.
        index: an index folder (``cnn-codes index build``) that ``POST /search`` answers from;
            None = no search. It must hold codes of the served model version (start-up fails
            otherwise, naming both versions); after a hot reload to another version
            ``/search`` answers 409 ``index_mismatch`` until the folder holds an index of the
            new version, which is then loaded (checked again at most every ``reload_poll_s``
            and whenever versions differ).
        tmp_dir: the service's own temporary folder (uploads are written there; emptied at
            start-up, removed at exit); None = ``<system temp>/cnn-codes-tmp-<hash of
            BENTOML_HOME>`` (one per instance, short enough for BentoML's Unix sockets).
    """

    model_config = SettingsConfigDict(env_prefix="CNN_CODES_", extra="ignore")

    repository: Path = Path("model_repository")
    model_name: str = "default"
    model_version: str = "latest"
    sample_data: Path = Path("../shared/data/hymenoptera")
    default_backbone: str = "mobilenet_v3_large"
    default_epochs: int = Field(default=8, ge=1)
    default_lr: float = Field(default=3e-3, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(default=3000, ge=0, le=65535)
    providers: list[Provider] = ["cpu"]
    allow_cpu_fallback: bool = False
    intra_op_threads: int = Field(default=0, ge=0)
    inter_op_threads: int = Field(default=0, ge=0)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    optimized_model_dir: Path | None = None
    ort_allow_spinning: bool = False
    max_batch_size: int = Field(default=8, ge=1)
    max_latency_ms: int = Field(default=30_000, ge=1)
    max_batch_wait_ms: float = Field(default=5.0, ge=0)
    batch_runs: int = Field(default=2, ge=1)
    beside_intra_op_threads: int = Field(default=1, ge=0)
    lone_runs: bool = True
    decode_threads: int = Field(default=0, ge=0)
    max_concurrency: int = Field(default=64, ge=1)
    api_workers: int = Field(default=0, ge=0)
    batching: Literal["in_process", "encoder"] = "in_process"
    http_front: Literal["in_memory", "bentoml"] = "in_memory"
    access_log: bool = False
    trace_requests: bool = False
    max_images_per_request: int = Field(default=64, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    request_timeout_s: int = Field(default=60, ge=1)
    http_idle_timeout_s: float = Field(default=5.0, gt=0)
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    http_max_connections: int = Field(default=4096, ge=16)
    http_read_high_water_bytes: int = Field(default=1024 * 1024, ge=65536)
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    min_image_side: int = Field(default=8, ge=1)
    max_file_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    api_keys: list[SecretStr] = []
    open_paths: list[str] = ["/livez", "/readyz", "/healthz", "/metrics",
                             "/v2/health/live", "/v2/health/ready"]
    retry_after_s: int = Field(default=1, ge=1)
    admin_keys: list[SecretStr] = []
    reload_poll_s: float = Field(default=5.0, ge=0)
    shutdown_grace_s: float = Field(default=10.0, ge=0, lt=30)
    grpc_enabled: bool = True
    grpc_port: int = Field(default=50051, ge=1, le=65535)
    grpc_max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    grpc_max_concurrency: int = Field(default=64, ge=1)
    grpc_grace_s: float = Field(default=5.0, ge=0)
    variant_min_cosine: float = Field(default=0.99, ge=-1, le=1)
    variant_min_cosine_floor: float = Field(default=0.80, ge=-1, le=1)
    variant_min_top1_agreement: float = Field(default=0.98, ge=0, le=1)
    variant_max_prob_diff: float = Field(default=0.05, ge=0, le=1)
    readiness_timeout_s: float = Field(default=2.0, gt=0, le=60)
    max_worker_failures: int = Field(default=5, ge=0)
    worker_failure_window_s: float = Field(default=60.0, gt=0)
    index: Path | None = None
    tmp_dir: Path | None = None

    @property
    def api_worker_count(self) -> int:
        """``api_workers``, with 0 resolved to one worker per 6 usable cores (CPU affinity),
        rounded up: one worker on this project's 2 cores.

        Each API worker is one event loop (HTTP front, gRPC front, batcher), its decode threads
        and one onnxruntime session. Measured on 2 cores (``python -m bench.configs
        "w1:API_WORKERS=1" "w2:API_WORKERS=2" ... --protocols http,grpc --concurrency 8,32,64
        --duration 10``, three alternations, README "Performance"): one worker serves as many
        images/s as two (HTTP c=32 150.6-153.5 vs 146.0-149.3, gRPC 154.4-162.2 vs 141.0-154.9)
        with half the p99 (HTTP c=32 357-379 ms vs 633-838 ms: one queue, where two workers
        split the connections unevenly) and one session's memory instead of two. Its event
        loop used 1.2-1.5 ms of CPU per image (``python -m bench.threadcpu --protocol http``
        and ``grpc``, c=32) while a core carries about 87 images/s of decode + onnxruntime
        (the shared-cores limit, 173.5 on 2 cores), i.e. 0.13 of a core of loop per core of
        pipeline: one worker per 6 cores keeps each loop under 80 % of a core.
        """
        return self.api_workers or max(1, math.ceil(usable_cores() / 6))

    @property
    def decode_thread_count(self) -> int:
        """``decode_threads``, with 0 resolved to each API worker's share of the usable cores
        (``max(1, cores // workers)``: 2 on this project's 2 cores).

        Before, decoding ran on asyncio's default executor, ``min(32, cores + 4)`` = 6 threads
        on 2 cores, which at c=32-64 decoded 6 photos at once beside the onnxruntime threads
        and the event loop. Measured over five alternations (``python -m bench.configs
        "d6:DECODE_THREADS=6" "d2:" ... --protocols http,grpc --concurrency 32,64
        --duration 8``, 2 cores, README "Performance"), mean images/s of 2 threads against 6:
        HTTP c=32 137.9 vs 130.5, HTTP c=64 132.5 vs 125.0 (p99 lower), gRPC c=32 138.8 vs
        133.0, gRPC c=64 132.6 vs 136.2; one thread served fewer on HTTP (105.8-121.8 at
        c=8-64 against 109.1-130.0).
        """
        return self.decode_threads or max(1, usable_cores() // self.api_worker_count)

    def core_threads(self) -> int:
        """onnxruntime intra-op threads of one in-process core: ``intra_op_threads`` when set,
        else twice each API worker's share of the usable cores, at most all of them
        (``min(cores, max(1, 2 * cores // workers))``): a lone request's batch runs on two
        cores while the other worker idles, and under load the sessions share the cores 2:1
        (idle onnxruntime threads do not spin, ``ort_allow_spinning``).

        Measured (``python -m bench.configs "t1_a:" "t2_a:INTRA_OP_THREADS=2" ...``, three
        alternations, 2 cores, 2 API workers, default model, one photo per request; README
        "Performance"): 1 thread per session c=1 p50 15.9-16.2 ms, c=32 105-134 images/s;
        2 threads c=1 13.8-15.5 ms, c=32 137-145 images/s.
        """
        if self.intra_op_threads:
            return self.intra_op_threads
        cores = usable_cores()
        return min(cores, max(1, 2 * cores // self.api_worker_count))

    @field_validator("model_name")
    @classmethod
    def _valid_model_name(cls, value: str) -> str:
        from models.repository import check_name

        return check_name(value)
