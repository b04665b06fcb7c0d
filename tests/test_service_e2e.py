"""The main job end to end: real photos -> fine-tune -> export -> `cnn-codes serve` -> HTTP.

The session fixtures train one epoch on the real train split and export with the public CLI;
this module starts the server on a free loopback port and talks to it over HTTP.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import numpy as np
import pytest

from cnn_codes.settings import Settings
from conftest import metric
from models.card import ModelCard
from models.decode import decode_file
from models.postprocess import l2_normalize
from models.runtime import open_session

TIMEOUT = httpx.Timeout(120.0)


def val_images(data_dir: Path, per_class: int = 4) -> list[Path]:
    """A few real val photos of each class, plus the GIF from the train split."""
    files: list[Path] = []
    for cls in ("ants", "bees"):
        files += sorted((data_dir / "val" / cls).glob("*.jpg"))[:per_class]
    gif = data_dir / "train" / "ants" / "imageNotFound.gif"
    assert gif.is_file(), "the sample data's GIF is missing"
    return files + [gif]


def multipart(paths: list[Path], extra: list[tuple[str, bytes]] = ()) -> list:
    """``files=`` argument for httpx: each path as a part named ``images``."""
    parts = [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    parts += [("images", (name, data, "application/octet-stream")) for name, data in extra]
    return parts


def onnx_reference(published: dict, paths: list[Path]) -> tuple[ModelCard, dict[str, np.ndarray]]:
    """onnxruntime run directly on the published model with the shared preprocessing."""
    card = ModelCard.model_validate_json((published["path"] / "model_card.json").read_text())
    session = open_session(str(published["path"] / "model.onnx"))
    batch = np.stack([decode_file(str(p), card.preprocessing) for p in paths])
    names = ["logits", "embedding", "features"]
    return card, dict(zip(names, session.run(names, {"images": batch})))


def test_metadata_matches_card(server, published):
    card = ModelCard.model_validate_json((published["path"] / "model_card.json").read_text())
    meta = httpx.get(f"{server.url}/metadata", timeout=TIMEOUT).json()
    assert meta["name"] == published["name"] and meta["version"] == published["version"]
    assert meta["class_names"] == ["ants", "bees"]
    dims = {o["name"]: o["shape"][-1] for o in meta["outputs"]}
    assert dims == {"logits": 2, "embedding": 1024, "features": 576}  # mobilenet_v3_small
    assert meta["onnx_sha256"] == card.onnx_sha256
    assert meta["parity"]["embedding_cosine_min"] > 0.9999
    # the build machine's file system is not shown: only the run's folder name
    assert Path(card.training["run_dir"]).is_absolute()
    assert meta["training"]["run_dir"] == Path(card.training["run_dir"]).name
    assert "/" not in str(meta["training"])


@pytest.mark.parametrize("layer", ["embedding", "features"])
def test_embed_equals_onnxruntime_on_real_images(server, published, data_dir, layer):
    paths = val_images(data_dir)
    card, reference = onnx_reference(published, paths)
    before = metric(server.url, "cnn_codes_images_total", endpoint="embed", outcome="ok")
    response = httpx.post(f"{server.url}/embed", files=multipart(paths),
                          data={"layer": layer, "normalize": "true"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dim"] == card.dim(layer) and body["layer"] == layer and body["normalized"]
    assert body["model"] == {"name": published["name"], "version": published["version"],
                             "backbone": "mobilenet_v3_small"}
    assert [r["index"] for r in body["results"]] == list(range(len(paths)))
    assert [r["filename"] for r in body["results"]] == [p.name for p in paths]
    got = np.array([r["embedding"] for r in body["results"]], dtype=np.float64)
    assert got.shape == (len(paths), card.dim(layer))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosine = (got * l2_normalize(reference[layer].astype(np.float64))).sum(axis=1)
    assert cosine.min() > 0.9999, cosine
    after = metric(server.url, "cnn_codes_images_total", endpoint="embed", outcome="ok")
    assert after - before == len(paths)


def test_embed_unnormalized_is_raw_penultimate_layer(server, published, data_dir):
    paths = val_images(data_dir, per_class=1)
    _, reference = onnx_reference(published, paths)
    body = httpx.post(f"{server.url}/embed", files=multipart(paths),
                      data={"normalize": "false"}, timeout=TIMEOUT).json()
    got = np.array([r["embedding"] for r in body["results"]], dtype=np.float32)
    np.testing.assert_allclose(got, reference["embedding"], rtol=1e-4, atol=1e-5)


def test_classify_probabilities_and_topk(server, published, data_dir):
    paths = val_images(data_dir)
    _, reference = onnx_reference(published, paths)
    response = httpx.post(f"{server.url}/classify", files=multipart(paths),
                          data={"top_k": "5"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["top_k"] == 2  # clamped to K
    for item, logits in zip(body["results"], reference["logits"]):
        assert item["error"] is None
        probs = [p["probability"] for p in item["predictions"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-6)
        assert probs == sorted(probs, reverse=True)
        assert {p["label"] for p in item["predictions"]} == {"ants", "bees"}
        assert item["predictions"][0]["index"] == int(np.argmax(logits))
    top1 = httpx.post(f"{server.url}/classify", files=multipart(paths[:2]),
                      data={"top_k": "1"}, timeout=TIMEOUT).json()
    assert all(len(r["predictions"]) == 1 for r in top1["results"])


def test_bad_image_fails_alone(server, data_dir):
    good = val_images(data_dir, per_class=1)
    extra = [("notes.txt", b"this is not an image"), ("empty.jpg", b""),
             ("cut.jpg", good[0].read_bytes()[:2000])]
    before_err = metric(server.url, "cnn_codes_decode_errors_total")
    response = httpx.post(f"{server.url}/classify", files=multipart(good, extra),
                          timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert all(r["predictions"] and r["error"] is None for r in results[:len(good)])
    codes = [r["error"]["code"] for r in results[len(good):]]
    assert codes == ["not_an_image", "empty", "truncated"]
    assert all(r["predictions"] is None for r in results[len(good):])
    assert metric(server.url, "cnn_codes_decode_errors_total") - before_err == 3
    # the worker is still healthy and serves normally
    again = httpx.post(f"{server.url}/embed", files=multipart(good), timeout=TIMEOUT)
    assert again.status_code == 200 and all(r["embedding"] for r in again.json()["results"])


def test_malformed_requests_get_4xx_json(server, data_dir):
    url = server.url
    no_images = httpx.post(f"{url}/classify", files={"top_k": (None, "1")}, timeout=TIMEOUT)
    assert no_images.status_code == 400 and "images" in no_images.text
    form = httpx.post(f"{url}/classify", data={"top_k": "1"}, timeout=TIMEOUT)
    assert form.status_code == 415 and "multipart/form-data" in form.json()["error"]
    bad_k = httpx.post(f"{url}/classify", files=multipart(val_images(data_dir, 1)[:1]),
                       data={"top_k": "0"}, timeout=TIMEOUT)
    assert bad_k.status_code == 400 and "top_k" in bad_k.json()["detail"][0]["loc"]
    bad_layer = httpx.post(f"{url}/embed", files=multipart(val_images(data_dir, 1)[:1]),
                           data={"layer": "fc9"}, timeout=TIMEOUT)
    assert bad_layer.status_code == 400 and "layer" in bad_layer.text
    one = val_images(data_dir, 1)[0]
    too_many = httpx.post(f"{url}/embed", files=multipart([one] * 65), timeout=TIMEOUT)
    assert too_many.status_code == 413 and "limit is 64" in too_many.json()["error"]


def test_concurrent_requests_are_batched(server, data_dir):
    paths = val_images(data_dir, per_class=8)[:16]
    before_n = metric(server.url, "cnn_codes_batch_size_count")
    before_sum = metric(server.url, "cnn_codes_batch_size_sum")
    before_runs = {s: metric(server.url, "cnn_codes_batch_runs_total", session=s)
                   for s in ("alone", "beside")}

    def one(path: Path) -> int:
        return httpx.post(f"{server.url}/embed", files=multipart([path]),
                          timeout=TIMEOUT).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, paths * 4))
    assert statuses == [200] * len(statuses)
    batches = metric(server.url, "cnn_codes_batch_size_count") - before_n
    images = metric(server.url, "cnn_codes_batch_size_sum") - before_sum
    assert images == len(statuses)
    assert batches < images, "adaptive batching never put two requests in one batch"
    # every batch counted once by the session it ran on; with two in flight and more than
    # one core (a second, 1-thread session), some batches started beside another
    runs = {s: metric(server.url, "cnn_codes_batch_runs_total", session=s) - before_runs[s]
            for s in ("alone", "beside")}
    assert runs["alone"] + runs["beside"] == batches
    if Settings().core_threads() > 1:
        assert runs["beside"] >= 1, runs


def test_model_info_metric(server, published):
    assert metric(server.url, "cnn_codes_model_info", name=published["name"],
                        version=str(published["version"]), provider="CPUExecutionProvider") == 1
