"""BentoML services: ``CNNCodes`` (HTTP API + Open Inference Protocol) and its ``Encoder``.

::

    client -HTTP/gRPC-> CNNCodes (validate, decode per image) -> core (adaptive batching,
                                                                 onnxruntime)

Pre / core / post: ``CNNCodes`` decodes every image on its own (a bad image becomes a per-item
error, :mod:`models.decode`), sends only decoded uint8 arrays to the inference core
(:mod:`service.core`), then post-processes (:mod:`service.responses`). The core runs in this
API worker by default (``batching = in_process``: :class:`service.core.LocalCore`), or in the
separate ``Encoder`` service (``batching = encoder``: BentoML's adaptive batching in its own
worker, :mod:`service.encoder`, only then declared as a dependency and started). Either way
HTTP and gRPC share one batcher. Routes are thin: validate, await the pipeline, map typed
errors through the one error table (:mod:`models.errors`).

Run with ``cnn-codes serve`` (or ``bentoml serve service.service:CNNCodes``); settings come from
``CNN_CODES_*`` environment variables (:class:`cnn_codes.settings.Settings`).
"""

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from cnn_codes.settings import Settings, apply_offline_env

apply_offline_env()  # before BentoML / onnxruntime do anything

import bentoml  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from models.errors import CNNCodesError  # noqa: E402
from models.repository import resolve  # noqa: E402
from service import bentoml_compat  # noqa: E402
from service.bentoml_compat import ErrorEnvelopeMiddleware, client_filename  # noqa: E402
from service.core import Core, LocalCore, RemoteCore  # noqa: E402
from service.encoder import Encoder  # noqa: E402
from service.front import HttpFront, options_model  # noqa: E402
from service.gateway import Gateway  # noqa: E402
from service.kserve import grpc_server as kserve_grpc  # noqa: E402
from service.kserve.http import routes as kserve_routes  # noqa: E402
from service.page import routes as page_routes  # noqa: E402
from service.pipeline import InferencePipeline  # noqa: E402
from service.request_metrics import RequestMetricsMiddleware  # noqa: E402
from service.responses import answer_json  # noqa: E402
from service.schemas import (ClassifyResponse, EmbedResponse, Layer, VectorDType,  # noqa: E402
                             VectorEncoding)
from service.search_route import IndexHolder, SearchResponse  # noqa: E402
from service.search_route import search as search_route  # noqa: E402
from service.served import ModelHolder, Reloader, canary  # noqa: E402

logger = logging.getLogger("cnn_codes.service")
#: the response model of each endpoint (the answer is written by service.responses)
RESPONSE_MODELS: dict[str, type[BaseModel]] = {"classify": ClassifyResponse,
                                               "embed": EmbedResponse}
#: excluded from tracing unless ``trace_requests`` (regular expressions, OpenTelemetry's form)
TRACED_IMAGE_ROUTES = ("/classify", "/embed", "/search", "/v2/models/.*/infer")

# Read once at import: BentoML's decorators below need the numbers when the class is defined.
SETTINGS = Settings()


async def _metadata(request: Request) -> JSONResponse:
    """``GET /metadata``: the served model's card, plus ``index``: the search index's manifest
    (null when search is off)."""
    service = bentoml.get_current_service()
    card = service.holder.card
    return JSONResponse({**card.public(), "index": service.index.describe(card)})


# plus the KServe v2 / Open Inference Protocol HTTP paths (/v2/...), see service/kserve, and
# the page at / with its assets and GET /thumbnails/{row}, see service/page
_routes = Starlette(routes=[Route("/metadata", _metadata, methods=["GET"]),
                            *kserve_routes(bentoml.get_current_service),
                            *page_routes(bentoml.get_current_service)])


@bentoml.asgi_app(_routes, path="/")
@bentoml.service(
    name="cnn_codes", workers=SETTINGS.api_worker_count,
    # No BentoML max_concurrency: the Gateway bounds concurrency itself so its 429 can carry
    # Retry-After (BentoML's limiter sits outside user middleware and sends none).
    traffic={"timeout": SETTINGS.request_timeout_s},
    # turning off per-request access log lines and tracing spans of the image routes raised
    # throughput at c=32 by 18-22 % (README "Performance"); both are settings, off by default
    logging={"access": {"enabled": SETTINGS.access_log}},
    tracing={} if SETTINGS.trace_requests else {"excluded_urls": list(TRACED_IMAGE_ROUTES)},
)
class CNNCodes:
    """HTTP API: ``/classify``, ``/embed``, ``/search``, ``GET /metadata``, the page at ``/``
    (:mod:`service.page`); ready after a canary inference."""

    if SETTINGS.batching == "encoder":  # else no Encoder process is started at all
        encoder = bentoml.depends(Encoder)

    def __init__(self) -> None:
        self.settings = Settings()
        published = resolve(self.settings.repository, self.settings.model_name,
                            self.settings.model_version)  # verified once (sha256, card)
        self.holder = ModelHolder(published.card)
        self.core: Core = (
            LocalCore(published, self.settings, pending=lambda: self.pipeline.decoding)
            if self.settings.batching == "in_process"
            # the dependency's client exists only once the worker runs: resolved per call
            else RemoteCore(lambda: self.encoder))
        self.pipeline = InferencePipeline(
            self.holder, self.settings, self.core.encode,
            claim_lone=self.core.claim_lone if isinstance(self.core, LocalCore) else None)
        self.reloader = Reloader(self.holder, self.settings, self.core.load)
        # POST /search: an index of the served version, or a start-up error naming both
        self.index = IndexHolder(self.settings.index, self.settings.reload_poll_s)
        self.index.load_for(self.holder.card)
        self._ready = False

    async def reload(self) -> dict:
        """Load the version ``model_version`` resolves to now (see :class:`Reloader`)."""
        try:
            return await self.reloader.reload()
        except CNNCodesError as exc:
            raise bentoml_compat.to_bentoml(exc) from None

    @bentoml.on_startup
    async def follow_alias(self) -> None:
        """Poll the repository every ``reload_poll_s`` and reload when ``model_version`` (an
        alias or ``latest``) points somewhere new."""
        if self.settings.reload_poll_s <= 0 or self.settings.model_version.isdigit():
            return
        self._poller = asyncio.create_task(self.reloader.follow(lambda: self._ready))

    @bentoml.api(route="/admin/reload")
    async def admin_reload(self) -> dict:
        """Reload now (admin key required, see ``admin_keys``): 200 with the versions, or 409
        when the target version is refused and the old one keeps serving."""
        return await self.reload()

    async def __is_ready__(self) -> bool:
        """Ready once a canary inference through the Encoder succeeded on the same model."""
        if not self._ready:
            self._ready = await canary(self.holder, self.core.model_ref,
                                       self.pipeline.encode_arrays)
        return self._ready

    async def serving_now(self) -> bool:
        """Ready (:meth:`__is_ready__`) and the Encoder answers now: its ``model_ref`` within
        ``readiness_timeout_s`` (seconds). Behind ``/v2/health/ready``, gRPC ``ServerReady`` and
        gRPC health, so they turn unready while the Encoder is frozen or restarting and ready
        again after (BentoML's ``/readyz`` probes the Encoder itself, see
        :mod:`service.bentoml_compat.readiness`). Never raises."""
        if not await self.__is_ready__():
            return False
        try:
            async with asyncio.timeout(self.settings.readiness_timeout_s):
                await self.core.model_ref()
            return True
        except Exception as exc:  # a frozen, dead or restarting Encoder: not serving now
            logger.warning("Encoder did not answer the health probe: %s",
                           type(exc).__name__ if isinstance(exc, TimeoutError) else exc)
            return False

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        """Serve the Open Inference Protocol over gRPC from this worker (service/kserve)."""
        await kserve_grpc.start(self)

    @bentoml.on_shutdown
    async def stop_grpc(self) -> None:
        """Stop this worker's gRPC server: health NOT_SERVING, then a grace period."""
        await kserve_grpc.stop(self)

    async def answer(self, endpoint: str, payloads: Sequence[bytes | Path],
                     filenames: Sequence[str | None], **options: Any) -> bytes:
        """``/classify`` or ``/embed``: the images through the shared pipeline, then the
        endpoint's post stage (:mod:`service.responses`). Both fronts call it: BentoML's routes
        below and the in-memory front (:mod:`service.front`).

        Returns:
            the JSON answer, UTF-8 (the fields of the endpoint's response model).

        Args:
            endpoint: ``classify`` or ``embed``.
            payloads: encoded image files, or paths of uploaded files (read in the decode
                thread, each through :func:`models.decode.read_file` and its byte limit), in
                request order.
            filenames: the client's file name per image (None when unknown).
            options: the route's validated options (``top_k``; ``layer``, ``normalize``,
                ``dtype``, ``encoding``).

        Raises:
            RequestError: ``no_images`` / ``too_many_images``.
        """
        result = await self.pipeline.run(payloads, endpoint=endpoint)
        return answer_json(endpoint, result, filenames, **options)

    async def _route(self, endpoint: str, images: list[Path], **options: Any) -> BaseModel:
        """:meth:`answer` for a BentoML route (its uploads are temp files).

        Raises:
            BentoMLException: ``no_images`` / ``too_many_images`` with the table's status.
        """
        try:
            answer = await self.answer(endpoint, images, [client_filename(p) for p in images],
                                       **options)
        except CNNCodesError as exc:
            raise bentoml_compat.to_bentoml(exc) from None
        # BentoML re-validates what a route returns against its declared output model
        return RESPONSE_MODELS[endpoint].model_validate_json(answer)

    @bentoml.api(route="/classify")
    async def classify(
        self,
        images: list[Path],
        top_k: Annotated[int, Field(ge=1, le=1000, description="classes per image")] = 5,
    ) -> ClassifyResponse:
        """Top-k classes with softmax probabilities for each image (multipart ``images``)."""
        return await self._route("classify", images, top_k=top_k)  # type: ignore[return-value]

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
        return await self._route(  # type: ignore[return-value]
            "embed", images, layer=layer, normalize=normalize, dtype=dtype, encoding=encoding)

    @bentoml.api(route="/search")
    async def search(
        self,
        # a default list, not None: BentoML takes only a plain list[Path] as multipart files
        images: list[Path] = [],  # noqa: B006 - pydantic copies it; never mutated
        vectors: list[list[float]] | None = None,
        k: Annotated[int, Field(ge=1, le=1000, description="neighbours per query")] = 10,
        model_version: int | None = None,
    ) -> SearchResponse:
        """The ``k`` nearest indexed images (path, cosine) of each image (the inputs of
        ``/embed``) or of each CNN code in ``vectors`` (a JSON body; ``model_version`` = the
        version that made them), from the index of setting ``index``. The index answers only
        for the model version it was built with: 409 ``index_mismatch`` otherwise."""
        try:
            return await search_route(self, images, vectors, k, model_version)
        except CNNCodesError as exc:  # the error table's body: {"error", "code", ...}
            return JSONResponse(exc.body(), status_code=exc.http_status,
                                headers=exc.headers)  # type: ignore[return-value]


bentoml_compat.check_version()
bentoml_compat.install_no_fetch()
# every process that imports this (arbiter, API and Encoder workers): descriptors for connections,
# idle / slow-header connections closed, BentoML's metrics labelled by route (not raw path)
bentoml_compat.raise_nofile_limit()
bentoml_compat.install_connection_limits(SETTINGS.http_idle_timeout_s,
                                         SETTINGS.http_header_timeout_s,
                                         SETTINGS.http_max_connections)
bentoml_compat.set_read_high_water(SETTINGS.http_read_high_water_bytes)
bentoml_compat.install_bounded_endpoint_labels()
CNNCodes.add_asgi_middleware(RequestMetricsMiddleware)  # outermost: counts every answer
CNNCodes.add_asgi_middleware(ErrorEnvelopeMiddleware)
# /classify and /embed answered from the body in memory; the options declared once, above
_front = HttpFront(bentoml.get_current_service,
                   {f"/{name}": options_model(CNNCodes.apis[name].input_spec)
                    for name in ("classify", "embed")})
CNNCodes.add_asgi_middleware(Gateway, settings=SETTINGS,
                              front=_front if SETTINGS.http_front == "in_memory" else None)
