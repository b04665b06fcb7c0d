"""The real sample photos, held in memory, in a fixed shuffled order (their natural mix)."""

from __future__ import annotations

import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")
# Pillow's JPEG draft mode can only halve a side while it stays >= resize_size (256 for the
# torchvision presets), so it changes nothing below a 512 px shorter side.
LARGE_SHORT_SIDE = 512


@dataclass(frozen=True)
class Photo:
    """One encoded sample photo.

    Attributes:
        name: path relative to the data root (``val/ants/x.jpg``).
        data: the encoded file.
        width, height: pixels.
        format: Pillow's format name (``JPEG``, ``GIF``...).
    """

    name: str
    data: bytes
    width: int
    height: int
    format: str

    @property
    def short_side(self) -> int:
        """The shorter side, pixels."""
        return min(self.width, self.height)

    @property
    def content_type(self) -> str:
        """A MIME type for multipart uploads."""
        return {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif",
                "WEBP": "image/webp", "BMP": "image/bmp"}.get(self.format,
                                                               "application/octet-stream")


def load_photos(data_dir: Path, *, seed: int = 0) -> list[Photo]:
    """Every image under ``data_dir`` (train and val), read into memory, shuffled with ``seed``.

    Raises:
        FileNotFoundError: no image under ``data_dir``.
    """
    paths = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no sample photos under {data_dir}")
    photos = []
    for path in paths:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            photos.append(Photo(name=str(path.relative_to(data_dir)), data=data,
                                width=image.width, height=image.height,
                                format=image.format or "unknown"))
    random.Random(seed).shuffle(photos)
    logger.info("loaded %d photos from %s", len(photos), data_dir)
    return photos


def describe(photos: list[Photo]) -> dict:
    """Count, formats, pixel and byte percentiles of a photo set (for the JSON result)."""
    import numpy as np

    pixels = np.array([p.width * p.height for p in photos], dtype=np.float64)
    sizes = np.array([len(p.data) for p in photos], dtype=np.float64)
    formats: dict[str, int] = {}
    for photo in photos:
        formats[photo.format] = formats.get(photo.format, 0) + 1
    return {
        "count": len(photos),
        "formats": formats,
        "megapixels_p50": round(float(np.percentile(pixels, 50)) / 1e6, 3),
        "megapixels_p99": round(float(np.percentile(pixels, 99)) / 1e6, 3),
        "megapixels_max": round(float(pixels.max()) / 1e6, 3),
        "kib_mean": round(float(sizes.mean()) / 1024, 1),
        "large_count": sum(1 for p in photos if p.short_side >= LARGE_SHORT_SIDE),
        "large_rule": f"shorter side >= {LARGE_SHORT_SIDE} px",
    }
