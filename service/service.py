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
from service.decode import DecodedBatch, decode_images  # noqa: E402
from service.middleware import ErrorEnvelopeMiddleware  # noqa: E402
from service.schemas import (ClassifyItem, ClassifyResponse, ClassScore, EmbedItem,  # noqa: E402
                             EmbedResponse, Layer, ModelRef)

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


_routes = Starlette(routes=[Route("/metadata", _metadata, methods=["GET"])])


@bentoml.asgi_app(_routes, path="/")
@bentoml.service(
    name="cnn_codes", workers=SETTINGS.api_workers,
    traffic={"timeout": SETTINGS.request_timeout_s, "max_concurrency": SETTINGS.max_concurrency},
)
class CNNCodes:
    """HTTP API: ``/classify``, ``/embed``, ``GET /metadata``; ready after a canary inference."""

    encoder = bentoml.depends(Encoder)

    def __init__(self) -> None:
        self.settings = Settings()
        self.card: ModelCard = _load_card(self.settings).card
        self.model_ref = ModelRef(name=self.card.name, version=self.card.version,
                                  backbone=self.card.backbone)
        self._ready = False

    async def __is_ready__(self) -> bool:
        """Ready once a canary inference through the Encoder succeeded on the same model."""
        if not self._ready:
            self._ready = await self._canary()
        return self._ready

    async def _canary(self) -> bool:
        from service.runtime import split_outputs

        try:
            ref = await self.encoder.to_async.model_ref()
            if (ref["name"], int(ref["version"])) != (self.card.name, self.card.version):
                logger.error("encoder serves %s, API expects %s:%d", ref, self.card.name,
                             self.card.version)
                return False
            size = self.card.preprocessing.crop_size
            packed = await self.encoder.to_async.encode(np.zeros((1, size, size, 3), np.uint8))
            split_outputs(np.asarray(packed), self.card)
        except Exception:  # any failure means "not ready yet"; logged for operators
            logger.exception("canary inference failed")
            return False
        return True

    async def _infer(self, endpoint: str, images: list[Path]
                     ) -> tuple[DecodedBatch, dict[str, np.ndarray] | None]:
        """Decode each image, run the decodable ones through the Encoder in chunks."""
        from service.runtime import split_outputs

        if not images:
            raise NoImages("no images: send one or more files in the multipart field 'images'")
        limit = self.settings.max_images_per_request
        if len(images) > limit:
            raise TooManyImages(f"{len(images)} images in one request; the limit is {limit}")
        metrics.REQUEST_IMAGES.labels(endpoint=endpoint).observe(len(images))
        payloads = await asyncio.to_thread(lambda: [p.read_bytes() for p in images])
        decoded = await asyncio.to_thread(decode_images, payloads, self.card.preprocessing,
                                          max_pixels=self.settings.max_image_pixels)
        outputs = None
        if len(decoded.arrays):
            step = self.settings.max_batch_size
            chunks = [decoded.arrays[i:i + step] for i in range(0, len(decoded.arrays), step)]
            packed = await asyncio.gather(*(self.encoder.to_async.encode(c) for c in chunks))
            outputs = split_outputs(np.concatenate([np.asarray(p) for p in packed]), self.card)
        metrics.IMAGES.labels(endpoint=endpoint, outcome="ok").inc(len(decoded.positions))
        if decoded.errors:
            metrics.IMAGES.labels(endpoint=endpoint, outcome="error").inc(len(decoded.errors))
        return decoded, outputs

    @bentoml.api(route="/classify")
    async def classify(
        self,
        images: list[Path],
        top_k: Annotated[int, Field(ge=1, le=1000, description="classes per image")] = 5,
    ) -> ClassifyResponse:
        """Top-k classes with softmax probabilities for each image (multipart ``images``)."""
        decoded, outputs = await self._infer("classify", images)
        k = min(top_k, len(self.card.class_names))
        rows: dict[int, list[ClassScore]] = {}
        if outputs is not None:
            logits = outputs["logits"].astype(np.float64)
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            for row, position in enumerate(decoded.positions):
                rows[position] = [
                    ClassScore(label=self.card.class_names[c], index=int(c),
                               probability=float(probs[row, c])) for c in order[row]]
        results = [ClassifyItem(index=i, filename=client_filename(path), predictions=rows.get(i),
                                error=decoded.errors.get(i)) for i, path in enumerate(images)]
        return ClassifyResponse(model=self.model_ref, top_k=k, results=results)

    @bentoml.api(route="/embed")
    async def embed(
        self,
        images: list[Path],
        layer: Layer = "embedding",
        normalize: bool = True,
    ) -> EmbedResponse:
        """CNN code per image: ``embedding`` (penultimate layer, D) or ``features`` (pooled
        conv output, C), float32, L2-normalised when ``normalize``."""
        decoded, outputs = await self._infer("embed", images)
        vectors: dict[int, list[float]] = {}
        if outputs is not None:
            matrix = outputs[layer]
            if normalize:
                norms = np.linalg.norm(matrix, axis=1, keepdims=True)
                matrix = matrix / np.maximum(norms, np.finfo(np.float32).tiny)
            for row, position in enumerate(decoded.positions):
                vectors[position] = matrix[row].astype(np.float32).tolist()
        results = [EmbedItem(index=i, filename=client_filename(path), embedding=vectors.get(i),
                             error=decoded.errors.get(i)) for i, path in enumerate(images)]
        return EmbedResponse(model=self.model_ref, layer=layer, dim=self.card.dim(layer),
                             normalized=normalize, results=results)


CNNCodes.add_asgi_middleware(ErrorEnvelopeMiddleware)
