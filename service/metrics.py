"""Prometheus metrics of ours, exposed on BentoML's ``/metrics`` beside its own.

BentoML runs prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` under
``BENTOML_HOME``), so series recorded in the Encoder worker and the API workers are summed on
the API service's ``/metrics``. Metric objects are created once per process at import, as
prometheus_client requires (a second registration of a name raises).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

IMAGES = Counter(
    "cnn_codes_images",
    "Images processed, by endpoint, protocol (http | grpc) and outcome (ok | error).",
    ["endpoint", "protocol", "outcome"])
DECODE_ERRORS = Counter(
    "cnn_codes_decode_errors", "Images refused while decoding, by error code.", ["code"])
DECODE_SECONDS = Histogram(
    "cnn_codes_decode_seconds", "Decode + resize + crop time per image, seconds.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
INFERENCE_SECONDS = Histogram(
    "cnn_codes_inference_seconds", "onnxruntime time per batch, seconds.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
BATCH_SIZE = Histogram(
    "cnn_codes_batch_size", "Images per batch formed by adaptive batching.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
BATCH_RUNS = Counter(
    "cnn_codes_batch_runs",
    "Batches run by the in-process core, by session: alone (the main session, a batch by "
    "itself) or beside (the 1-thread session, a batch that started while another was running).",
    ["session"])
REQUEST_IMAGES = Histogram(
    "cnn_codes_request_images", "Images per request.", ["endpoint"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
MODEL_INFO = Gauge(
    "cnn_codes_model_info", "The served model (value 1).",
    ["name", "version", "backbone", "precision", "provider"], multiprocess_mode="max")
REQUESTS = Counter(
    "cnn_codes_requests",
    "Requests by protocol (http | grpc), endpoint (HTTP route template or gRPC method) and "
    "status (HTTP status code or gRPC status code name).",
    ["protocol", "endpoint", "status"])
REQUEST_SECONDS = Histogram(
    "cnn_codes_request_seconds", "Request handling time, seconds, by protocol and endpoint.",
    ["protocol", "endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
SEARCH_SECONDS = Histogram(
    "cnn_codes_search_seconds", "Index search time per /search request (all its queries), s.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
INDEX_VECTORS = Gauge(
    "cnn_codes_index_vectors", "Vectors in the loaded search index.", multiprocess_mode="livemax")
INDEX_BYTES = Gauge(
    "cnn_codes_index_bytes", "Bytes of the loaded search index (FAISS file + path table).",
    multiprocess_mode="livemax")
