"""Per-image decoding for the API service: every image succeeds or fails on its own.

Pre-processing of the pre / core / post split: bytes -> ``(S, S, 3)`` uint8 or an error item.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from models.preprocessing import (SERVING_FORMATS, ImageDecodeError, PreprocessSpec,
                                  preprocess_bytes)
from service import metrics
from service.schemas import ItemError


@dataclass(frozen=True)
class DecodedBatch:
    """Outcome of decoding one request's images.

    Attributes:
        arrays: ``(M, S, S, 3)`` uint8, the decodable images in request order.
        positions: for each row of ``arrays``, its index in the request.
        errors: request index -> why that image failed.
    """

    arrays: np.ndarray
    positions: list[int]
    errors: dict[int, ItemError]


def decode_images(payloads: list[bytes], spec: PreprocessSpec, *, max_pixels: int,
                  min_side: int = 1) -> DecodedBatch:
    """Decode, convert to RGB, resize and centre-crop each payload independently.

    Blocking (Pillow); call it from a worker thread. Records decode time and error metrics.

    Args:
        payloads: encoded image files, in request order.
        spec: the served model's preprocessing spec.
        max_pixels: width*height limit per image (decompression bombs).
        min_side: shortest accepted side, pixels.

    Returns:
        The good images stacked, their positions, and per-position errors.
    """
    arrays: list[np.ndarray] = []
    positions: list[int] = []
    errors: dict[int, ItemError] = {}
    for index, data in enumerate(payloads):
        started = time.perf_counter()
        try:
            arrays.append(preprocess_bytes(data, spec, max_pixels=max_pixels,
                                           min_side=min_side, formats=SERVING_FORMATS))
            positions.append(index)
        except ImageDecodeError as exc:
            errors[index] = ItemError(code=exc.code, message=exc.message)
            metrics.DECODE_ERRORS.labels(code=exc.code).inc()
        metrics.DECODE_SECONDS.observe(time.perf_counter() - started)
    size = spec.crop_size
    stacked = np.stack(arrays) if arrays else np.empty((0, size, size, 3), dtype=np.uint8)
    return DecodedBatch(arrays=stacked, positions=positions, errors=errors)
