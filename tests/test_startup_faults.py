"""Start-up and fault behaviour of ``cnn-codes serve``, over real servers on loopback.

* an unusable model ends ``cnn-codes serve`` at once with one line and exit status 3 (pre-flight)
  instead of BentoML's workers restarting forever; a crash loop after the pre-flight ends it
  with exit status 4;
* ``/readyz`` answers (503) within a few seconds while the Encoder is frozen, and recovers;
* uploads go to the instance's own temp folder (emptied at start, removed at exit), and no
  ``cnn-codes-bentoml-*`` folder is left in the system temp folder;
* a 300-character upload file name and JSON nested 100,000 deep are 400s with a message on
  ``/embed`` (and ``/classify``) and ``/v2/models/<name>/infer``, and the server goes on serving.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from conftest import CLI, REPO_ROOT, Server, base_env, free_port, wait_until

EXIT_TIMEOUT_S = 90  # a pre-flight on the tiny model takes seconds; a crash loop never ends
WORKER_MODULE = "_bentoml_impl.worker.service"


def jpeg(size: int = 96) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 80, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def workers(server_pid: int, service: str | None = None) -> list[psutil.Process]:
    """BentoML service worker processes below ``server_pid`` (of ``service`` when given)."""
    found = []
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if WORKER_MODULE not in cmdline or "--service-name" not in cmdline:
            continue
        if service is None or cmdline[cmdline.index("--service-name") + 1] == service:
            found.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=10)


def copy_repository(published: dict, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the published repository (it is shared by the session) and the
    copy's version folder."""
    repository = tmp_path / "repository"
    shutil.copytree(published["repository"], repository)
    return repository, repository / published["name"] / str(published["version"])


def reseal(version_dir: Path) -> None:
    """Make the card describe the (damaged) ONNX file again: its sha256, size and checksum."""
    card_path = version_dir / "model_card.json"
    card = json.loads(card_path.read_text())
    onnx = (version_dir / "model.onnx").read_bytes()
    card["onnx_sha256"] = hashlib.sha256(onnx).hexdigest()
    card["onnx_bytes"] = len(onnx)
    card_path.write_text(json.dumps(card, indent=2))
    checksum = version_dir / "model_card.json.sha256"
    if checksum.exists():
        checksum.write_text(f"{hashlib.sha256(card_path.read_bytes()).hexdigest()}  "
                            "model_card.json\n")


def serve_until_exit(repository: Path, model: str, env: dict[str, str],
                     timeout: float = EXIT_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``cnn-codes serve`` and wait for it to exit by itself; fail (after stopping the
    whole process group) when it is still running after ``timeout``."""
    proc = subprocess.Popen(
        [*CLI, "serve", "--host", "127.0.0.1", "--port", str(free_port()),
         "--repository", str(repository), "--model", model],
        env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # BentoML's workers run in sessions of their own
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"cnn-codes serve still running after {timeout} s (crash loop?):\n"
                    f"{stderr[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def fresh_tmp() -> Path:
    """A short, private stand-in for the system temp folder (BentoML's Unix socket paths
    below ``TMPDIR`` must stay under 104 bytes)."""
    return Path(tempfile.mkdtemp(prefix="tsf-"))


# --- 5. an unusable model: exit at once ----------------------------------------------------

def _bad_name(published: dict, tmp_path: Path) -> tuple[Path, str, str]:
    return published["repository"], "../x", "../x"


def _truncated(published: dict, tmp_path: Path) -> tuple[Path, str, str]:
    repository, version_dir = copy_repository(published, tmp_path)
    onnx = version_dir / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    return repository, f"{published['name']}:{published['version']}", "sha256"


def _truncated_resealed(published: dict, tmp_path: Path) -> tuple[Path, str, str]:
    repository, version_dir = copy_repository(published, tmp_path)
    onnx = version_dir / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    reseal(version_dir)  # passes the sha256 check: only onnxruntime can tell
    return repository, f"{published['name']}:{published['version']}", "ONNX"


@pytest.mark.parametrize("damage", [_bad_name, _truncated, _truncated_resealed],
                         ids=["model-dotdot", "truncated-onnx", "truncated-onnx-resealed"])
def test_unusable_model_exits_with_one_clear_line(published, tmp_path, damage):
    repository, model, expected = damage(published, tmp_path)
    system_tmp = fresh_tmp()
    try:
        # no BENTOML_HOME: a refused start must not leave a cnn-codes-bentoml-* folder either
        env = {k: v for k, v in base_env(TMPDIR=str(system_tmp),
                                         CNN_CODES_GRPC_PORT=str(free_port())).items()
               if k != "BENTOML_HOME"}
        started = time.monotonic()
        result = serve_until_exit(repository, model, env)
        assert result.returncode == 3, (result.returncode, result.stderr[-4000:])
        assert time.monotonic() - started < 60
        lines = [line for line in result.stderr.splitlines()
                 if line.startswith("cnn-codes serve: cannot load model")]
        assert len(lines) == 1, result.stderr[-4000:]
        assert model.partition(":")[0] in lines[0] and expected in lines[0], lines[0]
        assert "Starting production" not in result.stderr + result.stdout  # BentoML never ran
        assert list(system_tmp.iterdir()) == []
    finally:
        shutil.rmtree(system_tmp, ignore_errors=True)


def test_help_documents_exit_statuses():
    proc = subprocess.run([*CLI, "serve", "--help"], env=base_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "exit status" in proc.stdout
    assert "\n  3 " in proc.stdout and "\n  4 " in proc.stdout, proc.stdout


def test_crash_loop_after_preflight_stops_serve(published, tmp_path):
    """The model breaks after the pre-flight; the worker holding the session then fails on
    every restart."""
    repository, version_dir = copy_repository(published, tmp_path)
    server = Server(repository, f"{published['name']}:{published['version']}", tmp_path,
                    CNN_CODES_MAX_WORKER_FAILURES="3", CNN_CODES_WORKER_FAILURE_WINDOW_S="120")
    try:
        server.wait_ready(240)
        onnx = version_dir / "model.onnx"
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
        api = workers(server.proc.pid, "cnn_codes")
        # the in-process core (batching = in_process) lives in the API worker
        api[0].send_signal(signal.SIGKILL)  # BentoML restarts it on the damaged file
        try:
            server.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            log = server.log()
            kill_tree(server.proc.pid)
            pytest.fail(f"still running after the Encoder failed repeatedly:\n{log[-4000:]}")
        assert server.proc.returncode == 4, server.log()[-4000:]
        assert "cnn-codes serve: service workers died 3 times" in server.log()
        deadline = time.monotonic() + 15  # nothing of the service is left running
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in api):
            assert time.monotonic() < deadline, "API workers still running"
            time.sleep(0.5)
    finally:
        server.stop()


# --- 6. /readyz is bounded -------------------------------------------------------------------

def _grpc_health(server) -> str:
    """The gRPC health status name of the whole server (service ``""``), or UNAVAILABLE."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.grpc_url) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@pytest.fixture(scope="module")
def encoder_server(published, tmp_path_factory):
    """The published model served with ``batching = encoder``: a separate Encoder process."""
    srv = Server(published["repository"], f"{published['name']}:{published['version']}",
                 tmp_path_factory.mktemp("encoder-server"), CNN_CODES_BATCHING="encoder")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_readyz_answers_while_the_encoder_is_frozen(encoder_server):
    """/readyz answers 503 in bounded time; /v2/health/ready and gRPC health, ready before,
    turn unready while the Encoder is frozen and ready again once it runs."""
    srv = encoder_server
    assert httpx.get(f"{srv.url}/v2/health/ready", timeout=10).status_code == 200
    wait_until(lambda: _grpc_health(srv) == "SERVING", "gRPC health SERVING", timeout=30)
    (encoder,) = workers(srv.proc.pid, "cnn_codes_encoder")
    encoder.send_signal(signal.SIGSTOP)
    try:
        for _ in range(2):  # also with the earlier probe's connection still pending
            started = time.monotonic()
            response = httpx.get(f"{srv.url}/readyz", timeout=20)
            elapsed = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert elapsed < 6, elapsed
            assert response.json()["code"] == "not_ready" and response.json()["error"]
        started = time.monotonic()
        v2 = httpx.get(f"{srv.url}/v2/health/ready", timeout=20)
        assert v2.status_code == 503 and v2.json() == {"ready": False}, v2.text
        assert time.monotonic() - started < 6
        wait_until(lambda: _grpc_health(srv) == "NOT_SERVING", "gRPC health NOT_SERVING",
                   timeout=15)
        assert httpx.get(f"{srv.url}/livez", timeout=5).status_code == 200
    finally:
        encoder.send_signal(signal.SIGCONT)
    wait_until(lambda: httpx.get(f"{srv.url}/readyz", timeout=20).status_code == 200,
               "/readyz 200 after SIGCONT", timeout=60)
    assert httpx.get(f"{srv.url}/v2/health/ready", timeout=10).status_code == 200
    wait_until(lambda: _grpc_health(srv) == "SERVING", "gRPC health SERVING again",
               timeout=30)
    ok = httpx.post(f"{srv.url}/embed", files=[("images", ("a.jpg", jpeg()))], timeout=60)
    assert ok.status_code == 200, ok.text


# --- 7. the service's own temp folder -------------------------------------------------------

def test_uploads_use_the_instance_temp_folder(published, tmp_path):
    from cnn_codes.commands import serve
    from cnn_codes.settings import Settings

    system_tmp = fresh_tmp()
    try:
        home = tmp_path / "home"
        own = serve.instance_tmp_dir(str(home), Settings(tmp_dir=None), str(system_tmp))
        assert own.parent == system_tmp
        # what a killed run left behind
        (own / "bentoml-request-stale").mkdir(parents=True)
        (own / "bentoml-request-stale" / "tmpabcdefghant.jpg").write_bytes(b"old upload")
        (own / "stale.bin").write_bytes(b"x")
        (own / serve.TMP_MARKER).write_text("")
        server = Server(published["repository"], f"{published['name']}:{published['version']}",
                        tmp_path, BENTOML_HOME=str(home), TMPDIR=str(system_tmp))
        try:
            server.wait_ready(240)
            assert not (own / "stale.bin").exists()
            assert not (own / "bentoml-request-stale").exists()
            procs = workers(server.proc.pid)
            assert len(procs) >= 1  # the API worker (and the Encoder with BATCHING=encoder)
            assert {p.environ().get("TMPDIR") for p in procs} == {str(own)}
            # /search is a BentoML route (its uploads become temp files; /embed and /classify
            # are parsed in memory, service/front.py); with no index it answers 404 after that
            response = httpx.post(f"{server.url}/search", timeout=60,
                                  files=[("images", ("ant.jpg", jpeg()))])
            assert response.status_code == 404, response.text
            assert any(p.name.startswith("bentoml-request-") for p in own.iterdir())
            assert not any(p.name.startswith("bentoml-") for p in system_tmp.iterdir()), \
                list(system_tmp.iterdir())
        finally:
            server.stop()
        assert server.proc.returncode is not None
        assert not own.exists(), list(own.iterdir())
        leftovers = [p.name for p in system_tmp.iterdir()]
        assert not [n for n in leftovers if n.startswith("cnn-codes-bentoml-")], leftovers
    finally:
        shutil.rmtree(system_tmp, ignore_errors=True)


# --- 9. absurd inputs are 400s ----------------------------------------------------------------

LONG_NAME = "a" * 296 + ".jpg"  # 300 characters: past NAME_MAX once BentoML prefixes it
DEEP = "[" * 100_000 + "]" * 100_000


def assert_400(response: httpx.Response) -> None:
    assert response.status_code == 400, (response.status_code, response.text[:500])
    assert response.json()["error"], response.text[:500]


def test_long_file_name_is_400_and_server_goes_on(server, published):
    for route in ("/embed", "/classify"):
        response = httpx.post(f"{server.url}{route}", timeout=60,
                              files=[("images", (LONG_NAME, jpeg()))])
        assert_400(response)
        assert "too long" in response.json()["error"]
    body = {"images": [{"b64": base64.b64encode(jpeg()).decode(), "filename": LONG_NAME}]}
    response = httpx.post(f"{server.url}/embed", json=body, timeout=60)
    assert_400(response)
    assert "too long" in response.json()["error"]
    # the Open Inference Protocol carries no file names: a long tensor name is refused too
    infer = f"{server.url}/v2/models/{published['name']}/infer"
    response = httpx.post(infer, timeout=60, json={"inputs": [{
        "name": "x" * 300, "datatype": "BYTES", "shape": [1],
        "data": [base64.b64encode(jpeg()).decode()]}]})
    assert 400 <= response.status_code < 500 and response.json()["error"], response.text[:500]
    ok = httpx.post(f"{server.url}/embed", files=[("images", ("a.jpg", jpeg()))], timeout=60)
    assert ok.status_code == 200, ok.text


def test_deeply_nested_json_is_400_and_server_goes_on(server, published):
    headers = {"content-type": "application/json"}
    url = server.url
    infer = f"{url}/v2/models/{published['name']}/infer"
    cases = [
        (f"{url}/embed", DEEP.encode()),
        (f"{url}/embed", b'{"images": ' + DEEP.encode() + b"}"),
        (infer, DEEP.encode()),
        (infer, b'{"inputs": ' + DEEP.encode() + b"}"),
    ]
    for target, body in cases:
        response = httpx.post(target, content=body, headers=headers, timeout=60)
        assert_400(response)
        assert "nested too deeply" in response.json()["error"], response.text[:500]
    # a form field's JSON value (BentoML json.loads every non-file field)
    response = httpx.post(f"{url}/embed", data={"layer": DEEP}, timeout=60,
                          files=[("images", ("a.jpg", jpeg()))])
    assert_400(response)
    # deep but parseable BYTES data on /v2: flattened without recursion, then refused
    nested: object = base64.b64encode(jpeg()).decode()
    for _ in range(900):
        nested = [nested]
    response = httpx.post(infer, timeout=60, json={"inputs": [{
        "name": "images", "datatype": "BYTES", "shape": [1], "data": nested}]})
    assert response.status_code in (200, 400), response.text[:500]
    ok = httpx.post(f"{url}/embed", files=[("images", ("a.jpg", jpeg()))], timeout=60)
    assert ok.status_code == 200, ok.text
    ok = httpx.post(infer, timeout=60, json={"inputs": [{
        "name": "images", "datatype": "BYTES", "shape": [1],
        "data": [base64.b64encode(jpeg()).decode()]}]})
    assert ok.status_code == 200, ok.text[:500]
