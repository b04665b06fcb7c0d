"""Model repository operations and hot reload through the public commands and HTTP.

A second version is made by resuming the real training run for one more epoch and exporting
it; the service follows the ``production`` alias, swaps with no failed request, and refuses
corrupt or incompatible versions while the old one keeps serving.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import CLI, REPO_ROOT, Server, base_env, last_json_line, run_cli
from models.card import ModelCard
from models.decode import decode_file
from models.repository import seal_card
from models.runtime import open_session

ADMIN = "admin-key-for-tests-0001"
TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def repo_two_versions(trained_run: Path, published: dict, tmp_path_factory) -> dict:
    """A repository with version 1 (the shared export) and version 2 (one more epoch)."""
    root = tmp_path_factory.mktemp("reload")
    repository, name = root / "repo", published["name"]
    shutil.copytree(published["repository"], repository)
    run2 = root / "run2"
    shutil.copytree(trained_run, run2)
    run_cli("train", "--out", str(run2), "--resume", "--epochs", "2")
    proc = run_cli("export", str(run2), "--repository", str(repository), "--name", name,
                   "--checkpoint", "last", "--parity-limit", "16")
    assert last_json_line(proc.stdout)["version"] == 2
    run_cli("models", "promote", f"{name}:1", "--repository", str(repository))
    return {"repository": repository, "name": name}


def models_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "models", *args], env=base_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_models_commands(repo_two_versions):
    repository, name = str(repo_two_versions["repository"]), repo_two_versions["name"]
    listed = models_cli("list", "--repository", repository).stdout
    assert f"{name}\t1,2\tproduction=1" in listed
    shown = json.loads(models_cli("show", f"{name}:production", "--repository",
                                  repository).stdout)
    assert shown["version"] == 1
    refused = models_cli("remove", f"{name}:1", "--repository", repository)
    assert refused.returncode == 1 and "production" in refused.stderr
    missing = models_cli("verify", f"{name}:7", "--repository", repository)
    assert missing.returncode == 1 and "no version 7" in missing.stderr


def embed(url: str, image: Path) -> httpx.Response:
    return httpx.post(f"{url}/embed", files=[("images", (image.name, image.read_bytes()))],
                      data={"normalize": "false"}, timeout=TIMEOUT)


def make_bad_version(repository: Path, name: str, version: int, *, corrupt: bool) -> None:
    """Copy version 2 to ``version``: with a tampered ONNX file, or with other class names."""
    source, target = repository / name / "2", repository / name / str(version)
    shutil.copytree(source, target)
    card = json.loads((target / "model_card.json").read_text())
    card["version"] = version
    if corrupt:
        with open(target / "model.onnx", "ab") as handle:
            handle.write(b"\0corrupt")
    else:
        card["class_names"] = ["wasps", "hornets"]
    (target / "model_card.json").write_text(json.dumps(card))
    seal_card(target)  # as a publisher would: the card itself is consistent


def point_alias(repository: Path, name: str, version: int) -> None:
    """Move the alias by hand (the CLI refuses corrupt versions, as it should)."""
    (repository / name / "aliases.json").write_text(json.dumps({"production": version}))


def test_hot_reload_follows_alias_without_failed_requests(repo_two_versions, data_dir,
                                                          tmp_path):
    repository, name = repo_two_versions["repository"], repo_two_versions["name"]
    image = sorted((data_dir / "val" / "ants").glob("*.jpg"))[0]
    # one API worker: "never back to the old version" holds per worker; several workers each
    # follow the alias on their own poll, so for up to RELOAD_POLL_S they answer different versions
    server = Server(repository, f"{name}:production", tmp_path, CNN_CODES_RELOAD_POLL_S="1",
                    CNN_CODES_ADMIN_KEYS=json.dumps([ADMIN]), CNN_CODES_API_WORKERS="1")
    statuses: list[int] = []
    versions: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            response = embed(server.url, image)
            statuses.append(response.status_code)
            if response.status_code == 200:
                versions.append(response.json()["model"]["version"])

    try:
        server.wait_ready()
        assert httpx.get(f"{server.url}/metadata").json()["version"] == 1
        worker = threading.Thread(target=traffic)
        worker.start()
        time.sleep(2)
        run_cli("models", "promote", f"{name}:2", "--repository", str(repository))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (not versions or versions[-1] != 2):
            time.sleep(0.5)
        time.sleep(2)
        stop.set()
        worker.join(60)
        assert statuses and set(statuses) == {200}, statuses
        assert versions[0] == 1 and versions[-1] == 2, versions
        assert versions == sorted(versions), "responses went back to the old version"
        assert httpx.get(f"{server.url}/metadata").json()["version"] == 2

        # the new weights really compute: HTTP equals onnxruntime on version 2
        card = ModelCard.model_validate_json(
            (repository / name / "2" / "model_card.json").read_text())
        session = open_session(str(repository / name / "2" / "model.onnx"))
        expected = session.run(["embedding"], {"images": decode_file(
            str(image), card.preprocessing)[None]})[0][0]
        got = np.array(embed(server.url, image).json()["results"][0]["embedding"])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

        # admin API: keys required
        assert httpx.post(f"{server.url}/admin/reload").status_code == 401
        auth = {"Authorization": f"Bearer {ADMIN}"}
        same = httpx.post(f"{server.url}/admin/reload", headers=auth, timeout=TIMEOUT)
        assert same.status_code == 200 and same.json() == {
            "reloaded": False, "previous": 2, "version": 2}

        # a corrupt version is refused, the old one keeps serving
        make_bad_version(repository, name, 3, corrupt=True)
        assert models_cli("promote", f"{name}:3", "--repository",
                          str(repository)).returncode == 1
        point_alias(repository, name, 3)
        refused = httpx.post(f"{server.url}/admin/reload", headers=auth, timeout=TIMEOUT)
        assert refused.status_code == 409 and "sha256" in refused.json()["error"]
        after = embed(server.url, image)
        assert after.status_code == 200 and after.json()["model"]["version"] == 2

        # an incompatible version (other classes) is refused too
        make_bad_version(repository, name, 4, corrupt=False)
        point_alias(repository, name, 4)
        mismatch = httpx.post(f"{server.url}/admin/reload", headers=auth, timeout=TIMEOUT)
        assert mismatch.status_code == 409 and "class_names" in mismatch.json()["error"]
        assert embed(server.url, image).json()["model"]["version"] == 2
        assert httpx.get(f"{server.url}/readyz").status_code == 200
    finally:
        stop.set()
        server.stop()


def test_admin_api_is_off_without_admin_keys(server):
    response = httpx.post(f"{server.url}/admin/reload", timeout=TIMEOUT)
    assert response.status_code == 403 and "admin" in response.json()["error"]
