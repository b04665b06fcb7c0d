"""Preprocessing spec and geometry shared by training (eval path), export and serving.

Decoding bytes into images lives in :mod:`models.decode` (the one per-image decode).

Torch-free on purpose: the service imports this module and must not need torch.

The numbers (resize size, crop size, interpolation, mean/std) come from the torchvision
weights' transforms (``weights.transforms()``, an ``ImageClassification`` preset, see
https://pytorch.org/vision/stable/models.html) and are held in one :class:`PreprocessSpec`.
The geometry below reproduces ``torchvision.transforms.v2.Resize(resize_size)`` followed by
``CenterCrop(crop_size)`` on PIL images, so nobody re-implements it elsewhere.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

Interpolation = Literal["nearest", "bilinear", "bicubic"]

_PIL_RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


class PreprocessSpec(BaseModel):
    """How an RGB image becomes the model input.

    The model graph takes ``images``: uint8 ``(N, crop_size, crop_size, 3)`` RGB (NHWC).
    Scaling to [0, 1] and ``(x - mean) / std`` normalisation happen inside the ONNX graph,
    so clients and the service only resize and crop.

    Attributes:
        resize_size: shorter side after resizing, pixels.
        crop_size: side of the square centre crop, pixels (the model's input size).
        interpolation: resampling filter of the resize.
        mean: per-channel mean of [0, 1]-scaled RGB.
        std: per-channel standard deviation of [0, 1]-scaled RGB.
    """

    model_config = ConfigDict(frozen=True)

    resize_size: int = Field(gt=0)
    crop_size: int = Field(gt=0)
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: Literal["RGB"] = "RGB"
    layout: Literal["NHWC"] = "NHWC"
    dtype: Literal["uint8"] = "uint8"

    def with_crop_size(self, crop_size: int) -> "PreprocessSpec":
        """The same preset at another input size, keeping the resize/crop ratio.

        Args:
            crop_size: new input side, pixels.

        Returns:
            A new spec whose ``resize_size`` scales with ``crop_size``
            (e.g. 256/224 stays 256/224).
        """
        resize = round(self.resize_size * crop_size / self.crop_size)
        return self.model_copy(update={"crop_size": crop_size, "resize_size": resize})


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the documented way.

    Transparent images (RGBA, LA, PA, P with transparency) are composited over white;
    16/32-bit integer and float grayscale (``I;16``, ``I``, ``F``) are rescaled to 8 bits from
    their own bit depth; everything else (L, P, CMYK, YCbCr, ...) uses Pillow's ``convert``.

    Args:
        image: a loaded Pillow image of any mode.

    Returns:
        An RGB Pillow image of the same size.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.uint16)
        return Image.fromarray((array >> 8).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max()) if array.size else 0.0
        scale = 255.0 / peak if peak > 0 else 0.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize the shorter side to ``spec.resize_size`` then centre-crop ``spec.crop_size``.

    Same geometry as ``torchvision.transforms.v2.Resize(resize_size)`` +
    ``CenterCrop(crop_size)`` (torchvision rounds the long side down and the crop offset to
    nearest); PIL's filters antialias like torchvision's ``antialias=True``.

    Args:
        image: an RGB Pillow image, any size.
        spec: the model's preprocessing spec.

    Returns:
        ``(crop_size, crop_size, 3)`` uint8 RGB array (HWC), C-contiguous.
    """
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short = spec.resize_size
    new_long = int(new_short * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample=_PIL_RESAMPLE[spec.interpolation])
    crop = spec.crop_size
    if new_w < crop or new_h < crop:  # only when resize_size < crop_size: pad like torchvision
        padded = Image.new("RGB", (max(new_w, crop), max(new_h, crop)))
        padded.paste(image, ((padded.width - new_w) // 2, (padded.height - new_h) // 2))
        image, new_w, new_h = padded, padded.width, padded.height
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    return np.array(image, dtype=np.uint8)  # a writable, C-contiguous copy
