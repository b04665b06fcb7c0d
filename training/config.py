"""Training configuration: one pydantic object, written resolved into the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CONFIG_FILENAME = "config.json"


class TrainConfig(BaseModel):
    """Everything that determines a fine-tuning run.

    Attributes:
        data: ImageFolder root holding ``train/<class>/*`` and ``val/<class>/*``.
        backbone: registry name (see ``cnn-codes backbones``).
        weights: torchvision weights name (``DEFAULT``...), a checkpoint path, or None
            (random initialisation).
        mode: ``finetune`` trains every layer, the backbone at ``lr * backbone_lr_mult``
            (discriminative learning rates); ``feature-extract`` freezes everything but the
            final Linear layer.
        epochs: total epochs of the run (a resumed run continues up to this number).
        batch_size: images per optimiser step.
        optimizer: ``adamw`` or ``sgd`` (with Nesterov momentum).
        lr: learning rate of the classifier head; the schedule is cosine over ``epochs``.
        backbone_lr_mult: backbone learning rate as a fraction of ``lr`` (finetune mode).
        weight_decay: L2 / decoupled weight decay, not applied to norms and biases.
        augment: train-time augmentation preset.
        input_size: model input side in pixels; None = the weights' preset crop size.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        bn_momentum: BatchNorm running-statistics momentum. None keeps the backbone's own
            when starting from pretrained weights and uses PyTorch's 0.1 from random
            initialisation: torchvision's MobileNetV3 uses 0.01, whose running statistics are
            still far from the data after a few hundred steps, so eval-mode outputs collapse
            to one class (measured on the sample data: val accuracy stuck at 0.542).
        seed: seeds torch and Python; epoch ``e`` reseeds with ``seed + e`` so a resumed run
            repeats exactly what an uninterrupted one does.
        num_workers: DataLoader worker processes (0 = load in the training process).
    """

    model_config = ConfigDict(extra="forbid")

    data: Path
    backbone: str = "mobilenet_v3_large"
    weights: str | None = None
    mode: Literal["finetune", "feature-extract"] = "finetune"
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=16, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    backbone_lr_mult: float = Field(default=0.1, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    augment: Literal["none", "light", "standard", "heavy"] = "standard"
    input_size: int | None = Field(default=None, ge=32)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    bn_momentum: float | None = Field(default=None, gt=0, le=1)
    seed: int = 0
    num_workers: int = Field(default=0, ge=0)
