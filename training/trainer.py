"""Fine-tuning loop: two transfer-learning modes, per-step schedule with warm-up, checkpoint
every epoch, best-on-val, exact resume, early stopping, JSONL metrics with dead units.

:func:`train` only orchestrates; the pieces live in

* :mod:`training.checkpoints`: the run directory (config files, ``checkpoints/epoch_NNN.pt``,
  ``best.pt``, ``metrics.jsonl``), resolving and loading checkpoints, resume;
* :mod:`training.components`: device, model, optimiser parameter groups, loss;
* :mod:`training.schedule`: learning-rate schedule, backbone freezing, early stopping;
* :mod:`training.loop`: one epoch's training and val passes.

Everything that changes over a run is either in the checkpoint (weights, optimiser moments,
GradScaler) or a closed-form function of the epoch and the metrics history (learning rate,
frozen/unfrozen backbone, early-stopping counters, the data order via ``seed + epoch``), so a
run killed after epoch k and resumed ends with the metrics of a run never stopped.

The names other code imports from here (``train``, ``load_model``, ``resolve_checkpoint``,
``checkpoint_paths``, ``initial_state``, ``METRICS_FILENAME``...) are re-exported from those
modules and stay importable from :mod:`training.trainer`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets

from models.backbones.registry import CNNCodeModel, get_backbone_info
from models.preprocessing import PreprocessSpec
from training.checkpoints import (BEST_FILENAME, CHECKPOINT_FORMAT, METRICS_FILENAME,
                                  RunDirError, checkpoint_paths, epoch_checkpoint, load_model,
                                  prepare_run_dir, resolve_checkpoint, restore_checkpoint,
                                  save_epoch)
from training.components import (balanced_class_weights, build_criterion, build_optimizer,
                                 initial_state, make_model, select_device, set_backbone_frozen)
from training.config import TrainConfig
from training.data import image_folders
from training.loop import StepPlan, evaluate, train_loader, val_loader
# Called through this module's namespace, so tests can patch ``training.trainer._train_epoch``.
from training.loop import train_epoch as _train_epoch
from training.precise_bn import recompute_bn_stats
from training.schedule import (EarlyStopping, backbone_frozen, cosine_factor,
                               early_stopping_state, lr_factor)

__all__ = [
    "BEST_FILENAME", "CHECKPOINT_FORMAT", "METRICS_FILENAME", "EarlyStopping", "RunDirError",
    "backbone_frozen", "balanced_class_weights", "checkpoint_paths", "cosine_factor",
    "early_stopping_state", "evaluate", "initial_state", "load_model", "lr_factor",
    "make_model", "resolve_checkpoint", "select_device", "train",
]

logger = logging.getLogger(__name__)


@dataclass
class _Run:
    """What one training run holds across its epochs."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    amp: bool
    spec: PreprocessSpec
    train_set: datasets.ImageFolder
    val_set: datasets.ImageFolder
    model: CNNCodeModel
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    scaler: torch.amp.GradScaler | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_acc: float = -1.0
    start_epoch: int = 1

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_set) / self.config.batch_size)

    @property
    def warmup_steps(self) -> int:
        return round(self.config.warmup_epochs * self.steps_per_epoch)


def _setup_device(config: TrainConfig) -> tuple[torch.device, bool]:
    """The device and whether AMP is on (CUDA only); cuDNN determinism when asked."""
    device = select_device(config.device)
    use_amp = config.amp and device.type == "cuda"
    if config.amp and not use_amp:
        logger.info("mixed precision is CUDA-only; training in float32 on %s", device)
    if device.type == "cuda" and config.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return device, use_amp


def _build_data(config: TrainConfig) -> tuple[PreprocessSpec, datasets.ImageFolder,
                                              datasets.ImageFolder]:
    """The backbone's preprocessing (at ``config.input_size``) and the train/val folders."""
    spec = get_backbone_info(config.backbone).preprocessing
    if config.input_size is not None:
        spec = spec.with_crop_size(config.input_size)
    train_set, val_set = image_folders(config.data, spec, config.augment)
    return spec, train_set, val_set


def _build_model(config: TrainConfig, num_classes: int, device: torch.device) -> CNNCodeModel:
    torch.manual_seed(config.seed)  # the random initialisation (head, or all without weights)
    return make_model(config, num_classes).to(device)


def _build_criterion(config: TrainConfig, train_set: datasets.ImageFolder,
                     device: torch.device) -> nn.Module:
    weight = None
    if config.class_weights == "balanced":
        weight = balanced_class_weights(train_set.targets, len(train_set.classes))
        logger.info("class weights %s", dict(zip(train_set.classes, weight.tolist())))
    return build_criterion(config, weight, device)


def _start_run(config: TrainConfig, run_dir: Path, device: torch.device, amp: bool) -> _Run:
    """Data, model, optimiser groups, loss and GradScaler of a run at its first epoch."""
    spec, train_set, val_set = _build_data(config)
    model = _build_model(config, len(train_set.classes), device)
    optimizer = build_optimizer(model, config)
    criterion = _build_criterion(config, train_set, device)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    return _Run(config, run_dir, device, amp, spec, train_set, val_set, model, optimizer,
                criterion, scaler)


def _resume(run: _Run, checkpoint: Path) -> None:
    point = restore_checkpoint(checkpoint, run.model, run.optimizer, run.scaler, run.device)
    run.history, run.best_val_acc = point.history, point.best_val_acc
    run.start_epoch = point.start_epoch
    logger.info("resuming %s at epoch %d", run.run_dir, run.start_epoch)


def _stops_early(run: _Run) -> bool:
    stopping = early_stopping_state(run.history, run.config)
    if stopping.stop:
        logger.info("early stopping: %s has not improved for %d epochs (best %.4f at "
                    "epoch %s)", run.config.early_stopping_metric, stopping.bad_epochs,
                    stopping.best, stopping.best_epoch)
    return stopping.stop


def _apply_freezing(run: _Run, epoch: int) -> bool:
    """Freeze/unfreeze the backbone for ``epoch``; returns whether it is frozen."""
    config = run.config
    frozen = backbone_frozen(config, epoch)
    if config.mode == "feature-extract":
        if not frozen and backbone_frozen(config, epoch - 1):
            logger.info("epoch %d: unfreezing the backbone (lr x %g)", epoch,
                        config.backbone_lr_mult)
        set_backbone_frozen(run.model, frozen)
    return frozen


def _train_and_evaluate(run: _Run, epoch: int, val_batches: DataLoader) -> dict[str, Any]:
    """Train ``epoch``, refresh BatchNorm statistics, evaluate; returns its metrics row."""
    config = run.config
    started, cpu_started = time.perf_counter(), time.process_time()
    frozen = _apply_freezing(run, epoch)
    loader = train_loader(run.train_set, config, epoch, pin_memory=run.pin_memory)
    plan = StepPlan((epoch - 1) * run.steps_per_epoch, run.steps_per_epoch, config.epochs,
                    run.warmup_steps, config.schedule, config.grad_clip_norm, run.amp,
                    run.scaler)
    factor = plan.factor()
    train_metrics = _train_epoch(run.model, loader, run.criterion, run.optimizer, plan,
                                 run.device, f"epoch {epoch}/{config.epochs} train")
    if config.precise_bn_batches:
        recompute_bn_stats(run.model, (images for images, _ in loader),
                           max_batches=config.precise_bn_batches, device=run.device)
    val_metrics = evaluate(run.model, val_batches, device=run.device, amp=run.amp)
    return {"epoch": epoch, **train_metrics, **val_metrics,
            "seconds": round(time.perf_counter() - started, 3),
            "cpu_seconds": round(time.process_time() - cpu_started, 3),
            "lr": config.lr * factor,
            "backbone_lr": 0.0 if frozen else config.lr * config.backbone_lr_mult * factor,
            "backbone_frozen": frozen}


def _checkpoint_epoch(run: _Run, row: dict[str, Any]) -> None:
    """Record ``row``; write the epoch checkpoint, ``best.pt`` if best, ``metrics.jsonl``."""
    run.history.append(row)
    run.best_val_acc = max(run.best_val_acc, row["val_acc"])
    checkpoint = epoch_checkpoint(
        epoch=row["epoch"], config=run.config, class_names=run.train_set.classes,
        spec=run.spec, model=run.model, optimizer=run.optimizer, scaler=run.scaler,
        history=run.history, best_val_acc=run.best_val_acc)
    save_epoch(run.run_dir, checkpoint, is_best=row["val_acc"] >= run.best_val_acc)


def _log_epoch(run: _Run, row: dict[str, Any]) -> None:
    frozen = row["backbone_frozen"] and run.config.mode == "feature-extract"
    logger.info("epoch %d: train_loss %.4f train_acc %.3f val_loss %.4f val_acc %.3f "
                "dead_units %.3f%s (%.1f s)", row["epoch"], row["train_loss"], row["train_acc"],
                row["val_loss"], row["val_acc"], row["dead_units"],
                " [backbone frozen]" if frozen else "", row["seconds"])


def train(config: TrainConfig, run_dir: Path, *, resume: bool = False) -> list[dict[str, Any]]:
    """Fine-tune ``config.backbone`` on ``config.data``; write checkpoints and metrics.

    Args:
        config: the run's settings (on resume, the saved config is used; only ``epochs`` may
            be raised).
        run_dir: run directory (created; layout in :mod:`training.checkpoints`).
        resume: continue from the last epoch checkpoint in ``run_dir``.

    Returns:
        The metrics of every epoch of the run (including those before a resume): dicts with
        ``epoch``, ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``dead_units``,
        ``seconds`` (wall time of the epoch, train + val), ``cpu_seconds`` (CPU time of this
        process, all threads; it grows too when the CPU is shared, as idle threads spin),
        ``lr`` (head rate at the epoch's first step), ``backbone_lr``, ``backbone_frozen``,
        and ``grad_norm`` when clipping. Shorter than ``epochs`` when early stopping ended
        the run.

    Raises:
        RunDirError: ``run_dir`` already holds a run and ``resume`` is False, or ``resume``
            is True and there is nothing to resume.
        RuntimeError: ``device`` is ``cuda`` and there is none.
        models.backbones.registry.WeightsNotFoundError: the requested weights are not available.
    """
    config, resume_from = prepare_run_dir(config, run_dir, resume)
    device, amp = _setup_device(config)
    run = _start_run(config, run_dir, device, amp)
    if resume_from is not None:
        _resume(run, resume_from)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    val_batches = val_loader(run.val_set, config, pin_memory=run.pin_memory)
    for epoch in range(run.start_epoch, config.epochs + 1):
        if _stops_early(run):
            break
        row = _train_and_evaluate(run, epoch, val_batches)
        _checkpoint_epoch(run, row)
        _log_epoch(run, row)
    return run.history
