"""The ``cnn-codes viz`` figures, from run directories and data folders.

Each function reads what a training run wrote (``metrics.jsonl``, ``config.json``,
``checkpoints/epoch_NNN.pt``, ``best.pt``; see :mod:`training.checkpoints`) and writes one PNG
with :mod:`diagnostics.plots`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from diagnostics import plots
from models.backbones.registry import WeightsNotFoundError, get_backbone_info
from training.checkpoints import (METRICS_FILENAME, checkpoint_paths, load_model,
                                  resolve_checkpoint)
from training.components import initial_state
from training.config import CONFIG_FILENAME, TrainConfig
from training.data import augmentation_samples

logger = logging.getLogger(__name__)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/metrics.jsonl``.

    Raises:
        FileNotFoundError: the run has no metrics yet.
    """
    path = Path(run_dir) / METRICS_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (has the run finished an epoch?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves(run_dirs: Sequence[Path], out: Path, labels: Sequence[str] | None = None,
           title: str | None = None) -> Path:
    """Loss / accuracy / dead units / lr per epoch of one or more runs (one colour each).

    Args:
        run_dirs: run directories.
        out: PNG path.
        labels: legend label per run (default: the run directory names).
        title: figure title.

    Raises:
        FileNotFoundError: a run without ``metrics.jsonl``.
        ValueError: ``labels`` of the wrong length.
    """
    labels = list(labels) if labels else [Path(r).name for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    return plots.plot_curves({label: read_metrics(r) for label, r in zip(labels, run_dirs)},
                             out, title=title)


def filters(run_dir: Path, out: Path, *, checkpoint: str = "best",
            mode: Literal["rgb", "gray"] = "rgb") -> Path:
    """The first convolution's kernels of a trained run as a PNG grid.

    Args:
        run_dir: run directory.
        out: PNG path.
        checkpoint: ``best``, ``last``, or a checkpoint file.
        mode: ``rgb`` or ``gray``.

    Raises:
        FileNotFoundError: no such checkpoint.
    """
    path = resolve_checkpoint(Path(run_dir), checkpoint)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = load_model(state)
    name, conv = plots.first_conv(model)
    return plots.plot_filters(model, out, mode, title=(
        f"{state['backbone']} {name} {tuple(conv.weight.shape)}\n{path.name} (epoch "
        f"{state['epoch']}), {mode}, min-max scaled per filter"))


def weights(run_dir: Path, out: Path, *, pattern: str | None = None, max_layers: int = 9,
            bins: int = 60, include_init: bool = True) -> Path:
    """Per-layer weight histograms across the epochs of a run.

    Reads every ``checkpoints/epoch_NNN.pt``; epoch 0 is the initialisation, reproduced from
    the run's seed (:func:`training.components.initial_state`) when ``include_init``.

    Raises:
        FileNotFoundError: the run has no checkpoints.
    """
    run_dir = Path(run_dir)
    paths = checkpoint_paths(run_dir)
    if not paths:
        raise FileNotFoundError(f"no checkpoints in {run_dir / 'checkpoints'}")
    states: dict[int, Any] = {int(p.stem.split("_")[1]): p for p in paths}
    if include_init:
        config = TrainConfig.model_validate_json((run_dir / CONFIG_FILENAME).read_text())
        classes = torch.load(paths[0], map_location="cpu", weights_only=True,
                             mmap=True)["class_names"]
        try:
            states[0] = initial_state(config, len(classes))
        except WeightsNotFoundError as err:
            logger.warning("initial weights not reproducible, leaving epoch 0 out: %s", err)
    config_name = run_dir.name
    return plots.plot_weight_histograms(
        states, out, pattern=pattern, max_layers=max_layers, bins=bins,
        title=f"{config_name}: weight distributions per layer across epochs "
              f"(fraction of weights per bin)")


def augment(data: Path, out: Path, *, backbone: str = "mobilenet_v3_small",
            input_size: int | None = None, presets: Sequence[str] = ("light", "heavy"),
            n_images: int = 2, n_samples: int = 6, seed: int = 0) -> Path:
    """A grid of augmented training photos per preset, beside the eval view.

    Args:
        data: ImageFolder root (``train/`` is read).
        out: PNG path.
        backbone: whose preprocessing (input size, mean/std) to use.
        input_size: input side in pixels (default: the backbone's).
        presets: augmentation presets, one row each per photo.
        n_images: photos.
        n_samples: augmented draws per row.
        seed: reproducible draws.
    """
    spec = get_backbone_info(backbone).preprocessing
    if input_size is not None:
        spec = spec.with_crop_size(input_size)
    rows = augmentation_samples(Path(data), spec, presets, n_images=n_images,
                                n_samples=n_samples, seed=seed)
    return plots.plot_augmentations(
        rows, spec.mean, spec.std, out,
        title=f"augmentation presets {', '.join(presets)} at {spec.crop_size} px "
              f"(torchvision transforms v2)")
