"""Image preprocessing shared by training (eval path), export parity checks and serving.

Torch-free on purpose: the service imports this module and must not need torch.

The numbers (resize size, crop size, interpolation, mean/std) come from the torchvision
weights' transforms (``weights.transforms()``, an ``ImageClassification`` preset, see
https://pytorch.org/vision/stable/models.html) and are held in one :class:`PreprocessSpec`.
The geometry below reproduces ``torchvision.transforms.v2.Resize(resize_size)`` followed by
``CenterCrop(crop_size)`` on PIL images, so nobody re-implements it elsewhere.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
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


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image.

    Attributes:
        code: stable machine-readable reason (``empty``, ``not_an_image``, ``truncated``,
            ``too_many_pixels``, ``unsupported_format``, ``too_small``).
        message: human-readable explanation.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


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


# Formats the service accepts (Pillow format names); MPO is the multi-picture JPEG of cameras.
SERVING_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF"})


def load_rgb(
    data: bytes,
    *,
    draft_size: int | None = None,
    max_pixels: int | None = None,
    min_side: int | None = None,
    formats: frozenset[str] | None = None,
) -> Image.Image:
    """Decode encoded image bytes to an RGB Pillow image.

    The first frame of animated formats is used; EXIF orientation is applied; JPEGs are
    decoded in draft mode (DCT scaling) when ``draft_size`` is given, which keeps both sides
    ``>= draft_size`` pixels and so never changes the later resize target.

    Args:
        data: the encoded file (JPEG, PNG, GIF, WebP, BMP, TIFF, ...).
        draft_size: smallest side, pixels, that JPEG draft decoding must keep; None = off.
        max_pixels: refuse images with more pixels than this (decompression bombs);
            None keeps Pillow's own ``Image.MAX_IMAGE_PIXELS`` guard (which stays on either
            way: Pillow raises for more than twice its limit).
        min_side: refuse images whose shorter side is below this, pixels.
        formats: accepted Pillow format names (e.g. :data:`SERVING_FORMATS`); None = any.

    Returns:
        A fully loaded RGB image.

    Raises:
        ImageDecodeError: ``empty``, ``not_an_image``, ``unsupported_format``,
            ``too_many_pixels``, ``too_small``, ``truncated``.
    """
    if not data:
        raise ImageDecodeError("empty", "the file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not_an_image", "not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_many_pixels", str(exc)) from None
    if formats is not None and image.format not in formats:
        raise ImageDecodeError(
            "unsupported_format",
            f"{image.format} images are not accepted; send one of {sorted(formats)}")
    width, height = image.size
    if min_side is not None and min(width, height) < min_side:
        raise ImageDecodeError(
            "too_small", f"{width}x{height} pixels: both sides must be at least {min_side}")
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageDecodeError(
            "too_many_pixels", f"{width}x{height} pixels is more than the limit of {limit}"
        )
    try:
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_many_pixels", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated and corrupt data as OSError ("image file is truncated").
        raise ImageDecodeError("truncated", f"the image data is incomplete or corrupt: {exc}") from None


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


def preprocess_bytes(
    data: bytes, spec: PreprocessSpec, *, max_pixels: int | None = None,
    min_side: int | None = None, formats: frozenset[str] | None = None,
) -> np.ndarray:
    """Encoded bytes -> model input for one image: decode, RGB, resize, centre crop.

    Args:
        data: encoded image file.
        spec: the model's preprocessing spec.
        max_pixels, min_side, formats: input limits (see :func:`load_rgb`).

    Returns:
        ``(crop_size, crop_size, 3)`` uint8 RGB array.

    Raises:
        ImageDecodeError: when the bytes are not a usable image.
    """
    image = load_rgb(data, draft_size=spec.resize_size, max_pixels=max_pixels,
                     min_side=min_side, formats=formats)
    return resize_center_crop(image, spec)


def preprocess_file(path: str, spec: PreprocessSpec) -> np.ndarray:
    """:func:`preprocess_bytes` on a file path; returns ``(S, S, 3)`` uint8."""
    with open(path, "rb") as handle:
        return preprocess_bytes(handle.read(), spec)
