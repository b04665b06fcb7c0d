"""One epoch: seeded data loaders, the training pass (per-step learning rate, AMP, clipping)
and the val pass (loss, accuracy, dead units)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.backbones.registry import CNNCodeModel
from training.config import TrainConfig
from training.dead_units import DeadUnitTracker
from training.schedule import lr_factor


def seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Seed torch and Python with ``seed + epoch``; returns a CPU generator seeded the same
    (the training loader's shuffle order), so epoch ``e`` is the same on resume."""
    torch.manual_seed(seed + epoch)
    random.seed(seed + epoch)
    return torch.Generator().manual_seed(seed + epoch)


def train_loader(dataset: Dataset, config: TrainConfig, epoch: int, *,
                 pin_memory: bool) -> DataLoader:
    """The shuffled training loader of ``epoch`` (reseeds via :func:`seed_epoch` first)."""
    generator = seed_epoch(config.seed, epoch)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator,
                      num_workers=config.num_workers, pin_memory=pin_memory)


def val_loader(dataset: Dataset, config: TrainConfig, *, pin_memory: bool) -> DataLoader:
    """The val loader (fixed order, same batch size as training)."""
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False,
                      num_workers=config.num_workers, pin_memory=pin_memory)


def set_train_mode(model: nn.Module, training: bool) -> None:
    """``model.train(training)``, but frozen BatchNorm layers stay in eval mode, so a frozen
    backbone's running statistics do not drift (feature-extraction mode)."""
    model.train(training)
    if training:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()):
                module.eval()


@dataclass
class StepPlan:
    """What the optimiser steps of one epoch need besides the batches.

    Attributes:
        first_step: run-wide index (0-based) of the epoch's first optimiser step.
        steps_per_epoch, epochs, warmup_steps, schedule: arguments of
            :func:`training.schedule.lr_factor`.
        grad_clip_norm: clip the global gradient L2 norm to this (None = off).
        amp: float16 autocast of the forward pass.
        scaler: the GradScaler when ``amp`` (None otherwise).
    """

    first_step: int
    steps_per_epoch: int
    epochs: int
    warmup_steps: int
    schedule: str
    grad_clip_norm: float | None
    amp: bool
    scaler: torch.amp.GradScaler | None

    def factor(self, step_in_epoch: int = 0) -> float:
        """Learning-rate multiplier of the epoch's step ``step_in_epoch``."""
        return lr_factor(self.first_step + step_in_epoch, self.steps_per_epoch, self.epochs,
                         self.warmup_steps, self.schedule)


def _optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                    params: list[nn.Parameter], plan: StepPlan) -> float | None:
    """Backward + (optional) clipping + step; returns the pre-clipping gradient norm when
    clipping."""
    norm = None
    optimizer.zero_grad(set_to_none=True)
    if plan.scaler is not None:
        plan.scaler.scale(loss).backward()
        if plan.grad_clip_norm is not None:
            plan.scaler.unscale_(optimizer)
            norm = float(nn.utils.clip_grad_norm_(params, plan.grad_clip_norm))
        plan.scaler.step(optimizer)
        plan.scaler.update()
    else:
        loss.backward()
        if plan.grad_clip_norm is not None:
            norm = float(nn.utils.clip_grad_norm_(params, plan.grad_clip_norm))
        optimizer.step()
    return norm


def train_epoch(model: CNNCodeModel, loader: DataLoader, criterion: nn.Module,
                optimizer: torch.optim.Optimizer, plan: StepPlan, device: torch.device,
                desc: str) -> dict[str, float]:
    """One training pass; sets the learning rate of every step (``base_lr`` of each group
    times :meth:`StepPlan.factor`).

    Args:
        loader: batches of ``(N, 3, S, S)`` float32 images and ``(N,)`` int64 targets.
        desc: progress-bar label.

    Returns:
        ``train_loss`` (mean training loss, with label smoothing / class weights),
        ``train_acc`` (top-1 on the augmented batches) and, when clipping, ``grad_norm``
        (mean pre-clipping gradient norm).
    """
    set_train_mode(model, True)
    total_loss, correct, seen, norms = 0.0, 0, 0, []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = tqdm(loader, desc=desc, leave=False, unit="batch", disable=None)
    for i, (images, targets) in enumerate(bar):
        factor = plan.factor(i)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=plan.amp):
            logits = model(images).logits
        loss = criterion(logits.float(), targets)
        norm = _optimizer_step(loss, optimizer, params, plan)
        if norm is not None:
            norms.append(norm)
        total_loss += float(loss.detach()) * len(targets)
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(targets)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    out = {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1)}
    if norms:
        out["grad_norm"] = sum(norms) / len(norms)
    return out


def evaluate(model: CNNCodeModel, loader: DataLoader, *, device: torch.device | None = None,
             amp: bool = False) -> dict[str, float]:
    """Val pass: plain cross-entropy, accuracy and the dead-unit fraction of the embedding.

    Args:
        model: the model (put in eval mode here).
        loader: batches of ``(N, 3, S, S)`` float32 images and ``(N,)`` int64 targets.
        device: where the model lives (default: the CPU).
        amp: float16 autocast (CUDA only).

    Returns:
        ``val_loss`` (mean cross-entropy, nats, without label smoothing or class weights),
        ``val_acc`` (top-1, in [0, 1]) and ``dead_units`` (fraction of embedding units
        ``<= 0`` on every image, see :mod:`training.dead_units`).
    """
    device = device or torch.device("cpu")
    model.eval()
    tracker = DeadUnitTracker()
    total_loss, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                out = model(images)
            total_loss += float(nn.functional.cross_entropy(out.logits.float(), targets,
                                                            reduction="sum"))
            correct += int((out.logits.argmax(1) == targets).sum())
            seen += len(targets)
            tracker.update(out.embedding)
    return {"val_loss": total_loss / max(seen, 1), "val_acc": correct / max(seen, 1),
            "dead_units": tracker.fraction}
