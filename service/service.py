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


class ReloadRefused(BentoMLException):
    """The requested model version cannot be loaded; the old one keeps serving (HTTP 409)."""

    error_code = HTTPStatus.CONFLICT


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


@bentoml.service(
    name="cnn_codes_encoder", workers=1, traffic={"timeout": SETTINGS.request_timeout_s},
    # BentoML 1.4.39's client to this service closes its connection pool every 100 calls or
    # 300 s while calls are still in flight on it (bentoml/BentoML#5540), failing them with
    # ServerDisconnectedError: under load 16-46 % of responses (bench/, c=32..64). Keep one
    # pool for the worker's lifetime; InferencePipeline also retries such a failure once.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e12},
)
class Encoder:
    """The inference core: onnxruntime on uint8 batches, adaptive batching by BentoML."""

    def __init__(self) -> None:
        from service.batching import cap_learned_wait

        self.settings = Settings()
        cap_learned_wait(self.settings.max_batch_wait_ms / 1000)
        self.core = self._open(_load_card(self.settings))

    def _open(self, published) -> "OnnxEncoder":
        """Open a session on ``published`` and run a canary batch through it.

        Raises:
            ProviderUnavailableError: see :mod:`service.runtime`.
            RuntimeError: the canary produced non-finite outputs.
        """
        from service.runtime import OnnxEncoder, SessionConfig

        card = published.card
        core = OnnxEncoder.create(str(published.onnx_path), card,
                                  SessionConfig.from_settings(self.settings))
        size = card.preprocessing.crop_size
        canary = core.run(np.full((1, size, size, 3), 127, dtype=np.uint8))
        if not np.isfinite(canary).all():
            raise RuntimeError(f"canary inference of {card.name}:{card.version} "
                               "produced non-finite outputs")
        metrics.MODEL_INFO.labels(name=card.name, version=str(card.version),
                                  backbone=card.backbone, precision=card.precision,
                                  provider=core.provider).set(1)
        return core

    @property
    def card(self) -> ModelCard:
        """The card of the model serving now."""
        return self.core.card

    @bentoml.on_startup
    def keep_serving_after_sigterm(self) -> None:
        """Outlive the API workers' drain at shutdown (see :mod:`service.lifecycle`)."""
        from service.lifecycle import delay_sigterm

        if not delay_sigterm(self.settings.shutdown_grace_s):
            logger.warning("could not defer SIGTERM; requests in flight at shutdown may fail")

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def encode(self, images: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 -> ``(N, K + D + C)`` float32 (logits|embedding|features)."""
        started = time.perf_counter()
        packed = self.core.run(images)  # one reference read: a reload swaps self.core whole
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(images))
        return packed

    @bentoml.api
    def model_ref(self) -> dict:
        """Name and version of the loaded model (the API service checks it matches its own)."""
        return {"name": self.card.name, "version": self.card.version}

    @bentoml.api
    def load(self, version: int) -> dict:
        """Hot-swap to ``version``: verify, check compatibility, open, canary, then swap.

        Batches in flight finish on the old session (they hold their own reference); nothing
        changes when any step fails.

        Returns:
            ``{"ok": True, "version": v}`` or ``{"ok": False, "error": "..."}``.
        """
        from models.card import compatibility_problems
        from models.repository import resolve

        current = self.core
        if version == current.card.version:
            return {"ok": True, "version": version}
        try:
            published = resolve(self.settings.repository, current.card.name, version)
            problems = compatibility_problems(current.card, published.card)
            if problems:
                raise ValueError(f"version {version} is not compatible with version "
                                 f"{current.card.version}: {', '.join(problems)}")
            new = self._open(published)
        except Exception as exc:  # any failure keeps the old model serving
            logger.error("refused to load %s:%s: %s", current.card.name, version, exc)
            return {"ok": False, "error": str(exc)}
        self.core = new
        metrics.MODEL_INFO.labels(name=current.card.name, version=str(current.card.version),
                                  backbone=current.card.backbone,
                                  precision=current.card.precision,
                                  provider=current.provider).set(0)
        logger.info("now serving %s:%d (was %d)", new.card.name, new.card.version,
                    current.card.version)
        return {"ok": True, "version": new.card.version}


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
        self._reload_lock = asyncio.Lock()

    def _use_card(self, card: ModelCard) -> None:
        """Point every protocol of this worker at ``card`` (after the Encoder swapped)."""
        self.card = card
        self.model_ref = ModelRef(name=card.name, version=card.version, backbone=card.backbone)
        self.pipeline.card = card
        front = getattr(self, "_oip_front", None)
        if front is not None:
            front.card = card

    async def reload(self) -> dict:
        """Load the version ``model_version`` resolves to now (alias, latest or a number).

        The new version is verified (sha256, card), must be compatible with the current one,
        and is loaded and canary-checked by the Encoder before it replaces the old one.

        Returns:
            ``{"reloaded": bool, "previous": v, "version": v}``.

        Raises:
            ReloadRefused: corrupt, missing or incompatible version; the old one keeps serving.
        """
        from models.card import compatibility_problems
        from models.repository import resolve

        async with self._reload_lock:
            previous = self.card.version
            try:
                target = await asyncio.to_thread(
                    resolve, self.settings.repository, self.card.name,
                    self.settings.model_version)
            except (LookupError, ValueError) as exc:
                raise ReloadRefused(f"cannot reload: {exc}") from None
            if target.card.version == previous:
                return {"reloaded": False, "previous": previous, "version": previous}
            problems = compatibility_problems(self.card, target.card)
            if problems:
                raise ReloadRefused(f"version {target.card.version} is not compatible with "
                                    f"version {previous}: {', '.join(problems)}")
            result = await self.encoder.to_async.load(target.card.version)
            if not result.get("ok"):
                raise ReloadRefused(f"version {target.card.version} refused: "
                                    f"{result.get('error')}")
            self._use_card(target.card)
            logger.info("reloaded %s: version %d -> %d", self.card.name, previous,
                        target.card.version)
            return {"reloaded": True, "previous": previous, "version": target.card.version}

    @bentoml.on_startup
    async def follow_alias(self) -> None:
        """Poll the repository every ``reload_poll_s`` and reload when ``model_version`` (an
        alias or ``latest``) points somewhere new; a refused version is logged once."""
        if self.settings.reload_poll_s <= 0 or self.settings.model_version.isdigit():
            return

        async def poll() -> None:
            while True:
                await asyncio.sleep(self.settings.reload_poll_s)
                if not self._ready:
                    continue
                try:
                    await self.reload()
                except ReloadRefused as exc:
                    if str(exc) not in self._refused_messages:
                        self._refused_messages.add(str(exc))
                        logger.error("%s; still serving version %d", exc, self.card.version)
                except Exception:  # the poller must survive anything; logged for operators
                    logger.exception("alias poll failed")

        self._refused_messages: set[str] = set()
        self._poller = asyncio.create_task(poll())

    @bentoml.api(route="/admin/reload")
    async def admin_reload(self) -> dict:
        """Reload now (admin key required, see ``admin_keys``): 200 with the versions, or 409
        when the target version is refused and the old one keeps serving."""
        return await self.reload()

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
