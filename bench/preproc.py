"""Preprocessing choices: Pillow decode with and without JPEG draft mode, small vs large photos.

Both variants then do the same resize + centre crop (``resize_center_crop``), so the only
difference is the DCT-domain downscale draft mode allows while decoding.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from bench.photos import LARGE_SHORT_SIDE, Photo
from models.preprocessing import PreprocessSpec, load_rgb, resize_center_crop

logger = logging.getLogger(__name__)


def _pass_seconds(photos: Sequence[Photo], spec: PreprocessSpec, draft: bool) -> float:
    """Seconds for one decode + resize + crop pass over ``photos``."""
    draft_size = spec.resize_size if draft else None
    started = time.perf_counter()
    for photo in photos:
        resize_center_crop(load_rgb(photo.data, draft_size=draft_size), spec)
    return time.perf_counter() - started


def _time_per_image(photos: Sequence[Photo], spec: PreprocessSpec, min_seconds: float
                    ) -> tuple[float, float]:
    """Mean seconds per image without and with draft mode.

    Passes alternate (off, on, off, on...) until both together took ``min_seconds``, so a
    change in machine load hits both variants alike.
    """
    off = on = 0.0
    rounds = 0
    while off + on < min_seconds or rounds < 2:
        off += _pass_seconds(photos, spec, False)
        on += _pass_seconds(photos, spec, True)
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
    jpegs = [p for p in photos if p.format == "JPEG"]
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
        off, on = _time_per_image(members, spec, seconds)
        diffs = [np.abs(resize_center_crop(load_rgb(p.data), spec).astype(np.int16)
                        - resize_center_crop(load_rgb(p.data, draft_size=spec.resize_size),
                                             spec).astype(np.int16)).mean()
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
