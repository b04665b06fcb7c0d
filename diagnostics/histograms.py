"""Per-layer weight distributions across the epochs of a run (headless PNG).

Also importable from :mod:`diagnostics.plots`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from diagnostics.figures import save_figure


def select_weight_layers(state: dict[str, torch.Tensor], pattern: str | None = None,
                         max_layers: int = 12) -> list[str]:
    """Conv/Linear weight keys (``*.weight`` with ndim >= 2) of a state dict.

    Args:
        state: a model state dict.
        pattern: keep keys matching this regular expression (``re.search``).
        max_layers: keep at most this many, evenly spaced from the first to the last.

    Returns:
        Keys in model order.

    Raises:
        ValueError: nothing matched.
    """
    keys = [k for k, v in state.items() if k.endswith(".weight") and v.ndim >= 2]
    if pattern:
        keys = [k for k in keys if re.search(pattern, k)]
    if not keys:
        raise ValueError(f"no conv/linear weights match {pattern!r}")
    if len(keys) > max_layers:
        picks = np.unique(np.linspace(0, len(keys) - 1, max_layers).round().astype(int))
        keys = [keys[i] for i in picks]
    return keys


def _load_state(item: dict[str, torch.Tensor] | Path) -> dict[str, torch.Tensor]:
    """A state dict, or a checkpoint's ``model_state`` (mmap), with the ``net.`` prefix off."""
    if not isinstance(item, dict):
        item = torch.load(item, map_location="cpu", weights_only=True,
                          mmap=True)["model_state"]
    return {k.removeprefix("net."): v for k, v in item.items()}


def _layer_ranges(states: dict, epochs: list[int],
                  keys: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Pass 1: ``(lo, hi)`` of each layer over all epochs, a common histogram range."""
    lo = {k: np.inf for k in keys}
    hi = {k: -np.inf for k in keys}
    for epoch in epochs:
        state = _load_state(states[epoch])
        for k in keys:
            lo[k] = min(lo[k], float(state[k].min()))
            hi[k] = max(hi[k], float(state[k].max()))
    return lo, hi


def _layer_histograms(states: dict, epochs: list[int], keys: list[str], bins: int,
                      lo: dict[str, float], hi: dict[str, float]
                      ) -> tuple[dict[str, list[np.ndarray]], dict[str, list[float]]]:
    """Pass 2: per layer, the ``(bins,)`` float32 counts and the std of every epoch."""
    hists: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    stds: dict[str, list[float]] = {k: [] for k in keys}
    for epoch in epochs:
        state = _load_state(states[epoch])
        for k in keys:
            values = state[k].detach().float()
            hists[k].append(torch.histc(values, bins=bins, min=lo[k], max=hi[k]).numpy())
            stds[k].append(float(values.std()))
    return hists, stds


def plot_weight_histograms(states: dict[int, dict[str, torch.Tensor]] | dict[int, Path],
                           out: Path, *, pattern: str | None = None, max_layers: int = 12,
                           bins: int = 60, title: str | None = None) -> Path:
    """Per-layer weight histograms across epochs, one panel per layer, one line per epoch.

    Args:
        states: ``{epoch: state dict or checkpoint path}`` (checkpoints are read with
            ``torch.load(mmap=True, weights_only=True)``, ``model_state`` inside); epoch 0 may
            be the initialisation.
        out: PNG path.
        pattern, max_layers: layer selection (:func:`select_weight_layers`).
        bins: histogram bins over each layer's range across all epochs.
        title: figure title.

    Returns:
        ``out``.

    Raises:
        ValueError: no states, or no layer selected.
    """
    if not states:
        raise ValueError("no epochs to plot")
    epochs = sorted(states)
    first = _load_state(states[epochs[0]])
    keys = select_weight_layers(first, pattern, max_layers)
    lo, hi = _layer_ranges(states, epochs, keys)
    hists, stds = _layer_histograms(states, epochs, keys, bins, lo, hi)
    columns = min(3, len(keys))
    rows = -(-len(keys) // columns)
    fig = Figure(figsize=(4.2 * columns + 0.8, 2.8 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    cmap = colormaps["viridis"]
    norm = Normalize(vmin=epochs[0], vmax=max(epochs[-1], epochs[0] + 1))
    for ax, k in zip(axes, keys):
        edges = np.linspace(lo[k], hi[k], bins + 1)
        for epoch, counts in zip(epochs, hists[k]):
            ax.stairs(counts / counts.sum(), edges, color=cmap(norm(epoch)), linewidth=1)
        shape = "x".join(map(str, first[k].shape))
        ax.set_title(f"{k} ({shape})\nstd {stds[k][0]:.3g} -> {stds[k][-1]:.3g}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[:len(keys)]),
                 label="epoch (0 = initialisation)", shrink=0.8)
    fig.suptitle(title or "weight distributions per layer (fraction of weights per bin)",
                 fontsize=10)
    return save_figure(fig, out)
