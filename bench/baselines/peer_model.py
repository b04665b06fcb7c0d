"""What the Triton and Ray Serve replicas run: this repository's decode and the served ONNX model.

Both peers serve exactly what ``/embed?layer=embedding&normalize=true`` of our service answers:
:func:`models.decode.decode_image` with the service's :class:`~models.decode.DecodeLimits` and
the model card's preprocessing, then onnxruntime on the published ``model.onnx`` through
:meth:`models.runtime.OnnxEncoder.create` (the session options of the service's Encoder: all
cores for intra-op threads, full graph optimisation, no spinning, from the same
``CNN_CODES_*`` settings), then the L2-normalised ``embedding`` output. Only the serving
framework around these calls differs, which is what the comparison is about.

Imports numpy, Pillow, pydantic(-settings) and onnxruntime only, so it runs in the peers' own
virtual environments (``bench/.venv-triton``, ``bench/.venv-ray-serve``) with the repository on
``PYTHONPATH``.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from models.decode import DecodeLimits, decode_image
from models.postprocess import prepare_vectors
from models.preprocessing import PreprocessSpec
from models.runtime import OnnxEncoder, split_outputs

logger = logging.getLogger(__name__)


@dataclass
class PeerModel:
    """The served model as a peer's replica holds it.

    Attributes:
        encoder: the onnxruntime session over the published version.
        spec: the card's preprocessing (resize, crop, interpolation).
        limits: per-image limits of the service's settings.
        decode_threads: threads :meth:`decode_many` spreads a batch over (Pillow releases the
            GIL while it decodes).
    """

    encoder: OnnxEncoder
    spec: PreprocessSpec
    limits: DecodeLimits
    decode_threads: int = 1
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    @classmethod
    def load(cls, repository: str | Path, name: str, version: int | str,
             decode_threads: int = 1) -> "PeerModel":
        """Verify and open ``name:version`` of ``repository`` with the service's settings.

        Raises:
            models.repository.ModelIntegrityError: a damaged or unknown model version.
        """
        from cnn_codes.settings import Settings
        from models.repository import resolve
        from models.runtime import SessionConfig

        settings = Settings()
        published = resolve(repository, name, version)
        encoder = OnnxEncoder.create(str(published.onnx_path), published.card,
                                     SessionConfig.from_settings(settings))
        logger.info("peer model %s:%d on %s", published.card.name, published.card.version,
                    encoder.provider)
        return cls(encoder=encoder, spec=published.card.preprocessing,
                   limits=DecodeLimits.from_settings(settings), decode_threads=decode_threads)

    def decode(self, data: bytes) -> np.ndarray:
        """One encoded image -> ``(S, S, 3)`` uint8 (raises :class:`models.errors.ImageError`)."""
        return decode_image(data, self.spec, self.limits)

    def decode_many(self, payloads: Sequence[bytes]) -> np.ndarray:
        """Encoded images -> ``(N, S, S, 3)`` uint8, decoded on ``decode_threads`` threads.

        Raises:
            models.errors.ImageError: the first image that does not decode.
        """
        if self.decode_threads <= 1 or len(payloads) == 1:
            return np.stack([self.decode(p) for p in payloads])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        return np.stack(list(self._pool.map(self.decode, payloads)))

    def embed(self, images: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 -> ``(N, D)`` float32 L2-normalised CNN codes (one run)."""
        packed = self.encoder.run(images)
        return prepare_vectors(split_outputs(packed, self.encoder.card)["embedding"],
                               normalize=True)
