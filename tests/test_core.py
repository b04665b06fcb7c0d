"""The one inference core in models/: error table, per-image decode, post-processing, cheap
alias resolution (hashing only a version about to be loaded)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

import models.repository as repository
from cnn_codes.settings import Settings
from conftest import REPO_ROOT, base_env
from models.decode import DecodeLimits, decode_batch, decode_image, read_file
from models.errors import ERRORS, IMAGE_ERROR_CODES, ImageError, RequestError
from models.postprocess import (cosine_rows, decode_vector, encode_vector, json_bytes,
                                json_numbers, l2_normalize, prepare_vectors, softmax, top_k)
from models.preprocessing import PreprocessSpec

SPEC = PreprocessSpec(resize_size=64, crop_size=56, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
LIMITS = DecodeLimits.from_settings(Settings())


def jpeg(data_dir: Path) -> bytes:
    return sorted((data_dir / "val" / "ants").glob("*.jpg"))[0].read_bytes()


def test_error_table_has_both_statuses_for_every_code():
    import grpc

    for row in ERRORS.values():
        assert 400 <= row.http_status < 600
        assert hasattr(grpc.StatusCode, row.grpc_status), row
    assert {"truncated", "empty", "not_an_image", "decode_failed"} <= IMAGE_ERROR_CODES
    assert RequestError("too_many_images").http_status == 413
    assert RequestError("overloaded", headers={"Retry-After": "1"}).grpc_status == \
        "RESOURCE_EXHAUSTED"
    with pytest.raises(ValueError):
        ImageError("overloaded")  # a request code is not a per-image one
    with pytest.raises(KeyError):
        RequestError("no_such_code")


@pytest.mark.parametrize("cut", [12, 40, 200, 1000])
def test_cut_jpeg_is_a_per_image_error_not_an_exception(data_dir, cut):
    with pytest.raises(ImageError) as err:
        decode_image(jpeg(data_dir)[:cut], SPEC, LIMITS)
    assert err.value.code in ("truncated", "not_an_image")
    assert err.value.code == "truncated" or cut <= 12


def test_header_only_jpeg_is_truncated(data_dir):
    # Image.open itself raises OSError("Truncated File Read") for it: the service's 500 before
    with pytest.raises(ImageError) as err:
        decode_image(jpeg(data_dir)[:200], SPEC, LIMITS)
    assert err.value.code == "truncated"


def test_decode_batch_keeps_good_images_and_positions(data_dir):
    good = jpeg(data_dir)
    seen: list = []
    batch = decode_batch([good, b"", good[:200], good], SPEC, LIMITS,
                         observe=lambda code, s: seen.append(code))
    assert batch.positions == [0, 3] and batch.arrays.shape == (2, 56, 56, 3)
    assert {i: e.code for i, e in batch.errors.items()} == {1: "empty", 2: "truncated"}
    assert seen == [None, "empty", "truncated", None]
    np.testing.assert_array_equal(batch.arrays[0], decode_image(good, SPEC, LIMITS))


def test_file_limit_applies_to_bytes(data_dir):
    small = DecodeLimits(max_pixels=LIMITS.max_pixels, min_side=1, max_file_bytes=100)
    with pytest.raises(ImageError) as err:
        decode_image(jpeg(data_dir), SPEC, small)
    assert err.value.code == "too_large"


def test_read_file_refuses_special_and_huge_files(tmp_path):
    fifo = tmp_path / "f.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError) as err:
        read_file(fifo, 1000)  # would block forever if opened for reading
    assert err.value.code == "not_a_file"
    zero = tmp_path / "z.jpg"
    zero.symlink_to("/dev/zero")
    with pytest.raises(ImageError) as err:
        read_file(zero, 1000)
    assert err.value.code == "not_a_file"
    sparse = tmp_path / "sparse.jpg"
    with open(sparse, "wb") as handle:
        handle.truncate(8 * 2**30)  # 8 GiB, no blocks on disk
    with pytest.raises(ImageError) as err:
        read_file(sparse, 2**20)
    assert err.value.code == "too_large"
    with pytest.raises(ImageError) as err:
        read_file(tmp_path / "missing.jpg", 1000)
    assert err.value.code == "unreadable"
    with pytest.raises(ImageError) as err:
        read_file(tmp_path, 1000)
    assert err.value.code == "not_a_file"


def test_odd_modes_decode(data_dir):
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg(data_dir))).convert("CMYK").save(buffer, "JPEG")
    assert decode_image(buffer.getvalue(), SPEC, LIMITS).shape == (56, 56, 3)


def test_postprocess():
    logits = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0]], np.float32)
    probs = softmax(logits)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    assert top_k(probs, 2).tolist() == [[1, 2], [0, 1]]  # ties: lower index first
    unit = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_allclose(cosine_rows(unit, unit), [1.0, 1.0])
    half = prepare_vectors(np.array([[3.0, 4.0]], np.float32), normalize=True, dtype="float16")
    assert half.dtype == np.dtype("<f2")
    np.testing.assert_array_equal(decode_vector(encode_vector(half[0], "base64"), "float16"),
                                  half[0])
    listed = encode_vector(half[0], "list")  # the row itself, for json_bytes
    assert listed.dtype == np.dtype("<f2") and listed.flags.c_contiguous
    assert orjson.loads(json_bytes({"v": listed}))["v"] == pytest.approx([0.6, 0.8], abs=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_json_numbers_are_the_shortest_that_read_back_bit_for_bit(dtype):
    """A vector's JSON numbers read back, cast to its dtype, to the identical bits, and are
    never longer than ``tolist()``'s float64 text (for float32, far shorter)."""
    rng = np.random.default_rng(0)
    row = prepare_vectors(rng.standard_normal((1, 1280)).astype(np.float32), normalize=True,
                          dtype=dtype)[0]
    text = json_bytes(encode_vector(row, "list")).decode()
    assert json_numbers(row) == json.loads(text)  # the same numbers either way
    back = np.asarray(json.loads(text), dtype=row.dtype)
    np.testing.assert_array_equal(back.view(np.uint8), row.view(np.uint8))
    widened = json.dumps(row.tolist())
    assert len(text) <= len(widened)
    if dtype == "float32":
        assert len(text) < 0.7 * len(widened), (len(text), len(widened))
    assert json_numbers(np.arange(3, dtype=np.uint8)) == [0, 1, 2]


@pytest.fixture()
def counted_hashes(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = repository.sha256_file

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(repository, "sha256_file", counting)
    return calls


def test_alias_resolution_hashes_nothing_and_reload_hashes_once(published, tmp_path,
                                                                counted_hashes):
    from service.served import ModelHolder, Reloader

    repo, name = tmp_path / "repo", published["name"]
    shutil.copytree(published["repository"], repo)
    version = published["version"]
    for _ in range(50):  # what the alias poller does every reload_poll_s
        assert repository.resolve_version(repo, name, "latest") == version
    assert counted_hashes == []

    card = repository.resolve(repo, name, version).card
    assert len(counted_hashes) == 1
    settings = Settings(repository=repo, model_name=name, model_version="latest")
    loads: list[int] = []

    async def load(v: int) -> dict:  # the Encoder's load(); here it always succeeds
        loads.append(v)
        return {"ok": True, "version": v}

    reloader = Reloader(ModelHolder(card), settings, load)
    for _ in range(20):
        assert asyncio.run(reloader.reload())["reloaded"] is False
    assert len(counted_hashes) == 1 and loads == []

    shutil.copytree(repo / name / str(version), repo / name / str(version + 1))
    card_file = repo / name / str(version + 1) / "model_card.json"
    card_file.write_text(card.model_copy(update={"version": version + 1}).model_dump_json())
    repository.seal_card(card_file.parent)
    answer = asyncio.run(reloader.reload())
    assert answer == {"reloaded": True, "previous": version, "version": version + 1}
    assert len(counted_hashes) == 2 and loads == [version + 1]
    assert reloader.holder.card.version == version + 1


def test_batch_and_models_import_nothing_from_service():
    code = ("import sys, batch.runner, batch.ray_engine, models.decode, models.runtime, "
            "models.postprocess, models.errors, models.repository, export.quantize; "
            "bad = [m for m in sys.modules if m == 'service' or m.startswith('service.')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=base_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_changed_card_fails_verify_and_the_graph_check(published, tmp_path):
    from models.repository import ModelIntegrityError
    from models.runtime import CardMismatchError, OnnxEncoder

    repo, name, version = tmp_path / "repo", published["name"], published["version"]
    shutil.copytree(published["repository"], repo)
    folder = repo / name / str(version)
    good = (folder / "model_card.json").read_text()
    assert (folder / "model_card.json.sha256").is_file()  # sealed at publish
    size = repository.resolve(repo, name, version).card.preprocessing.resize_size
    flipped = good.replace(f'"resize_size": {size}', f'"resize_size": {size + 1}')
    assert flipped != good
    (folder / "model_card.json").write_text(flipped)
    with pytest.raises(ModelIntegrityError, match="changed after it was published"):
        repository.resolve(repo, name, version)
    proc = subprocess.run([sys.executable, "-m", "cnn_codes.cli", "models", "verify",
                           f"{name}:{version}", "--repository", str(repo)], cwd=REPO_ROOT,
                          env=base_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "changed after it was published" in proc.stderr

    # a card that passes its checksum (re-sealed) but lies about the graph is refused at load
    (folder / "model_card.json").write_text(good)
    card = repository.resolve(repo, name, version).card
    embedding = card.output("embedding")
    wrong = card.model_copy(update={"outputs": [
        o if o.name != "embedding" else o.model_copy(update={"shape": [-1, embedding.shape[-1] + 1]})
        for o in card.outputs]})
    with pytest.raises(CardMismatchError, match="'embedding' has"):
        OnnxEncoder.create(str(folder / "model.onnx"), wrong)
    more = card.model_copy(update={"class_names": [*card.class_names, "wasps"]})
    with pytest.raises(CardMismatchError, match="class names"):
        OnnxEncoder.create(str(folder / "model.onnx"), more)


def test_model_names_cannot_leave_the_repository(published, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(published["repository"], repo)
    outside = tmp_path / "elsewhere" / "x" / "1"
    outside.mkdir(parents=True)
    (outside / "keep.txt").write_text("not a model")
    proc = subprocess.run([sys.executable, "-m", "cnn_codes.cli", "models", "remove",
                           "../elsewhere/x:1", "--repository", str(repo), "--force"],
                          cwd=REPO_ROOT, env=base_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "invalid model name" in proc.stderr
    assert (outside / "keep.txt").is_file()
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError, match="invalid model name"):
            repository.check_name(bad)
        with pytest.raises(ValueError):
            Settings(model_name=bad)
    assert repository.check_name("ants-bees") == "ants-bees"


@pytest.mark.parametrize("cores,workers,threads,expected", [
    (2, 0, 0, 2),    # the default here: 1 worker x 2 threads
    (2, 2, 0, 2),    # 2 workers x 2 threads, 2:1 over the cores
    (16, 0, 0, 10),  # 3 workers (one per 6 cores, rounded up): 10 threads each
    (16, 4, 0, 8),
    (1, 0, 0, 1),
    (8, 3, 0, 5),
    (2, 2, 1, 1),    # set explicitly: kept
])
def test_core_threads_share_the_cores(monkeypatch, cores, workers, threads, expected):
    """Intra-op threads per worker session, and the worker count they follow."""
    import cnn_codes.settings as settings_module

    monkeypatch.setattr(settings_module, "usable_cores", lambda: cores)
    settings = Settings(api_workers=workers, intra_op_threads=threads)
    assert settings.core_threads() == expected
    assert settings.api_worker_count == (workers or -(-cores // 6))


@pytest.mark.parametrize("cores,workers,decode_threads,expected", [
    (2, 0, 0, 2),    # the default here: 1 worker decoding on 2 threads
    (2, 2, 0, 1),
    (16, 0, 0, 5),   # 3 workers
    (1, 0, 0, 1),
    (2, 0, 6, 6),    # set explicitly: kept
])
def test_decode_threads_follow_the_worker_share(monkeypatch, cores, workers, decode_threads,
                                                expected):
    """Decode threads per API worker: its share of the usable cores unless set."""
    import cnn_codes.settings as settings_module

    monkeypatch.setattr(settings_module, "usable_cores", lambda: cores)
    settings = Settings(api_workers=workers, decode_threads=decode_threads)
    assert settings.decode_thread_count == expected


def test_pipeline_decodes_on_its_own_bounded_threads(published, data_dir, monkeypatch):
    """``decode_threads`` bounds how many photos a worker decodes at once: 12 concurrent
    requests are decoded on at most 2 threads of the pipeline's own (named ``decode_N``), each
    request still gets its own row, and ``close`` stops them."""
    import threading

    import service.pipeline as pipeline_module
    from models.card import OUTPUT_NAMES, ModelCard
    from service.served import ModelHolder

    card = ModelCard.model_validate_json((published["path"] / "model_card.json").read_text())
    width = sum(card.dim(name) for name in OUTPUT_NAMES)
    decoded_on: set[str] = set()

    def spying_decode(*args, **kwargs):
        decoded_on.add(threading.current_thread().name)
        return decode_batch(*args, **kwargs)

    async def encode(batch: np.ndarray) -> np.ndarray:  # every column: the image's mean pixel
        means = batch.reshape(len(batch), -1).mean(axis=1, dtype=np.float32)
        return np.repeat(means[:, None], width, axis=1)

    monkeypatch.setattr(pipeline_module, "decode_batch", spying_decode)
    pipeline = pipeline_module.InferencePipeline(ModelHolder(card), Settings(decode_threads=2),
                                                 encode)
    photos = [p.read_bytes() for p in sorted((data_dir / "val" / "bees").glob("*.jpg"))[:12]]

    async def main():
        return await asyncio.gather(*(pipeline.run([p], endpoint="embed") for p in photos))

    try:
        results = asyncio.run(main())
    finally:
        pipeline.close()
    for result, photo in zip(results, photos):
        alone = decode_batch([photo], card.preprocessing, pipeline.limits).arrays
        assert list(result.decoded.positions) == [0]
        assert np.isclose(result.outputs["embedding"][0, 0], alone.mean(dtype=np.float32))
    assert decoded_on and len(decoded_on) <= 2
    assert all(name.startswith("decode_") for name in decoded_on), decoded_on
    assert not [t for t in threading.enumerate() if t.name.startswith("decode_")]
