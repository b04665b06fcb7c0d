"""Peer: NVIDIA Triton Inference Server 2.51 as PyTriton 0.7.0 ships it, on the same ONNX model.

PyTriton's wheel carries the ``tritonserver`` binary and its Python backend; ``Triton.bind``
puts a Python ``infer_func`` behind Triton's dynamic batcher (PyTriton's ``@batch`` decorator
hands it the batch Triton formed as one array per input). The function decodes the encoded
photos with this repository's :func:`models.decode.decode_image` (the service's limits and the
model card's preprocessing) and runs onnxruntime on the published ``model.onnx``
(:class:`bench.baselines.peer_model.PeerModel`): exactly what our ``/embed`` computes.

The model speaks KServe v2 like our gRPC front: input ``images`` (``BYTES``, one encoded file per
batch row), output ``embedding`` (``FP32 [D]``, L2-normalised), model name = the published
model's name, so :mod:`bench.grpcload` drives both. One difference: Triton requires every input
of a batching model to have at least one dimension besides the batch (``dims: []`` is refused:
"model input 'images' must specify 'dims'"), so a request carries shape ``[1, 1]`` (our front
takes ``[N]`` and ``[N, 1]``; the load generator sends ``[1]`` to ours). Triton's HTTP front
takes the same tensors with the binary tensor data extension.

Runs in its own virtual environment, ``bench/.venv-triton`` (``make bench-triton``: PyTriton
pins numpy < 2), with the repository on ``PYTHONPATH``. Triton's Python backend stub embeds the
interpreter's shared ``libpython``: it must be the venv interpreter's own (the distribution's
``libpython3.11`` lacks ``RLock._recursion_count``, which the stub calls, and the model fails to
load), so :func:`main` puts that library's folder first on ``LD_LIBRARY_PATH`` before it starts
the server (:func:`libpython_dir`).

Run (the harness does this)::

    PYTHONPATH=. bench/.venv-triton/bin/python -m bench.baselines.triton \\
        --repository bench/.cache/model/mobilenet_v3_large/repo --name bench --version 1 \\
        --http-port 8000 --grpc-port 8001 --metrics-port 8002 --workspace /tmp/triton-ws

Stock Triton settings otherwise: one model instance, dynamic batcher with no added queueing
delay (``max_queue_delay_microseconds`` 0: a batch is whatever queued while the previous one
ran), ``max_batch_size`` 32 like our Encoder.

A batch is all-or-nothing here: an image that does not decode fails every request Triton put in
its batch (PyTriton's ``@batch`` returns one outcome per batch). The sample photos all decode.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

logger = logging.getLogger("bench.triton")

REPO_ROOT = Path(__file__).resolve().parents[2]
TRITON_VENV = REPO_ROOT / "bench" / ".venv-triton"
INSTALL_LOG = REPO_ROOT / "bench" / ".cache" / "triton-install.log"
INPUT_NAME, OUTPUT_NAME = "images", "embedding"


class TritonUnavailable(RuntimeError):
    """Triton (PyTriton) cannot run here; the message says exactly why."""


def unavailable_reason() -> str | None:
    """None when ``bench/.venv-triton`` is installed and PyTriton imports there (harness side)."""
    python = TRITON_VENV / "bin" / "python"
    if not python.is_file():
        tail = INSTALL_LOG.read_text(errors="replace")[-1500:] if INSTALL_LOG.is_file() else ""
        return (f"{python} is missing: `make bench-triton` (pip install nvidia-pytriton into "
                f"bench/.venv-triton) did not complete. Install log tail: {tail or '(no log)'}")
    probe = subprocess.run([str(python), "-c", "import pytriton.triton, onnxruntime, PIL"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return f"PyTriton does not import in {TRITON_VENV}: {probe.stderr.strip()[-800:]}"
    return None


def libpython_dir() -> Path | None:
    """The folder of this interpreter's shared ``libpython`` (sysconfig ``LIBDIR`` holding
    ``INSTSONAME``, e.g. ``~/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0``); None for a
    statically linked interpreter."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).is_file():
        return Path(libdir)
    return None


def _prepend_library_path(folder: Path) -> None:
    current = os.environ.get("LD_LIBRARY_PATH", "")
    parts = [p for p in current.split(os.pathsep) if p and p != str(folder)]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([str(folder), *parts])


def build_parser() -> argparse.ArgumentParser:
    """Options of the Triton peer."""
    p = argparse.ArgumentParser(prog="python -m bench.baselines.triton",
                                description=__doc__.splitlines()[0])
    p.add_argument("--repository", required=True, type=Path, help="model repository root")
    p.add_argument("--name", required=True, help="published model name (= Triton model name)")
    p.add_argument("--version", required=True, help="published version or alias")
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--workspace", type=Path, required=True,
                   help="PyTriton's workspace (model store, sockets)")
    p.add_argument("--max-batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="dynamic batcher: longest a request waits for its batch to fill, us")
    p.add_argument("--decode-threads", type=int, default=os.cpu_count() or 1,
                   help="threads decoding one batch (Pillow releases the GIL)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Serve the model on Triton until SIGTERM / SIGINT; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    folder = libpython_dir()
    if folder is not None:
        _prepend_library_path(folder)  # the server (and its Python backend stub) inherits it
    logger.info("LD_LIBRARY_PATH=%s", os.environ.get("LD_LIBRARY_PATH", ""))

    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from bench.baselines.peer_model import PeerModel

    model = PeerModel.load(args.repository, args.name, args.version,
                           decode_threads=args.decode_threads)

    @batch
    def infer_func(images: np.ndarray) -> dict[str, np.ndarray]:
        """``images``: ``(N, 1)`` object array of encoded files -> ``embedding (N, D)`` float32.

        Raises:
            models.errors.ImageError: an image of the batch does not decode (fails the batch).
        """
        payloads = [bytes(x) for x in images.reshape(-1)]
        return {OUTPUT_NAME: model.embed(model.decode_many(payloads))}

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # Triton.serve() stops on it

    signal.signal(signal.SIGTERM, terminate)
    config = TritonConfig(http_address="127.0.0.1", http_port=args.http_port,
                          grpc_address="127.0.0.1", grpc_port=args.grpc_port,
                          metrics_address="127.0.0.1", metrics_port=args.metrics_port,
                          allow_gpu_metrics=False, exit_on_error=True)
    dim = model.encoder.card.dim(OUTPUT_NAME)
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name=args.name, infer_func=infer_func,
            inputs=[Tensor(name=INPUT_NAME, dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name=OUTPUT_NAME, dtype=np.float32, shape=(dim,))],
            config=ModelConfig(max_batch_size=args.max_batch_size, batcher=DynamicBatcher(
                max_queue_delay_microseconds=args.max_queue_delay_us)),
            strict=True)
        logger.info("Triton serving %s on 127.0.0.1: HTTP %d, gRPC %d, metrics %d", args.name,
                    args.http_port, args.grpc_port, args.metrics_port)
        try:
            triton.serve()
        except KeyboardInterrupt:
            logger.info("stopping Triton")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
