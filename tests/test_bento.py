"""`bentoml build` packages the serving side (no torch) and the built Bento serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import REPO_ROOT, base_env, free_port, wait_ready


def test_bento_builds_and_serves(published, data_dir, tmp_path):
    env = base_env(BENTOML_HOME=str(tmp_path / "home"),
                   CNN_CODES_REPOSITORY=str(published["repository"]),
                   CNN_CODES_MODEL_NAME=published["name"],
                   CNN_CODES_GRPC_PORT=str(free_port()), CNN_CODES_SHUTDOWN_GRACE_S="0")
    env.pop("PYTHONPATH")  # the Bento must carry its own code
    bentoml = [sys.executable, "-m", "bentoml"]
    build = subprocess.run([*bentoml, "build", "."], env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    src = next((tmp_path / "home" / "bentos" / "cnn-codes").glob("*/src"))
    packaged = {p.relative_to(src).as_posix() for p in src.rglob("*.py")}
    assert "service/service.py" in packaged and "models/preprocessing.py" in packaged
    assert not any(p.startswith(("training/", "export/", "tests/")) for p in packaged)
    assert "models/backbones/registry.py" not in packaged  # the torch side stays out
    assert {f"service/static/{p.name}" for p in (REPO_ROOT / "service" / "static").iterdir()} <= \
        {p.relative_to(src).as_posix() for p in src.rglob("*")}  # the page at / and its assets
    requirements = next(src.parent.glob("env/python/requirements.txt")).read_text()
    assert "onnxruntime" in requirements and "torch" not in requirements

    port = free_port()
    log = open(tmp_path / "bento.log", "w")
    proc = subprocess.Popen([*bentoml, "serve", "cnn-codes:latest", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, tmp_path / "bento.log", timeout=180)
        image = sorted((data_dir / "val" / "ants").glob("*.jpg"))[0]
        response = httpx.post(f"http://127.0.0.1:{port}/embed", timeout=60,
                              files=[("images", (image.name, image.read_bytes()))])
        assert response.status_code == 200, response.text
        assert len(response.json()["results"][0]["embedding"]) == 1024
        page = httpx.get(f"http://127.0.0.1:{port}/static/app.js", timeout=60)
        assert page.status_code == 200 and "/thumbnails/" in page.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
