"""The models :mod:`bench.precision` compares: random-init backbones made to mean something.

Built through the registry with 2 classes, BatchNorm statistics recomputed on real training
photos (``training/precise_bn.py``), and only the final Linear layer fitted (logistic
regression on the fp32 embeddings), so that ``logits`` encode a decision rather than a random
projection (see :mod:`bench.precision`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def labelled_images(folder: Path, limit: int | None, seed: int = 0) -> tuple[list[Path], list[int]]:
    """Image files of an ImageFolder split (seeded sample of at most ``limit``) and labels."""
    from export.onnx_export import collect_images
    from export.quantize import sample_paths

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = sample_paths(collect_images(folder), limit, seed=seed)
    return files, [classes.index(f.relative_to(folder).parts[0]) for f in files]


def fit_head(model, embeddings, labels, *, steps: int = 200, weight_decay: float = 1e-3) -> float:
    """Fit the final Linear layer as an L2-regularised logistic regression; returns train acc."""
    import torch
    from torch import nn

    layer = model.classifier_layer
    x = embeddings.detach()
    y = torch.as_tensor(labels)
    scale = x.norm(dim=1).mean().clamp_min(1e-6)
    head = nn.Linear(x.shape[1], layer.out_features)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (nn.functional.cross_entropy(head(x / scale), y)
                + weight_decay * head.weight.pow(2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        layer.weight.copy_(head.weight / scale)
        layer.bias.copy_(head.bias)
        return float((head(x / scale).argmax(1) == y).float().mean())


def build_model(name: str, train_images: np.ndarray, train_labels: list[int], spec):
    """Random-init backbone, precise BatchNorm statistics, fitted head (see module doc)."""
    import torch

    from models.backbones.registry import build_backbone
    from training.data import normalize_uint8
    from training.precise_bn import recompute_bn_stats

    torch.manual_seed(0)
    model = build_backbone(name, num_classes=2)
    batches = [normalize_uint8(torch.from_numpy(train_images[i:i + 16]), spec)
               for i in range(0, len(train_images), 16)]
    bn_batches = recompute_bn_stats(model, batches)
    model.eval()
    with torch.no_grad():
        embeddings = torch.cat([model(b).embedding for b in batches])
    train_acc = fit_head(model, embeddings, train_labels)
    return model.eval(), {"bn_batches_recomputed": bn_batches, "head_train_acc": train_acc}
