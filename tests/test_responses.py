"""The post stage's answers (service/responses.py) against the declared response models.

The HTTP answers are written straight from numpy (``json_bytes``), not dumped from the pydantic
models that OpenAPI and BentoML's clients read. These tests hold the two together on a real
exported model over real photos and a hostile one: every variant of every option parses into
its model strictly and dumps back to the same document, field for field and in field order,
and each vector reads back bit for bit as the model's output.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import orjson
import pytest

from models.decode import DecodeLimits, decode_batch
from models.postprocess import prepare_vectors, softmax
from models.repository import resolve
from models.runtime import OnnxEncoder, split_outputs
from service.pipeline import PipelineResult
from service.responses import answer_json
from service.schemas import ClassifyResponse, EmbedResponse

MODELS = {"classify": ClassifyResponse, "embed": EmbedResponse}


@pytest.fixture(scope="module")
def result(published: dict, data_dir: Path) -> PipelineResult:
    """Three real photos around a truncated JPEG, decoded and run through the exported model."""
    model = resolve(published["repository"], published["name"], published["version"])
    photos = sorted((data_dir / "val" / "ants").glob("*.jpg"))[:2] + \
        sorted((data_dir / "val" / "bees").glob("*.jpg"))[:1]
    payloads = [p.read_bytes() for p in photos]
    payloads.insert(1, payloads[0][:300])  # a JPEG cut off after its headers
    decoded = decode_batch(payloads, model.card.preprocessing, DecodeLimits.default())
    assert decoded.positions == [0, 2, 3] and decoded.errors[1].code in {"truncated",
                                                                         "decode_failed"}
    encoder = OnnxEncoder.create(str(model.onnx_path), model.card)
    outputs = split_outputs(encoder.run(decoded.arrays), model.card)
    return PipelineResult(card=model.card, decoded=decoded, outputs=outputs)


FILENAMES = ["a.jpg", None, "dir-less name ü.jpg", "b.jpg"]


def _check_against_model(endpoint: str, answer: bytes) -> dict:
    document = orjson.loads(answer)
    parsed = MODELS[endpoint].model_validate_json(answer, strict=True)
    dumped = json.loads(parsed.model_dump_json())
    assert dumped == document
    assert list(dumped) == list(document)  # field order too
    for mine, theirs in zip(document["results"], dumped["results"]):
        assert list(mine) == list(theirs)
    return document


@pytest.mark.parametrize("layer", ["embedding", "features"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("encoding", ["list", "base64"])
def test_embed_answer_is_the_declared_model_and_the_exact_vectors(result, layer, normalize,
                                                                  dtype, encoding):
    answer = answer_json("embed", result, FILENAMES, layer=layer, normalize=normalize,
                         dtype=dtype, encoding=encoding)
    document = _check_against_model("embed", answer)
    card = result.card
    assert (document["layer"], document["dim"], document["dtype"], document["encoding"],
            document["normalized"]) == (layer, card.dim(layer), dtype, encoding, normalize)
    assert document["model"] == {"name": card.name, "version": card.version,
                                 "backbone": card.backbone}
    want = prepare_vectors(result.outputs[layer], normalize=normalize, dtype=dtype)
    items = document["results"]
    assert [item["index"] for item in items] == [0, 1, 2, 3]
    assert [item["filename"] for item in items] == FILENAMES
    bad = items[1]
    assert bad["embedding"] is None and bad["error"]["code"] == result.decoded.errors[1].code
    assert bad["error"]["message"] == result.decoded.errors[1].message
    for row, position in enumerate(result.decoded.positions):
        item = items[position]
        assert item["error"] is None
        if encoding == "base64":
            got = np.frombuffer(base64.b64decode(item["embedding"]), dtype=want.dtype)
        else:
            got = np.asarray(item["embedding"], dtype=want.dtype)
        assert got.shape == (card.dim(layer),)
        np.testing.assert_array_equal(got.view(np.uint8), want[row].view(np.uint8))
    if encoding == "list" and dtype == "float32":  # the shortest float32 decimals, not float64's
        first = answer.split(b'"embedding":[', 1)[1].split(b"]", 1)[0]
        assert len(first) < 0.7 * len(json.dumps(want[0].tolist()))


@pytest.mark.parametrize("top_k", [1, 2, 1000])
def test_classify_answer_is_the_declared_model_and_the_softmax(result, top_k):
    document = _check_against_model("classify", answer_json("classify", result, FILENAMES,
                                                            top_k=top_k))
    card = result.card
    k = min(top_k, len(card.class_names))
    assert document["top_k"] == k
    probs = softmax(result.outputs["logits"])
    items = document["results"]
    assert items[1]["predictions"] is None and items[1]["error"]["code"]
    for row, position in enumerate(result.decoded.positions):
        predictions = items[position]["predictions"]
        assert len(predictions) == k and items[position]["error"] is None
        scores = [p["probability"] for p in predictions]
        assert scores == sorted(scores, reverse=True)
        for p in predictions:
            assert p["label"] == card.class_names[p["index"]]
            assert p["probability"] == float(probs[row, p["index"]])  # exact, not rounded


def test_an_answer_with_no_decodable_image(result):
    only_bad = PipelineResult(card=result.card, decoded=type(result.decoded)(
        arrays=result.decoded.arrays[:0], positions=[], errors={0: result.decoded.errors[1]},
        count=1), outputs=None)
    for endpoint, options in (("embed", {"layer": "embedding", "normalize": True,
                                         "dtype": "float32", "encoding": "list"}),
                              ("classify", {"top_k": 5})):
        document = _check_against_model(endpoint, answer_json(endpoint, only_bad, [None],
                                                              **options))
        assert document["results"][0]["error"]["code"] == result.decoded.errors[1].code
