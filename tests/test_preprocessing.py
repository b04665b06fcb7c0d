"""Shared preprocessing: torchvision-equal geometry, mode conversion, decode errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from models.decode import DecodeLimits, decode_image, load_rgb
from models.errors import ImageError
from models.preprocessing import PreprocessSpec, resize_center_crop

SPEC = PreprocessSpec(resize_size=232, crop_size=224, interpolation="bilinear",
                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LIMITS = DecodeLimits.default()


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 1)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (224, 224), (1000, 231)])
def test_geometry_equals_torchvision_resize_center_crop(size):
    image = noise(*size)
    expected = v2.Compose([v2.Resize(SPEC.resize_size, antialias=True),
                           v2.CenterCrop(SPEC.crop_size)])(image)
    got = resize_center_crop(image, SPEC)
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.asarray(expected))


def test_real_photo_decodes(data_dir):
    path = sorted((data_dir / "val" / "ants").glob("*.jpg"))[0]
    array = decode_image(path.read_bytes(), SPEC, LIMITS)
    assert array.shape == (224, 224, 3) and array.std() > 5


def test_gif_first_frame(data_dir):
    data = (data_dir / "train" / "ants" / "imageNotFound.gif").read_bytes()
    assert Image.open(io.BytesIO(data)).format == "GIF"
    assert decode_image(data, SPEC, LIMITS).shape == (224, 224, 3)


def test_transparency_composited_over_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert load_rgb(encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("LA", (8, 8), (0, 128))
    value = load_rgb(encode(half, "PNG")).getpixel((0, 0))
    assert value[0] == value[1] == value[2] and 120 <= value[0] <= 135


def test_sixteen_bit_grayscale_uses_high_byte():
    array = np.full((8, 8), 0x8000, dtype=np.uint16)
    image = Image.fromarray(array)
    assert image.mode.startswith("I;16")
    assert load_rgb(encode(image, "PNG")).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied():
    image = noise(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    rotated = load_rgb(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert rotated.size == (20, 40)


def test_jpeg_draft_keeps_resize_target():
    data = encode(noise(2000, 1500), "JPEG", quality=90)
    image = load_rgb(data, draft_size=232)
    assert min(image.size) >= 232 and image.size[0] < 2000


@pytest.mark.parametrize("data,code", [
    (b"", "empty"),
    (b"hello, not an image", "not_an_image"),
    (b"%PDF-1.4\n1 0 obj\n", "not_an_image"),
])
def test_decode_errors(data, code):
    with pytest.raises(ImageError) as err:
        load_rgb(data)
    assert err.value.code == code


def test_truncated_jpeg():
    data = encode(noise(300, 300), "JPEG")
    with pytest.raises(ImageError) as err:
        load_rgb(data[: len(data) // 3])
    assert err.value.code == "truncated"


def test_pixel_limit():
    data = encode(Image.new("L", (1000, 1000)), "PNG")
    with pytest.raises(ImageError) as err:
        load_rgb(data, max_pixels=999_999)
    assert err.value.code == "too_many_pixels"


def test_with_crop_size_keeps_ratio():
    small = SPEC.with_crop_size(112)
    assert (small.crop_size, small.resize_size) == (112, 116)


def test_eval_normalisation_matches_torchvision_normalize():
    from training.data import normalize_uint8

    array = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    ours = normalize_uint8(torch.from_numpy(array), SPEC)
    theirs = v2.Normalize(list(SPEC.mean), list(SPEC.std))(
        torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(ours, theirs)
