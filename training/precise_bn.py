"""Precise BatchNorm statistics: recompute running mean/var over training data after an epoch.

BatchNorm's exponential moving average (momentum 0.1, or 0.01 in torchvision's MobileNetV3)
lags far behind the weights when a network trains from scratch for a few hundred steps; in
eval mode such a network normalises with stale statistics and its outputs can collapse to one
constant vector for every image. Recomputing the statistics as a plain average over a number of
training batches with the final weights fixes that ("precise BN": Wu & Johnson, "Rethinking
'Batch' in BatchNorm", 2021, arXiv:2105.07576; fvcore's ``update_bn_stats``; torch's
``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor], *,
                       max_batches: int = 200, device: torch.device | None = None) -> int:
    """Set every BatchNorm layer's running mean/var to the average over ``batches``.

    Only the BatchNorm layers that are trainable (a frozen backbone keeps its statistics) are
    updated. The model's train/eval mode is restored afterwards; weights are not touched.

    Args:
        model: the network; its forward takes one ``(N, 3, H, W)`` float32 batch.
        batches: input batches (augmented training images are what the layers saw).
        max_batches: at most this many batches are used.
        device: where to run (default: the model's).

    Returns:
        The number of batches used (0 = nothing changed).
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats and any(p.requires_grad for p in m.parameters())]
    if not layers:
        return 0
    was_training = model.training
    momenta = {layer: layer.momentum for layer in layers}
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average = exact mean over the batches
    model.train()
    for module in model.modules():  # frozen BatchNorm layers keep their statistics
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module not in momenta:
            module.eval()
    used = 0
    for images in batches:
        if used >= max_batches:
            break
        model(images.to(device) if device is not None else images)
        used += 1
    for layer, momentum in momenta.items():
        layer.momentum = momentum
    model.train(was_training)
    return used
