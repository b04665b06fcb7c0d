"""Training configuration: one pydantic object, from a YAML file plus overrides, written
resolved into the run directory (``config.json``, read back on ``--resume`` and by export,
and ``config.yaml`` for people).

Precedence, lowest to highest: the field defaults below, the ``--config`` YAML/JSON file,
the command-line flags (``cnn-codes train --config base.yaml --lr 3e-3`` trains at 3e-3).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

CONFIG_FILENAME = "config.json"
CONFIG_YAML_FILENAME = "config.yaml"


class TrainConfig(BaseModel):
    """Everything that determines a fine-tuning run.

    Attributes:
        data: ImageFolder root holding ``train/<class>/*`` and ``val/<class>/*``.
        backbone: registry name (see ``cnn-codes backbones``).
        weights: torchvision weights name (``DEFAULT``...) read from the torch hub cache
            under ``$TORCH_HOME``, a checkpoint path, or None (random initialisation).
        mode: ``finetune`` trains every layer, the backbone at ``lr * backbone_lr_mult``
            (discriminative learning rates: the pretrained layers move slowly, the new head
            fast); ``feature-extract`` freezes everything but the final Linear layer (frozen
            BatchNorm layers also keep their running statistics).
        unfreeze_after: feature-extract only: train the head alone for this many epochs, then
            unfreeze the backbone and fine-tune it at ``lr * backbone_lr_mult`` (gradual
            unfreezing). None keeps the backbone frozen for the whole run.
        epochs: total epochs of the run (a resumed run continues up to this number).
        batch_size: images per optimiser step.
        optimizer: ``adamw`` (decoupled weight decay) or ``sgd`` (Nesterov momentum).
        lr: learning rate of the classifier head at the top of the schedule.
        backbone_lr_mult: backbone learning rate as a fraction of ``lr`` (finetune mode, and
            after unfreezing).
        momentum: SGD momentum (ignored by AdamW).
        weight_decay: L2 (SGD) / decoupled (AdamW) weight decay, not applied to norms and
            biases (parameters with ``ndim <= 1``).
        schedule: ``cosine``: cosine decay updated per epoch, 1.0 in epoch 1 towards 0 after
            the last (Loshchilov & Hutter, SGDR, 2017, without restarts); ``constant``.
        warmup_epochs: linear warm-up, per optimiser step, from ``lr / warmup_steps`` to the
            scheduled rate over this many epochs (fractions allowed: 0.5 = half an epoch of
            steps); it multiplies the schedule (see :func:`training.schedule.lr_factor`).
        label_smoothing: cross-entropy label smoothing in [0, 1) (training loss only).
        class_weights: ``balanced`` weights the training loss by ``N / (K * n_c)`` per class
            (scikit-learn's ``class_weight="balanced"``), for imbalanced data; ``none``.
        grad_clip_norm: clip the global L2 norm of the gradients to this value; None = off.
        early_stopping_patience: stop when ``early_stopping_metric`` has not improved by more
            than ``early_stopping_min_delta`` for this many epochs; None = off.
        early_stopping_metric: ``val_loss`` (lower is better) or ``val_acc``.
        early_stopping_min_delta: smallest change that counts as an improvement.
        augment: train-time augmentation preset (see :func:`training.data.train_transform`).
        input_size: model input side in pixels; None = the weights' preset crop size.
        precise_bn_batches: after each epoch's training, BatchNorm running statistics are
            recomputed as the plain average over this many training batches with the final
            weights (0 = off); see :mod:`training.precise_bn`. Without it a network trained
            from scratch for one epoch gave the same embedding (cosine 1.0) for every image.
        bn_momentum: BatchNorm running-statistics momentum. None keeps the backbone's own
            when starting from pretrained weights and uses PyTorch's 0.1 from random
            initialisation: torchvision's MobileNetV3 uses 0.01, whose running statistics are
            still far from the data after a few hundred steps, so eval-mode outputs collapse
            to one class (measured on the sample data: val accuracy stuck at 0.542).
        seed: seeds torch and Python; epoch ``e`` reseeds with ``seed + e`` so a resumed run
            repeats exactly what an uninterrupted one does.
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
        amp: automatic mixed precision (float16 autocast + GradScaler) when on CUDA; ignored
            on the CPU.
        deterministic: on CUDA, cuDNN deterministic kernels (slower; CPU runs are
            deterministic already).
        num_workers: DataLoader worker processes (0 = load in the training process).
    """

    model_config = ConfigDict(extra="forbid")

    data: Path
    backbone: str = "mobilenet_v3_large"
    weights: str | None = None
    mode: Literal["finetune", "feature-extract"] = "finetune"
    unfreeze_after: int | None = Field(default=None, ge=0)
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=16, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    backbone_lr_mult: float = Field(default=0.1, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    class_weights: Literal["none", "balanced"] = "none"
    grad_clip_norm: float | None = Field(default=None, gt=0)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    early_stopping_metric: Literal["val_loss", "val_acc"] = "val_loss"
    early_stopping_min_delta: float = Field(default=0.0, ge=0)
    augment: Literal["none", "light", "standard", "heavy"] = "standard"
    input_size: int | None = Field(default=None, ge=32)
    bn_momentum: float | None = Field(default=None, gt=0, le=1)
    precise_bn_batches: int = Field(default=32, ge=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    deterministic: bool = False
    num_workers: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _unfreeze_needs_feature_extract(self) -> "TrainConfig":
        if self.unfreeze_after is not None and self.mode != "feature-extract":
            raise ValueError("unfreeze_after applies to mode 'feature-extract' (the backbone "
                             "starts frozen); mode 'finetune' trains it from the start")
        return self

    @classmethod
    def from_file(cls, path: Path | None, **overrides: Any) -> "TrainConfig":
        """Defaults < the YAML/JSON file at ``path`` < ``overrides`` (those not None).

        Keys may use ``-`` or ``_`` (``batch-size`` or ``batch_size``).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not a mapping.
            pydantic.ValidationError: unknown keys or invalid values.
        """
        values = load_config_file(path) if path is not None else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_yaml(self) -> str:
        """The resolved config as YAML (paths as strings)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict with ``_`` keys.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the top level is not a mapping.
    """
    text = Path(path).read_text()
    loaded = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}
