"""BentoML services: ``CNNCodes`` (HTTP API) and its ``Encoder`` dependency.

::

    client -HTTP-> CNNCodes (decode + validate per request) -> Encoder (adaptive batching,
                                                               onnxruntime)

Pre / core / post: ``CNNCodes`` decodes every image on its own (a bad image becomes a per-item
error), sends only decoded uint8 arrays to ``Encoder.encode`` (batchable, so BentoML forms
batches across requests), then post-processes (softmax + top-k, L2 normalisation).

Run with ``cnn-codes serve`` (or ``bentoml serve service.service:CNNCodes``); settings come from
``CNN_CODES_*`` environment variables (:class:`cnn_codes.settings.Settings`).
"""

import asyncio
import base64
import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

from cnn_codes.settings import Settings, apply_offline_env

apply_offline_env()  # before BentoML / onnxruntime do anything

import bentoml  # noqa: E402
import numpy as np  # noqa: E402
from bentoml.exceptions import BentoMLException  # noqa: E402
from pydantic import Field  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from models.card import ModelCard  # noqa: E402
from service import metrics  # noqa: E402
from service import no_fetch  # noqa: E402
from service.gateway import Gateway  # noqa: E402
from service.kserve import grpc_server as kserve_grpc  # noqa: E402
from service.kserve.http import RequestMetricsMiddleware  # noqa: E402
from service.kserve.http import routes as kserve_routes  # noqa: E402
from service.middleware import ErrorEnvelopeMiddleware  # noqa: E402
from service.pipeline import (EmptyRequest, InferencePipeline, PipelineResult,  # noqa: E402
                              RequestTooLarge, l2_normalize, softmax)
from service.pipeline import top_k as top_k_indices  # noqa: E402
from service.schemas import (ClassifyItem, ClassifyResponse, ClassScore, EmbedItem,  # noqa: E402
                             EmbedResponse, Layer, ModelRef, VectorDType, VectorEncoding)

logger = logging.getLogger("cnn_codes.service")

# Read once at import: BentoML's decorators below need the numbers when the class is defined.
SETTINGS = Settings()


class TooManyImages(BentoMLException):
    """More images in one request than ``max_images_per_request`` (HTTP 413)."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class NoImages(BentoMLException):
    """A request without any image (HTTP 400)."""

    error_code = HTTPStatus.BAD_REQUEST


def client_filename(path: Path) -> str | None:
    """The file name the client sent, recovered from BentoML's upload temp file.

    BentoML stores each uploaded file as ``tempfile.NamedTemporaryFile(suffix=<client name>)``,
    i.e. ``tmp`` + 8 random characters + the client's name (``_bentoml_sdk/validators.py``).
    """
    name = path.name
    if name.startswith("tmp") and len(name) >= 11:
        return name[11:] or None
    return name


def _load_card(settings: Settings):
    from models.repository import resolve

    return resolve(settings.repository, settings.model_name, settings.model_version)


@bentoml.service(name="cnn_codes_encoder", workers=1,
                 traffic={"timeout": SETTINGS.request_timeout_s})
class Encoder:
    """The inference core: onnxruntime on uint8 batches, adaptive batching by BentoML."""

    def __init__(self) -> None:
        from service.runtime import OnnxEncoder

        settings = Settings()
        published = _load_card(settings)
        self.card: ModelCard = published.card
        self.core = OnnxEncoder.create(
            str(published.onnx_path), published.card, providers=settings.providers,
            allow_cpu_fallback=settings.allow_cpu_fallback,
            intra_op_threads=settings.intra_op_threads)
        size = self.card.preprocessing.crop_size
        canary = self.core.run(np.full((1, size, size, 3), 127, dtype=np.uint8))
        if not np.isfinite(canary).all():
            raise RuntimeError(f"canary inference of {self.card.name}:{self.card.version} "
                               "produced non-finite outputs")
        metrics.MODEL_INFO.labels(name=self.card.name, version=str(self.card.version),
                                  backbone=self.card.backbone, precision=self.card.precision,
                                  provider=self.core.provider).set(1)

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def encode(self, images: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 -> ``(N, K + D + C)`` float32 (logits|embedding|features)."""
        started = time.perf_counter()
        packed = self.core.run(images)
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(images))
        return packed

    @bentoml.api
    def model_ref(self) -> dict:
        """Name and version of the loaded model (the API service checks it matches its own)."""
        return {"name": self.card.name, "version": self.card.version}


async def _metadata(request: Request) -> JSONResponse:
    """``GET /metadata``: the served model's card."""
    service = bentoml.get_current_service()
    return JSONResponse(service.card.public())


# plus the KServe v2 / Open Inference Protocol HTTP paths (/v2/...), see service/kserve
_routes = Starlette(routes=[Route("/metadata", _metadata, methods=["GET"]),
                            *kserve_routes(bentoml.get_current_service)])


@bentoml.asgi_app(_routes, path="/")
@bentoml.service(
    name="cnn_codes", workers=SETTINGS.api_workers,
    # No BentoML max_concurrency: the Gateway bounds concurrency itself so its 429 can carry
    # Retry-After (BentoML's limiter sits outside user middleware and sends none).
    traffic={"timeout": SETTINGS.request_timeout_s},
)
class CNNCodes:
    """HTTP API: ``/classify``, ``/embed``, ``GET /metadata``; ready after a canary inference."""

    encoder = bentoml.depends(Encoder)

    def __init__(self) -> None:
        self.settings = Settings()
        self.card: ModelCard = _load_card(self.settings).card
        self.model_ref = ModelRef(name=self.card.name, version=self.card.version,
                                  backbone=self.card.backbone)
        # the dependency's client methods exist only once the worker runs: resolve per call
        self.pipeline = InferencePipeline(
            self.card, self.settings, lambda batch: self.encoder.to_async.encode(batch))
        self._ready = False

    async def __is_ready__(self) -> bool:
        """Ready once a canary inference through the Encoder succeeded on the same model."""
        if not self._ready:
            self._ready = await self._canary()
        return self._ready

    async def _canary(self) -> bool:
        try:
            ref = await self.encoder.to_async.model_ref()
            if (ref["name"], int(ref["version"])) != (self.card.name, self.card.version):
                logger.error("encoder serves %s, API expects %s:%d", ref, self.card.name,
                             self.card.version)
                return False
            size = self.card.preprocessing.crop_size
            await self.pipeline.encode_arrays(np.zeros((1, size, size, 3), np.uint8))
        except Exception:  # any failure means "not ready yet"; logged for operators
            logger.exception("canary inference failed")
            return False
        return True

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        """Serve the Open Inference Protocol over gRPC from this worker (service/kserve)."""
        await kserve_grpc.start(self)

    @bentoml.on_shutdown
    async def stop_grpc(self) -> None:
        """Stop this worker's gRPC server: health NOT_SERVING, then a grace period."""
        await kserve_grpc.stop(self)

    async def _run(self, endpoint: str, images: list[Path]) -> PipelineResult:
        """Read the uploaded files and run them through the shared pipeline."""
        try:
            self.pipeline.check_count(len(images))
        except EmptyRequest as exc:
            raise NoImages(f"{exc}: multipart field 'images'") from None
        except RequestTooLarge as exc:
            raise TooManyImages(str(exc)) from None
        payloads = await asyncio.to_thread(lambda: [p.read_bytes() for p in images])
        return await self.pipeline.run(payloads, endpoint=endpoint)

    @bentoml.api(route="/classify")
    async def classify(
        self,
        images: list[Path],
        top_k: Annotated[int, Field(ge=1, le=1000, description="classes per image")] = 5,
    ) -> ClassifyResponse:
        """Top-k classes with softmax probabilities for each image (multipart ``images``)."""
        result = await self._run("classify", images)
        k = min(top_k, len(self.card.class_names))
        rows: dict[int, list[ClassScore]] = {}
        if result.outputs is not None:
            probs = softmax(result.outputs["logits"])
            for row, (position, order) in enumerate(
                    zip(result.decoded.positions, top_k_indices(probs, k))):
                rows[position] = [
                    ClassScore(label=self.card.class_names[c], index=int(c),
                               probability=float(probs[row, c])) for c in order]
        results = [ClassifyItem(index=i, filename=client_filename(path), predictions=rows.get(i),
                                error=result.decoded.errors.get(i))
                   for i, path in enumerate(images)]
        return ClassifyResponse(model=self.model_ref, top_k=k, results=results)

    @bentoml.api(route="/embed")
    async def embed(
        self,
        images: list[Path],
        layer: Layer = "embedding",
        normalize: bool = True,
        dtype: VectorDType = "float32",
        encoding: VectorEncoding = "list",
    ) -> EmbedResponse:
        """CNN code per image: ``embedding`` (penultimate layer, D) or ``features`` (pooled
        conv output, C), L2-normalised when ``normalize``, as ``dtype``, encoded as a JSON
        ``list`` or ``base64`` of little-endian bytes."""
        result = await self._run("embed", images)
        vectors: dict[int, list[float] | str] = {}
        if result.outputs is not None:
            matrix = result.outputs[layer]
            matrix = l2_normalize(matrix) if normalize else matrix.astype(np.float32)
            matrix = matrix.astype("<f2" if dtype == "float16" else "<f4")
            for row, position in enumerate(result.decoded.positions):
                vectors[position] = (base64.b64encode(matrix[row].tobytes()).decode("ascii")
                                     if encoding == "base64" else matrix[row].tolist())
        results = [EmbedItem(index=i, filename=client_filename(path), embedding=vectors.get(i),
                             error=result.decoded.errors.get(i)) for i, path in enumerate(images)]
        return EmbedResponse(model=self.model_ref, layer=layer, dim=self.card.dim(layer),
                             dtype=dtype, encoding=encoding, normalized=normalize,
                             results=results)


no_fetch.install()
CNNCodes.add_asgi_middleware(RequestMetricsMiddleware)  # outermost: counts every answer
CNNCodes.add_asgi_middleware(ErrorEnvelopeMiddleware)
CNNCodes.add_asgi_middleware(Gateway, settings=SETTINGS)
