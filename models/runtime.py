"""onnxruntime sessions: the one session factory, provider selection, threads, the runner.

Provider names follow onnxruntime (https://onnxruntime.ai/docs/execution-providers/):
``tensorrt`` -> ``TensorrtExecutionProvider``, ``cuda`` -> ``CUDAExecutionProvider``,
``cpu`` -> ``CPUExecutionProvider``. The CPU provider is always appended last (onnxruntime needs
it for operators the GPU providers lack), but a requested GPU provider that is missing is an
error unless ``allow_cpu_fallback`` is set: never a silent swap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from models.card import INPUT_NAME, OUTPUT_NAMES, ModelCard

if TYPE_CHECKING:
    from cnn_codes.settings import Settings

logger = logging.getLogger(__name__)

PROVIDER_NAMES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
CPU = PROVIDER_NAMES["cpu"]


def _levels() -> dict:
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel
    return {"disable": level.ORT_DISABLE_ALL, "basic": level.ORT_ENABLE_BASIC,
            "extended": level.ORT_ENABLE_EXTENDED, "all": level.ORT_ENABLE_ALL}


class ProviderUnavailableError(RuntimeError):
    """A requested execution provider is not available and CPU fallback is not allowed."""


def select_providers(requested: Sequence[str], available: Sequence[str], *,
                     allow_cpu_fallback: bool = False) -> list[str]:
    """Ordered onnxruntime provider list for the requested short names.

    Args:
        requested: short names in order of preference (``tensorrt``, ``cuda``, ``cpu``).
        available: ``onnxruntime.get_available_providers()``.
        allow_cpu_fallback: missing GPU providers are logged and skipped instead of raising.

    Returns:
        Full provider names, the available requested ones in order, ``CPUExecutionProvider``
        last.

    Raises:
        ValueError: an unknown short name.
        ProviderUnavailableError: a requested provider is missing and fallback is off.
    """
    chosen: list[str] = []
    for short in requested:
        if short not in PROVIDER_NAMES:
            raise ValueError(f"unknown execution provider {short!r}; known: {list(PROVIDER_NAMES)}")
        full = PROVIDER_NAMES[short]
        if full in available:
            if full not in chosen:
                chosen.append(full)
        elif allow_cpu_fallback:
            logger.warning("execution provider %s is not available (have %s); continuing "
                           "without it because allow_cpu_fallback is set", full, list(available))
        else:
            raise ProviderUnavailableError(
                f"execution provider {full} was requested but onnxruntime offers only "
                f"{list(available)}; install onnxruntime-gpu (pip install .[gpu]) or set "
                "CNN_CODES_ALLOW_CPU_FALLBACK=true")
    if CPU in chosen:
        chosen.remove(CPU)
    return [*chosen, CPU]


GraphOptimization = Literal["disable", "basic", "extended", "all"]


@dataclass(frozen=True)
class SessionConfig:
    """onnxruntime session settings (https://onnxruntime.ai/docs/performance/tune-performance/).

    Attributes:
        providers: short provider names in order of preference (see :func:`select_providers`).
        allow_cpu_fallback: a missing GPU provider is a warning, not an error.
        intra_op_threads: threads inside one operator; 0 = onnxruntime's default (one per
            physical core).
        inter_op_threads: threads across independent operators (only used by the parallel
            execution mode); 0 = default.
        graph_optimization: onnxruntime graph optimisation level.
        optimized_model_dir: where the optimised graph is cached, keyed by the model's
            sha256, providers, level and onnxruntime version; the next start loads it with
            optimisation off (faster start-up); None = no cache.
        allow_spinning: let idle intra-op threads busy-wait for work. Off by default: the
            service decodes images on the same cores, and with one decode thread beside it
            spinning off took onnxruntime from 40.9 to 55.0 images/s and decode from 74.8 to
            96.1 (bench/, 2 cores).
    """

    providers: tuple[str, ...] = ("cpu",)
    allow_cpu_fallback: bool = False
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: GraphOptimization = "all"
    optimized_model_dir: Path | None = None
    allow_spinning: bool = False

    @classmethod
    def from_settings(cls, settings: "Settings") -> "SessionConfig":
        """The session part of :class:`cnn_codes.settings.Settings`."""
        return cls(providers=tuple(settings.providers),
                   allow_cpu_fallback=settings.allow_cpu_fallback,
                   intra_op_threads=settings.intra_op_threads,
                   inter_op_threads=settings.inter_op_threads,
                   graph_optimization=settings.graph_optimization,
                   optimized_model_dir=settings.optimized_model_dir,
                   allow_spinning=settings.ort_allow_spinning)


def optimized_model_path(config: SessionConfig, card: ModelCard, providers: Sequence[str],
                         ort_version: str) -> Path | None:
    """Cache file of the optimised graph for this model + providers + level + onnxruntime."""
    if config.optimized_model_dir is None or config.graph_optimization == "disable":
        return None
    key = "-".join([card.onnx_sha256[:16], config.graph_optimization, ort_version,
                    *[p.removesuffix("ExecutionProvider").lower() for p in providers]])
    return Path(config.optimized_model_dir) / f"{card.name}-{key}.onnx"


def open_session(onnx_path: str | Path, config: SessionConfig = SessionConfig(), *,
                 card: ModelCard | None = None):
    """The one onnxruntime session constructor of the project.

    Selects the execution providers, sets threads, spinning and the graph optimisation
    level, uses the optimised-graph cache when ``card`` names the model (its sha256 keys the
    cache), and checks which providers the session really got.

    Args:
        onnx_path: an ONNX file.
        config: providers, threads, optimisation (:class:`SessionConfig`).
        card: the published model's card, for the optimised-graph cache; None = no cache.

    Returns:
        ``onnxruntime.InferenceSession``.

    Raises:
        ProviderUnavailableError: see :func:`select_providers`; also when the session
            silently dropped a requested GPU provider (e.g. missing CUDA libraries).
    """
    import onnxruntime as ort

    wanted = select_providers(config.providers, ort.get_available_providers(),
                              allow_cpu_fallback=config.allow_cpu_fallback)
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    if not config.allow_spinning:
        # idle onnxruntime threads would spin on the cores the decoders need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = _levels()[config.graph_optimization]
    cached = optimized_model_path(config, card, wanted, ort.__version__) if card else None
    source = str(onnx_path)
    if cached is not None and cached.is_file():
        source = str(cached)  # already optimised for exactly this setup
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        logger.info("loading the cached optimised graph %s", cached)
    elif cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        options.optimized_model_filepath = str(cached)
    session = ort.InferenceSession(source, sess_options=options, providers=wanted)
    got = session.get_providers()
    dropped = [p for p in wanted if p not in got]
    if dropped:
        message = f"onnxruntime dropped providers {dropped} (session has {got})"
        if not config.allow_cpu_fallback:
            raise ProviderUnavailableError(message)
        logger.warning(message)
    return session


class CardMismatchError(ValueError):
    """A model card does not describe its ONNX graph (input, output names or dims)."""


def check_card_against_graph(card: ModelCard, session) -> None:
    """Check the card against the graph onnxruntime loaded: input name, dtype and shape
    ``(N, S, S, 3)`` uint8 with ``S = card.preprocessing.crop_size``; outputs
    ``logits``/``embedding``/``features`` with the card's dims; K = number of class names.

    Raises:
        CardMismatchError: naming every difference.
    """
    problems: list[str] = []
    inputs = session.get_inputs()
    size = card.preprocessing.crop_size
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        problems.append(f"graph inputs {[i.name for i in inputs]}, card expects [{INPUT_NAME!r}]")
    else:
        graph = inputs[0]
        if graph.type != "tensor(uint8)":
            problems.append(f"input {INPUT_NAME!r} is {graph.type}, card says uint8")
        if list(graph.shape[1:]) != [size, size, 3]:
            problems.append(f"input shape {graph.shape}, card says [N, {size}, {size}, 3]")
    outputs = {o.name: o.shape for o in session.get_outputs()}
    for name in OUTPUT_NAMES:
        if name not in outputs:
            problems.append(f"graph has no output {name!r}")
        elif outputs[name][-1] != card.dim(name):
            problems.append(f"output {name!r} has {outputs[name][-1]} values, card says "
                            f"{card.dim(name)}")
    if card.dim("logits") != len(card.class_names):
        problems.append(f"card lists {len(card.class_names)} class names for "
                        f"{card.dim('logits')} logits")
    if problems:
        raise CardMismatchError(f"the card of {card.name}:{card.version} does not describe its "
                                f"ONNX graph: {'; '.join(problems)}")


@dataclass
class OnnxEncoder:
    """An onnxruntime session over a published model: the inference core.

    ``run`` maps ``(N, S, S, 3)`` uint8 to one ``(N, K + D + C)`` float32 array: logits,
    embedding and features side by side (one array crosses the batching boundary;
    :meth:`split` takes it apart).
    """

    session: object
    card: ModelCard

    @classmethod
    def create(cls, onnx_path: str, card: ModelCard,
               config: SessionConfig = SessionConfig()) -> "OnnxEncoder":
        """Open a session on a published model (see :func:`open_session`).

        Raises:
            ProviderUnavailableError: see :func:`open_session`.
            CardMismatchError: the card does not describe the graph.
        """
        session = open_session(onnx_path, config, card=card)
        check_card_against_graph(card, session)
        logger.info("onnxruntime session for %s:%d on %s", card.name, card.version,
                    session.get_providers())
        return cls(session=session, card=card)

    @property
    def provider(self) -> str:
        """The first (preferred) provider the session really runs on."""
        return self.session.get_providers()[0]

    def run(self, images: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 -> ``(N, K + D + C)`` float32.

        Raises:
            ValueError: wrong dtype or shape.
        """
        size = self.card.preprocessing.crop_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"expected uint8 (N, {size}, {size}, 3), got {images.dtype} "
                             f"{images.shape}")
        outputs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return np.concatenate(outputs, axis=1).astype(np.float32, copy=False)



def split_outputs(packed: np.ndarray, card: ModelCard) -> dict[str, np.ndarray]:
    """Inverse of the packing in :meth:`OnnxEncoder.run`.

    Args:
        packed: ``(N, K + D + C)`` float32.
        card: the model card giving K, D, C.

    Returns:
        ``{"logits": (N, K), "embedding": (N, D), "features": (N, C)}`` float32 views.

    Raises:
        ValueError: the width is not K + D + C.
    """
    widths = [card.dim(name) for name in OUTPUT_NAMES]
    if packed.ndim != 2 or packed.shape[1] != sum(widths):
        raise ValueError(f"expected (N, {sum(widths)}) packed outputs, got {packed.shape}")
    bounds = np.cumsum([0, *widths])
    return {name: packed[:, bounds[i]:bounds[i + 1]] for i, name in enumerate(OUTPUT_NAMES)}
