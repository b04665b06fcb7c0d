"""Baseline: TorchServe with its stock ``image_classifier`` handler on the same weights.

TorchServe lives in its own virtual environment, ``bench/.venv-torchserve`` (``make
bench-torchserve``), so its packages never touch the project's. That environment reuses the
project's torch and torchvision through a ``.pth`` file pointing at ``.venv``'s site-packages
(one more 5 GB torch install would buy nothing, and the same torch build makes the comparison
fair). The model is archived eagerly: a ``model.py`` building the torchvision backbone plus the
run's ``state_dict``. The handler is the stock ``ImageClassifier`` with one change forced by a
two-class model: ``topk = 2`` (the stock value 5 makes ``torch.topk`` fail on K=2).

What the stock handler does differently from our service (not changed, because it is what a
user gets): ``Resize(256)`` for every model (ours reads the preset: 232 for
MobileNetV3-Large), no JPEG draft mode, no RGB conversion (a palette GIF fails), batch size 1,
one worker per core, JSON out.

Deliberately not the project's inference core: the archived ``model.py`` and handler below
decode, preprocess and post-process (softmax, top-k) with TorchServe's and torchvision's own
code, exactly what a TorchServe user deploys. :mod:`models.decode`, :mod:`models.postprocess`
and :mod:`models.runtime` stay out of them on purpose: the point is to measure the stock
TorchServe path, not ours inside TorchServe.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import ManagedServer, free_port

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
TS_VENV = REPO_ROOT / "bench" / ".venv-torchserve"
MODEL_NAME = "bench"

# The two files below are TorchServe's side, written as a TorchServe user writes them: keep
# them on TorchServe's own preprocessing and softmax (see the module docstring).
_MODEL_PY = '''"""Eager model for TorchServe: torchvision {backbone} with {k} classes (bench)."""
import torch
import torchvision


class BenchNet(torch.nn.Module):
    """The fine-tuned torchvision classifier; the state dict keys carry a ``net.`` prefix."""

    def __init__(self):
        super().__init__()
        self.net = torchvision.models.get_model("{backbone}", weights=None, num_classes={k})

    def forward(self, x):
        return self.net(x)
'''

_HANDLER_PY = '''"""TorchServe's stock image classifier; topk lowered to the model's {k} classes."""
from ts.torch_handler.image_classifier import ImageClassifier


class BenchImageClassifier(ImageClassifier):
    """Stock ImageClassifier (Resize 256, CenterCrop 224, ImageNet mean/std, softmax top-k)."""

    topk = {topk}
'''


class TorchServeUnavailable(RuntimeError):
    """TorchServe cannot run here; the message says exactly why."""


def unavailable_reason() -> str | None:
    """None when TorchServe's environment is installed and its java frontend can start."""
    for tool in ("torchserve", "torch-model-archiver"):
        if not (TS_VENV / "bin" / tool).is_file():
            log = REPO_ROOT / "bench" / ".cache" / "torchserve-install.log"
            tail = log.read_text(errors="replace")[-1500:] if log.is_file() else ""
            return (f"{TS_VENV / 'bin' / tool} is missing: `make bench-torchserve` (pip install "
                    "torchserve torch-model-archiver captum into bench/.venv-torchserve) did "
                    f"not complete. Install log tail: {tail or '(no log)'}")
    if shutil.which("java") is None:
        return "no `java` on PATH: TorchServe's frontend needs a JDK (11+)"
    probe = subprocess.run([str(TS_VENV / "bin" / "python"), "-c",
                            "import torch, torchvision, captum, ts.torch_handler.image_classifier"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return f"TorchServe's handler does not import: {probe.stderr.strip()[-800:]}"
    return None


def build_archive(run_dir: Path, work_dir: Path) -> Path:
    """Archive the run's weights as ``bench.mar`` with the stock image classifier handler.

    Returns:
        The model store folder holding ``bench.mar``.

    Raises:
        TorchServeUnavailable: torch-model-archiver failed.
    """
    import torch

    from export.onnx_export import load_run_checkpoint

    state = load_run_checkpoint(run_dir, "best")
    classes = list(state["class_names"])
    src = work_dir / "torchserve-src"
    store = work_dir / "torchserve-store"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    src.mkdir(parents=True)
    store.mkdir(parents=True)
    (src / "model.py").write_text(_MODEL_PY.format(backbone=state["backbone"], k=len(classes)))
    (src / "handler.py").write_text(_HANDLER_PY.format(k=len(classes),
                                                       topk=min(5, len(classes))))
    (src / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in
                                                        enumerate(classes)}))
    weights = {k: v for k, v in state["model_state"].items() if k.startswith("net.")}
    torch.save(weights, src / "weights.pt")
    argv = [str(TS_VENV / "bin" / "torch-model-archiver"), "--model-name", MODEL_NAME,
            "--version", "1.0", "--model-file", str(src / "model.py"),
            "--serialized-file", str(src / "weights.pt"), "--handler", str(src / "handler.py"),
            "--extra-files", str(src / "index_to_name.json"), "--export-path", str(store)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise TorchServeUnavailable(f"torch-model-archiver exited {proc.returncode}: "
                                    f"{proc.stderr[-1500:]}")
    return store


@dataclass
class TorchServeInstance:
    """A configured (not yet started) TorchServe."""

    server: ManagedServer
    url: str
    management_url: str


def make_server(store: Path, work_dir: Path, env: dict[str, str]) -> TorchServeInstance:
    """TorchServe on free loopback ports serving ``bench.mar`` (stock settings otherwise).

    Token authorisation is turned off (loopback benchmark); its pid file and logs go to
    ``work_dir`` (``TMPDIR``, ``LOG_LOCATION``), so it cannot clash with another TorchServe.
    """
    home = work_dir / "torchserve-home"
    shutil.rmtree(home, ignore_errors=True)
    (home / "tmp").mkdir(parents=True)
    ports = [free_port() for _ in range(3)]
    config = home / "config.properties"
    config.write_text("\n".join([
        f"inference_address=http://127.0.0.1:{ports[0]}",
        f"management_address=http://127.0.0.1:{ports[1]}",
        f"metrics_address=http://127.0.0.1:{ports[2]}",
        f"model_store={store}",
        "disable_token_authorization=true",
        "",
    ]))
    env = {**env, "TMPDIR": str(home / "tmp"), "TEMP": str(home / "tmp"),
           "LOG_LOCATION": str(home / "logs"), "METRICS_LOCATION": str(home / "logs")}
    argv = [str(TS_VENV / "bin" / "torchserve"), "--start", "--foreground", "--ncs",
            "--model-store", str(store), "--models", f"{MODEL_NAME}={MODEL_NAME}.mar",
            "--ts-config", str(config), "--disable-token-auth"]
    server = ManagedServer("torchserve", argv, env, home, work_dir / "logs" / "torchserve.log")
    return TorchServeInstance(server, f"http://127.0.0.1:{ports[0]}",
                              f"http://127.0.0.1:{ports[1]}")
