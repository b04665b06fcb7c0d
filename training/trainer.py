"""Fine-tuning loop: checkpoint every epoch, best-on-val, exact resume, JSONL metrics.

Run directory layout::

    RUN_DIR/config.json              resolved TrainConfig
    RUN_DIR/metrics.jsonl            one JSON object per epoch
    RUN_DIR/checkpoints/epoch_NNN.pt model + optimiser + scheduler + RNG state after epoch NNN
    RUN_DIR/best.pt                  the epoch with the highest val accuracy
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.registry import CNNCodeModel, build_backbone, get_backbone_info
from training.config import CONFIG_FILENAME, TrainConfig
from training.data import image_folders

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"
BEST_FILENAME = "best.pt"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists without --resume, nothing to resume)."""


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Per-epoch checkpoints of a run, in epoch order."""
    return sorted((run_dir / "checkpoints").glob("epoch_*.pt"))


def _param_groups(model: CNNCodeModel, config: TrainConfig) -> list[dict[str, Any]]:
    """Head at ``lr``, backbone at ``lr * backbone_lr_mult``; no weight decay on norms/biases."""
    head_ids = {id(p) for p in model.classifier_layer.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        key = (id(param) in head_ids, param.ndim <= 1)
        groups.setdefault(key, []).append(param)
    return [
        {"params": params,
         "base_lr": config.lr * (1.0 if is_head else config.backbone_lr_mult),
         "weight_decay": 0.0 if no_decay else config.weight_decay}
        for (is_head, no_decay), params in sorted(groups.items())
    ]


def cosine_factor(epoch: int, epochs: int) -> float:
    """Cosine learning-rate schedule (Loshchilov & Hutter, SGDR, 2017) without restarts, in
    closed form: 1.0 at epoch 1, decaying towards 0 at ``epochs + 1``.

    Closed form (not a stateful scheduler) so a resumed run, even with more ``epochs``, gets
    exactly the rate an uninterrupted run of that length would.
    """
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


def _make_model(config: TrainConfig, num_classes: int) -> CNNCodeModel:
    model = build_backbone(config.backbone, weights=config.weights, num_classes=num_classes)
    momentum = config.bn_momentum
    if momentum is None and (config.weights is None or str(config.weights).lower() == "none"):
        momentum = 0.1
    if momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = momentum
    if config.mode == "feature-extract":
        for param in model.parameters():
            param.requires_grad = False
        for param in model.classifier_layer.parameters():
            param.requires_grad = True
    return model


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


def _run_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module,
               optimizer: torch.optim.Optimizer | None, desc: str) -> tuple[float, float]:
    """One pass; trains when ``optimizer`` is given. Returns (mean loss, accuracy)."""
    training = optimizer is not None
    _set_train_mode(model, training)
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        bar = tqdm(loader, desc=desc, leave=False, unit="batch", disable=None)
        for images, targets in bar:
            logits = model(images).logits
            loss = criterion(logits, targets)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total_loss += float(loss.detach()) * len(targets)
            correct += int((logits.argmax(1) == targets).sum())
            seen += len(targets)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    return total_loss / max(seen, 1), correct / max(seen, 1)


def train(config: TrainConfig, run_dir: Path, *, resume: bool = False) -> list[dict[str, Any]]:
    """Fine-tune ``config.backbone`` on ``config.data``; write checkpoints and metrics.

    Args:
        config: the run's settings (on resume, the saved config is used; only ``epochs`` may
            be raised).
        run_dir: run directory (created).
        resume: continue from the last epoch checkpoint in ``run_dir``.

    Returns:
        The metrics of every epoch of the run (including those before a resume): dicts with
        ``epoch``, ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``seconds``, ``lr``.

    Raises:
        RunDirError: ``run_dir`` already holds a run and ``resume`` is False, or ``resume``
            is True and there is nothing to resume.
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

    info = get_backbone_info(config.backbone)
    spec = info.preprocessing
    if config.input_size is not None:
        spec = spec.with_crop_size(config.input_size)
    train_set, val_set = image_folders(config.data, spec, config.augment)
    torch.manual_seed(config.seed)  # the random initialisation (head, or all without weights)
    model = _make_model(config, len(train_set.classes))
    optimizer: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(_param_groups(model, config), lr=config.lr,
                                    momentum=config.momentum, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(_param_groups(model, config), lr=config.lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    history: list[dict[str, Any]] = []
    start_epoch, best_acc = 1, -1.0
    if resume:
        state = torch.load(existing[-1], map_location="cpu", weights_only=True)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        history, best_acc = list(state["history"]), float(state["best_val_acc"])
        start_epoch = int(state["epoch"]) + 1
        logger.info("resuming %s at epoch %d", run_dir, start_epoch)

    (run_dir / "checkpoints").mkdir(exist_ok=True)
    val_loader = DataLoader(val_set, batch_size=config.batch_size, shuffle=False,
                            num_workers=config.num_workers)
    for epoch in range(start_epoch, config.epochs + 1):
        started = time.perf_counter()
        generator = _seed_epoch(config.seed, epoch)
        train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True,
                                  generator=generator, num_workers=config.num_workers)
        factor = cosine_factor(epoch, config.epochs)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        lr = config.lr * factor
        train_loss, train_acc = _run_epoch(model, train_loader, criterion, optimizer,
                                           f"epoch {epoch}/{config.epochs} train")
        val_loss, val_acc = _run_epoch(model, val_loader, criterion, None,
                                       f"epoch {epoch}/{config.epochs} val")
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": val_loss, "val_acc": val_acc,
               "seconds": round(time.perf_counter() - started, 3), "lr": lr}
        history.append(row)
        best_acc = max(best_acc, val_acc)
        checkpoint = {
            "epoch": epoch,
            "backbone": config.backbone,
            "weights": config.weights,
            "class_names": list(train_set.classes),
            "preprocessing": spec.model_dump(mode="json"),
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "history": history,
            "best_val_acc": best_acc,
        }
        path = run_dir / "checkpoints" / f"epoch_{epoch:03d}.pt"
        _atomic_save(checkpoint, path)
        if val_acc >= best_acc:
            shutil.copyfile(path, run_dir / (BEST_FILENAME + ".tmp"))
            os.replace(run_dir / (BEST_FILENAME + ".tmp"), run_dir / BEST_FILENAME)
        # Rewritten from the checkpoint's history, so a resumed run never duplicates lines.
        (run_dir / METRICS_FILENAME).write_text("".join(json.dumps(r) + "\n" for r in history))
        logger.info("epoch %d: train_loss %.4f train_acc %.3f val_loss %.4f val_acc %.3f (%.1f s)",
                    epoch, train_loss, train_acc, val_loss, val_acc, row["seconds"])
    return history
