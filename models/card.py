"""The model card: everything needed to use an exported model, stored next to the ONNX file.

Torch-free: the service reads it. Written by ``export/``, read by ``service/`` and by batch
jobs. Layout of a published model (like Triton's model repository)::

    <repository>/<name>/<version>/model.onnx
    <repository>/<name>/<version>/model_card.json
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.preprocessing import PreprocessSpec

CARD_FILENAME = "model_card.json"
ONNX_FILENAME = "model.onnx"
OUTPUT_NAMES: tuple[str, str, str] = ("logits", "embedding", "features")
INPUT_NAME = "images"


class TensorSpec(BaseModel):
    """One graph input or output: name, dtype and shape (``-1`` = dynamic batch)."""

    model_config = ConfigDict(frozen=True)

    name: str
    dtype: Literal["uint8", "float32", "float16"]
    shape: tuple[int, ...]
    description: str = ""


class ParityReport(BaseModel):
    """onnxruntime vs torch on the same real images, measured at export time.

    Attributes:
        n_images: images compared.
        max_abs_diff: per output name, the max absolute element difference.
        embedding_cosine_min: smallest cosine similarity of the embeddings (unitless).
        embedding_cosine_mean: mean cosine similarity of the embeddings.
        top1_agreement: fraction of images whose arg-max class agrees.
        source: where the images came from.
    """

    n_images: int
    max_abs_diff: dict[str, float]
    embedding_cosine_min: float
    embedding_cosine_mean: float
    top1_agreement: float
    source: str


class VariantCheck(BaseModel):
    """A precision variant (int8, fp16) compared with its fp32 reference on real images.

    Measured by ``cnn-codes export --precision`` before publishing; a variant that misses the
    thresholds (settings ``CNN_CODES_VARIANT_*``, recorded in ``thresholds``) is not published.

    Attributes:
        precision: the variant's precision.
        reference: what it was compared with (the fp32 export of the same checkpoint, itself
            checked against torch: the card's ``parity``).
        reference_onnx_sha256: sha256 of that fp32 ONNX file.
        n_images: images compared.
        embedding_cosine_mean / embedding_cosine_min: cosine similarity of the ``embedding``
            outputs, mean and worst image.
        features_cosine_mean / features_cosine_min: the same for ``features``.
        top1_agreement: fraction of images whose arg-max class is the same.
        max_prob_diff: largest absolute difference of any softmax probability.
        max_abs_diff: per output name, the max absolute element difference.
        provider: onnxruntime execution provider the variant ran on for the check.
        source: where the images came from.
        thresholds: the thresholds it was held to.
        conversion: how the variant was made (quantiser, calibration images, float nodes...).
    """

    precision: Literal["fp32", "fp16", "int8"]
    reference: str = "fp32"
    reference_onnx_sha256: str = ""
    n_images: int
    embedding_cosine_mean: float
    embedding_cosine_min: float
    features_cosine_mean: float | None = None
    features_cosine_min: float | None = None
    top1_agreement: float
    max_prob_diff: float
    max_abs_diff: dict[str, float] = Field(default_factory=dict)
    provider: str = "CPUExecutionProvider"
    source: str = ""
    thresholds: dict[str, float] = Field(default_factory=dict)
    conversion: dict[str, Any] = Field(default_factory=dict)


class ModelCard(BaseModel):
    """Self-description of an exported CNN-codes model (JSON next to ``model.onnx``).

    The input is ``images`` uint8 ``(N, S, S, 3)`` RGB with ``S = preprocessing.crop_size``;
    outputs are ``logits (N, K)``, ``embedding (N, D)`` (penultimate layer) and
    ``features (N, C)`` (globally average-pooled conv output), all float32.
    """

    schema_version: Literal[1] = 1
    name: str
    version: int = Field(ge=1)
    backbone: str
    weights_source: str
    class_names: list[str]
    preprocessing: PreprocessSpec
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    onnx_sha256: str
    onnx_bytes: int
    training: dict[str, float | int | str | None] = Field(default_factory=dict)
    parity: ParityReport | None = None
    # precision variants (int8, fp16) only: the check against the fp32 reference. ``parity``
    # of a variant's card is the fp32 reference's (onnxruntime fp32 vs torch).
    variant_check: VariantCheck | None = None
    # retrieval quality of the codes (val queries vs the train gallery): kNN accuracy at k,
    # mAP, and what a constant guess / random ranking score (export/retrieval_figures.py)
    retrieval: dict[str, Any] | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    def output(self, name: str) -> TensorSpec:
        """The output called ``name``.

        Raises:
            KeyError: no such output.
        """
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(f"model has no output {name!r}; outputs: {[o.name for o in self.outputs]}")

    def dim(self, name: str) -> int:
        """Width of a 2-D output (``K``, ``D`` or ``C``)."""
        return self.output(name).shape[-1]

    def public(self) -> dict:
        """The part shown to clients by ``GET /metadata`` (JSON-serialisable).

        The card itself keeps where the model was trained (``training.run_dir``, an absolute
        path on the build machine, read by ``cnn-codes viz`` to find the run); clients see only
        the run's folder name, never the build machine's file system.
        """
        shown = self.model_dump(mode="json")
        run_dir = (shown.get("training") or {}).get("run_dir")
        if run_dir:
            shown["training"]["run_dir"] = Path(run_dir).name
        return shown


def compatibility_problems(current: ModelCard, candidate: ModelCard) -> list[str]:
    """Why ``candidate`` cannot replace ``current`` without clients noticing (empty = it can).

    A hot swap keeps requests in flight valid only if the name, preprocessing (input size),
    input/output shapes and class names are the same; a different version number, weights,
    training figures or precision are what a new version is for.
    """
    problems = []
    for field in ("name", "preprocessing", "inputs", "outputs", "class_names"):
        if getattr(current, field) != getattr(candidate, field):
            problems.append(f"{field} differs")
    return problems


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk_bytes`` pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
