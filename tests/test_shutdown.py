"""Graceful shutdown: SIGTERM stops accepting, finishes the request in flight, then exits."""

from __future__ import annotations

import io
import signal
import threading
import time

import httpx
from PIL import Image

from conftest import Server


def test_sigterm_finishes_in_flight_request(published, data_dir, tmp_path):
    photo = Image.open(sorted((data_dir / "val" / "bees").glob("*.jpg"))[0]).convert("RGB")
    buffer = io.BytesIO()
    photo.resize((2400, 2400)).save(buffer, format="PNG")  # PNG: no draft mode, slow decode
    files = [("images", (f"{i}.png", buffer.getvalue())) for i in range(6)]
    server = Server(published["repository"], f"{published['name']}:{published['version']}",
                    tmp_path, CNN_CODES_SHUTDOWN_GRACE_S="10")
    result: dict[str, httpx.Response | Exception] = {}

    def slow_request() -> None:
        try:
            result["response"] = httpx.post(f"{server.url}/embed", files=files, timeout=180)
        except httpx.HTTPError as exc:
            result["response"] = exc

    try:
        server.wait_ready()
        worker = threading.Thread(target=slow_request)
        worker.start()
        time.sleep(1.5)  # the upload is done and decoding is under way
        server.proc.send_signal(signal.SIGTERM)  # what docker/systemd send to the main process
        worker.join(180)
        response = result["response"]
        assert isinstance(response, httpx.Response), response
        assert response.status_code == 200, response.text
        assert all(item["embedding"] for item in response.json()["results"])
        server.proc.wait(timeout=90)
        assert server.proc.returncode is not None
        try:
            refused = httpx.get(f"{server.url}/livez", timeout=5)
        except httpx.TransportError:
            refused = None
        assert refused is None, "still accepting connections after shutdown"
    finally:
        server.stop()
