"""One inference core: the same damaged input gets the same per-image code on all five paths.

The corpus (``tests/corpus.py``: truncated JPEG/WebP/PNG/GIF/BMP/TIFF, wrong magic, empty,
random bytes, text, PDF, decompression bombs, too-small images, formats not served, and odd
but valid modes that must work) is made at test time from a real val photo. Each entry's
expected answer is what ``models.decode.decode_image`` says (checked against the entries whose
answer is certain). Every entry is sent at index 1 of a request whose index 0 is a good photo:

1. HTTP ``/embed`` multipart: 200, item 1 has the code, item 0 an embedding;
2. HTTP ``/embed`` JSON base64: the same;
3. Open Inference Protocol over HTTP ``/v2/models/<name>/infer`` (BYTES ``[2]``): 400 listing
   index 1 with the code and not index 0 (one tensor per request); 200 with 2 rows if ok;
4. gRPC ``ModelInfer``: INVALID_ARGUMENT naming ``[1] <code>`` and not index 0; OK if ok;
5. ``cnn-codes embed``: the file's row has the code and no embedding, the photo's row has one.

One server (the conftest ``server`` fixture: loopback, free HTTP and gRPC ports) for paths 1-4
and one embed job over a folder holding every entry (each in its own sub-folder with the good
photo) for path 5.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2_grpc

from batch.sources import IMAGE_EXTENSIONS, LINE_MANIFESTS, TABLE_MANIFESTS
from conftest import Server, run_cli
from corpus import BY_ID, CORPUS, IDS, OK, build_corpus, good_photo, reference
from models.card import OUTPUT_NAMES, ModelCard
from models.errors import IMAGE_ERROR_CODES
from test_batch_embed import embed_args, read_job
from test_grpc import grpc_error, health_status, raw_request, serialized, wait_for

TIMEOUT = 120.0
ERRORS_METADATA = "cnn-codes-errors"  # gRPC trailing metadata: [{"index", "code", ...}]
CERTAIN = {k.certain for k in CORPUS}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def card(published: dict) -> ModelCard:
    return ModelCard.model_validate_json((published["path"] / "model_card.json").read_text())


@pytest.fixture(scope="module")
def corpus(data_dir: Path) -> dict[str, bytes]:
    return build_corpus(data_dir)


@pytest.fixture(scope="module")
def good(data_dir: Path) -> bytes:
    return good_photo(data_dir).read_bytes()


@pytest.fixture(scope="module")
def expected(corpus: dict[str, bytes], card: ModelCard) -> dict[str, str]:
    """``{id: code or "ok"}`` from the one decode function, with the served model's spec."""
    return {key: reference(data, card.preprocessing) for key, data in corpus.items()}


@pytest.fixture(scope="module")
def http(server: Server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server: Server):
    """tritonclient's generated gRPC stub on the server's gRPC port, once it is SERVING."""
    wait_for(lambda: health_status(server.grpc_url, "") == "SERVING", server)
    channel = grpc.insecure_channel(server.grpc_url, options=[
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20)])
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def embed_job(published: dict, corpus: dict[str, bytes], good: bytes,
              tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ``cnn-codes embed`` job over ``<root>/<id>/{good.jpg, <entry file name>}`` for every
    entry. A directory source only picks image extensions, so entries named otherwise
    (``icon.ico``, ``doc.pdf``...) are also given as file sources, as a user would."""
    root = tmp_path_factory.mktemp("corpus")
    paths: dict[str, tuple[Path, Path]] = {}
    extra: list[Path] = []
    for kind in CORPUS:
        folder = root / kind.id
        folder.mkdir()
        (folder / "good.jpg").write_bytes(good)
        bad = folder / kind.filename
        bad.write_bytes(corpus[kind.id])
        paths[kind.id] = (folder / "good.jpg", bad)
        suffix = bad.suffix.lower()
        assert suffix not in LINE_MANIFESTS | TABLE_MANIFESTS, f"{bad.name} reads as a manifest"
        if suffix not in IMAGE_EXTENSIONS:
            extra.append(bad)
    out = tmp_path_factory.mktemp("corpus-embed") / "out"
    run_cli(*embed_args(published, root, *extra, out=out))
    rows = read_job(out)
    return {"rows": rows, "paths": paths}


# ---------------------------------------------------------------- the corpus itself
def test_corpus_is_large_varied_and_deterministic(corpus, data_dir):
    assert len(CORPUS) >= 25
    assert build_corpus(data_dir) == corpus  # same photo, same Pillow: same bytes
    assert {"truncated", "empty", "not_an_image", "too_small", "too_many_pixels",
            "unsupported_format", OK} <= CERTAIN
    assert sum(k.certain == OK for k in CORPUS) >= 6


@pytest.mark.parametrize("kind", IDS)
def test_reference_agrees_with_the_certain_answers(corpus, expected, kind):
    got = expected[kind]
    assert got == OK or got in IMAGE_ERROR_CODES
    # decode_failed is the "unexpected decoder failure" catch-all: none of these should need it
    assert got != "decode_failed", kind
    if BY_ID[kind].certain is not None:
        assert got == BY_ID[kind].certain, (kind, got)


# ---------------------------------------------------------------- the five paths
def check_embed_results(response: httpx.Response, want: str, dim: int) -> None:
    """A 200 ``/embed`` answer whose item 0 (the good photo) has an embedding and item 1
    ``want`` (an error code, or an embedding too for "ok")."""
    assert response.status_code == 200, response.text[:2000]
    first, second = response.json()["results"]
    assert first["error"] is None, first["error"]
    assert len(first["embedding"]) == dim
    if want == OK:
        assert second["error"] is None, second["error"]
        assert len(second["embedding"]) == dim
    else:
        assert second["embedding"] is None
        assert second["error"] is not None and second["error"]["code"] == want, second["error"]
        assert second["error"]["message"]


@pytest.mark.parametrize("kind", IDS)
def test_http_multipart(http, corpus, good, expected, card, kind):
    files = [("images", ("good.jpg", good, "image/jpeg")),
             ("images", (BY_ID[kind].filename, corpus[kind], "application/octet-stream"))]
    check_embed_results(http.post("/embed", files=files), expected[kind], card.dim("embedding"))


@pytest.mark.parametrize("kind", IDS)
def test_http_json_base64(http, corpus, good, expected, card, kind):
    body = {"images": [{"b64": base64.b64encode(good).decode()},
                       {"b64": base64.b64encode(corpus[kind]).decode()}]}
    check_embed_results(http.post("/embed", json=body), expected[kind], card.dim("embedding"))


@pytest.mark.parametrize("kind", IDS)
def test_oip_http(http, corpus, good, expected, card, published, kind):
    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2],
                        "data": [base64.b64encode(b).decode() for b in (good, corpus[kind])]}]}
    response = http.post(f"/v2/models/{published['name']}/infer", json=body)
    want = expected[kind]
    if want == OK:
        assert response.status_code == 200, response.text[:2000]
        outputs = {o["name"]: o for o in response.json()["outputs"]}
        assert set(outputs) == set(OUTPUT_NAMES)
        assert all(o["shape"][0] == 2 for o in outputs.values()), outputs
        assert outputs["embedding"]["shape"] == [2, card.dim("embedding")]
        assert len(outputs["embedding"]["data"]) == 2 * card.dim("embedding")
    else:
        assert response.status_code == 400, response.text[:2000]
        answer = response.json()
        assert [(e["index"], e["code"]) for e in answer["errors"]] == [(1, want)], answer
        assert f"[1] {want}" in answer["error"] and "[0]" not in answer["error"], answer


@pytest.mark.parametrize("kind", IDS)
def test_grpc_model_infer(stub, corpus, good, expected, card, published, kind):
    request = raw_request("images", "BYTES", [2], serialized([good, corpus[kind]]),
                          model=published["name"])
    want = expected[kind]
    if want == OK:
        reply = stub.ModelInfer(request, timeout=TIMEOUT)
        shapes = {o.name: list(o.shape) for o in reply.outputs}
        assert set(shapes) == set(OUTPUT_NAMES) and all(s[0] == 2 for s in shapes.values())
        assert shapes["embedding"] == [2, card.dim("embedding")]
        assert len(reply.raw_output_contents) == len(reply.outputs)
    else:
        error = grpc_error(lambda: stub.ModelInfer(request, timeout=TIMEOUT))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(),
                                                                  error.details())
        assert f"[1] {want}" in error.details() and "[0]" not in error.details(), \
            error.details()
        listed = json.loads(dict(error.trailing_metadata())[ERRORS_METADATA])
        assert [(e["index"], e["code"]) for e in listed] == [(1, want)], listed


@pytest.mark.parametrize("kind", IDS)
def test_batch_embed_job(embed_job, expected, card, kind):
    good_path, bad_path = embed_job["paths"][kind]
    rows = embed_job["rows"]
    photo, row = rows[str(good_path.resolve())], rows[str(bad_path.resolve())]
    assert photo["error_code"] is None and len(photo["embedding"]) == card.dim("embedding")
    want = expected[kind]
    if want == OK:
        assert row["error_code"] is None, row["error"]
        assert len(row["embedding"]) == card.dim("embedding")
    else:
        assert row["error_code"] == want, (row["error_code"], row["error"])
        assert row["embedding"] is None and row["error"]


def test_job_has_one_row_per_file(embed_job):
    listed = {str(p.resolve()) for pair in embed_job["paths"].values() for p in pair}
    assert set(embed_job["rows"]) == listed


def test_server_still_serves_and_logged_no_traceback(http, good, server):
    """After the whole corpus the worker still answers, and no input made it log a
    traceback (a per-image error is an answer, not an unexpected failure)."""
    response = http.post("/embed", files=[("images", ("good.jpg", good, "image/jpeg"))])
    assert response.status_code == 200
    assert http.get("/readyz").status_code == 200
    assert "Traceback" not in server.log(), server.log()[-6000:]
