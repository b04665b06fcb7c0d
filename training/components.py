"""The pieces a run is built from: device, model, optimiser (parameter groups), loss.

Used by :func:`training.trainer.train`; :func:`make_model` and :func:`initial_state` are also
what :mod:`diagnostics.viz` uses to reproduce a run's initial weights.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch
from torch import nn

from models.backbones.registry import CNNCodeModel, build_backbone
from training.config import TrainConfig
from training.schedule import backbone_frozen


def select_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``; ``cuda``.

    Raises:
        RuntimeError: ``cuda`` was asked for and torch sees no CUDA device.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    return torch.device(requested)


def balanced_class_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """``N / (K * n_c)`` per class (scikit-learn's ``class_weight="balanced"``).

    Args:
        targets: class index of every training image.
        num_classes: K.

    Returns:
        ``(K,)`` float32; 1.0 everywhere for perfectly balanced data.

    Raises:
        ValueError: a class has no training images.
    """
    counts = Counter(int(t) for t in targets)
    missing = [c for c in range(num_classes) if counts[c] == 0]
    if missing:
        raise ValueError(f"classes {missing} have no training images")
    n = sum(counts.values())
    return torch.tensor([n / (num_classes * counts[c]) for c in range(num_classes)],
                        dtype=torch.float32)


def param_groups(model: CNNCodeModel, config: TrainConfig) -> list[dict[str, Any]]:
    """Head at ``lr``, backbone at ``lr * backbone_lr_mult``; no weight decay on norms/biases.

    The backbone is in the optimiser in finetune mode and when it will be unfrozen; frozen
    parameters have no gradient, so the optimiser skips them (no moments, no decay).

    Returns:
        Optimiser parameter groups, each with ``params``, ``base_lr`` (the rate before the
        schedule factor) and ``weight_decay``, in a fixed order (backbone before head, decayed
        before not decayed).
    """
    head_ids = {id(p) for p in model.classifier_layer.parameters()}
    with_backbone = config.mode == "finetune" or config.unfreeze_after is not None
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        is_head = id(param) in head_ids
        if not (is_head or with_backbone):
            continue
        groups.setdefault((is_head, param.ndim <= 1), []).append(param)
    return [
        {"params": params,
         "base_lr": config.lr * (1.0 if is_head else config.backbone_lr_mult),
         "weight_decay": 0.0 if no_decay else config.weight_decay}
        for (is_head, no_decay), params in sorted(groups.items())
    ]


def set_backbone_frozen(model: CNNCodeModel, frozen: bool) -> None:
    """``requires_grad = not frozen`` on every parameter outside the classifier layer (the
    head always trains)."""
    head_ids = {id(p) for p in model.classifier_layer.parameters()}
    for param in model.parameters():
        param.requires_grad = (not frozen) or id(param) in head_ids


def make_model(config: TrainConfig, num_classes: int) -> CNNCodeModel:
    """The model a run starts from: ``config.weights`` (or random init), a new K-way head,
    BatchNorm momentum per ``config.bn_momentum``, the backbone frozen for feature-extract.

    The trainer calls it right after ``torch.manual_seed(config.seed)``; doing the same
    reproduces a run's initial weights exactly (:func:`initial_state`).

    Raises:
        models.backbones.registry.WeightsNotFoundError: the weights are not available locally.
    """
    model = build_backbone(config.backbone, weights=config.weights, num_classes=num_classes)
    momentum = config.bn_momentum
    if momentum is None and (config.weights is None or str(config.weights).lower() == "none"):
        momentum = 0.1
    if momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = momentum
    set_backbone_frozen(model, backbone_frozen(config, 1))
    return model


def initial_state(config: TrainConfig, num_classes: int) -> dict[str, torch.Tensor]:
    """The state dict a run had before its first step (reproduced from its seed, on the CPU).

    Raises:
        models.backbones.registry.WeightsNotFoundError: the run's weights are no longer available.
    """
    torch.manual_seed(config.seed)
    return make_model(config, num_classes).state_dict()


def build_optimizer(model: CNNCodeModel, config: TrainConfig) -> torch.optim.Optimizer:
    """Nesterov SGD (``config.momentum``) or AdamW over :func:`param_groups`."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups(model, config), lr=config.lr,
                               momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(param_groups(model, config), lr=config.lr)


def build_criterion(config: TrainConfig, class_weights: torch.Tensor | None,
                    device: torch.device) -> nn.CrossEntropyLoss:
    """The training loss: cross-entropy with ``config.label_smoothing`` and optional ``(K,)``
    float32 ``class_weights`` (moved to ``device``)."""
    weight = class_weights.to(device) if class_weights is not None else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
