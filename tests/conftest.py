"""Shared fixtures: the real sample data, free ports, a trained + exported tiny model, servers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "hymenoptera"
CLI = [sys.executable, "-m", "cnn_codes.cli"]


def base_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: offline libraries, repo on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ)
    env.update({"BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1",
                "PYTHONPATH": str(REPO_ROOT)})
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real hymenoptera ImageFolder (``CNN_CODES_SAMPLE_DATA``); a failure in CI if absent."""
    path = Path(os.environ.get("CNN_CODES_SAMPLE_DATA", DEFAULT_DATA))
    if not (path / "train").is_dir() or not (path / "val").is_dir():
        message = f"sample data not found at {path} (set CNN_CODES_SAMPLE_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cnn-codes ARGS`` and fail the test with its output if it exits non-zero."""
    proc = subprocess.run([*CLI, *args], env=env or base_env(), cwd=cwd or REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"cnn-codes {' '.join(args)} exited {proc.returncode}\n"
                    f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def last_json_line(text: str) -> dict:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{text[-2000:]}")


def subset_imagefolder(data_dir: Path, root: Path, counts: dict[str, dict[str, int]]) -> Path:
    """Copy the first ``counts[split][cls]`` JPEGs of each class of ``data_dir`` into ``root``."""
    for split, per_class in counts.items():
        for cls, count in per_class.items():
            (root / split / cls).mkdir(parents=True)
            for path in sorted((data_dir / split / cls).glob("*.jpg"))[:count]:
                shutil.copy(path, root / split / cls / path.name)
    return root


@pytest.fixture(scope="session")
def trained_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short epoch of mobilenet_v3_small fine-tuning on the real train split (CLI)."""
    run_dir = tmp_path_factory.mktemp("runs") / "small"
    run_cli("train", "--data", str(data_dir), "--backbone", "mobilenet_v3_small",
            "--epochs", "1", "--batch-size", "16", "--out", str(run_dir))
    return run_dir


@pytest.fixture(scope="session")
def published(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The run exported with ``cnn-codes export`` into a fresh model repository."""
    repository = tmp_path_factory.mktemp("repository")
    proc = run_cli("export", str(trained_run), "--repository", str(repository),
                   "--name", "ants-bees")
    result = last_json_line(proc.stdout)
    return {"repository": repository, "name": "ants-bees", "version": result["version"],
            "path": Path(result["path"])}


@pytest.fixture(scope="session")
def embedded(published: dict, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real train and val photos embedded by the published model (two embed folders)."""
    root = tmp_path_factory.mktemp("search")
    model = f"{published['name']}:{published['version']}"
    for split in ("train", "val"):
        run_cli("embed", str(data_dir / split), "--out", str(root / f"emb-{split}"),
                "--model", model, "--repository", str(published["repository"]),
                "--no-progress")
    return {"root": root, "train": root / "emb-train", "val": root / "emb-val", "model": model,
            "repository": published["repository"]}


@pytest.fixture(scope="session")
def index(embedded: dict) -> dict:
    """An exact index of both embed folders (``dir``, build ``manifest``); tests that change an
    index copy ``dir`` first."""
    out = embedded["root"] / "index"
    proc = run_cli("index", "build", str(embedded["train"]), str(embedded["val"]),
                   "--out", str(out), "--no-progress")
    return {"dir": out, "manifest": last_json_line(proc.stdout)}


def metric(url: str, name: str, /, **labels: str) -> float:
    """Sum of the samples of ``name`` on ``url/metrics`` whose labels include ``labels``
    (positional-only parameters, so ``name=`` and ``url=`` can be label filters)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=60).text
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_until(check, what: str, timeout: float = 60.0, interval: float = 0.5):
    """Call ``check`` every ``interval`` s until it returns something truthy (returned);
    fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    """Poll ``url/readyz`` until 200; fail with the log's tail on timeout or if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode}:\n"
                        f"{log_path.read_text(errors='replace')[-6000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server not ready after {timeout} s:\n"
                f"{log_path.read_text(errors='replace')[-6000:]}")


class Server:
    """A ``cnn-codes serve`` process on a free loopback port; stopped by :meth:`stop`."""

    def __init__(self, repository: Path, model: str, tmp: Path, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"serve-{self.port}.log"
        # every server gets its own gRPC port too (SO_REUSEPORT would share a fixed one)
        # no shutdown grace unless a test asks for it (test_shutdown does): stops stay quick
        env = base_env(**{"BENTOML_HOME": str(tmp / f"bentoml-{self.port}"),
                          "CNN_CODES_GRPC_PORT": str(free_port()),
                          "CNN_CODES_SHUTDOWN_GRACE_S": "0", **settings})
        self.grpc_port = int(env["CNN_CODES_GRPC_PORT"])
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--repository", str(repository), "--model", model],
            env=env, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        """Poll ``/readyz`` until 200; fail with the server log on timeout or early exit."""
        wait_ready(self.url, self.proc, self.log_path, timeout)

    def stop(self) -> None:
        """SIGTERM the whole process group, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def server(published: dict, tmp_path_factory: pytest.TempPathFactory):
    """The published model served over HTTP on loopback for one test module."""
    srv = Server(published["repository"], f"{published['name']}:{published['version']}",
                 tmp_path_factory.mktemp("server"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
