"""Headless diagnostic figures (PNG) with matplotlib.

Every figure is a bare :class:`matplotlib.figure.Figure` rendered by the Agg canvas on
``savefig``: no pyplot, no global state, no display needed (servers, CI, containers).

* :func:`plot_curves`: loss / accuracy / dead units / learning rate per epoch, one or more runs.
* :func:`plot_filters`: the first convolution's kernels as an image grid (RGB or grayscale).
* :func:`plot_weight_histograms`: per-layer weight distributions across epochs (defined in
  :mod:`diagnostics.histograms`, with :func:`select_weight_layers`).
* :func:`plot_augmentations`: augmented samples of real training photos per preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from diagnostics.figures import DPI, save_figure
from diagnostics.histograms import plot_weight_histograms, select_weight_layers

__all__ = ["DPI", "filter_tiles", "first_conv", "plot_augmentations", "plot_curves",
           "plot_filters", "plot_weight_histograms", "select_weight_layers"]


def plot_curves(runs: dict[str, Sequence[dict[str, Any]]], out: Path,
                title: str | None = None) -> Path:
    """Learning curves per epoch as a 2x2 PNG: loss, accuracy, dead units, learning rate.

    Train curves are solid, val dashed; one colour per run. A dotted vertical line marks the
    epoch a frozen backbone was unfrozen.

    Args:
        runs: ``{label: metrics rows}``, rows as in ``metrics.jsonl`` (``epoch``,
            ``train_loss``, ``val_loss``, ``train_acc``, ``val_acc``; optional
            ``dead_units``, ``lr``, ``backbone_lr``, ``backbone_frozen``).
        out: PNG path (parents created).
        title: figure title.

    Returns:
        ``out``.

    Raises:
        ValueError: no run has any rows.
    """
    if not any(runs.values()):
        raise ValueError("no metrics to plot")
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    colours = colormaps["tab10"]
    for i, (label, rows) in enumerate(runs.items()):
        if rows:
            _plot_run_curves(axes, label, rows, colours(i % 10))
    _style_curve_axes(axes)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def _plot_run_curves(axes: np.ndarray, label: str, rows: Sequence[dict[str, Any]],
                     colour: Any) -> None:
    """One run's lines on the 2x2 ``axes`` of :func:`plot_curves`."""
    (ax_loss, ax_acc), (ax_dead, ax_lr) = axes
    epochs = [r["epoch"] for r in rows]
    for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "-", color=colour,
                label=f"{label} train")
        ax.plot(epochs, [r[f"val_{key}"] for r in rows], "--", color=colour,
                label=f"{label} val")
    if all("dead_units" in r for r in rows):
        ax_dead.plot(epochs, [100 * r["dead_units"] for r in rows], "o-", color=colour,
                     label=label, markersize=3)
    if all("lr" in r for r in rows):
        ax_lr.plot(epochs, [r["lr"] for r in rows], "-", color=colour, label=f"{label} head")
    if all("backbone_lr" in r for r in rows):
        ax_lr.plot(epochs, [r["backbone_lr"] for r in rows], ":", color=colour,
                   label=f"{label} backbone")
    thawed = [r["epoch"] for prev, r in zip(rows, rows[1:])
              if prev.get("backbone_frozen") and not r.get("backbone_frozen")]
    for epoch in thawed:
        for ax in axes.flat:
            ax.axvline(epoch - 0.5, color=colour, linestyle=":", linewidth=1)


def _style_curve_axes(axes: np.ndarray) -> None:
    """Titles, labels, grid and legends of the 2x2 ``axes`` of :func:`plot_curves`."""
    (ax_loss, ax_acc), (ax_dead, ax_lr) = axes
    ax_loss.set(title="cross-entropy loss", xlabel="epoch", ylabel="nats")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="top-1", ylim=(0, 1.02))
    ax_acc.axhline(0.5, color="grey", linewidth=0.5)
    ax_dead.set(title="dead embedding units on val (<= 0 on every image)", xlabel="epoch",
                ylabel="% of units")
    ax_lr.set(title="learning rate (epoch start)", xlabel="epoch", ylabel="lr")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.has_data():
            ax.legend(fontsize=7)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first ``nn.Conv2d`` in module order (VGG ``features.0``, MobileNet ``features.0.0``).

    Raises:
        ValueError: the model has no Conv2d.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError("model has no Conv2d layer")


def _mosaic(tiles: np.ndarray, columns: int, pad: int = 1, fill: float = 1.0) -> np.ndarray:
    """``(n, h, w[, 3])`` tiles in [0, 1] -> one padded grid image."""
    n, h, w = tiles.shape[:3]
    rows = -(-n // columns)
    shape = (rows * (h + pad) + pad, columns * (w + pad) + pad, *tiles.shape[3:])
    grid = np.full(shape, fill, dtype=np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + c * (w + pad): pad + c * (w + pad) + w] = tile
    return grid


def filter_tiles(weight: torch.Tensor, mode: Literal["rgb", "gray"]) -> np.ndarray:
    """First-layer kernels ``(F, C, kh, kw)`` -> displayable tiles in [0, 1].

    ``rgb`` (needs C = 3): one ``(kh, kw, 3)`` colour tile per filter. ``gray``: one
    ``(kh, kw)`` tile per filter: the luminance of the colour tile (ITU-R BT.601 weights
    0.299, 0.587, 0.114) when C = 3, else the mean over input channels. Each filter is
    min-max scaled on its own, so the pattern (not the magnitude) is visible.

    Raises:
        ValueError: ``rgb`` with C != 3, or not a 4-D weight.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a (F, C, kh, kw) conv weight, got {tuple(weight.shape)}")
    w = weight.detach().float().cpu().numpy()
    if mode == "rgb" and w.shape[1] != 3:
        raise ValueError(f"rgb needs 3 input channels, this layer has {w.shape[1]}")
    if mode == "gray":
        if w.shape[1] == 3:
            w = np.tensordot(np.array([0.299, 0.587, 0.114], dtype=np.float32), w,
                             axes=([0], [1]))[:, None]
        else:
            w = w.mean(axis=1, keepdims=True)
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    span = np.maximum(w.max(axis=(1, 2, 3), keepdims=True) - lo, 1e-12)
    w = (w - lo) / span
    return w.transpose(0, 2, 3, 1) if mode == "rgb" else w[:, 0]


def plot_filters(model: nn.Module, out: Path, mode: Literal["rgb", "gray"] = "rgb",
                 title: str | None = None) -> Path:
    """The first convolution's kernels as a PNG grid (CS231n-style filter visualisation).

    Args:
        model: any model with a Conv2d (a trained :class:`~models.backbones.registry.CNNCodeModel`).
        out: PNG path.
        mode: ``rgb`` (colour tile per filter) or ``gray`` (luminance per filter).
        title: figure title (default: layer name and weight shape).

    Returns:
        ``out``.

    Raises:
        ValueError: no Conv2d, or ``rgb`` on a layer without 3 input channels.
    """
    name, conv = first_conv(model)
    tiles = filter_tiles(conv.weight, mode)
    columns = int(np.ceil(np.sqrt(len(tiles))))
    grid = _mosaic(tiles, columns)
    fig = Figure(figsize=(6, max(6 * grid.shape[0] / grid.shape[1], 1.0) + 0.7),
                 layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid, cmap=None if mode == "rgb" else "gray", interpolation="nearest",
              vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title or f"{name}: {tuple(conv.weight.shape)} ({mode}, min-max per filter)",
                 fontsize=9)
    return save_figure(fig, out)


def plot_augmentations(images: Sequence[tuple[str, np.ndarray, list[torch.Tensor]]],
                       mean: Sequence[float], std: Sequence[float], out: Path,
                       title: str | None = None) -> Path:
    """A grid of augmented samples: one row per (image, preset), the eval view first.

    Args:
        images: ``(row label, eval view (S, S, 3) uint8, [augmented (3, S, S) float32
            normalised tensors])`` per row.
        mean, std: the normalisation to undo for display.
        out: PNG path.
        title: figure title.

    Returns:
        ``out``.

    Raises:
        ValueError: no rows.
    """
    if not images:
        raise ValueError("no images")
    m = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
    s = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
    columns = 1 + max(len(samples) for _, _, samples in images)
    fig = Figure(figsize=(1.6 * columns + 1.2, 1.6 * len(images) + 0.5), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(images), columns))
    for r, (label, view, samples) in enumerate(images):
        axes[r, 0].imshow(view)
        axes[r, 0].set_ylabel(label, fontsize=8)
        if r == 0:
            axes[r, 0].set_title("eval view", fontsize=8)
        for c, sample in enumerate(samples, start=1):
            pixels = sample.permute(1, 2, 0).numpy() * s + m
            axes[r, c].imshow(np.clip(pixels, 0, 1))
            if r == 0:
                axes[r, c].set_title(f"sample {c}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out)
