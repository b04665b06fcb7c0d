"""Preprocessing choices: Pillow decode with and without JPEG draft mode, small vs large photos.

Draft on is exactly the service's decode (:func:`models.decode.decode_image`); draft off is the
same steps composed from the core without it (:func:`models.decode.load_rgb` with the same
limits, then :func:`models.preprocessing.resize_center_crop`), so the only difference is the
DCT-domain downscale draft mode allows while decoding.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from bench.photos import LARGE_SHORT_SIDE, Photo
from models.decode import DecodeLimits, decode_batch, decode_image, load_rgb
from models.preprocessing import PreprocessSpec, resize_center_crop

logger = logging.getLogger(__name__)


def model_input(data: bytes, spec: PreprocessSpec, limits: DecodeLimits, *, draft: bool
                ) -> np.ndarray:
    """``(S, S, 3)`` uint8 model input with JPEG draft mode on (the service's own
    :func:`~models.decode.decode_image`) or off (the same pixel, side and format limits,
    decode, resize and crop).

    Raises:
        ImageError: the photo is refused (see :mod:`models.errors`).
    """
    if draft:
        return decode_image(data, spec, limits)
    image = load_rgb(data, max_pixels=limits.max_pixels, min_side=limits.min_side,
                     formats=limits.formats)
    return resize_center_crop(image, spec)


def _pass_seconds(photos: Sequence[Photo], spec: PreprocessSpec, limits: DecodeLimits,
                  draft: bool) -> float:
    """Seconds for one decode + resize + crop pass over ``photos``."""
    started = time.perf_counter()
    for photo in photos:
        model_input(photo.data, spec, limits, draft=draft)
    return time.perf_counter() - started


def _decodable(photos: Sequence[Photo], spec: PreprocessSpec, limits: DecodeLimits
               ) -> list[Photo]:
    """The photos the service accepts (none is expected to be refused; logged if one is)."""
    decoded = decode_batch([p.data for p in photos], spec, limits)
    for index, error in sorted(decoded.errors.items()):
        logger.warning("skipping %s: %s", photos[index].name, error)
    return [photos[i] for i in decoded.positions]


def _time_per_image(photos: Sequence[Photo], spec: PreprocessSpec, limits: DecodeLimits,
                    min_seconds: float) -> tuple[float, float]:
    """Mean seconds per image without and with draft mode.

    Passes alternate (off, on, off, on...) until both together took ``min_seconds``, so a
    change in machine load hits both variants alike.
    """
    off = on = 0.0
    rounds = 0
    while off + on < min_seconds or rounds < 2:
        off += _pass_seconds(photos, spec, limits, False)
        on += _pass_seconds(photos, spec, limits, True)
        rounds += 1
    return off / (rounds * len(photos)), on / (rounds * len(photos))


def draft_mode_table(photos: Sequence[Photo], spec: PreprocessSpec, seconds: float
                     ) -> list[dict[str, Any]]:
    """ms/image with and without draft mode for small, large and all photos (one core).

    Small: shorter side < 512 px (draft cannot act at resize 256); large: >= 512 px. Also
    checks that draft mode changes the model input only slightly (mean abs pixel difference).

    Returns:
        Rows ``{"group", "count", "mean_megapixels", "ms_draft_off", "ms_draft_on",
        "speedup", "mean_abs_pixel_diff"}``.
    """
    limits = DecodeLimits.default()
    jpegs = _decodable([p for p in photos if p.format == "JPEG"], spec, limits)
    groups = {
        f"small (<{LARGE_SHORT_SIDE} px short side)":
            [p for p in jpegs if p.short_side < LARGE_SHORT_SIDE],
        f"large (>={LARGE_SHORT_SIDE} px short side)":
            [p for p in jpegs if p.short_side >= LARGE_SHORT_SIDE],
        "all JPEGs (natural mix)": jpegs,
    }
    rows = []
    for group, members in groups.items():
        if not members:
            continue
        off, on = _time_per_image(members, spec, limits, seconds)
        diffs = [np.abs(model_input(p.data, spec, limits, draft=False).astype(np.int16)
                        - model_input(p.data, spec, limits, draft=True).astype(np.int16)).mean()
                 for p in members[:64]]
        rows.append({
            "group": group, "count": len(members),
            "mean_megapixels": round(float(np.mean([p.width * p.height for p in members])) / 1e6,
                                     3),
            "ms_draft_off": round(off * 1000, 2), "ms_draft_on": round(on * 1000, 2),
            "speedup": round(off / on, 2),
            "mean_abs_pixel_diff": round(float(np.mean(diffs)), 2),
        })
        logger.info("preprocessing %s: %.2f ms off, %.2f ms on", group, off * 1000, on * 1000)
    return rows
