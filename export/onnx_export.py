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

from models.card import (INPUT_NAME, OUTPUT_NAMES, ModelCard, ParityReport, TensorSpec,
                         sha256_file)
from models.preprocessing import ImageDecodeError, PreprocessSpec, preprocess_file
from models.registry import CNNCodeModel, build_backbone, get_backbone_info
from models.repository import PublishedModel, publish
from training.config import CONFIG_FILENAME, TrainConfig
from training.data import normalize_uint8
from training.trainer import BEST_FILENAME, checkpoint_paths

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
    if which == "best":
        path = run_dir / BEST_FILENAME
    elif which == "last":
        paths = checkpoint_paths(run_dir)
        if not paths:
            raise FileNotFoundError(f"no checkpoints in {run_dir / 'checkpoints'}")
        path = paths[-1]
    else:
        path = Path(which)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (did training finish an epoch?)")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(checkpoint: dict) -> tuple[CNNCodeModel, PreprocessSpec]:
    """Rebuild the trained model (eval mode) and its preprocessing spec from a checkpoint."""
    model = build_backbone(checkpoint["backbone"], weights=None,
                           num_classes=len(checkpoint["class_names"]))
    model.load_state_dict(checkpoint["model_state"])
    return model.eval(), PreprocessSpec.model_validate(checkpoint["preprocessing"])


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
    import onnxruntime as ort

    arrays = []
    for path in images:
        try:
            arrays.append(preprocess_file(str(path), spec))
        except ImageDecodeError as exc:
            logger.warning("parity: skipping %s (%s)", path, exc)
    if not arrays:
        raise ExportError("no decodable images for the parity check")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    wrapper = UInt8Normalized(model.eval(), spec).eval()
    max_diff = {name: 0.0 for name in OUTPUT_NAMES}
    cosines, agree = [], 0
    for start in range(0, len(arrays), batch_size):
        batch = np.stack(arrays[start:start + batch_size])
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(torch.from_numpy(batch))]
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        for name, r, g in zip(OUTPUT_NAMES, ref, got):
            max_diff[name] = max(max_diff[name], float(np.abs(r - g).max()))
        r_emb, g_emb = ref[1].astype(np.float64), got[1].astype(np.float64)
        denom = np.linalg.norm(r_emb, axis=1) * np.linalg.norm(g_emb, axis=1)
        cos = np.where(denom > 0, (r_emb * g_emb).sum(1) / np.maximum(denom, 1e-300), 1.0)
        cosines.extend(cos.tolist())
        agree += int((ref[0].argmax(1) == got[0].argmax(1)).sum())
    return ParityReport(
        n_images=len(arrays), max_abs_diff=max_diff,
        embedding_cosine_min=float(min(cosines)), embedding_cosine_mean=float(np.mean(cosines)),
        top1_agreement=agree / len(arrays), source=str(images[0].parent.parent),
    )


def export_run(run_dir: Path, *, repository: Path, name: str, checkpoint: str = "best",
               parity_data: Path | None = None, parity_limit: int | None = 64,
               opset: int = DEFAULT_OPSET,
               thresholds: ParityThresholds = ParityThresholds()) -> PublishedModel:
    """Export a training run, check it, and publish it as the next version of ``name``.

    Args:
        run_dir: a training run directory.
        repository: model repository root.
        name: model name in the repository.
        checkpoint: ``best``, ``last`` or a checkpoint file path.
        parity_data: images for the torch-vs-onnxruntime check; default: the run's
            ``<data>/val``.
        parity_limit: at most this many images are compared (None = all).

    Returns:
        The published model (path + card).

    Raises:
        ExportError: checker or parity failure; nothing is published.
        FileNotFoundError: missing checkpoint or parity data.
    """
    state = load_run_checkpoint(run_dir, checkpoint)
    model, spec = model_from_checkpoint(state)
    info = get_backbone_info(state["backbone"])
    if parity_data is None:
        config = TrainConfig.model_validate_json((run_dir / CONFIG_FILENAME).read_text())
        parity_data = config.data / "val"
    images = collect_images(parity_data, parity_limit)
    if not images:
        raise FileNotFoundError(f"no images under {parity_data} for the parity check")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(model, spec, onnx_path, opset=opset)
        parity = check_parity(model, spec, onnx_path, images)
        logger.info("parity: %s", parity.model_dump_json())
        if (parity.embedding_cosine_min < thresholds.min_cosine
                or parity.top1_agreement < thresholds.min_top1_agreement
                or parity.max_abs_diff["logits"] > thresholds.max_abs_diff_logits):
            raise ExportError(f"onnxruntime disagrees with torch beyond {thresholds}: {parity}")
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
            parity=parity,
        )
        return publish(repository, card, onnx_path)
