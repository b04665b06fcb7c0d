"""What the convnet learned: feature maps of chosen layers, and Grad-CAM, for one image.

* :func:`activations_figure` (``cnn-codes viz activations``): the feature maps of chosen
  layers (forward hooks on the torch backbone), by default the first convolution (edges and
  colours), a middle block and the last conv block (parts), as in CS231n's "Visualizing what
  ConvNets learn".
* :func:`gradcam_figure` (``cnn-codes viz gradcam``): Grad-CAM (Selvaraju et al., 2017,
  "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
  arXiv:1610.02391) of the predicted class (or a chosen one) over the image, for any registry
  backbone: the target layer is the output of the convolutional feature extractor
  (:meth:`~models.backbones.registry.CNNCodeModel.forward_features`, the last conv block).

Both need the torch model, read by :func:`open_torch_model` from a training run folder, a
checkpoint file, or a published model version with a torch checkpoint beside its ONNX file
(:data:`TORCH_CHECKPOINT_FILENAME`; ``cnn-codes export`` publishes ONNX only, so a version
without one is refused with a message naming the training run its card records). The image
is decoded by :func:`models.decode.decode_file` with the checkpoint's preprocessing spec (the
one the model card carries) and normalised by :func:`training.data.normalize_uint8`, the
computation the exported graph does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import nn

from diagnostics.figures import Drawn, save_drawn
from diagnostics.plots import _mosaic, first_conv
from models.backbones.registry import CNNCodeModel
from models.card import CARD_FILENAME
from models.decode import DecodeLimits, decode_file
from models.preprocessing import PreprocessSpec
from models.repository import (ModelIntegrityError, PublishedModel, check_name, resolve,
                               verify)
from training.checkpoints import load_model, resolve_checkpoint
from training.data import normalize_uint8

logger = logging.getLogger(__name__)

TORCH_CHECKPOINT_FILENAME = "checkpoint.pt"
"""A training checkpoint beside a published version's ``model.onnx``, read when present.
``cnn-codes export`` does not write one (the repository holds ONNX models only)."""

_CHECKPOINT_KEYS = ("backbone", "class_names", "model_state", "preprocessing")


class NoTorchCheckpointError(FileNotFoundError):
    """A published model version has no torch checkpoint beside its ONNX file."""


@dataclass(frozen=True)
class TorchModelSource:
    """A trained torch model and where it was read from.

    Attributes:
        model: the model, eval mode, CPU, float32.
        spec: its preprocessing (resize, crop, mean/std), as the model card carries it.
        class_names: class index -> name.
        kind: ``run`` (a training run folder), ``checkpoint`` (a checkpoint file) or
            ``model`` (a published version's checkpoint).
        checkpoint: the checkpoint file read.
        epoch: the training epoch of the checkpoint (None if it does not say).
        description: one line naming what was read, for titles and the command's output.
    """

    model: CNNCodeModel
    spec: PreprocessSpec
    class_names: list[str]
    kind: Literal["run", "checkpoint", "model"]
    checkpoint: Path
    epoch: int | None
    description: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: kind, checkpoint, backbone, epoch, description."""
        return {"kind": self.kind, "checkpoint": str(self.checkpoint),
                "backbone": self.model.info.name, "epoch": self.epoch,
                "description": self.description}


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """A cnn-codes training checkpoint (``torch.load(weights_only=True)``).

    Raises:
        ValueError: not a training checkpoint of this project (the missing keys are named).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of a file that is not one
        raise ValueError(f"{path} is not a readable torch checkpoint: "
                         f"{type(exc).__name__}: {exc}") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a cnn-codes training checkpoint (no {', '.join(missing)})")
    return state


def _source(path: Path, kind: Literal["run", "checkpoint", "model"], where: str
            ) -> tuple[TorchModelSource, dict[str, Any]]:
    state = _read_checkpoint(path)
    epoch = state.get("epoch")
    backbone = state["backbone"]
    description = f"{where} ({path.name}, epoch {epoch}, {backbone})"
    model = load_model(state)
    source = TorchModelSource(model=model, spec=PreprocessSpec.model_validate(
        state["preprocessing"]), class_names=list(state["class_names"]), kind=kind,
        checkpoint=path, epoch=epoch, description=description)
    logger.info("read %s", description)
    return source, state


def _from_published(published: PublishedModel) -> TorchModelSource:
    card = published.card
    path = published.path / TORCH_CHECKPOINT_FILENAME
    if not path.is_file():
        run_dir = (card.training or {}).get("run_dir")
        hint = (f"; its card records the training run {run_dir}"
                + ("" if run_dir and Path(run_dir).is_dir() else " (no longer there)")
                if run_dir else "")
        raise NoTorchCheckpointError(
            f"model {card.name}:{card.version} ({published.path}) has no torch checkpoint "
            f"beside its ONNX file (no {TORCH_CHECKPOINT_FILENAME}: cnn-codes export publishes "
            f"ONNX only); pass the training run folder instead{hint}")
    source, state = _source(path, "model", f"model {card.name}:{card.version}")
    problems = [what for what, same in (
        ("backbone", state["backbone"] == card.backbone),
        ("class names", list(state["class_names"]) == list(card.class_names)),
        ("preprocessing", source.spec == card.preprocessing)) if not same]
    if problems:
        raise ModelIntegrityError(f"{path} does not match the card of {card.name}:"
                                  f"{card.version}: {', '.join(problems)} differ")
    return source


def open_torch_model(source: str | Path, *, repository: str | Path,
                     checkpoint: str = "best") -> TorchModelSource:
    """Read a trained torch model from a run folder, a checkpoint file or a published model.

    Args:
        source: a training run folder (its ``checkpoint``), a checkpoint file, a published
            version folder (``<repository>/<name>/<version>``), or ``NAME[:VERSION|ALIAS]``
            of a model in ``repository`` (default version: latest).
        repository: the model repository for ``NAME[:VERSION]``.
        checkpoint: for a run folder, ``best``, ``last`` or a file.

    Returns:
        The model (eval, CPU) with its preprocessing spec and what was read.

    Raises:
        FileNotFoundError: a run folder without that checkpoint; ``source`` names nothing.
        NoTorchCheckpointError: a published version without :data:`TORCH_CHECKPOINT_FILENAME`
            (the message names the training run its card records).
        models.repository.ModelNotFoundError: unknown model name or version.
        models.repository.ModelIntegrityError: the version fails verification, or its
            checkpoint does not match its card.
        ValueError: a file that is not a cnn-codes training checkpoint.
    """
    path = Path(source)
    if path.is_dir():
        if (path / CARD_FILENAME).is_file():
            return _from_published(verify(path))
        file = resolve_checkpoint(path, checkpoint)
        return _source(file, "run", f"run {path}")[0]
    if path.is_file():
        return _source(path, "checkpoint", f"checkpoint {path}")[0]
    name, _, version = str(source).partition(":")
    try:
        check_name(name)
    except ValueError:
        raise FileNotFoundError(f"{source} is neither a training run folder, a checkpoint "
                                "file nor a published model NAME[:VERSION|ALIAS]") from None
    return _from_published(resolve(repository, name, version or "latest"))


def _short(text: str, width: int = 40) -> str:
    """``text`` cut to ``width`` characters with an ellipsis."""
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def load_image(path: str | Path, spec: PreprocessSpec,
               limits: DecodeLimits | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """One image as the model sees it.

    Returns:
        ``((S, S, 3) uint8 RGB view, (1, 3, S, S) float32 normalised input)``,
        ``S = spec.crop_size``.

    Raises:
        models.errors.ImageError: the file cannot be used (its per-image code).
    """
    view = decode_file(path, spec, limits)
    return view, normalize_uint8(torch.from_numpy(view)[None], spec)


def default_layers(model: CNNCodeModel) -> list[str]:
    """The first conv, the middle block and the last block of the feature extractor.

    Returns:
        Module names in ``model.named_modules()`` (e.g. ``net.features.0.0``,
        ``net.features.6``, ``net.features.12`` for MobileNetV3-Small): the first
        ``nn.Conv2d``, the child of ``net.features`` at half its length, and its last child
        (whose output is the feature map :meth:`CNNCodeModel.forward_features` returns).
    """
    blocks = [f"net.features.{name}" for name, _ in model.net.features.named_children()]
    first, _ = first_conv(model)
    names = [first, blocks[len(blocks) // 2], blocks[-1]]
    return list(dict.fromkeys(names))  # a short network may repeat one


def resolve_layers(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for each layer name (``net.`` may be left out: ``features.3``).

    Raises:
        ValueError: an unknown name (the message lists the feature extractor's blocks).
    """
    modules = dict(model.named_modules())
    found = []
    for name in names:
        key = name if name in modules else f"net.{name}"
        if not name or key not in modules:
            blocks = [n for n in modules if n.count(".") == 2 and n.startswith("net.features.")]
            raise ValueError(f"no layer {name!r} in {type(model.net).__name__}; e.g. "
                             f"{', '.join(blocks)} (any module name of the model)")
        found.append((key, modules[key]))
    return found


def capture_activations(model: nn.Module, x: torch.Tensor, layers: Sequence[str]
                        ) -> dict[str, torch.Tensor]:
    """The outputs of ``layers`` for the input ``x``, from one forward pass (forward hooks).

    Args:
        model: a registry model (eval mode).
        x: ``(1, 3, S, S)`` float32, normalised.
        layers: module names (see :func:`resolve_layers`).

    Returns:
        ``{name: (C, h, w) float32}`` in the order of ``layers`` (first call of a module
        that runs more than once).

    Raises:
        ValueError: an unknown layer, one that did not run, or one whose output is not a
            ``(1, C, h, w)`` feature map (e.g. a Linear layer).
    """
    chosen = resolve_layers(model, layers)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in chosen:
        def hook(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
            if name not in captured and isinstance(out, torch.Tensor):
                captured[name] = out.detach().clone()
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for name, _ in chosen:
        out = captured.get(name)
        if out is None:
            raise ValueError(f"layer {name} did not run in the forward pass")
        if out.ndim != 4:
            raise ValueError(f"layer {name} outputs {tuple(out.shape)}, not a (N, C, h, w) "
                             "feature map; choose a convolutional layer or block")
        result[name] = out[0].float()
    return result


def channel_tiles(fmap: torch.Tensor, max_channels: int = 16) -> tuple[np.ndarray, list[int]]:
    """The most active channels of a feature map as tiles in [0, 1].

    Args:
        fmap: ``(C, h, w)`` float32.
        max_channels: at most this many channels, highest mean activation first.

    Returns:
        ``((n, h, w) float32 tiles, each min-max scaled on its own (a constant channel is
        0), their channel indices)``.
    """
    means = fmap.mean(dim=(1, 2))
    order = torch.argsort(means, descending=True)[:max_channels].tolist()
    tiles = fmap[order].numpy().astype(np.float32)
    lo = tiles.min(axis=(1, 2), keepdims=True)
    span = tiles.max(axis=(1, 2), keepdims=True) - lo
    tiles = np.where(span > 0, (tiles - lo) / np.where(span > 0, span, 1), 0.0)
    return tiles.astype(np.float32), order


def activations_figure(source: TorchModelSource, image: str | Path, out: Path, *,
                       layers: Sequence[str] | None = None, max_channels: int = 16,
                       limits: DecodeLimits | None = None) -> Drawn:
    """The image and the feature maps of ``layers`` (one panel each) as a PNG.

    Each layer's panel is a grid of its ``max_channels`` most active channels (highest mean
    over the map), each min-max scaled on its own (viridis: dark = low), with the layer's
    name, type and output shape in the title.

    Args:
        source: the model (:func:`open_torch_model`).
        image: an image file.
        out: PNG path.
        layers: module names (default :func:`default_layers`).
        max_channels: channels shown per layer.
        limits: decode limits.

    Returns:
        The PNG with its layout (1 row, 1 + len(layers) panels); ``details`` has
        ``source`` (what was read), ``image`` and ``layers`` (name, type, shape, channels).

    Raises:
        models.errors.ImageError: the image cannot be used.
        ValueError: an unknown layer or one without a feature map; ``max_channels`` < 1.
    """
    if max_channels < 1:
        raise ValueError(f"max_channels must be >= 1, got {max_channels}")
    model = source.model.eval()
    names = list(layers) if layers else default_layers(model)
    view, x = load_image(image, source.spec, limits)
    maps = capture_activations(model, x, names)
    modules = dict(model.named_modules())
    columns = 1 + len(maps)
    fig = Figure(figsize=(3.3 * columns, 4.0), layout="constrained")
    axes = fig.subplots(1, columns, squeeze=False)[0]
    axes[0].imshow(view)
    axes[0].set_title(f"{_short(Path(image).name)}\ninput, {view.shape[0]} px (model view)",
                      fontsize=8)
    described = []
    for ax, (name, fmap) in zip(axes[1:], maps.items()):
        tiles, channels = channel_tiles(fmap, max_channels)
        grid = _mosaic(tiles, int(np.ceil(np.sqrt(len(tiles)))), fill=np.nan)
        ax.imshow(grid, cmap=colormaps["viridis"].with_extremes(bad="white"), vmin=0, vmax=1,
                  interpolation="nearest")
        c, h, w = fmap.shape
        kind = type(modules[name]).__name__
        ax.set_title(f"{name} ({kind})\n{c}x{h}x{w}, top {len(channels)} channels by mean",
                     fontsize=8)
        described.append({"layer": name, "type": kind, "shape": [c, h, w],
                          "channels": channels})
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"feature maps: {source.description}", fontsize=9)
    return save_drawn(fig, out, rows=1, columns=columns, figure="activations",
                      source=source.as_dict(), image=str(image), layers=described)


@dataclass(frozen=True)
class GradCam:
    """A Grad-CAM map of one image.

    Attributes:
        heatmap: ``(S, S)`` float32 in [0, 1], the coarse map bilinearly upsampled to the
            input and divided by its maximum (all zeros when the map is zero everywhere).
        coarse: ``(h, w)`` float32 >= 0, ``ReLU(sum_k alpha_k A^k)`` on the feature map.
        class_index: the class explained.
        probabilities: ``(K,)`` float32 softmax of the logits.
        fmap_shape: ``(C, h, w)`` of the target layer's output.
    """

    heatmap: np.ndarray
    coarse: np.ndarray
    class_index: int
    probabilities: np.ndarray
    fmap_shape: tuple[int, int, int]


def grad_cam(model: CNNCodeModel, x: torch.Tensor, class_index: int | None = None) -> GradCam:
    """Grad-CAM of class ``c`` on the output ``A`` of the feature extractor.

    Selvaraju et al., 2017 (arXiv:1610.02391), eqs. 1-2: ``alpha_k = mean_ij dy^c/dA^k_ij``
    (y^c the class score before softmax), ``L = ReLU(sum_k alpha_k A^k)``.

    Args:
        model: a registry model; used in eval mode, its weights untouched.
        x: ``(1, 3, S, S)`` float32, normalised.
        class_index: the class to explain (default: the predicted one).

    Returns:
        :class:`GradCam`.

    Raises:
        ValueError: ``x`` not one image, or ``class_index`` out of range.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one (1, 3, S, S) image, got {tuple(x.shape)}")
    model.eval()
    with torch.enable_grad():
        fmap = model.forward_features(x)
        logits = model.forward_head(fmap)
        k = logits.shape[1]
        c = int(logits[0].argmax()) if class_index is None else int(class_index)
        if not 0 <= c < k:
            raise ValueError(f"class index {c} out of range for {k} classes")
        (grads,) = torch.autograd.grad(logits[0, c], fmap)
    fmap, grads = fmap.detach(), grads.detach()
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    coarse = F.relu((alpha * fmap).sum(dim=1, keepdim=True))
    up = F.interpolate(coarse, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    peak = float(up.max())
    heat = (up / peak if peak > 0 else torch.zeros_like(up))[0, 0]
    return GradCam(heatmap=heat.numpy().astype(np.float32),
                   coarse=coarse[0, 0].numpy().astype(np.float32), class_index=c,
                   probabilities=torch.softmax(logits.detach()[0], 0).numpy(),
                   fmap_shape=tuple(fmap.shape[1:]))


def class_index_of(target: str | int | None, class_names: Sequence[str]) -> int | None:
    """``--class`` -> class index: a class name, an index, or None (the predicted class).

    Raises:
        ValueError: neither a class name nor an index in range (the classes are listed).
    """
    if target is None:
        return None
    if str(target) in class_names:
        return list(class_names).index(str(target))
    if str(target).isdigit() and int(target) < len(class_names):
        return int(target)
    raise ValueError(f"class {target!r} is neither a class name nor an index; classes: "
                     f"{list(class_names)}")


def gradcam_figure(source: TorchModelSource, image: str | Path, out: Path, *,
                   target: str | int | None = None,
                   limits: DecodeLimits | None = None) -> Drawn:
    """The image, its Grad-CAM heatmap and the two overlaid, as a 3-panel PNG.

    Args:
        source: the model (:func:`open_torch_model`).
        image: an image file.
        out: PNG path.
        target: class name or index to explain (default: the predicted class).
        limits: decode limits.

    Returns:
        The PNG with its layout (1 x 3 panels); ``details`` has ``source``, ``image``,
        ``predicted`` and ``explained`` (class names), ``probabilities`` (per class),
        ``target_layer`` and its ``fmap_shape``, and ``zero`` (the map was zero everywhere:
        no positive evidence for the class at that layer).

    Raises:
        models.errors.ImageError: the image cannot be used.
        ValueError: an unknown target class.
    """
    model = source.model
    names = source.class_names
    view, x = load_image(image, source.spec, limits)
    cam = grad_cam(model, x, class_index_of(target, names))
    predicted = int(np.argmax(cam.probabilities))
    explained = names[cam.class_index]
    last = list(model.net.features.named_children())[-1][0]
    layer = f"net.features (last block net.features.{last})"
    zero = not cam.heatmap.any()

    fig = Figure(figsize=(11, 4.3), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(view)
    axes[0].set_title(f"{_short(Path(image).name)}\ninput, {view.shape[0]} px (model view)",
                      fontsize=8)
    axes[1].imshow(cam.heatmap, cmap="jet", vmin=0, vmax=1)
    c, h, w = cam.fmap_shape
    axes[1].set_title(f"Grad-CAM of '{explained}' on {c}x{h}x{w}\n{layer}"
                      + ("\n(zero everywhere: no positive evidence)" if zero else ""),
                      fontsize=8)
    axes[2].imshow(view)
    axes[2].imshow(cam.heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[2].set_title("overlay", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    probs = ", ".join(f"{n} {p:.3f}" for n, p in zip(names, cam.probabilities))
    fig.suptitle(f"{source.description}: predicted '{names[predicted]}' ({probs})",
                 fontsize=9)
    return save_drawn(fig, out, rows=1, columns=3, figure="gradcam", source=source.as_dict(),
                      image=str(image), predicted=names[predicted], explained=explained,
                      probabilities={n: float(p) for n, p in zip(names, cam.probabilities)},
                      target_layer=layer, fmap_shape=[c, h, w], zero=zero)
