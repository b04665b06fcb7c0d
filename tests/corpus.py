"""A corpus of damaged, hostile and odd image inputs, made at test time from real photos.

Every entry is built with Pillow (plus byte surgery: truncation, patched headers, one flipped
byte) from a real val photo of the sample data, deterministically: the same photo and the same
Pillow give the same bytes. ``tests/test_error_corpus.py`` sends each entry beside a good photo
down every path of the service and checks all paths give it the same per-image code.

The expected answer of an entry is what the one decode function says,
``models.decode.decode_image(data, spec, DecodeLimits.default())`` (:func:`reference`): an
error code of ``models.errors``, or :data:`OK` when it decodes. Entries whose answer is not a
matter of decoder details also state it (:attr:`Kind.certain`), so the reference itself is
checked (``test_reference_agrees_with_the_certain_answers``); the others (a JPEG cut after 12
bytes may raise in one Pillow call or another)
take the reference's answer. A file that starts with a served format's signature but
cannot be opened is ``truncated``.

Not a test module (no ``test_`` prefix): imported by the tests.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from models.decode import DecodeLimits, decode_image
from models.errors import IMAGE_ERROR_CODES, ImageError
from models.preprocessing import PreprocessSpec

#: The expectation of an entry that must decode (and be embedded).
OK = "ok"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ the photos it is made of
def good_photo(data_dir: Path) -> Path:
    """The good photo every request carries beside the bad input (first val ant)."""
    return sorted((data_dir / "val" / "ants").glob("*.jpg"))[0]


def source_photo(data_dir: Path) -> Path:
    """The real photo the damaged inputs are made from (first val bee, a camera JPEG)."""
    return sorted((data_dir / "val" / "bees").glob("*.jpg"))[0]


@dataclass
class Sources:
    """The source photo, as its original file and re-encoded by Pillow (cached)."""

    jpeg: bytes  # the original camera JPEG file, byte for byte
    _cache: dict[str, object] = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        """The photo decoded to RGB."""
        if "image" not in self._cache:
            self._cache["image"] = Image.open(io.BytesIO(self.jpeg)).convert("RGB")
        return self._cache["image"]  # type: ignore[return-value]

    def encoded(self, fmt: str, **kwargs) -> bytes:
        """The photo saved as ``fmt`` (Pillow format name) with ``kwargs``, cached."""
        key = f"{fmt}{sorted(kwargs.items())}"
        if key not in self._cache:
            self._cache[key] = encode(self.image, fmt, **kwargs)
        return self._cache[key]  # type: ignore[return-value]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    """``image`` saved with Pillow as ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# ------------------------------------------------------------------ byte surgery
def jpeg_scan_start(data: bytes) -> int:
    """Offset of the first byte of entropy-coded data: just after the first SOS header."""
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"not a JPEG marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xDA:  # SOS
            return pos + 2 + length
        pos += 2 + length
    raise ValueError("no SOS marker")


def jpeg_sof(data: bytes) -> int:
    """Offset of the first start-of-frame marker (SOF0..SOF2)."""
    pos = 2
    while pos + 4 <= len(data):
        marker = data[pos + 1]
        if marker in (0xC0, 0xC1, 0xC2):
            return pos
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    raise ValueError("no SOF marker")


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header declaring ``width`` x ``height`` (at most 65535)."""
    sof = jpeg_sof(data)
    # SOF: FF Cn, length(2), precision(1), height(2), width(2), ...
    return data[:sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


def jpeg_flip_entropy_byte(data: bytes) -> bytes:
    """The JPEG with one byte in the middle of its entropy-coded data changed (XOR 0x55),
    never touching a 0xFF byte or its neighbours, so no marker is made or destroyed."""
    start, end = jpeg_scan_start(data), len(data) - 2  # before EOI
    pos = (start + end) // 2
    while data[pos] == 0xFF or data[pos - 1] == 0xFF or data[pos + 1] == 0xFF \
            or data[pos] ^ 0x55 == 0xFF:
        pos += 1
    return data[:pos] + bytes([data[pos] ^ 0x55]) + data[pos + 1:]


def png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """``(type, offset of the chunk, length of its data)`` for every chunk of a PNG."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        chunks.append((data[pos + 4:pos + 8], pos, length))
        pos += 12 + length
    return chunks


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + \
        struct.pack(">I", zlib.crc32(kind + payload))


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR declaring ``width`` x ``height`` (CRC recomputed): a small file
    that claims a huge pixel count (what a decompression bomb looks like from outside)."""
    kind, offset, length = png_chunks(data)[0]
    assert kind == b"IHDR"
    ihdr = data[offset + 8:offset + 8 + length]
    patched = struct.pack(">II", width, height) + ihdr[8:]
    return data[:offset] + png_chunk(b"IHDR", patched) + data[offset + 12 + length:]


def png_cut_mid_idat(data: bytes) -> bytes:
    """The PNG cut in the middle of its first IDAT chunk's data."""
    kind, offset, length = next(c for c in png_chunks(data) if c[0] == b"IDAT")
    return data[:offset + 8 + length // 2]


def png_flip_idat_byte(data: bytes) -> bytes:
    """The PNG with one byte of its first IDAT data changed (its CRC no longer matches)."""
    kind, offset, length = next(c for c in png_chunks(data) if c[0] == b"IDAT")
    pos = offset + 8 + length // 2
    return data[:pos] + bytes([data[pos] ^ 0x55]) + data[pos + 1:]


def exif_rotated(image: Image.Image) -> bytes:
    """A JPEG stored sideways with EXIF orientation 6 ("rotate 90 CW to display")."""
    stored = image.resize((300, 200)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def transparent_palette(image: Image.Image) -> bytes:
    """A palette PNG whose tRNS gives every palette entry its own alpha (Pillow opens it as
    P with a transparency table; converting it gives PA/RGBA)."""
    small = image.resize((96, 72)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    small.info["transparency"] = bytes(range(0, 256, 4))
    return encode(small, "PNG")


# ------------------------------------------------------------------ the corpus
@dataclass(frozen=True)
class Kind:
    """One kind of input.

    Attributes:
        id: the pytest id.
        filename: a plausible file name (what a client would upload, what a batch job reads).
        build: the bytes, from the source photo.
        certain: the answer that does not depend on decoder details (an error code or
            :data:`OK`); None = whatever :func:`reference` says.
    """

    id: str
    filename: str
    build: Callable[[Sources], bytes]
    certain: str | None = None


def _cut(fraction_or_bytes: float | int, of: Callable[[Sources], bytes]
         ) -> Callable[[Sources], bytes]:
    def build(src: Sources) -> bytes:
        data = of(src)
        cut = fraction_or_bytes if isinstance(fraction_or_bytes, int) else \
            int(len(data) * fraction_or_bytes)
        assert 0 < cut < len(data), (cut, len(data))
        return data[:cut]
    return build


def _jpeg(src: Sources) -> bytes:
    return src.jpeg


def _webp(src: Sources) -> bytes:
    return src.encoded("WEBP", quality=80)


def _png(src: Sources) -> bytes:
    return src.encoded("PNG")


def _gif(src: Sources) -> bytes:
    return src.encoded("GIF")


def _progressive(src: Sources) -> bytes:
    return src.encoded("JPEG", quality=90, progressive=True)


def _one_bit_png(src: Sources) -> bytes:
    return encode(Image.new("1", (64, 64)), "PNG")


def _sixteen_bit(src: Sources) -> bytes:
    gray = np.asarray(src.image.convert("L"), np.uint16) * 257
    return encode(Image.fromarray(gray), "PNG")  # mode I;16


def _gray_alpha(src: Sources) -> bytes:
    la = src.image.convert("LA")
    la.putalpha(Image.linear_gradient("L").resize(la.size))
    return encode(la, "PNG")


def _small(src: Sources, fmt: str, size: tuple[int, int] = (32, 32)) -> bytes:
    return encode(src.image.resize(size), fmt)


CORPUS: tuple[Kind, ...] = (
    # --- truncated / damaged JPEG (the original camera file)
    Kind("jpeg-cut-12", "cut-12.jpg", _cut(12, _jpeg), "truncated"),
    Kind("jpeg-cut-40", "cut-40.jpg", _cut(40, _jpeg)),
    Kind("jpeg-cut-200", "cut-200.jpg", _cut(200, _jpeg)),
    Kind("jpeg-cut-third", "cut-third.jpg", _cut(1 / 3, _jpeg), "truncated"),
    Kind("jpeg-cut-two-thirds", "cut-two-thirds.jpg", _cut(2 / 3, _jpeg), "truncated"),
    Kind("jpeg-header-only", "header-only.jpg", lambda s: s.jpeg[:jpeg_scan_start(s.jpeg)],
         "truncated"),
    Kind("jpeg-progressive-cut-half", "progressive-cut.jpg", _cut(1 / 2, _progressive)),
    Kind("jpeg-no-eoi", "no-eoi.jpg", lambda s: s.jpeg[:-2]),
    Kind("jpeg-flipped-entropy-byte", "flipped-byte.jpg",
         lambda s: jpeg_flip_entropy_byte(s.jpeg)),
    Kind("jpeg-wrong-magic", "wrong-magic.jpg", lambda s: b"\0\0\0\0" + s.jpeg[4:],
         "not_an_image"),
    # --- truncated WebP, PNG, GIF, BMP, TIFF (Pillow re-encodings of the photo)
    Kind("webp-cut-40", "cut-40.webp", _cut(40, _webp), "truncated"),
    Kind("webp-cut-200", "cut-200.webp", _cut(200, _webp), "truncated"),
    Kind("webp-cut-third", "cut-third.webp", _cut(1 / 3, _webp)),
    Kind("png-cut-after-ihdr", "cut-after-ihdr.png", _cut(len(PNG_SIGNATURE) + 25, _png), "truncated"),
    Kind("png-cut-mid-idat", "cut-mid-idat.png", lambda s: png_cut_mid_idat(_png(s)),
         "truncated"),
    Kind("png-bad-idat-crc", "bad-crc.png", lambda s: png_flip_idat_byte(_png(s))),
    Kind("gif-cut-half", "cut-half.gif", _cut(1 / 2, _gif)),
    Kind("bmp-cut-half", "cut-half.bmp", _cut(1 / 2, lambda s: s.encoded("BMP"))),
    Kind("tiff-cut-half", "cut-half.tiff", _cut(1 / 2, lambda s: s.encoded("TIFF"))),
    # --- not images at all
    Kind("zero-bytes", "zero.jpg", lambda s: b"", "empty"),
    Kind("random-bytes", "random.jpg",
         lambda s: np.random.default_rng(20240601).bytes(4096)),
    Kind("text", "notes.jpg", lambda s: b"these are notes, not pixels\n" * 8, "not_an_image"),
    Kind("pdf-header", "doc.pdf",
         lambda s: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"
                   b"trailer\n<< /Root 1 0 R >>\n%%EOF\n", "not_an_image"),
    Kind("html", "page.png", lambda s: b"<!doctype html><html><body><img src=x></body></html>",
         "not_an_image"),
    # --- decompression bombs: small files, huge declared pixel counts
    Kind("bomb-png-7000", "bomb-7000.png",
         lambda s: png_with_size(_one_bit_png(s), 7000, 7000), "too_many_pixels"),
    Kind("bomb-png-10000", "bomb-10000.png",
         lambda s: png_with_size(_one_bit_png(s), 10_000, 10_000), "too_many_pixels"),
    # 400 Mpx: past 2x Pillow's MAX_IMAGE_PIXELS, where Image.open itself raises
    Kind("bomb-png-20000", "bomb-20000.png",
         lambda s: png_with_size(_one_bit_png(s), 20_000, 20_000), "too_many_pixels"),
    Kind("bomb-jpeg-60000", "bomb-60000.jpg",
         lambda s: jpeg_with_size(s.jpeg, 60_000, 60_000), "too_many_pixels"),
    # --- too small
    Kind("tiny-4x4", "tiny.png", lambda s: _small(s, "PNG", (4, 4)), "too_small"),
    Kind("thin-7px", "thin.jpg", lambda s: _small(s, "JPEG", (300, 7)), "too_small"),
    # --- images in formats the service does not serve
    Kind("ico", "icon.ico", lambda s: _small(s, "ICO"), "unsupported_format"),
    Kind("ppm", "photo.ppm", lambda s: _small(s, "PPM"), "unsupported_format"),
    Kind("tga", "photo.tga", lambda s: _small(s, "TGA"), "unsupported_format"),
    Kind("pcx", "photo.pcx", lambda s: _small(s, "PCX"), "unsupported_format"),
    Kind("qoi", "photo.qoi", lambda s: _small(s, "QOI"), "unsupported_format"),
    Kind("sgi", "photo.sgi", lambda s: _small(s, "SGI"), "unsupported_format"),
    # --- odd but valid: these must work
    Kind("cmyk-jpeg", "cmyk.jpg", lambda s: encode(s.image.convert("CMYK"), "JPEG", quality=90),
         OK),
    Kind("png-16-bit", "sixteen.png", _sixteen_bit, OK),
    Kind("png-gray-alpha", "gray-alpha.png", _gray_alpha, OK),
    Kind("png-palette-alpha", "palette-alpha.png", lambda s: transparent_palette(s.image), OK),
    Kind("gif-transparent", "transparent.gif",
         lambda s: encode(s.image.resize((96, 72)).convert("P"), "GIF", transparency=0), OK),
    Kind("png-1-bit", "one-bit.png", lambda s: encode(s.image.convert("1"), "PNG"), OK),
    Kind("jpeg-exif-rotated", "exif-rotated.jpg", lambda s: exif_rotated(s.image), OK),
    Kind("png-8x8-smallest-ok", "eight.png", lambda s: _small(s, "PNG", (8, 8)), OK),
)
IDS: tuple[str, ...] = tuple(k.id for k in CORPUS)
BY_ID: dict[str, Kind] = {k.id: k for k in CORPUS}
assert len(BY_ID) == len(CORPUS), "corpus ids must be unique"
assert len({k.filename for k in CORPUS}) == len(CORPUS), "corpus file names must be unique"


def build_corpus(data_dir: Path) -> dict[str, bytes]:
    """``{id: bytes}`` of every entry, made from :func:`source_photo` of ``data_dir``."""
    src = Sources(source_photo(data_dir).read_bytes())
    return {k.id: k.build(src) for k in CORPUS}


def reference(data: bytes, spec: PreprocessSpec, limits: DecodeLimits | None = None) -> str:
    """What the one decode function makes of ``data``: an error code, or :data:`OK`."""
    try:
        with warnings.catch_warnings():  # the 10000x10000 bomb is past Pillow's warning line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            array = decode_image(data, spec, limits or DecodeLimits.default())
    except ImageError as exc:
        assert exc.code in IMAGE_ERROR_CODES, exc.code
        return exc.code
    assert array.shape == (spec.crop_size, spec.crop_size, 3) and array.dtype == np.uint8
    return OK
