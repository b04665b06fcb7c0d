"""A precision variant checked against its fp32 reference on real images before it is published.

Both models run on the same preprocessed photos (the one decode, :mod:`models.decode`) through
the one session factory (:func:`models.runtime.open_session`); the figures (embedding and
features cosine, top-1 agreement, probability difference) use :mod:`models.postprocess`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from models.card import INPUT_NAME, OUTPUT_NAMES, VariantCheck
from models.decode import DecodeLimits, decode_batch
from models.postprocess import cosine_rows, softmax
from models.preprocessing import PreprocessSpec
from models.runtime import SessionConfig, open_session

logger = logging.getLogger(__name__)


class VariantRejectedError(RuntimeError):
    """A precision variant missed a threshold against its fp32 reference; nothing published.

    Attributes:
        check: the measured figures.
        failures: one line per missed threshold, naming the metric and the setting.
    """

    def __init__(self, check: VariantCheck, failures: list[str]) -> None:
        self.check = check
        self.failures = failures
        super().__init__(
            f"{check.precision} variant not published: it differs from fp32 on "
            f"{check.n_images} images beyond the thresholds: " + "; ".join(failures))


@dataclass(frozen=True)
class VariantThresholds:
    """What a variant must meet against its fp32 reference (settings ``CNN_CODES_VARIANT_*``).

    Attributes:
        min_cosine: smallest allowed *mean* embedding cosine similarity.
        min_cosine_floor: smallest allowed per-image (worst) embedding cosine.
        min_top1_agreement: smallest allowed fraction of images with the same arg-max class.
        max_prob_diff: largest allowed absolute difference of any softmax probability.
    """

    min_cosine: float = 0.99
    min_cosine_floor: float = 0.80
    min_top1_agreement: float = 0.98
    max_prob_diff: float = 0.05

    @classmethod
    def from_settings(cls, settings) -> "VariantThresholds":
        """The thresholds held by a :class:`cnn_codes.settings.Settings` object."""
        return cls(min_cosine=settings.variant_min_cosine,
                   min_cosine_floor=settings.variant_min_cosine_floor,
                   min_top1_agreement=settings.variant_min_top1_agreement,
                   max_prob_diff=settings.variant_max_prob_diff)

    def failures(self, check: VariantCheck) -> list[str]:
        """One message per missed threshold (empty = the variant passes)."""
        out = []
        if check.embedding_cosine_mean < self.min_cosine:
            out.append(f"embedding_cosine_mean {check.embedding_cosine_mean:.6f} < "
                       f"{self.min_cosine} (CNN_CODES_VARIANT_MIN_COSINE)")
        if check.embedding_cosine_min < self.min_cosine_floor:
            out.append(f"embedding_cosine_min {check.embedding_cosine_min:.6f} < "
                       f"{self.min_cosine_floor} (CNN_CODES_VARIANT_MIN_COSINE_FLOOR)")
        if check.top1_agreement < self.min_top1_agreement:
            out.append(f"top1_agreement {check.top1_agreement:.4f} < "
                       f"{self.min_top1_agreement} (CNN_CODES_VARIANT_MIN_TOP1_AGREEMENT)")
        if check.max_prob_diff > self.max_prob_diff:
            out.append(f"max_prob_diff {check.max_prob_diff:.6f} > "
                       f"{self.max_prob_diff} (CNN_CODES_VARIANT_MAX_PROB_DIFF)")
        return out


def load_images(paths: Iterable[Path], spec: PreprocessSpec) -> tuple[np.ndarray, list[Path]]:
    """Decode and preprocess image files exactly as serving does (:func:`models.decode.decode_batch`).

    Returns:
        ``(N, S, S, 3)`` uint8 array and the paths that decoded (undecodable ones are logged
        and skipped).

    Raises:
        ValueError: no image decoded.
    """
    paths = [Path(p) for p in paths]
    decoded = decode_batch(paths, spec, DecodeLimits.default())
    for index, error in sorted(decoded.errors.items()):
        logger.warning("skipping %s (%s)", paths[index], error)
    if not decoded.positions:
        raise ValueError("no decodable images")
    return decoded.arrays, [paths[i] for i in decoded.positions]


def sample_paths(paths: Sequence[Path], limit: int | None, *, seed: int = 0) -> list[Path]:
    """At most ``limit`` of ``paths``, a seeded random sample (so every class is represented
    when the folder is sorted by class), in sorted order."""
    paths = sorted(paths)
    if limit is None or len(paths) <= limit:
        return paths
    return sorted(random.Random(seed).sample(paths, limit))


def check_interface(reference: Path, variant: Path) -> None:
    """The variant has the reference's input/output names, element types and shapes
    (including the symbolic batch axis).

    Raises:
        ValueError: naming the first difference.
    """
    import onnx

    def signature(path: Path) -> list[tuple]:
        graph = onnx.load(str(path), load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        rows = []
        for kind, values in (("input", [v for v in graph.input if v.name not in inits]),
                             ("output", graph.output)):
            for v in values:
                t = v.type.tensor_type
                dims = tuple(d.dim_param and "dyn" or d.dim_value for d in t.shape.dim)
                rows.append((kind, v.name, onnx.TensorProto.DataType.Name(t.elem_type), dims))
        return rows

    want, got = signature(reference), signature(variant)
    if want != got:
        raise ValueError(f"{variant} changed the model interface: {got} instead of {want}")


def compare_variant(reference: Path, variant: Path, images: np.ndarray, *, precision: str,
                    providers: Sequence[str] = ("cpu",), batch_size: int = 16,
                    source: str = "") -> VariantCheck:
    """Run the fp32 reference and a variant on the same images and compare their outputs.

    Args:
        reference: the fp32 model.
        variant: the int8 / fp16 model.
        images: ``(N, S, S, 3)`` uint8 preprocessed real images.
        providers: short names of the variant's execution providers (see
            :func:`models.runtime.select_providers`); the reference runs on CPU.

    Returns:
        Embedding and features cosine (mean, min), top-1 agreement, max probability
        difference and max absolute difference per output.
    """
    ref_session = open_session(reference)
    var_session = open_session(variant, SessionConfig(providers=tuple(providers)))
    names = list(OUTPUT_NAMES)
    cos = {"embedding": [], "features": []}
    agree, max_prob, max_abs = 0, 0.0, dict.fromkeys(names, 0.0)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        ref = dict(zip(names, ref_session.run(names, {INPUT_NAME: batch})))
        got = dict(zip(names, var_session.run(names, {INPUT_NAME: batch})))
        for name in names:
            max_abs[name] = max(max_abs[name], float(np.abs(ref[name] - got[name]).max()))
        for name in cos:
            cos[name].extend(cosine_rows(ref[name], got[name]).tolist())
        agree += int((ref["logits"].argmax(1) == got["logits"].argmax(1)).sum())
        max_prob = max(max_prob, float(np.abs(softmax(ref["logits"])
                                              - softmax(got["logits"])).max()))
    return VariantCheck(
        precision=precision, n_images=len(images),
        embedding_cosine_mean=float(np.mean(cos["embedding"])),
        embedding_cosine_min=float(np.min(cos["embedding"])),
        features_cosine_mean=float(np.mean(cos["features"])),
        features_cosine_min=float(np.min(cos["features"])),
        top1_agreement=agree / len(images), max_prob_diff=max_prob, max_abs_diff=max_abs,
        provider=var_session.get_providers()[0], source=source,
    )


def thresholds_dict(thresholds: VariantThresholds) -> dict[str, float]:
    """The thresholds as a plain dict (recorded in the card)."""
    return asdict(thresholds)
