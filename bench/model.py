"""The benchmarked model, built with the project's own commands and cached under bench/.cache.

``cnn-codes train`` (one epoch of feature extraction from random init: weights cannot be
downloaded here, and speed does not depend on the weights' values) then ``cnn-codes export``
into a private model repository.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cnn_codes.cli"]
MODEL_NAME = "bench"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchModel:
    """A trained run and its published ONNX export.

    Attributes:
        backbone: registry name.
        run_dir: the training run (holds ``best.pt`` for the torch baselines).
        repository: model repository holding ``bench/<version>/``.
        name, version: the published model.
        onnx_path: ``model.onnx`` of that version.
    """

    backbone: str
    run_dir: Path
    repository: Path
    name: str
    version: int
    onnx_path: Path

    @property
    def ref(self) -> str:
        """``name:version`` as ``cnn-codes serve --model`` takes it."""
        return f"{self.name}:{self.version}"


def offline_env(**extra: str) -> dict[str, str]:
    """This environment plus the offline switches and the repository on ``PYTHONPATH``."""
    env = dict(os.environ)
    env.update({"BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                            env.get("PYTHONPATH")]))})
    env.update(extra)
    return env


def _cli(*args: str, timeout: float) -> str:
    """Run ``cnn-codes ARGS``; return stdout; raise with the output tail on failure."""
    logger.info("cnn-codes %s", " ".join(args))
    proc = subprocess.run([*CLI, *args], env=offline_env(), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"cnn-codes {' '.join(args)} exited {proc.returncode}:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def ensure_model(cache_dir: Path, data_dir: Path, backbone: str, *, epochs: int = 1,
                 timeout: float = 1800) -> BenchModel:
    """Train + export the benchmark model once; later runs reuse the cached export.

    Args:
        cache_dir: ``bench/.cache/model``; one sub-folder per backbone.
        data_dir: ImageFolder with ``train/`` and ``val/`` (the sample photos).
        backbone: registry name, e.g. ``mobilenet_v3_large``.
        epochs: training epochs (speed does not depend on them).
        timeout: seconds allowed for each of train and export.

    Returns:
        The published model.
    """
    root = cache_dir / backbone
    run_dir, repository = root / "run", root / "repo"
    marker = root / "published.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        onnx_path = Path(info["path"]) / "model.onnx"
        if onnx_path.is_file() and (run_dir / "best.pt").is_file():
            logger.info("reusing cached model %s:%s (%s)", info["name"], info["version"],
                        onnx_path)
            return BenchModel(backbone, run_dir, repository, info["name"], int(info["version"]),
                              onnx_path)
    root.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "best.pt").is_file():
        # Feature extraction (frozen backbone) trains only the head: the cheapest real run.
        _cli("train", "--data", str(data_dir), "--backbone", backbone, "--epochs", str(epochs),
             "--mode", "feature-extract", "--out", str(run_dir), timeout=timeout)
    stdout = _cli("export", str(run_dir), "--repository", str(repository), "--name", MODEL_NAME,
                  timeout=timeout)
    line = next(x for x in reversed(stdout.strip().splitlines()) if x.startswith("{"))
    info = json.loads(line)
    marker.write_text(json.dumps(info))
    return BenchModel(backbone, run_dir, repository, info["name"], int(info["version"]),
                      Path(info["path"]) / "model.onnx")
