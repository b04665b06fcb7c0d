"""Post-processing of model outputs, one copy for every path: softmax, top-k, L2, cosine,
vector packing (float16 / base64).

Torch-free: numpy (and orjson for JSON numbers).
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
import orjson

VectorDType = Literal["float32", "float16"]
VectorEncoding = Literal["list", "base64"]
_WIRE_DTYPE = {"float32": "<f4", "float16": "<f2"}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (numerically stable: the row maximum is subtracted first).

    Args:
        logits: ``(N, K)`` class scores, any float dtype.

    Returns:
        ``(N, K)`` float64 probabilities, each row summing to 1.
    """
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest values per row, descending.

    Args:
        scores: ``(N, K)`` any numeric dtype.
        k: how many per row; clamped to ``K``.

    Returns:
        ``(N, min(k, K))`` int64; ties keep the lower index first (stable sort).
    """
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def l2_normalize(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero.

    Args:
        matrix: ``(N, D)`` any float dtype.

    Returns:
        ``(N, D)`` float32, L2-normalised.
    """
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``.

    Args:
        a, b: ``(N, D)`` any float dtype, same shape.

    Returns:
        ``(N,)`` float64 in [-1, 1]; identical rows (including two zero rows) give 1.0.
    """
    a, b = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    same = np.all(a == b, axis=1)
    return np.where(same, 1.0, (a * b).sum(1) / np.maximum(denom, 1e-300))


def prepare_vectors(matrix: np.ndarray, *, normalize: bool,
                    dtype: VectorDType = "float32") -> np.ndarray:
    """CNN codes as they are returned or stored: optionally L2-normalised, then rounded.

    Args:
        matrix: ``(N, D)`` float32 model output (``embedding`` or ``features``).
        normalize: scale rows to unit L2 norm first (computed in float32).
        dtype: ``float32`` or ``float16`` (rounded after normalising).

    Returns:
        ``(N, D)`` little-endian ``float32`` or ``float16``.
    """
    matrix = l2_normalize(matrix) if normalize else matrix.astype(np.float32, copy=False)
    return matrix.astype(_WIRE_DTYPE[dtype], copy=False)


def json_bytes(document: Any) -> bytes:
    """A JSON document (dicts, lists, str, int, float, bool, None and numpy arrays) as UTF-8
    JSON text, the one JSON writer of answers that carry numbers from the model.

    numpy arrays are written by orjson's numpy serializer (``OPT_SERIALIZE_NUMPY``): float32
    with Ryu's shortest float32 form, float16 via float32, so each number is the shortest
    decimal that reads back, cast to the array's dtype, to the identical bits.
    ``ndarray.tolist()`` widens float32 to float64, whose shortest decimal carries 17
    significant digits of which 8-9 are the widening's noise: a 1,280-dim float32 embedding was
    27,168 bytes of JSON that way and is 15,984 this way (measured on a unit-norm random
    vector). NaN and infinities become ``null`` (as pydantic's JSON does). Source:
    https://github.com/ijl/orjson#numpy

    Writing the ``/embed`` answer this way, straight from the numpy rows, took 49-51 us of CPU
    per one-image answer where building the pydantic response model from Python floats and
    ``model_dump_json`` took 253-291 us (``/tmp/exp/answer.py`` of 2026-12-02, 2,000 answers,
    ``time.thread_time``; README "Performance").

    Raises:
        TypeError: (``orjson.JSONEncodeError``) a value orjson cannot write.
    """
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


def json_numbers(values: np.ndarray) -> list:
    """Flattened elements of ``values`` as Python numbers whose JSON text is the shortest
    decimal that reads back as the same value *of the array's own dtype* (see
    :func:`json_bytes`): reading that text back gives floats whose own shortest form is the
    same text, so pydantic and ``json`` keep it. For documents built as Python objects (the
    KServe v2 JSON tensors); answers written with :func:`json_bytes` carry the array itself.
    Integer and float64 arrays come out as ``tolist()``.

    Args:
        values: any shape, float16 / float32 / float64 or integer dtype.

    Returns:
        ``list`` of ``values.size`` ints or floats, row-major.
    """
    flat = np.ascontiguousarray(values).reshape(-1)
    if flat.dtype in (np.float32, np.float16):
        return orjson.loads(json_bytes(flat))
    return flat.tolist()


def encode_vector(row: np.ndarray, encoding: VectorEncoding) -> np.ndarray | str:
    """One vector as a value of a JSON answer written by :func:`json_bytes`.

    Args:
        row: ``(D,)`` from :func:`prepare_vectors`.
        encoding: ``list`` (the row itself, C-contiguous, which :func:`json_bytes` writes as
            numbers, each the shortest decimal of its float32 / float16 value) or ``base64``
            (RFC 4648, standard alphabet, padded, of the little-endian bytes).

    Returns:
        ``(D,)`` ndarray of ``row``'s dtype, or an ASCII base64 string of ``D * itemsize``
        bytes.
    """
    if encoding == "base64":
        return base64.b64encode(row.tobytes()).decode("ascii")
    return np.ascontiguousarray(row)


def decode_vector(text: str, dtype: VectorDType = "float32") -> np.ndarray:
    """Inverse of :func:`encode_vector` for ``base64``: ``(D,)`` of ``dtype``.

    Raises:
        binascii.Error: not valid base64.
    """
    return np.frombuffer(base64.b64decode(text), dtype=_WIRE_DTYPE[dtype])
