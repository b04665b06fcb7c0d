"""ImageFolder datasets and transforms for fine-tuning.

Eval/val images go through exactly the serving path (:func:`models.decode.decode_image`),
so the val accuracy a run reports is the accuracy the service delivers. Train images go through
a torchvision transforms v2 augmentation preset built on the same spec.
"""

from __future__ import annotations

import functools

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision.transforms import v2

from models.decode import DecodeLimits, decode_file, load_rgb, read_file
from models.preprocessing import PreprocessSpec

PRESETS = ("none", "light", "standard", "heavy")
"""Augmentation presets of :func:`train_transform`, weakest first."""

_INTERPOLATION = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


def _load_rgb_file(path: str) -> Image.Image:
    return load_rgb(read_file(path, DecodeLimits.default().max_file_bytes))


def normalize_uint8(images: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 RGB -> ``(N, 3, H, W)`` float32 normalised with mean/std.

    This is the computation the exported ONNX graph performs on its ``images`` input.
    """
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return (x - mean) / std


def train_transform(spec: PreprocessSpec, preset: str) -> Callable[[Image.Image], torch.Tensor]:
    """Augmentation preset on torchvision transforms v2, ending in a normalised tensor.

    Presets (the invariances: scale, translation, flips, rotation, shear, colour):
        ``none``: eval geometry only (resize + centre crop).
        ``light``: random resized crop (scale 0.5-1) + horizontal flip.
        ``standard``: random resized crop (0.25-1) + flip + colour jitter 0.2.
        ``heavy``: standard + rotation +-15 deg, shear +-10 deg, stronger jitter, grayscale 5%.

    Returns:
        PIL RGB image -> ``(3, S, S)`` float32 normalised tensor, ``S = spec.crop_size``.
    """
    size, interp = spec.crop_size, _INTERPOLATION[spec.interpolation]
    if preset == "none":
        geometry = [v2.Resize(spec.resize_size, interpolation=interp, antialias=True),
                    v2.CenterCrop(size)]
    elif preset == "light":
        geometry = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=interp,
                                         antialias=True), v2.RandomHorizontalFlip()]
    elif preset == "standard":
        geometry = [v2.RandomResizedCrop(size, scale=(0.25, 1.0), interpolation=interp,
                                         antialias=True), v2.RandomHorizontalFlip(),
                    v2.ColorJitter(0.2, 0.2, 0.2)]
    elif preset == "heavy":
        geometry = [v2.RandomAffine(degrees=15, shear=10, interpolation=interp),
                    v2.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=interp,
                                         antialias=True), v2.RandomHorizontalFlip(),
                    v2.ColorJitter(0.4, 0.4, 0.4, 0.05), v2.RandomGrayscale(0.05)]
    else:
        raise ValueError(f"unknown augmentation preset {preset!r}")
    return v2.Compose([
        v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(spec.mean), list(spec.std)),
    ])


def eval_transform(spec: PreprocessSpec) -> Callable[[np.ndarray], torch.Tensor]:
    """``(S, S, 3)`` uint8 from :func:`decode_file` -> ``(3, S, S)`` float32 normalised."""
    def transform(array: np.ndarray) -> torch.Tensor:
        return normalize_uint8(torch.from_numpy(array)[None], spec)[0]
    return transform


def image_folders(
    root: Path, spec: PreprocessSpec, augment: str
) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """``root/train`` and ``root/val`` ImageFolders (same class list, checked).

    Raises:
        FileNotFoundError: a split is missing.
        ValueError: the splits have different classes.
    """
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split} does not exist: expected <data>/{split}/<class>/")
    train = datasets.ImageFolder(str(root / "train"), transform=train_transform(spec, augment),
                                 loader=_load_rgb_file)
    val = datasets.ImageFolder(str(root / "val"), transform=eval_transform(spec),
                               loader=functools.partial(decode_file, spec=spec))
    if train.classes != val.classes:
        raise ValueError(f"train classes {train.classes} differ from val classes {val.classes}")
    return train, val


def augmentation_samples(
    root: Path, spec: PreprocessSpec, presets: Sequence[str], *, n_images: int = 2,
    n_samples: int = 6, seed: int = 0,
) -> list[tuple[str, np.ndarray, list[torch.Tensor]]]:
    """Augmented views of real training photos, for looking at (``cnn-codes viz augment``).

    Images are taken from ``root/train``, alternating between classes (first files in sorted
    order), so the grid shows every class.

    Args:
        root: ImageFolder root (``train/<class>/*``).
        spec: the model's preprocessing spec (input size, mean/std).
        presets: augmentation presets (:data:`PRESETS`).
        n_images: photos to show.
        n_samples: augmented draws per photo and preset.
        seed: ``torch.manual_seed`` before each (photo, preset) row, so rows are reproducible.

    Returns:
        ``(label, eval view (S, S, 3) uint8, [n_samples x (3, S, S) float32 normalised])`` per
        (photo, preset), photos outermost.

    Raises:
        FileNotFoundError: no ``root/train``.
        ValueError: unknown preset.
    """
    train = datasets.ImageFolder(str(Path(root) / "train"), loader=_load_rgb_file)
    by_class: dict[int, list[str]] = {}
    for path, target in train.samples:
        by_class.setdefault(target, []).append(path)
    picks: list[tuple[str, int]] = []
    for i in range(n_images):
        target = sorted(by_class)[i % len(by_class)]
        paths = by_class[target]
        picks.append((paths[(i // len(by_class)) % len(paths)], target))
    rows = []
    for path, target in picks:
        image = _load_rgb_file(path)
        view = decode_file(path, spec=spec)
        for preset in presets:
            transform = train_transform(spec, preset)
            torch.manual_seed(seed)
            samples = [transform(image) for _ in range(n_samples)]
            rows.append((f"{train.classes[target]}\n{Path(path).stem[:12]}\n{preset}", view,
                         samples))
    return rows
