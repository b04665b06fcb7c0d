"""Checkpoint -> self-describing ONNX model -> model repository.

The graph takes ``images``: uint8 ``(N, S, S, 3)`` RGB (dynamic N) and returns ``logits (N, K)``,
``embedding (N, D)`` and ``features (N, C)`` float32. Casting, scaling and mean/std
normalisation are inside the graph. Every export runs ``onnx.checker`` and compares
onnxruntime with torch on real images before publishing (timm's rule: an export checks itself).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export.quantize import (PRECISIONS, Int8Options, VariantRejectedError, VariantThresholds,
                             compare_variant, load_images, make_variant, sample_paths,
                             thresholds_dict)
from export.retrieval_figures import retrieval_figures
from models.card import (INPUT_NAME, OUTPUT_NAMES, ModelCard, ParityReport, TensorSpec,
                         VariantCheck, sha256_file)
from models.postprocess import cosine_rows
from models.preprocessing import PreprocessSpec
from models.runtime import open_session
from models.backbones.registry import CNNCodeModel, get_backbone_info
from models.repository import PublishedModel, publish
from training.config import CONFIG_FILENAME, TrainConfig
from training.data import normalize_uint8
from training.trainer import load_model, resolve_checkpoint

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


class ExportError(RuntimeError):
    """Export failed a check (checker, parity); nothing was published."""


@dataclass(frozen=True)
class ParityThresholds:
    """What an fp32 export must meet against torch to be published."""

    min_cosine: float = 0.9999
    min_top1_agreement: float = 1.0
    max_abs_diff_logits: float = 1e-3


class UInt8Normalized(nn.Module):
    """Wraps a :class:`CNNCodeModel` so it takes ``(N, H, W, 3)`` uint8 RGB.

    Returns the tuple ``(logits, embedding, features)``, float32.
    """

    def __init__(self, model: CNNCodeModel, spec: PreprocessSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, H, W, 3)`` uint8 -> (logits ``(N, K)``, embedding ``(N, D)``, features ``(N, C)``)."""
        out = self.model(normalize_uint8(images, self.spec))
        return out.logits, out.embedding, out.features


def load_run_checkpoint(run_dir: Path, which: str = "best") -> dict:
    """Read ``best.pt``, ``last`` (highest epoch) or an explicit file of a run.

    Raises:
        FileNotFoundError: no such checkpoint.
    """
    path = resolve_checkpoint(run_dir, which)
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(checkpoint: dict) -> tuple[CNNCodeModel, PreprocessSpec]:
    """Rebuild the trained model (eval mode) and its preprocessing spec from a checkpoint."""
    return load_model(checkpoint), PreprocessSpec.model_validate(checkpoint["preprocessing"])


def export_onnx(model: CNNCodeModel, spec: PreprocessSpec, path: Path, *,
                opset: int = DEFAULT_OPSET) -> None:
    """Write the uint8-input ONNX graph with a dynamic batch axis and run ``onnx.checker``.

    Raises:
        ExportError: the checker rejects the model.
    """
    wrapper = UInt8Normalized(model.eval(), spec).eval()
    size = spec.crop_size
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), opset_version=opset, dynamo=True,
            dynamic_shapes={"images": {0: batch}}, external_data=False,
        )
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected {path}: {exc}") from None


def collect_images(folder: Path, limit: int | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), at most ``limit``."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:limit] if limit else files


def check_parity(model: CNNCodeModel, spec: PreprocessSpec, onnx_path: Path,
                 images: list[Path], *, batch_size: int = 16) -> ParityReport:
    """Run torch and onnxruntime (CPU) on the same preprocessed real images and compare.

    Args:
        images: image files; undecodable ones are skipped (and logged).

    Returns:
        Max abs difference per output, embedding cosine min/mean, top-1 agreement.

    Raises:
        ExportError: no usable image.
    """
    try:
        arrays, _ = load_images(images, spec)
    except ValueError:
        raise ExportError("no decodable images for the parity check") from None
    session = open_session(onnx_path)
    wrapper = UInt8Normalized(model.eval(), spec).eval()
    max_diff = {name: 0.0 for name in OUTPUT_NAMES}
    cosines, agree = [], 0
    for start in range(0, len(arrays), batch_size):
        batch = arrays[start:start + batch_size]
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(torch.from_numpy(batch))]
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        for name, r, g in zip(OUTPUT_NAMES, ref, got):
            max_diff[name] = max(max_diff[name], float(np.abs(r - g).max()))
        cosines.extend(cosine_rows(ref[1], got[1]).tolist())
        agree += int((ref[0].argmax(1) == got[0].argmax(1)).sum())
    return ParityReport(
        n_images=len(arrays), max_abs_diff=max_diff,
        embedding_cosine_min=float(min(cosines)), embedding_cosine_mean=float(np.mean(cosines)),
        top1_agreement=agree / len(arrays), source=str(images[0].parent.parent),
    )


def export_run(run_dir: Path, *, repository: Path, name: str, checkpoint: str = "best",
               parity_data: Path | None = None, parity_limit: int | None = 64,
               opset: int = DEFAULT_OPSET,
               thresholds: ParityThresholds = ParityThresholds(),
               precision: str = "fp32", calibration_data: Path | None = None,
               calibration_limit: int | None = 64,
               variant_thresholds: VariantThresholds = VariantThresholds(),
               int8_options: Int8Options = Int8Options(),
               retrieval: bool = True) -> PublishedModel:
    """Export a training run, check it, and publish it as the next version of ``name``.

    With ``precision`` ``int8`` or ``fp16`` the fp32 export (checked against torch as always)
    is the reference the variant is derived from and compared with, on the same parity
    images; the variant is published only if it meets ``variant_thresholds``, with the
    figures in the card's ``variant_check``.

    Args:
        run_dir: a training run directory.
        repository: model repository root.
        name: model name in the repository.
        checkpoint: ``best``, ``last`` or a checkpoint file path.
        parity_data: images for the torch-vs-onnxruntime check (and the variant-vs-fp32
            check); default: the run's ``<data>/val``.
        parity_limit: at most this many images are compared (None = all).
        precision: ``fp32`` (default), ``int8`` (static quantisation, CPU) or ``fp16`` (GPU).
        calibration_data: int8 calibration images; default: the run's ``<data>/train``.
        calibration_limit: at most this many calibration images (a seeded random sample).
        variant_thresholds: what the variant must meet against fp32.
        int8_options: how int8 quantises.
        retrieval: record retrieval figures in the card (the exported codes of the val photos
            against the train photos beside ``parity_data``, see
            :mod:`export.retrieval_figures`).

    Returns:
        The published model (path + card).

    Raises:
        ExportError: checker or parity failure; nothing is published.
        VariantRejectedError: the variant missed a threshold; nothing is published.
        FileNotFoundError: missing checkpoint, parity or calibration data.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    state = load_run_checkpoint(run_dir, checkpoint)
    model, spec = model_from_checkpoint(state)
    info = get_backbone_info(state["backbone"])
    config = None
    if parity_data is None or (precision == "int8" and calibration_data is None):
        config = TrainConfig.model_validate_json((run_dir / CONFIG_FILENAME).read_text())
    if parity_data is None:
        parity_data = config.data / "val"
    images = collect_images(parity_data, parity_limit)
    if not images:
        raise FileNotFoundError(f"no images under {parity_data} for the parity check")
    calibration_files: list[Path] = []
    if precision == "int8":
        calibration_data = calibration_data or config.data / "train"
        calibration_files = sample_paths(collect_images(calibration_data), calibration_limit)
        if not calibration_files:
            raise FileNotFoundError(f"no images under {calibration_data} for int8 calibration")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(model, spec, onnx_path, opset=opset)
        parity = check_parity(model, spec, onnx_path, images)
        logger.info("parity: %s", parity.model_dump_json())
        if (parity.embedding_cosine_min < thresholds.min_cosine
                or parity.top1_agreement < thresholds.min_top1_agreement
                or parity.max_abs_diff["logits"] > thresholds.max_abs_diff_logits):
            raise ExportError(f"onnxruntime disagrees with torch beyond {thresholds}: {parity}")
        variant_check = None
        if precision != "fp32":
            variant_check = _derive_variant(
                precision, onnx_path, Path(tmp) / f"model.{precision}.onnx", spec, images,
                calibration_files, variant_thresholds, int8_options)
            onnx_path = Path(tmp) / f"model.{precision}.onnx"
        k, s = len(state["class_names"]), spec.crop_size
        history = state.get("history") or []
        best = max(history, key=lambda r: r["val_acc"]) if history else {}
        card = ModelCard(
            name=name, version=1, backbone=info.name,
            weights_source=str(state.get("weights") or "random-init"),
            class_names=list(state["class_names"]), preprocessing=spec,
            inputs=[TensorSpec(name=INPUT_NAME, dtype="uint8", shape=(-1, s, s, 3),
                               description="RGB pixels, NHWC, resized and centre-cropped")],
            outputs=[
                TensorSpec(name="logits", dtype="float32", shape=(-1, k),
                           description="class scores before softmax"),
                TensorSpec(name="embedding", dtype="float32", shape=(-1, info.embedding_dim),
                           description=f"penultimate layer ({info.embedding_layer})"),
                TensorSpec(name="features", dtype="float32", shape=(-1, info.features_dim),
                           description="global average pool of the last conv feature map"),
            ],
            opset=opset, onnx_sha256=sha256_file(onnx_path),
            onnx_bytes=onnx_path.stat().st_size,
            training={"epoch": state["epoch"], "best_epoch": best.get("epoch"),
                      "val_acc": best.get("val_acc"), "train_acc": best.get("train_acc"),
                      "run_dir": str(run_dir.resolve())},
            parity=parity, precision=precision, variant_check=variant_check,
            retrieval=retrieval_figures(onnx_path, spec, Path(parity_data).parent,
                                        name=name) if retrieval else None,
        )
        return publish(repository, card, onnx_path)


def _derive_variant(precision: str, fp32_path: Path, out_path: Path, spec: PreprocessSpec,
                    check_files: list[Path], calibration_files: list[Path],
                    thresholds: VariantThresholds, int8_options: Int8Options) -> VariantCheck:
    """Make the variant, compare it with fp32 on ``check_files``, enforce ``thresholds``.

    Raises:
        VariantRejectedError: a threshold was missed.
    """
    calibration = None
    if calibration_files:
        calibration, used = load_images(calibration_files, spec)
        logger.info("int8: calibrating on %d images from %s", len(used),
                    calibration_files[0].parent.parent)
    conversion = make_variant(precision, fp32_path, out_path, calibration=calibration,
                              int8=int8_options)
    if calibration_files:
        conversion["calibration_source"] = str(calibration_files[0].parent.parent)
    arrays, used = load_images(check_files, spec)
    check = compare_variant(fp32_path, out_path, arrays, precision=precision,
                            source=str(used[0].parent.parent))
    check = check.model_copy(update={"reference_onnx_sha256": sha256_file(fp32_path),
                                     "thresholds": thresholds_dict(thresholds),
                                     "conversion": conversion})
    logger.info("%s vs fp32: %s", precision, check.model_dump_json(exclude={"conversion"}))
    failures = thresholds.failures(check)
    if failures:
        raise VariantRejectedError(check, failures)
    return check
