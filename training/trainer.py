"""Fine-tuning loop: two transfer-learning modes, per-step schedule with warm-up, checkpoint
every epoch, best-on-val, exact resume, early stopping, JSONL metrics with dead units.

Run directory layout::

    RUN_DIR/config.json              resolved TrainConfig (read back by --resume and export)
    RUN_DIR/config.yaml              the same, as YAML, for people
    RUN_DIR/metrics.jsonl            one JSON object per epoch
    RUN_DIR/checkpoints/epoch_NNN.pt model + optimiser (+ GradScaler) state after epoch NNN
    RUN_DIR/best.pt                  the epoch with the highest val accuracy

Everything that changes over a run is either in the checkpoint (weights, optimiser moments,
GradScaler) or a closed-form function of the epoch and the metrics history (learning rate,
frozen/unfrozen backbone, early-stopping counters, the data order via ``seed + epoch``), so a
run killed after epoch k and resumed ends with the metrics of a run never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from diagnostics.dead_units import DeadUnitTracker
from models.registry import CNNCodeModel, build_backbone, get_backbone_info
from training.config import CONFIG_FILENAME, CONFIG_YAML_FILENAME, TrainConfig
from training.data import image_folders
from training.precise_bn import recompute_bn_stats

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"
BEST_FILENAME = "best.pt"
CHECKPOINT_FORMAT = 2


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists without --resume, nothing to resume)."""


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Per-epoch checkpoints of a run, in epoch order."""
    return sorted((run_dir / "checkpoints").glob("epoch_*.pt"))


def resolve_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """``best`` (``best.pt``), ``last`` (highest epoch), or an explicit file path.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
    """
    if which == "best":
        path = run_dir / BEST_FILENAME
    elif which == "last":
        paths = checkpoint_paths(run_dir)
        if not paths:
            raise FileNotFoundError(f"no checkpoints in {run_dir / 'checkpoints'}")
        path = paths[-1]
    else:
        path = Path(which)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def load_model(checkpoint: dict[str, Any]) -> CNNCodeModel:
    """Rebuild the trained :class:`CNNCodeModel` (eval mode, CPU) from a checkpoint dict."""
    model = build_backbone(checkpoint["backbone"], weights=None,
                           num_classes=len(checkpoint["class_names"]))
    model.load_state_dict(checkpoint["model_state"])
    return model.eval()


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
    """Replay ``history`` through the early-stopping rule of ``config``."""
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


def _param_groups(model: CNNCodeModel, config: TrainConfig) -> list[dict[str, Any]]:
    """Head at ``lr``, backbone at ``lr * backbone_lr_mult``; no weight decay on norms/biases.

    The backbone is in the optimiser in finetune mode and when it will be unfrozen; frozen
    parameters have no gradient, so the optimiser skips them (no moments, no decay).
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


def _set_backbone_frozen(model: CNNCodeModel, frozen: bool) -> None:
    head_ids = {id(p) for p in model.classifier_layer.parameters()}
    for param in model.parameters():
        param.requires_grad = (not frozen) or id(param) in head_ids


def make_model(config: TrainConfig, num_classes: int) -> CNNCodeModel:
    """The model a run starts from: ``config.weights`` (or random init), a new K-way head,
    BatchNorm momentum per ``config.bn_momentum``, the backbone frozen for feature-extract.

    The trainer calls it right after ``torch.manual_seed(config.seed)``; doing the same
    reproduces a run's initial weights exactly (:func:`initial_state`).

    Raises:
        models.registry.WeightsNotFoundError: the weights are not available locally.
    """
    model = build_backbone(config.backbone, weights=config.weights, num_classes=num_classes)
    momentum = config.bn_momentum
    if momentum is None and (config.weights is None or str(config.weights).lower() == "none"):
        momentum = 0.1
    if momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = momentum
    _set_backbone_frozen(model, backbone_frozen(config, 1))
    return model


def initial_state(config: TrainConfig, num_classes: int) -> dict[str, torch.Tensor]:
    """The state dict a run had before its first step (reproduced from its seed, on the CPU).

    Raises:
        models.registry.WeightsNotFoundError: the run's weights are no longer available.
    """
    torch.manual_seed(config.seed)
    return make_model(config, num_classes).state_dict()


def _seed_epoch(seed: int, epoch: int) -> torch.Generator:
    torch.manual_seed(seed + epoch)
    random.seed(seed + epoch)
    return torch.Generator().manual_seed(seed + epoch)


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _set_train_mode(model: nn.Module, training: bool) -> None:
    """``model.train(training)``, but frozen BatchNorm layers stay in eval mode, so a frozen
    backbone's running statistics do not drift (feature-extraction mode)."""
    model.train(training)
    if training:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()):
                module.eval()


@dataclass
class _StepPlan:
    """What the optimiser steps of one epoch need besides the batches."""

    first_step: int
    steps_per_epoch: int
    epochs: int
    warmup_steps: int
    schedule: str
    grad_clip_norm: float | None
    amp: bool
    scaler: torch.amp.GradScaler | None


def _train_epoch(model: CNNCodeModel, loader: DataLoader, criterion: nn.Module,
                 optimizer: torch.optim.Optimizer, plan: _StepPlan, device: torch.device,
                 desc: str) -> dict[str, float]:
    """One training pass; sets the learning rate of every step. Returns loss/acc (and the
    mean pre-clipping gradient norm when clipping)."""
    _set_train_mode(model, True)
    total_loss, correct, seen, norms = 0.0, 0, 0, []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = tqdm(loader, desc=desc, leave=False, unit="batch", disable=None)
    for i, (images, targets) in enumerate(bar):
        factor = lr_factor(plan.first_step + i, plan.steps_per_epoch, plan.epochs,
                           plan.warmup_steps, plan.schedule)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=plan.amp):
            logits = model(images).logits
        loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        if plan.scaler is not None:
            plan.scaler.scale(loss).backward()
            if plan.grad_clip_norm is not None:
                plan.scaler.unscale_(optimizer)
                norms.append(float(nn.utils.clip_grad_norm_(params, plan.grad_clip_norm)))
            plan.scaler.step(optimizer)
            plan.scaler.update()
        else:
            loss.backward()
            if plan.grad_clip_norm is not None:
                norms.append(float(nn.utils.clip_grad_norm_(params, plan.grad_clip_norm)))
            optimizer.step()
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
        ``<= 0`` on every image, see :mod:`diagnostics.dead_units`).
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


def train(config: TrainConfig, run_dir: Path, *, resume: bool = False) -> list[dict[str, Any]]:
    """Fine-tune ``config.backbone`` on ``config.data``; write checkpoints and metrics.

    Args:
        config: the run's settings (on resume, the saved config is used; only ``epochs`` may
            be raised).
        run_dir: run directory (created).
        resume: continue from the last epoch checkpoint in ``run_dir``.

    Returns:
        The metrics of every epoch of the run (including those before a resume): dicts with
        ``epoch``, ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``dead_units``,
        ``seconds`` (wall time of the epoch, train + val), ``cpu_seconds`` (CPU time of this
        process, all threads; it grows too when the CPU is shared, as idle threads spin), ``lr`` (head rate at the epoch's
        first step), ``backbone_lr``, ``backbone_frozen``, and ``grad_norm`` when clipping.
        Shorter than ``epochs`` when early stopping ended the run.

    Raises:
        RunDirError: ``run_dir`` already holds a run and ``resume`` is False, or ``resume``
            is True and there is nothing to resume.
        RuntimeError: ``device`` is ``cuda`` and there is none.
        models.registry.WeightsNotFoundError: the requested weights are not available.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG_FILENAME
    existing = checkpoint_paths(run_dir)
    if resume:
        if not existing:
            raise RunDirError(f"nothing to resume in {run_dir}: no checkpoints/epoch_*.pt")
        saved = TrainConfig.model_validate_json(config_path.read_text())
        config = saved.model_copy(update={"epochs": max(config.epochs, saved.epochs)})
    elif existing:
        raise RunDirError(f"{run_dir} already holds a run; pass --resume or another --out")
    config_path.write_text(config.model_dump_json(indent=2))
    (run_dir / CONFIG_YAML_FILENAME).write_text(config.to_yaml())

    device = select_device(config.device)
    use_amp = config.amp and device.type == "cuda"
    if config.amp and not use_amp:
        logger.info("mixed precision is CUDA-only; training in float32 on %s", device)
    if device.type == "cuda" and config.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    info = get_backbone_info(config.backbone)
    spec = info.preprocessing
    if config.input_size is not None:
        spec = spec.with_crop_size(config.input_size)
    train_set, val_set = image_folders(config.data, spec, config.augment)
    num_classes = len(train_set.classes)
    torch.manual_seed(config.seed)  # the random initialisation (head, or all without weights)
    model = make_model(config, num_classes).to(device)
    optimizer: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(_param_groups(model, config), lr=config.lr,
                                    momentum=config.momentum, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(_param_groups(model, config), lr=config.lr)
    weight = None
    if config.class_weights == "balanced":
        weight = balanced_class_weights(train_set.targets, num_classes)
        logger.info("class weights %s", dict(zip(train_set.classes, weight.tolist())))
    criterion = nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None,
                                    label_smoothing=config.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    history: list[dict[str, Any]] = []
    start_epoch, best_acc = 1, -1.0
    if resume:
        state = torch.load(existing[-1], map_location=device, weights_only=True)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        if scaler is not None and state.get("scaler_state"):
            scaler.load_state_dict(state["scaler_state"])
        history, best_acc = list(state["history"]), float(state["best_val_acc"])
        start_epoch = int(state["epoch"]) + 1
        logger.info("resuming %s at epoch %d", run_dir, start_epoch)

    (run_dir / "checkpoints").mkdir(exist_ok=True)
    pin = device.type == "cuda"
    val_loader = DataLoader(val_set, batch_size=config.batch_size, shuffle=False,
                            num_workers=config.num_workers, pin_memory=pin)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    for epoch in range(start_epoch, config.epochs + 1):
        stopping = early_stopping_state(history, config)
        if stopping.stop:
            logger.info("early stopping: %s has not improved for %d epochs (best %.4f at "
                        "epoch %s)", config.early_stopping_metric, stopping.bad_epochs,
                        stopping.best, stopping.best_epoch)
            break
        started, cpu_started = time.perf_counter(), time.process_time()
        frozen = backbone_frozen(config, epoch)
        if config.mode == "feature-extract":
            if not frozen and backbone_frozen(config, epoch - 1):
                logger.info("epoch %d: unfreezing the backbone (lr x %g)", epoch,
                            config.backbone_lr_mult)
            _set_backbone_frozen(model, frozen)
        generator = _seed_epoch(config.seed, epoch)
        train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True,
                                  generator=generator, num_workers=config.num_workers,
                                  pin_memory=pin)
        plan = _StepPlan((epoch - 1) * steps_per_epoch, steps_per_epoch, config.epochs,
                         warmup_steps, config.schedule, config.grad_clip_norm, use_amp, scaler)
        factor = lr_factor(plan.first_step, steps_per_epoch, config.epochs, warmup_steps,
                           config.schedule)
        train_metrics = _train_epoch(model, train_loader, criterion, optimizer, plan, device,
                                     f"epoch {epoch}/{config.epochs} train")
        if config.precise_bn_batches:
            recompute_bn_stats(model, (images for images, _ in train_loader),
                               max_batches=config.precise_bn_batches, device=device)
        val_metrics = evaluate(model, val_loader, device=device, amp=use_amp)
        row = {"epoch": epoch, **train_metrics, **val_metrics,
               "seconds": round(time.perf_counter() - started, 3),
               "cpu_seconds": round(time.process_time() - cpu_started, 3),
               "lr": config.lr * factor,
               "backbone_lr": 0.0 if frozen else config.lr * config.backbone_lr_mult * factor,
               "backbone_frozen": frozen}
        history.append(row)
        best_acc = max(best_acc, row["val_acc"])
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "backbone": config.backbone,
            "weights": config.weights,
            "class_names": list(train_set.classes),
            "preprocessing": spec.model_dump(mode="json"),
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "scaler_state": scaler.state_dict() if scaler is not None else None,
            "history": history,
            "best_val_acc": best_acc,
            "early_stopping": asdict(early_stopping_state(history, config)),
            "config": config.model_dump(mode="json"),
        }
        path = run_dir / "checkpoints" / f"epoch_{epoch:03d}.pt"
        _atomic_save(checkpoint, path)
        if row["val_acc"] >= best_acc:
            shutil.copyfile(path, run_dir / (BEST_FILENAME + ".tmp"))
            os.replace(run_dir / (BEST_FILENAME + ".tmp"), run_dir / BEST_FILENAME)
        # Rewritten from the checkpoint's history, so a resumed run never duplicates lines.
        (run_dir / METRICS_FILENAME).write_text("".join(json.dumps(r) + "\n" for r in history))
        logger.info("epoch %d: train_loss %.4f train_acc %.3f val_loss %.4f val_acc %.3f "
                    "dead_units %.3f%s (%.1f s)", epoch, row["train_loss"], row["train_acc"],
                    row["val_loss"], row["val_acc"], row["dead_units"],
                    " [backbone frozen]" if frozen and config.mode == "feature-extract" else "",
                    row["seconds"])
    return history
