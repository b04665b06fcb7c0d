"""The one per-image decode: encoded bytes (or a file) -> model input, or a typed per-image error.

Every path calls this module and nothing else decodes an image: the HTTP routes, the Open
Inference Protocol (``/v2`` and gRPC), batch jobs (``cnn-codes embed``), export's parity and
calibration loops and the benchmarks. Whatever a decoder raises becomes that image's
:class:`~models.errors.ImageError` (codes in :mod:`models.errors`), never the request's or the
job's: Pillow reports damaged files as ``OSError``, ``SyntaxError``, ``ValueError``,
``EOFError`` or ``struct.error`` depending on the plug-in and the byte where the data ends
(a JPEG cut after its first 200 bytes raises ``OSError: Truncated File Read`` from
``Image.open`` itself), so all of them are caught here, once.

Torch-free: numpy and Pillow only.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import ImageError
from models.preprocessing import PreprocessSpec, resize_center_crop, to_rgb

if TYPE_CHECKING:
    from cnn_codes.settings import Settings

logger = logging.getLogger(__name__)

# Formats the service accepts (Pillow format names); MPO is the multi-picture JPEG of cameras.
SERVING_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF"})

# Signatures of the served formats: a file that starts like one but that no Pillow plug-in
# could open is a damaged image (``truncated``), not ``not_an_image``.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00",
               b"MM\x00*")


def _looks_like_served_image(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


# What Pillow raises for damaged data, depending on the plug-in and where the data ends.
_DAMAGED = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError,
            ZeroDivisionError)


@dataclass(frozen=True)
class DecodeLimits:
    """Per-image limits, the same on every path (from :class:`cnn_codes.settings.Settings`).

    Attributes:
        max_pixels: width*height above which an image is ``too_many_pixels``.
        min_side: shortest accepted side, pixels (``too_small`` below).
        max_file_bytes: largest encoded file, bytes (``too_large`` above).
        formats: accepted Pillow format names (``unsupported_format`` otherwise); None = any.
    """

    max_pixels: int
    min_side: int
    max_file_bytes: int
    formats: frozenset[str] | None = SERVING_FORMATS

    @classmethod
    def from_settings(cls, settings: "Settings") -> "DecodeLimits":
        """The limits of ``settings`` (``max_image_pixels``, ``min_image_side``,
        ``max_file_bytes``) with the served formats."""
        return cls(max_pixels=settings.max_image_pixels, min_side=settings.min_image_side,
                   max_file_bytes=settings.max_file_bytes)

    @classmethod
    def default(cls) -> "DecodeLimits":
        """The limits of the settings in force (environment ``CNN_CODES_*``)."""
        from cnn_codes.settings import Settings

        return cls.from_settings(Settings())


def load_rgb(data: bytes, *, draft_size: int | None = None, max_pixels: int | None = None,
             min_side: int | None = None, formats: frozenset[str] | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB Pillow image (training's augmentation input).

    The first frame of animated formats is used; EXIF orientation is applied; JPEGs are
    decoded in draft mode (DCT scaling) when ``draft_size`` is given, which keeps both sides
    ``>= draft_size`` pixels and so never changes the later resize target.

    Args:
        data: the encoded file (JPEG, PNG, GIF, WebP, BMP, TIFF, ...).
        draft_size: smallest side, pixels, that JPEG draft decoding must keep; None = off.
        max_pixels: refuse images with more pixels than this; None keeps Pillow's own
            ``Image.MAX_IMAGE_PIXELS`` guard (on either way).
        min_side: refuse images whose shorter side is below this, pixels.
        formats: accepted Pillow format names (e.g. :data:`SERVING_FORMATS`); None = any.

    Returns:
        A fully loaded RGB image.

    Raises:
        ImageError: ``empty``, ``not_an_image``, ``unsupported_format``, ``too_many_pixels``,
            ``too_small``, ``truncated``, ``decode_failed``; never anything else.
    """
    if not data:
        raise ImageError("empty", "the file is empty (0 bytes)")
    try:
        return _load_rgb(data, draft_size, max_pixels, min_side, formats)
    except ImageError:
        raise
    except UnidentifiedImageError:
        if _looks_like_served_image(data):
            raise ImageError("truncated", "the file starts like an image but its data is "
                                          "incomplete or corrupt") from None
        raise ImageError("not_an_image", "not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", str(exc)) from None
    except _DAMAGED as exc:
        raise ImageError("truncated", "the image data is incomplete or corrupt: "
                                      f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - one odd file must never fail the others
        logger.warning("unexpected decoder failure", exc_info=True)
        raise ImageError("decode_failed", f"{type(exc).__name__}: {exc}") from None


def _load_rgb(data: bytes, draft_size: int | None, max_pixels: int | None,
              min_side: int | None, formats: frozenset[str] | None) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    if formats is not None and image.format not in formats:
        raise ImageError("unsupported_format",
                         f"{image.format} images are not accepted; send one of {sorted(formats)}")
    width, height = image.size
    if min_side is not None and min(width, height) < min_side:
        raise ImageError("too_small",
                         f"{width}x{height} pixels: both sides must be at least {min_side}")
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageError("too_many_pixels",
                         f"{width}x{height} pixels is more than the limit of {limit}")
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def decode_image(data: bytes, spec: PreprocessSpec, limits: DecodeLimits) -> np.ndarray:
    """Encoded bytes -> model input for one image: decode, RGB, resize, centre crop.

    Args:
        data: the encoded image file.
        spec: the model's preprocessing spec (resize, crop, interpolation).
        limits: per-image limits.

    Returns:
        ``(S, S, 3)`` uint8 RGB, ``S = spec.crop_size``, C-contiguous.

    Raises:
        ImageError: a per-image code (see :func:`load_rgb`, plus ``too_large``); never
            anything else.
    """
    if len(data) > limits.max_file_bytes:
        raise ImageError("too_large", f"{len(data)} bytes is more than the limit of "
                                      f"{limits.max_file_bytes} (max_file_bytes)")
    image = load_rgb(data, draft_size=spec.resize_size, max_pixels=limits.max_pixels,
                     min_side=limits.min_side, formats=limits.formats)
    try:
        return resize_center_crop(image, spec)
    except Exception as exc:  # noqa: BLE001 - Pillow resize on an odd image
        raise ImageError("decode_failed", f"{type(exc).__name__}: {exc}") from None


def read_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes.

    Only regular files are read (after following symlinks), so a FIFO never blocks and a
    device such as ``/dev/zero`` or a huge sparse file is never read into memory.

    Raises:
        ImageError: ``not_a_file`` (directory, FIFO, device, socket), ``too_large``,
            ``unreadable`` (missing, no permission, I/O error).
    """
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("not_a_file", f"{path} is not a regular file")
        if info.st_size > max_bytes:
            raise ImageError("too_large", f"{path} has {info.st_size} bytes, more than the "
                                          f"limit of {max_bytes} (max_file_bytes)")
        # O_NONBLOCK: a file swapped for a FIFO after the stat still cannot block the open
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ImageError("not_a_file", f"{path} is not a regular file")
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError("unreadable", f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{path} has more than {max_bytes} bytes "
                                      "(max_file_bytes)")
    return data


def decode_file(path: str | Path, spec: PreprocessSpec,
                limits: DecodeLimits | None = None) -> np.ndarray:
    """:func:`read_file` then :func:`decode_image`; ``(S, S, 3)`` uint8.

    Args:
        path: an image file.
        spec: the model's preprocessing spec.
        limits: per-image limits; None = :meth:`DecodeLimits.default`.

    Raises:
        ImageError: a per-image code.
    """
    limits = limits or DecodeLimits.default()
    return decode_image(read_file(path, limits.max_file_bytes), spec, limits)


@dataclass(frozen=True)
class DecodedBatch:
    """Outcome of decoding a list of images, each on its own.

    Attributes:
        arrays: ``(M, S, S, 3)`` uint8, the usable images in input order.
        positions: for each row of ``arrays``, its index in the input list.
        errors: input index -> why that image failed.
        count: number of inputs.
    """

    arrays: np.ndarray
    positions: list[int]
    errors: dict[int, ImageError]
    count: int


# observer(error code or None, seconds spent on that image)
DecodeObserver = Callable[[str | None, float], None]


def decode_batch(sources: Sequence[bytes | str | Path], spec: PreprocessSpec,
                 limits: DecodeLimits, *, observe: DecodeObserver | None = None) -> DecodedBatch:
    """Decode every input on its own (bytes are decoded, paths read with :func:`read_file`).

    Blocking (Pillow); run it in a worker thread from async code.

    Args:
        sources: encoded images or file paths, in order.
        spec: the model's preprocessing spec.
        limits: per-image limits.
        observe: called once per input with its error code (None when it worked) and the
            seconds it took (the service's decode metrics).

    Returns:
        The usable images stacked, their positions, and per-position errors.
    """
    arrays: list[np.ndarray] = []
    positions: list[int] = []
    errors: dict[int, ImageError] = {}
    for index, source in enumerate(sources):
        started = time.perf_counter()
        code = None
        try:
            data = source if isinstance(source, (bytes, bytearray, memoryview)) else \
                read_file(source, limits.max_file_bytes)
            arrays.append(decode_image(bytes(data), spec, limits))
            positions.append(index)
        except ImageError as exc:
            errors[index] = exc
            code = exc.code
        if observe is not None:
            observe(code, time.perf_counter() - started)
    size = spec.crop_size
    stacked = np.stack(arrays) if arrays else np.empty((0, size, size, 3), dtype=np.uint8)
    return DecodedBatch(arrays=stacked, positions=positions, errors=errors, count=len(sources))
