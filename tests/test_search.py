"""Search and near-duplicates (issue 13) through the public commands and HTTP, on the real photos.

The real photos are embedded with ``cnn-codes embed`` by the shared published model, indexed
with ``cnn-codes index build`` (the ``embedded`` and ``index`` fixtures of conftest.py), queried
with ``cnn-codes index query`` and through a real ``cnn-codes serve`` (``POST /search``, all
three input forms and vectors, per-image errors, a hot reload to another version answered with
409 ``index_mismatch`` until an index of the new version is published); ``cnn-codes dedup``
runs on constructed near-duplicates of real photos.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import CLI, REPO_ROOT, Server, base_env, last_json_line, metric, run_cli

ADMIN = "admin-key-for-search-tests-1"
TIMEOUT = httpx.Timeout(60.0)
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``cnn-codes ARGS`` whatever its exit status."""
    return subprocess.run([*CLI, *args], env=base_env(), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def photos(data_dir: Path, split: str = "val") -> list[Path]:
    """The files ``cnn-codes embed`` takes from a split (the batch job's own listing)."""
    from batch.sources import list_inputs

    return [Path(p) for p in list_inputs([str(data_dir / split)])]


def test_index_build_manifest_and_files(index, published, data_dir):
    manifest, folder = index["manifest"], index["dir"]
    card = json.loads((published["path"] / "model_card.json").read_text())
    everything = photos(data_dir, "train") + photos(data_dir, "val")
    assert (manifest["model_name"], manifest["model_version"]) == (published["name"],
                                                                   published["version"])
    assert manifest["onnx_sha256"] == card["onnx_sha256"]
    assert manifest["layer"] == "embedding" and manifest["normalized"] is True
    assert manifest["dim"] == 1024 and manifest["count"] == len(everything)
    assert manifest["kind"] == "exact" and manifest["factory"] == "Flat"
    assert manifest["recall_at_10"] == 1.0
    assert manifest["recall_queries"] == min(500, len(everything))
    assert manifest["build_seconds"] > 0 and manifest["skipped"] == 0
    assert [s["path"] for s in manifest["sources"]] == [str(p) for p in (
        index["dir"].parent / "emb-train", index["dir"].parent / "emb-val")]
    assert sorted(p.name for p in folder.iterdir()) == ["index.faiss", "manifest.json",
                                                        "paths.txt"]
    indexed = (folder / "paths.txt").read_text().splitlines()
    assert sorted(indexed) == sorted(str(p.resolve()) for p in everything)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".index.")]  # no staging

    again = cli("index", "build", str(folder.parent / "emb-val"), "--out", str(folder))
    assert again.returncode == 2 and "exists" in again.stderr  # published indexes stay put


def test_index_kinds_record_params_and_recall(embedded):
    for kind, params in (("ivfpq", {"nlist", "m", "nbits", "nprobe"}),
                         ("hnsw", {"M", "ef_construction", "ef_search"})):
        out = embedded["root"] / f"index-{kind}"
        manifest = last_json_line(run_cli("index", "build", str(embedded["val"]), "--out",
                                          str(out), "--kind", kind, "--no-progress").stdout)
        assert manifest["kind"] == kind and set(manifest["params"]) == params
        assert 0.0 <= manifest["recall_at_10"] <= 1.0 and manifest["recall_queries"] == 153
        if kind == "hnsw":  # a graph over 153 full vectors misses nothing
            assert manifest["recall_at_10"] >= 0.95
        else:  # 4-bit codes: compressed, 2 bytes per 4 dims
            assert manifest["bytes_per_vector"] < 4 * manifest["dim"]


def test_index_build_refuses_mixed_versions_and_layers(embedded, tmp_path):
    for field, value in (("model_version", 99), ("layer", "features")):
        other = tmp_path / f"emb-{field}"
        shutil.copytree(embedded["val"], other)
        job = json.loads((other / "_job.json").read_text())
        job[field] = value
        (other / "_job.json").write_text(json.dumps(job))
        proc = cli("index", "build", str(embedded["train"]), str(other), "--out",
                   str(tmp_path / f"index-{field}"))
        assert proc.returncode == 2, proc.stderr
        assert field in proc.stderr and repr(value) in proc.stderr, proc.stderr
        assert not (tmp_path / f"index-{field}").exists()
    missing = cli("index", "build", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "not a cnn-codes embed output" in missing.stderr


def test_index_query_cli_finds_the_photo_itself(index, published, data_dir, tmp_path):
    photo = photos(data_dir)[0]
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    proc = run_cli("index", "query", str(index["dir"]), str(photo), str(junk), "-k", "5",
                   "--repository", str(published["repository"]))
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    first, bad = answer["results"]
    assert [n["rank"] for n in first["neighbors"]] == [1, 2, 3, 4, 5]
    assert first["neighbors"][0]["path"] == str(photo.resolve())
    assert first["neighbors"][0]["score"] >= 0.999 and first["error"] is None
    scores = [n["score"] for n in first["neighbors"]]
    assert scores == sorted(scores, reverse=True)
    assert bad["neighbors"] is None and bad["error"]["code"] == "not_an_image"


@pytest.fixture(scope="module")
def two_versions(published, tmp_path_factory) -> dict:
    """A repository with the published version 1 and a version 2 (same weights, other
    version), alias production=1."""
    from models.repository import seal_card

    repository = tmp_path_factory.mktemp("search-repo") / "repo"
    name = published["name"]
    shutil.copytree(published["repository"], repository)
    source, target = repository / name / str(published["version"]), repository / name / "2"
    shutil.copytree(source, target)
    card = json.loads((target / "model_card.json").read_text())
    card["version"] = 2
    (target / "model_card.json").write_text(json.dumps(card))
    seal_card(target)
    run_cli("models", "promote", f"{name}:1", "--repository", str(repository))
    return {"repository": repository, "name": name}


def post_search(url: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/search", timeout=TIMEOUT, **kwargs)


def test_search_service_end_to_end_and_hot_reload(index, embedded, two_versions, data_dir,
                                                  tmp_path):
    assert index["manifest"]["model_version"] == 1
    repository, name = two_versions["repository"], two_versions["name"]
    served_index = tmp_path / "served-index"
    shutil.copytree(index["dir"], served_index)
    # one API worker: POST /admin/reload reloads the worker that answers it (the others follow
    # the alias within RELOAD_POLL_S, which is off here)
    server = Server(repository, f"{name}:production", tmp_path, CNN_CODES_API_WORKERS="1",
                    CNN_CODES_INDEX=str(served_index), CNN_CODES_RELOAD_POLL_S="0",
                    CNN_CODES_ADMIN_KEYS=json.dumps([ADMIN]))
    photo = photos(data_dir)[3]
    try:
        server.wait_ready()
        meta = httpx.get(f"{server.url}/metadata", timeout=TIMEOUT).json()
        assert meta["version"] == 1 and meta["index"]["model_version"] == 1
        assert meta["index"]["count"] == index["manifest"]["count"] and meta["index"]["answers"]

        # multipart: the photo finds itself first; a bad image is that item's error
        response = post_search(server.url, data={"k": "3"}, files=[
            ("images", (photo.name, photo.read_bytes())),
            ("images", ("junk.png", b"\x89PNG\r\n\x1a\n broken")),
            ("images", ("empty.jpg", b""))])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"]["version"] == 1 and body["index"]["model_version"] == 1
        assert body["k"] == 3
        first, broken, empty = body["results"]
        assert first["filename"] == photo.name and first["error"] is None
        indexed = (served_index / "paths.txt").read_text().splitlines()
        assert first["neighbors"][0] == {"rank": 1, "row": indexed.index(str(photo.resolve())),
                                         "path": str(photo.resolve()),
                                         "score": pytest.approx(1.0, abs=1e-3)}
        assert all(indexed[n["row"]] == n["path"] for n in first["neighbors"])
        assert len(first["neighbors"]) == 3
        assert broken["neighbors"] is None and broken["error"]["code"] == "truncated"
        assert empty["error"]["code"] == "empty"

        # the other input forms of /embed: raw body, JSON base64; and vectors
        raw = post_search(server.url, content=photo.read_bytes(),
                          headers={"Content-Type": "image/jpeg"}, params={"k": "2"})
        assert raw.status_code == 200 and \
            raw.json()["results"][0]["neighbors"][0]["path"] == str(photo.resolve())
        b64 = post_search(server.url, json={"images": [
            {"b64": base64.b64encode(photo.read_bytes()).decode()}], "k": 1})
        assert b64.json()["results"][0]["neighbors"][0]["path"] == str(photo.resolve())
        code = httpx.post(f"{server.url}/embed", files=[("images", photo.read_bytes())],
                          timeout=TIMEOUT).json()["results"][0]["embedding"]
        by_vector = post_search(server.url, json={"vectors": [code], "k": 2,
                                                  "model_version": 1})
        assert by_vector.status_code == 200, by_vector.text
        assert by_vector.json()["results"][0]["neighbors"][0]["path"] == str(photo.resolve())
        other = post_search(server.url, json={"vectors": [code], "model_version": 2})
        assert other.status_code == 409 and other.json()["code"] == "index_mismatch"
        short = post_search(server.url, json={"vectors": [code[:10]]})
        assert short.status_code == 400 and "1024" in short.json()["error"]
        nothing = post_search(server.url, files=[("k", (None, "2"))])  # multipart, no file
        assert nothing.status_code == 400 and nothing.json()["code"] == "no_images"

        assert metric(server.url, "cnn_codes_search_seconds_count") >= 4
        assert metric(server.url, "cnn_codes_index_vectors") == index["manifest"]["count"]
        assert metric(server.url, "cnn_codes_index_bytes") > 0
        assert metric(server.url, "cnn_codes_requests_total", endpoint="/search",
                      status="200") >= 4

        # hot reload to version 2: the version-1 index no longer answers
        run_cli("models", "promote", f"{name}:2", "--repository", str(repository))
        reloaded = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=TIMEOUT)
        assert reloaded.json() == {"reloaded": True, "previous": 1, "version": 2}
        refused = post_search(server.url, files=[("images", photo.read_bytes())])
        assert refused.status_code == 409, refused.text
        error = refused.json()
        assert error["code"] == "index_mismatch"
        assert f"{name}:1" in error["error"] and f"{name}:2" in error["error"]
        assert (error["index_model"], error["served_model"]) == (f"{name}:1", f"{name}:2")
        assert post_search(server.url, json={"vectors": [code]}).status_code == 409
        assert not httpx.get(f"{server.url}/metadata").json()["index"]["answers"]
        assert httpx.post(f"{server.url}/embed", files=[("images", photo.read_bytes())],
                          timeout=TIMEOUT).status_code == 200  # the rest serves on

        # an index of version 2 published at the same folder answers again
        emb2 = tmp_path / "emb-v2"
        run_cli("embed", str(data_dir / "val" / "ants"), "--out", str(emb2), "--model",
                f"{name}:2", "--repository", str(repository), "--no-progress")
        run_cli("index", "build", str(emb2), "--out", str(served_index), "--overwrite",
                "--no-progress")
        answered = post_search(server.url, files=[("images", photo.read_bytes())],
                               data={"k": "2"})
        assert answered.status_code == 200, answered.text
        assert answered.json()["index"]["model_version"] == 2
        assert answered.json()["model"]["version"] == 2
        ants = answered.json()["results"][0]["neighbors"]
        assert all("/val/ants/" in n["path"] for n in ants)  # the new index's rows only
        assert httpx.get(f"{server.url}/metadata").json()["index"]["answers"]
    finally:
        server.stop()


def test_serve_refuses_an_index_of_another_version(index, two_versions):
    name = two_versions["name"]
    env = base_env(CNN_CODES_INDEX=str(index["dir"]))
    proc = subprocess.run([*CLI, "serve", "--host", "127.0.0.1", "--port", "1",
                           "--repository", str(two_versions["repository"]),
                           "--model", f"{name}:2"],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"{name}:1" in proc.stderr and f"{name}:2" in proc.stderr, proc.stderr[-3000:]


def test_search_is_404_without_an_index(server):
    response = post_search(server.url, json={"vectors": [[1.0] * 1024]})
    assert response.status_code == 404 and "CNN_CODES_INDEX" in response.json()["error"]
    assert httpx.get(f"{server.url}/metadata", timeout=TIMEOUT).json()["index"] is None


def test_dedup_finds_constructed_duplicates(embedded, data_dir, tmp_path):
    """Four near-duplicates (JPEG q10, half size, 5 % crop, PNG) of 20 real val photos, mixed
    with all 153 val photos: pairs found at the default threshold (figures printed)."""
    import pyarrow.parquet as pq

    from search.dedup import DEFAULT_THRESHOLD, VARIANTS, make_variants, pair_metrics

    chosen = sorted((data_dir / "val" / "ants").glob("*.jpg"))[:10] + \
        sorted((data_dir / "val" / "bees").glob("*.jpg"))[:10]
    original_of = {}
    for photo in chosen:
        for path in make_variants(photo, tmp_path / "dups"):
            original_of[str(path.resolve())] = str(photo.resolve())
    emb_dups = tmp_path / "emb-dups"
    run_cli("embed", str(tmp_path / "dups"), "--out", str(emb_dups), "--model",
            embedded["model"], "--repository", str(embedded["repository"]), "--no-progress")
    out = tmp_path / "groups.parquet"
    report = last_json_line(run_cli("dedup", str(embedded["val"]), str(emb_dups), "--out",
                                    str(out), "--no-progress").stdout)
    table = pq.read_table(out).to_pylist()
    assert report["threshold"] == DEFAULT_THRESHOLD and report["images"] == 153 + 80
    assert len(table) == 153 + 80 and set(table[0]) == {
        "path", "group_id", "group_size", "nearest_path", "nearest_score"}
    assert len({r["path"] for r in table}) == len(table)
    paths = [r["path"] for r in table]
    figures = pair_metrics([r["group_id"] for r in table],
                           [original_of.get(p, p) for p in paths])
    group_of = {r["path"]: r["group_id"] for r in table}

    def variant(path: str) -> str:  # <stem>.<variant>.jpg or <stem>.png
        return "png" if path.endswith(".png") else Path(path).name.split(".")[-2]

    by_variant = {v: float(np.mean([group_of[p] == group_of[o] for p, o in original_of.items()
                                    if variant(p) == v])) for v in VARIANTS}
    print(f"\ndedup at threshold {DEFAULT_THRESHOLD} ({embedded['model']}): {figures}, "
          f"recall by variant {by_variant}")
    # the lossless copy decodes to the same pixels (but for JPEG draft decoding): found
    assert by_variant["png"] >= 0.9, (figures, by_variant)
    assert figures["precision"] >= 0.5, (figures, by_variant)
    for row in table:
        assert row["nearest_path"] != row["path"] and -1.0 <= row["nearest_score"] <= 1.0
        size = sum(1 for r in table if r["group_id"] == row["group_id"])
        assert row["group_size"] == size



def test_retrieval_metrics_on_known_rankings():
    from search.retrieval import chance_map, evaluate, knn_accuracy, mean_average_precision

    gallery = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    labels = np.array(["a", "a", "b", "b"])
    queries = np.array([[1, 0.05], [0.05, 1]], np.float32)
    scores = queries @ gallery.T
    assert knn_accuracy(scores, labels, np.array(["a", "b"]), 1) == 1.0
    assert mean_average_precision(scores, labels, np.array(["a", "b"])) == 1.0
    assert mean_average_precision(scores, labels, np.array(["b", "a"])) < 0.5
    # the expected AP of a random ranking, against simulation
    rng = np.random.default_rng(0)
    big = np.array(["a"] * 30 + ["b"] * 70)
    simulated = np.mean([mean_average_precision(rng.random((1, 100)), big, np.array(["a"]))
                         for _ in range(3000)])
    assert chance_map(big, np.array(["a"])) == pytest.approx(simulated, abs=0.01)
    report = evaluate(gallery, labels, queries, ["a", "b"], model="m:1", layer="embedding")
    # k = 5 sees the whole gallery, two of each class: the tie goes to the nearest one
    assert report.knn_accuracy == {"1": 1.0, "5": 1.0} and report.map == 1.0


def test_eval_retrieval_command(published, data_dir, tmp_path):
    from conftest import subset_imagefolder

    data = subset_imagefolder(data_dir, tmp_path / "data", {
        "train": {"ants": 12, "bees": 12}, "val": {"ants": 6, "bees": 8}})
    report = last_json_line(run_cli(
        "eval", "retrieval", "--model", f"{published['name']}:{published['version']}",
        "--repository", str(published["repository"]), "--data", str(data)).stdout)
    assert report["model"] == f"{published['name']}:{published['version']}"
    assert (report["gallery"], report["queries"], report["classes"]) == (24, 14,
                                                                         ["ants", "bees"])
    assert set(report["knn_accuracy"]) == {"1", "5"}
    assert all(0 <= v <= 1 for v in report["knn_accuracy"].values())
    assert 0 < report["map"] <= 1 and 0 < report["chance_map"] < 1
    assert report["best_constant_accuracy"] == pytest.approx(8 / 14, abs=1e-4)
    assert report["chance_knn_accuracy"] in (pytest.approx(6 / 14, abs=1e-4),
                                             pytest.approx(8 / 14, abs=1e-4))


def test_index_holder_picks_up_a_rebuild_and_never_another_version(index, embedded, published,
                                                                   tmp_path):
    """The rules of service/search_route.py without a server: a rebuild of the same version is
    loaded in the background (the old index answers meanwhile); an index of another version
    put in the folder is never loaded for the served one."""
    import asyncio

    from models.card import ModelCard
    from models.errors import RequestError
    from service.search_route import IndexHolder, IndexMismatchError

    card = ModelCard.model_validate_json((published["path"] / "model_card.json").read_text())
    folder = tmp_path / "index"
    shutil.copytree(index["dir"], folder)
    holder = IndexHolder(folder, poll_s=0.01)
    holder.load_for(card)
    first = holder.index.manifest.build_id

    async def scenario() -> None:
        run_cli("index", "build", str(embedded["val"]), "--out", str(folder), "--overwrite",
                "--no-progress")
        await asyncio.sleep(0.05)
        answering = await holder.for_card(card)  # the old one answers, a reload starts
        assert answering.manifest.build_id == first
        for _ in range(200):
            await asyncio.sleep(0.05)
            if holder.index.manifest.build_id != first:
                break
        assert holder.index.manifest.count == 153  # the rebuild (val only) is loaded
        rebuilt = holder.index.manifest.build_id

        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["model_version"] = card.version + 1  # "an index of the next version"
        (folder / "manifest.json").write_text(json.dumps(manifest))
        await asyncio.sleep(0.05)
        for _ in range(5):
            assert (await holder.for_card(card)).manifest.build_id == rebuilt
            await asyncio.sleep(0.05)
        later = card.model_copy(update={"version": card.version + 1})
        with pytest.raises(RequestError) as refused:  # that version, but other weights
            await holder.for_card(later.model_copy(update={"onnx_sha256": "0" * 64}))
        assert refused.value.code == "index_mismatch"
        loaded = await holder.for_card(later)  # the served version moved to the folder's
        assert loaded.manifest.model_version == card.version + 1

    asyncio.run(scenario())
    with pytest.raises(IndexMismatchError, match=f"{card.name}:{card.version + 1}"):
        IndexHolder(folder).load_for(card)
