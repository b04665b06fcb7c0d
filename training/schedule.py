"""Closed-form training policy: learning-rate schedule, backbone freezing, early stopping.

Everything here is a pure function of the config, the step/epoch number and the metrics
history, so a resumed run recomputes exactly what an uninterrupted one had (nothing of it needs
to be checkpointed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from training.config import TrainConfig


def cosine_factor(epoch: int, epochs: int) -> float:
    """Cosine schedule (Loshchilov & Hutter, SGDR, 2017) without restarts, per epoch:
    1.0 at epoch 1, decaying towards 0 at ``epochs + 1``."""
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


def lr_factor(step: int, steps_per_epoch: int, epochs: int, warmup_steps: int,
              schedule: str) -> float:
    """Learning-rate multiplier of optimiser step ``step`` (0-based, counted over the run).

    ``warm-up ramp x schedule``: the ramp is ``(step + 1) / warmup_steps`` during the first
    ``warmup_steps`` steps (linear warm-up, Goyal et al., 2017), then 1; the schedule is
    :func:`cosine_factor` of the step's epoch (``cosine``, updated per epoch as timm's
    ``CosineLRScheduler`` does by default) or 1 (``constant``).

    Closed form, so a resumed run gets exactly the rate an uninterrupted one had; and epoch 1
    does not depend on ``epochs``, so a run trained for k epochs and resumed with more
    repeats a longer run exactly from epoch k + 1 on.
    """
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    epoch = step // steps_per_epoch + 1
    return ramp * (cosine_factor(epoch, epochs) if schedule == "cosine" else 1.0)


def backbone_frozen(config: TrainConfig, epoch: int) -> bool:
    """Whether the backbone is frozen during ``epoch`` (1-based): feature-extract mode, until
    ``unfreeze_after`` epochs have passed."""
    if config.mode != "feature-extract":
        return False
    return config.unfreeze_after is None or epoch <= config.unfreeze_after


@dataclass(frozen=True)
class EarlyStopping:
    """Early-stopping state, a pure function of the metrics history.

    Attributes:
        best: best value of the monitored metric so far (None before the first epoch).
        best_epoch: the epoch that reached it.
        bad_epochs: epochs since the last improvement larger than ``min_delta``.
        stop: True when ``bad_epochs >= patience``.
    """

    best: float | None
    best_epoch: int | None
    bad_epochs: int
    stop: bool


def early_stopping_state(history: Sequence[dict[str, Any]], config: TrainConfig) -> EarlyStopping:
    """Replay ``history`` (metrics rows, oldest first) through the early-stopping rule of
    ``config`` (``early_stopping_metric``, ``_min_delta``, ``_patience``)."""
    metric, delta = config.early_stopping_metric, config.early_stopping_min_delta
    sign = -1.0 if metric == "val_loss" else 1.0  # compare as "higher is better"
    best: float | None = None
    best_epoch: int | None = None
    bad = 0
    for row in history:
        value = float(row[metric])
        if best is None or sign * (value - best) > delta:
            best, best_epoch, bad = value, int(row["epoch"]), 0
        else:
            bad += 1
    patience = config.early_stopping_patience
    return EarlyStopping(best, best_epoch, bad, patience is not None and bad >= patience)
