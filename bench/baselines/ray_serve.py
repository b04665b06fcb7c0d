"""Peer: Ray Serve (``ray[serve]`` at the Ray version the batch engine pins) on the same ONNX model.

One deployment, one replica, HTTP ingress through Serve's own proxy, one photo per request in
the same multipart form as our ``/embed`` (file field ``images``, form fields ``layer`` and
``normalize``), answered with the same JSON shape. The replica decodes the upload with this
repository's :func:`models.decode.decode_image` (service limits, model card preprocessing) in a
worker thread, then awaits a ``@serve.batch`` method that runs onnxruntime on the batch Serve
formed (:class:`bench.baselines.peer_model.PeerModel`): exactly what our ``/embed`` computes.
Both blocking steps run off the replica's event loop (``asyncio.to_thread``), as Ray Serve's
docs advise, so requests keep arriving and decoding while a batch runs.

Settings: Ray Serve's defaults except ``max_batch_size`` 32 (our Encoder's) and
``max_ongoing_requests`` 64 (the default 5 would cap every batch at 5; Serve's batching guide
says to set it to at least the batch size); ``batch_wait_timeout_s`` stays Serve's 0.01 s.

Runs in its own virtual environment, ``bench/.venv-ray-serve`` (``make bench-ray-serve``:
``ray[serve]`` brings uvicorn[standard], i.e. uvloop and httptools, and a newer FastAPI, which
must not change the servers measured from ``.venv``), with the repository on ``PYTHONPATH``.
It starts its own local Ray instance (no dashboard, no usage statistics, a private temporary
folder) and, on SIGTERM or SIGINT, shuts Serve and that Ray instance down.

Run (the harness does this)::

    PYTHONPATH=. bench/.venv-ray-serve/bin/python -m bench.baselines.ray_serve \\
        --repository bench/.cache/model/mobilenet_v3_large/repo --name bench --version 1 \\
        --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench.ray_serve")

REPO_ROOT = Path(__file__).resolve().parents[2]
RAY_SERVE_VENV = REPO_ROOT / "bench" / ".venv-ray-serve"
INSTALL_LOG = REPO_ROOT / "bench" / ".cache" / "ray-serve-install.log"
APP_NAME = "cnn-codes-peer"


class RayServeUnavailable(RuntimeError):
    """Ray Serve cannot run here; the message says exactly why."""


def unavailable_reason() -> str | None:
    """None when ``bench/.venv-ray-serve`` is installed and Ray Serve imports there (harness
    side)."""
    import subprocess

    python = RAY_SERVE_VENV / "bin" / "python"
    if not python.is_file():
        tail = INSTALL_LOG.read_text(errors="replace")[-1500:] if INSTALL_LOG.is_file() else ""
        return (f"{python} is missing: `make bench-ray-serve` (pip install ray[serve] into "
                f"bench/.venv-ray-serve) did not complete. Install log tail: {tail or '(no log)'}")
    probe = subprocess.run([str(python), "-c", "import ray.serve, onnxruntime, PIL, multipart"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return f"Ray Serve does not import in {RAY_SERVE_VENV}: {probe.stderr.strip()[-800:]}"
    return None


def build_app(repository: str, name: str, version: str, *, max_batch_size: int,
              batch_wait_timeout_s: float, max_ongoing_requests: int,
              decode_threads: int) -> Any:
    """The Serve application: one ``Embedder`` replica (see the module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=1, max_ongoing_requests=max_ongoing_requests)
    class Embedder:
        """``POST /embed`` (multipart, one photo) -> CNN code; ``GET /readyz``."""

        def __init__(self) -> None:
            from bench.baselines.peer_model import PeerModel

            self.model = PeerModel.load(repository, name, version)
            self.dim = self.model.encoder.card.dim("embedding")
            self.decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def embed_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
            """Serve's batch of decoded images -> one L2-normalised code per image."""
            vectors = await asyncio.to_thread(self.model.embed, np.stack(images))
            return list(vectors)

        async def __call__(self, request: Request) -> JSONResponse:
            from models.errors import ImageError

            if request.url.path.rstrip("/") == "/readyz":
                return JSONResponse({"ready": True})
            if request.url.path.rstrip("/") != "/embed" or request.method != "POST":
                return JSONResponse({"error": "not found"}, status_code=404)
            form = await request.form()
            uploads = form.getlist("images")
            if len(uploads) != 1 or form.get("layer", "embedding") != "embedding":
                return JSONResponse({"error": "one file under 'images', layer=embedding"},
                                    status_code=400)
            upload = uploads[0]
            data = await upload.read()
            try:
                image = await asyncio.get_running_loop().run_in_executor(
                    self.decoders, self.model.decode, data)
            except ImageError as exc:
                return JSONResponse({"results": [{"index": 0, "filename": upload.filename,
                                                  "embedding": None,
                                                  "error": {"code": exc.code,
                                                            "message": exc.message}}]},
                                    status_code=422)
            vector = await self.embed_batch(image)
            return JSONResponse({"layer": "embedding", "dim": self.dim, "dtype": "float32",
                                 "normalized": True,
                                 "results": [{"index": 0, "filename": upload.filename,
                                              "embedding": vector.tolist(), "error": None}]})

    return Embedder.bind()


def build_parser() -> argparse.ArgumentParser:
    """Options of the Ray Serve peer."""
    p = argparse.ArgumentParser(prog="python -m bench.baselines.ray_serve",
                                description=__doc__.splitlines()[0])
    p.add_argument("--repository", required=True, help="model repository root")
    p.add_argument("--name", required=True, help="published model name")
    p.add_argument("--version", required=True, help="published version or alias")
    p.add_argument("--port", type=int, required=True, help="HTTP port on 127.0.0.1")
    p.add_argument("--max-batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01,
                   help="@serve.batch: longest the first request waits for its batch, s")
    p.add_argument("--max-ongoing-requests", type=int, default=64,
                   help="requests one replica holds at once")
    p.add_argument("--decode-threads", type=int, default=os.cpu_count() or 1,
                   help="replica threads decoding uploads")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1,
                   help="CPUs the local Ray instance offers")
    return p


def main(argv: list[str] | None = None) -> int:
    """Start a local Ray, deploy the app on 127.0.0.1:PORT, serve until SIGTERM / SIGINT."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    stop = threading.Event()
    # a short private folder: Ray's Unix socket paths must stay under 107 characters
    temp_dir = tempfile.mkdtemp(prefix="ray-bench-")
    try:
        # the workers' logs stay in their files under temp_dir (not copied into this one's)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 _temp_dir=temp_dir)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        app = build_app(args.repository, args.name, args.version,
                        max_batch_size=args.max_batch_size,
                        batch_wait_timeout_s=args.batch_wait_timeout_s,
                        max_ongoing_requests=args.max_ongoing_requests,
                        decode_threads=args.decode_threads)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        # after ray.init, which installs handlers of its own that end the driver abruptly
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: stop.set())
        logger.info("Ray Serve serving %s:%s on http://127.0.0.1:%d", args.name, args.version,
                    args.port)
        stop.wait()
        logger.info("stopping Ray Serve and the local Ray instance")
        serve.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
