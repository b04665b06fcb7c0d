"""The run directory: config files, per-epoch checkpoints, ``best.pt``, ``metrics.jsonl``.

Layout::

    RUN_DIR/config.json              resolved TrainConfig (read back by --resume and export)
    RUN_DIR/config.yaml              the same, as YAML, for people
    RUN_DIR/metrics.jsonl            one JSON object per epoch
    RUN_DIR/checkpoints/epoch_NNN.pt model + optimiser (+ GradScaler) state after epoch NNN
    RUN_DIR/best.pt                  the epoch with the highest val accuracy

A checkpoint is a dict (``torch.save``; every value loads with ``weights_only=True``):
``format``, ``epoch``, ``backbone``, ``weights``, ``class_names``, ``preprocessing`` (the
spec as JSON), ``model_state``, ``optimizer_state``, ``scaler_state`` (None without AMP),
``history`` (metrics rows up to this epoch), ``best_val_acc``, ``early_stopping`` and
``config`` (the TrainConfig as JSON).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from models.backbones.registry import CNNCodeModel, build_backbone
from models.preprocessing import PreprocessSpec
from training.config import CONFIG_FILENAME, CONFIG_YAML_FILENAME, TrainConfig
from training.schedule import early_stopping_state

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


def prepare_run_dir(config: TrainConfig, run_dir: Path,
                    resume: bool) -> tuple[TrainConfig, Path | None]:
    """Create ``run_dir``, settle the run's config and write ``config.json`` / ``config.yaml``.

    On resume the saved config is used, with ``epochs`` raised to ``config.epochs`` when that
    is larger (the only setting a resume may change).

    Returns:
        ``(config of the run, last epoch checkpoint to resume from or None)``.

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
    (run_dir / CONFIG_YAML_FILENAME).write_text(config.to_yaml())
    return config, existing[-1] if resume else None


@dataclass
class ResumePoint:
    """Where a resumed run continues.

    Attributes:
        history: metrics rows of the epochs already done.
        best_val_acc: highest val accuracy among them.
        start_epoch: the first epoch still to train (1-based).
    """

    history: list[dict[str, Any]]
    best_val_acc: float
    start_epoch: int


def restore_checkpoint(path: Path, model: CNNCodeModel, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler | None,
                       device: torch.device) -> ResumePoint:
    """Load model, optimiser (and GradScaler) state from the epoch checkpoint ``path``, in
    place, tensors onto ``device``; returns the run's progress."""
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model_state"])
    optimizer.load_state_dict(state["optimizer_state"])
    if scaler is not None and state.get("scaler_state"):
        scaler.load_state_dict(state["scaler_state"])
    return ResumePoint(list(state["history"]), float(state["best_val_acc"]),
                       int(state["epoch"]) + 1)


def epoch_checkpoint(*, epoch: int, config: TrainConfig, class_names: list[str],
                     spec: PreprocessSpec, model: CNNCodeModel,
                     optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                     history: list[dict[str, Any]], best_val_acc: float) -> dict[str, Any]:
    """The checkpoint dict after ``epoch`` (see the module docstring for its keys)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "backbone": config.backbone,
        "weights": config.weights,
        "class_names": list(class_names),
        "preprocessing": spec.model_dump(mode="json"),
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scaler_state": scaler.state_dict() if scaler is not None else None,
        "history": history,
        "best_val_acc": best_val_acc,
        "early_stopping": asdict(early_stopping_state(history, config)),
        "config": config.model_dump(mode="json"),
    }


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_epoch(run_dir: Path, checkpoint: dict[str, Any], *, is_best: bool) -> Path:
    """Write ``checkpoints/epoch_NNN.pt`` (atomically), copy it to ``best.pt`` when
    ``is_best``, and rewrite ``metrics.jsonl`` from the checkpoint's history.

    Returns:
        The epoch checkpoint's path.
    """
    path = run_dir / "checkpoints" / f"epoch_{checkpoint['epoch']:03d}.pt"
    _atomic_save(checkpoint, path)
    if is_best:
        shutil.copyfile(path, run_dir / (BEST_FILENAME + ".tmp"))
        os.replace(run_dir / (BEST_FILENAME + ".tmp"), run_dir / BEST_FILENAME)
    # Rewritten from the checkpoint's history, so a resumed run never duplicates lines.
    history = checkpoint["history"]
    (run_dir / METRICS_FILENAME).write_text("".join(json.dumps(r) + "\n" for r in history))
    return path
