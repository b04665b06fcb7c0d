"""onnxruntime sessions: execution provider selection, threads, and the inference core.

Provider names follow onnxruntime (https://onnxruntime.ai/docs/execution-providers/):
``tensorrt`` -> ``TensorrtExecutionProvider``, ``cuda`` -> ``CUDAExecutionProvider``,
``cpu`` -> ``CPUExecutionProvider``. The CPU provider is always appended last (onnxruntime needs
it for operators the GPU providers lack), but a requested GPU provider that is missing is an
error unless ``allow_cpu_fallback`` is set: never a silent swap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from models.card import INPUT_NAME, OUTPUT_NAMES, ModelCard

logger = logging.getLogger(__name__)

PROVIDER_NAMES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
CPU = PROVIDER_NAMES["cpu"]


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
    def create(cls, onnx_path: str, card: ModelCard, *, providers: Sequence[str],
               allow_cpu_fallback: bool = False, intra_op_threads: int = 0) -> "OnnxEncoder":
        """Open a session with the selected providers and check what onnxruntime really used.

        Raises:
            ProviderUnavailableError: see :func:`select_providers`; also when the session
                silently dropped a requested GPU provider (e.g. missing CUDA libraries).
        """
        import onnxruntime as ort

        wanted = select_providers(providers, ort.get_available_providers(),
                                  allow_cpu_fallback=allow_cpu_fallback)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(onnx_path, sess_options=options, providers=wanted)
        got = session.get_providers()
        dropped = [p for p in wanted if p not in got]
        if dropped:
            message = f"onnxruntime dropped providers {dropped} (session has {got})"
            if not allow_cpu_fallback:
                raise ProviderUnavailableError(message)
            logger.warning(message)
        logger.info("onnxruntime session for %s:%d on %s", card.name, card.version, got)
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
