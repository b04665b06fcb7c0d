"""The Open Inference Protocol (KServe v2) front, driven by stock clients on loopback.

One ``cnn-codes serve`` process for the module (the session's real mobilenet_v3_small, trained
one epoch on the real photos), with an API key and a small gRPC message limit; it is spoken to
with the real ``tritonclient`` (gRPC and HTTP clients, and its generated gRPC stub for
hand-made requests), grpc_health_probe-style ``grpc.health.v1`` checks and server reflection.
Expected numbers come from the model card and from onnxruntime run directly on the published
model, never from constants.

The not-ready (UNAVAILABLE) and overload cases need a service held in those states, which the
real Encoder cannot be made to do on cue: ``test_standby_front_*`` runs the same gRPC front
(``service.kserve.grpc_server.GrpcFront`` + ``InferenceFront`` + ``InferencePipeline``) in a
subprocess whose Encoder stand-in is slow and whose readiness follows a flag file.

This process imports tritonclient only: the server-side stubs share protobuf's ``inference``
package and are never imported here (see ``service/kserve/__init__.py``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from google.protobuf import descriptor_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from cnn_codes.settings import Settings
from conftest import REPO_ROOT, Server, base_env, free_port, metric
from models.card import OUTPUT_NAMES, ModelCard
from models.decode import decode_file
from models.runtime import open_session

KEY = "grpc-test-key-0123456789"
METADATA = (("authorization", f"Bearer {KEY}"),)


def auth() -> dict[str, str]:
    """Fresh headers per call: tritonclient.http adds its own keys to the dict it is given."""
    return dict(METADATA)

MAX_MESSAGE = 12 * 1024 * 1024  # the server's CNN_CODES_GRPC_MAX_MESSAGE_BYTES here
SERVICE = "inference.GRPCInferenceService"
TIMEOUT = 120.0
PROTO = "service/kserve/proto/grpc_predict_v2.proto"


# -- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def oip(published: dict, tmp_path_factory: pytest.TempPathFactory):
    """The served model with an API key and a 12 MiB gRPC message limit, on one API worker:
    its one batcher is what HTTP and gRPC share (with N workers each worker has its own, shared
    by both protocols reaching that worker)."""
    srv = Server(published["repository"], f"{published['name']}:{published['version']}",
                 tmp_path_factory.mktemp("oip"), CNN_CODES_API_KEYS=json.dumps([KEY]),
                 CNN_CODES_GRPC_MAX_MESSAGE_BYTES=str(MAX_MESSAGE), CNN_CODES_API_WORKERS="1")
    try:
        srv.wait_ready()
        wait_for(lambda: health_status(srv.grpc_url, "") == "SERVING", srv)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def card(published: dict) -> ModelCard:
    return ModelCard.model_validate_json((published["path"] / "model_card.json").read_text())


@pytest.fixture(scope="module")
def photos(data_dir: Path) -> list[Path]:
    """Three real val photos of each class."""
    return [p for cls in ("ants", "bees") for p in sorted((data_dir / "val" / cls).glob("*.jpg"))[:3]]


@pytest.fixture(scope="module")
def client(oip: Server):
    with triton_grpc.InferenceServerClient(oip.grpc_url) as grpc_client:
        yield grpc_client


@pytest.fixture(scope="module")
def http_client(oip: Server):
    http = triton_http.InferenceServerClient(oip.url.removeprefix("http://"),
                                             network_timeout=TIMEOUT)
    yield http
    http.close()


@pytest.fixture(scope="module")
def stub(oip: Server):
    """tritonclient's generated stub, for requests the high-level client cannot make."""
    channel = grpc.insecure_channel(oip.grpc_url, options=[
        ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def wait_for(condition, srv: Server | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    pytest.fail(f"condition not met in {timeout} s" + (f":\n{srv.log()[-4000:]}" if srv else ""))


def health_status(target: str, service: str, timeout: float = 5) -> str:
    """What ``grpc_health_probe -addr=<target> -service=<service>`` checks: the status name."""
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def onnx_outputs(published: dict, batch: np.ndarray) -> dict[str, np.ndarray]:
    """onnxruntime run directly on the published model."""
    session = open_session(str(published["path"] / "model.onnx"))
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {"images": batch})))


def pixels(card: ModelCard, paths: list[Path]) -> np.ndarray:
    return np.stack([decode_file(str(p), card.preprocessing) for p in paths])


def bytes_input(module, paths_or_blobs: list) -> object:
    blobs = [p.read_bytes() if isinstance(p, Path) else p for p in paths_or_blobs]
    tensor = module.InferInput("images", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    return tensor


def uint8_input(module, batch: np.ndarray) -> object:
    tensor = module.InferInput("images", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    return tensor


def grpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def triton_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def parse_classes(row) -> list[tuple[float, int, str | None]]:
    """``b"value:index[:label]"`` strings -> (value, index, label)."""
    out = []
    for item in row:
        text = item.decode() if isinstance(item, bytes) else str(item)
        value, index, *label = text.split(":", 2)
        out.append((float(value), int(index), label[0] if label else None))
    return out


def raw_request(name: str, datatype: str, shape: list[int], raw: bytes,
                **fields) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=fields.pop("model", None) or "", **fields)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend(shape)
    request.raw_input_contents.append(raw)
    return request


def serialized(blobs: list[bytes]) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in blobs)


# -- stubs ----------------------------------------------------------------------------------

def test_generated_stubs_match_proto(tmp_path: Path):
    """The committed stubs are what the pinned grpcio-tools makes of the committed .proto."""
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", PROTO],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    stem = PROTO.removesuffix(".proto")
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
        generated = (tmp_path / (stem + suffix)).read_text()
        committed = (REPO_ROOT / (stem + suffix)).read_text()
        assert generated == committed, f"{stem + suffix} is stale: regenerate (see " \
                                       "service/kserve/__init__.py)"


# -- health, reflection, metadata --------------------------------------------------------

def test_health_checking_without_a_key(oip):
    assert health_status(oip.grpc_url, "") == "SERVING"
    assert health_status(oip.grpc_url, SERVICE) == "SERVING"
    with grpc.insecure_channel(oip.grpc_url) as channel:
        error = grpc_error(lambda: health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_protocol(oip):
    with grpc.insecure_channel(oip.grpc_url) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = lambda **kw: list(reflect.ServerReflectionInfo(  # noqa: E731
            iter([reflection_pb2.ServerReflectionRequest(**kw)]), metadata=METADATA, timeout=10))
        names = {s.name for s in ask(list_services="")[0].list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names
        files = ask(file_containing_symbol=SERVICE)[0].file_descriptor_response.file_descriptor_proto
        descriptor = descriptor_pb2.FileDescriptorProto.FromString(files[0])
        methods = {m.name for s in descriptor.service for m in s.method}
        assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                "ModelInfer", "ModelConfig"} <= methods
        denied = grpc_error(lambda: list(reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)))
    assert denied.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_live_ready_metadata_config(client, card, published):
    name, version = published["name"], str(published["version"])
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name, headers=auth())
    assert client.is_model_ready(name, version, headers=auth())
    server = client.get_server_metadata(headers=auth())
    assert server.name == "cnn-codes" and "classification" in server.extensions
    meta = client.get_model_metadata(name, headers=auth())
    size = card.preprocessing.crop_size
    assert meta.name == name and list(meta.versions) == [version]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == \
        [("images", "UINT8", [-1, size, size, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == \
        [(o, "FP32", [-1, card.dim(o)]) for o in OUTPUT_NAMES]
    config = client.get_model_config(name, headers=auth()).config
    assert config.name == name and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == Settings.model_fields["max_images_per_request"].default
    assert [(i.name, list(i.dims)) for i in config.input] == [("images", [size, size, 3])]
    assert config.input[0].format == config.input[0].FORMAT_NHWC
    assert [(o.name, list(o.dims)) for o in config.output] == \
        [(o, [card.dim(o)]) for o in OUTPUT_NAMES]
    assert json.loads(config.parameters["class_names"].string_value) == card.class_names


def test_http_live_ready_metadata_config(http_client, card, published):
    name, version = published["name"], str(published["version"])
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert http_client.is_model_ready(name, version, headers=auth())
    assert "model_configuration" in http_client.get_server_metadata(headers=auth())["extensions"]
    meta = http_client.get_model_metadata(name, headers=auth())
    assert meta["outputs"] == [{"name": o, "datatype": "FP32", "shape": [-1, card.dim(o)]}
                               for o in OUTPUT_NAMES]
    config = http_client.get_model_config(name, headers=auth())
    assert config["input"][0]["dims"] == [card.preprocessing.crop_size] * 2 + [3]
    assert config["max_batch_size"] == Settings.model_fields["max_images_per_request"].default


# -- inference --------------------------------------------------------------------------

def test_grpc_bytes_images_equal_onnxruntime_and_http(oip, client, card, published, photos):
    reference = onnx_outputs(published, pixels(card, photos))
    result = client.infer(published["name"], [bytes_input(triton_grpc, photos)],
                          outputs=[triton_grpc.InferRequestedOutput(o) for o in OUTPUT_NAMES],
                          request_id="bytes-1", headers=auth())
    assert result.get_response().id == "bytes-1"
    assert result.get_response().model_version == str(published["version"])
    for name in OUTPUT_NAMES:
        got = result.as_numpy(name)
        assert got.dtype == np.float32 and got.shape == (len(photos), card.dim(name))
        np.testing.assert_allclose(got, reference[name], rtol=1e-4, atol=1e-5)
    # the gRPC embedding of an image equals the HTTP one
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    body = httpx.post(f"{oip.url}/embed", files=files, data={"normalize": "false"},
                      headers=auth(), timeout=TIMEOUT).json()
    http_embedding = np.array([r["embedding"] for r in body["results"]], dtype=np.float32)
    np.testing.assert_allclose(result.as_numpy("embedding"), http_embedding, rtol=1e-5, atol=1e-6)


def test_grpc_uint8_tensor_returns_every_output(client, card, published, photos):
    batch = pixels(card, photos[:4])
    reference = onnx_outputs(published, batch)
    result = client.infer(published["name"], [uint8_input(triton_grpc, batch)], headers=auth())
    names = [o.name for o in result.get_response().outputs]
    assert names == list(OUTPUT_NAMES)  # none requested: all of them
    for name in OUTPUT_NAMES:
        np.testing.assert_allclose(result.as_numpy(name), reference[name], rtol=1e-4, atol=1e-5)


def test_grpc_typed_contents_equal_raw_contents(stub, card, published, photos):
    """``contents.bytes_contents`` / ``contents.uint_contents`` instead of raw bytes."""
    reference = onnx_outputs(published, pixels(card, photos[:1]))
    as_bytes = service_pb2.ModelInferRequest(model_name=published["name"])
    tensor = as_bytes.inputs.add(name="images", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(photos[0].read_bytes())
    as_bytes.outputs.add(name="features")
    as_pixels = service_pb2.ModelInferRequest(model_name=published["name"])
    tensor = as_pixels.inputs.add(name="images", datatype="UINT8",
                                  shape=[1, *pixels(card, photos[:1]).shape[1:]])
    tensor.contents.uint_contents.extend(pixels(card, photos[:1]).reshape(-1).tolist())
    as_pixels.outputs.add(name="features")
    for request in (as_bytes, as_pixels):
        reply = stub.ModelInfer(request, metadata=METADATA, timeout=TIMEOUT)
        got = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(
            list(reply.outputs[0].shape))
        np.testing.assert_allclose(got, reference["features"], rtol=1e-4, atol=1e-5)


def test_classification_extension_grpc_and_http(client, http_client, card, published, photos):
    logits = onnx_outputs(published, pixels(card, photos))["logits"]
    expected_order = np.argsort(-logits, axis=1, kind="stable")
    width = card.dim("logits")
    grpc_result = client.infer(
        published["name"], [bytes_input(triton_grpc, photos)], headers=auth(),
        outputs=[triton_grpc.InferRequestedOutput("logits", class_count=width + 3)])
    http_results = [http_client.infer(
        published["name"], [bytes_input(triton_http, photos)], headers=auth(),
        outputs=[triton_http.InferRequestedOutput("logits", class_count=width + 3,
                                                  binary_data=binary)])
        for binary in (True, False)]
    for result in (grpc_result, *http_results):
        table = result.as_numpy("logits")
        assert table.shape == (len(photos), width)  # count clamped to the K classes
        for row, order, values in zip(table, expected_order, logits):
            parsed = parse_classes(row)
            assert [index for _, index, _ in parsed] == order.tolist()
            assert [label for _, _, label in parsed] == [card.class_names[i] for i in order]
            np.testing.assert_allclose([v for v, _, _ in parsed], values[order], rtol=1e-4,
                                       atol=1e-5)
    top1 = client.infer(published["name"], [bytes_input(triton_grpc, photos[:2])], headers=auth(),
                        outputs=[triton_grpc.InferRequestedOutput("logits", class_count=1),
                                 triton_grpc.InferRequestedOutput("embedding")])
    assert top1.as_numpy("logits").shape == (2, 1)
    assert top1.as_numpy("embedding").shape == (2, card.dim("embedding"))


def test_http_infer_binary_and_json_bodies(oip, http_client, card, published, photos):
    reference = onnx_outputs(published, pixels(card, photos[:2]))
    binary = http_client.infer(published["name"], [bytes_input(triton_http, photos[:2])],
                               headers=auth())
    for name in OUTPUT_NAMES:
        np.testing.assert_allclose(binary.as_numpy(name), reference[name], rtol=1e-4, atol=1e-5)
    # plain JSON: BYTES elements are base64 image files; UINT8 is a list of integers
    url = f"{oip.url}/v2/models/{published['name']}/versions/{published['version']}/infer"
    as_b64 = {"id": "json-1", "inputs": [{
        "name": "images", "datatype": "BYTES", "shape": [2],
        "data": [base64.b64encode(p.read_bytes()).decode() for p in photos[:2]]}],
        "outputs": [{"name": "embedding"}]}
    body = httpx.post(url, json=as_b64, headers=auth(), timeout=TIMEOUT).json()
    assert body["id"] == "json-1" and body["outputs"][0]["shape"] == [2, card.dim("embedding")]
    got = np.array(body["outputs"][0]["data"], dtype=np.float32).reshape(2, -1)
    np.testing.assert_allclose(got, reference["embedding"], rtol=1e-4, atol=1e-5)
    one = pixels(card, photos[:1])
    as_ints = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(one.shape),
                           "data": one.reshape(-1).tolist()}], "outputs": [{"name": "logits"}]}
    body = httpx.post(url, json=as_ints, headers=auth(), timeout=TIMEOUT).json()
    np.testing.assert_allclose(body["outputs"][0]["data"], reference["logits"][0], rtol=1e-4,
                               atol=1e-5)


# -- errors ------------------------------------------------------------------------------

def test_invalid_argument_names_the_problem(oip, stub, card, published, photos):
    name, size = published["name"], card.preprocessing.crop_size
    good = photos[0].read_bytes()
    small = np.zeros((1, 100, 100, 3), np.uint8)
    cases = {
        "unknown input 'pixels'": raw_request("pixels", "BYTES", [1], serialized([good]),
                                              model=name),
        "datatype 'FP32'": raw_request("images", "FP32", [1], b"\0" * 4, model=name),
        f"[N, {size}, {size}, 3]": raw_request("images", "UINT8", list(small.shape),
                                               small.tobytes(), model=name),
        "needs": raw_request("images", "UINT8", [1, size, size, 3], b"\0" * 10, model=name),
        "declares": raw_request("images", "BYTES", [1], (99).to_bytes(4, "little") + b"x",
                                model=name),
        "shape [2]": raw_request("images", "BYTES", [2], serialized([good]), model=name),
    }
    unknown_output = raw_request("images", "BYTES", [1], serialized([good]), model=name)
    unknown_output.outputs.add(name="fc9")
    cases["unknown output 'fc9'"] = unknown_output
    string_param = raw_request("images", "BYTES", [1], serialized([good]), model=name)
    string_param.outputs.add(name="logits").parameters["classification"].string_param = "2"
    cases["int64_param"] = string_param
    for expected, request in cases.items():
        error = grpc_error(lambda: stub.ModelInfer(request, metadata=METADATA, timeout=TIMEOUT))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (expected, error.details())
        assert expected in error.details()


def test_bad_images_use_the_http_error_codes(oip, stub, published, photos):
    good = photos[0].read_bytes()
    blobs = [good, b"this is not an image", b"", good[:2000]]
    request = raw_request("images", "BYTES", [len(blobs)], serialized(blobs),
                          model=published["name"])
    error = grpc_error(lambda: stub.ModelInfer(request, metadata=METADATA, timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailing = dict(error.trailing_metadata())
    listed = json.loads(trailing["cnn-codes-errors"])
    assert [(e["index"], e["code"]) for e in listed] == \
        [(1, "not_an_image"), (2, "empty"), (3, "truncated")]
    for code in ("[1] not_an_image", "[2] empty", "[3] truncated"):
        assert code in error.details()
    # HTTP /v2 says the same with 400 and the same codes
    files = [base64.b64encode(b).decode() for b in blobs]
    response = httpx.post(f"{oip.url}/v2/models/{published['name']}/infer", headers=auth(),
                          json={"inputs": [{"name": "images", "datatype": "BYTES",
                                            "shape": [len(files)], "data": files}]},
                          timeout=TIMEOUT)
    assert response.status_code == 400
    assert [e["code"] for e in response.json()["errors"]] == ["not_an_image", "empty",
                                                              "truncated"]


def test_not_found_for_another_model_or_version(oip, client, http_client, stub, published,
                                                 photos):
    name, version = published["name"], str(published["version"])
    calls = [
        lambda: client.get_model_metadata("no-such-model", headers=auth()),
        lambda: client.get_model_config(name, "99", headers=auth()),
        lambda: client.is_model_ready(name, "99", headers=auth()),
        lambda: client.infer("no-such-model", [bytes_input(triton_grpc, photos[:1])],
                             headers=auth()),
        lambda: client.infer(name, [bytes_input(triton_grpc, photos[:1])], model_version="99",
                             headers=auth()),
    ]
    for call in calls:
        error = triton_error(call)
        assert error.status() == "StatusCode.NOT_FOUND", error.message()
        assert "no-such-model" in error.message() or "'99'" in error.message()
        assert name in error.message() and version in error.message()
    for path in ("/v2/models/no-such-model", f"/v2/models/{name}/versions/99/config"):
        response = httpx.get(oip.url + path, headers=auth(), timeout=TIMEOUT)
        assert response.status_code == 404 and "error" in response.json()


def test_resource_exhausted_for_too_many_images_or_bytes(oip, client, published, photos):
    limit = Settings.model_fields["max_images_per_request"].default
    error = triton_error(lambda: client.infer(
        published["name"], [bytes_input(triton_grpc, [photos[0]] * (limit + 1))], headers=auth()))
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert f"limit is {limit}" in error.message()
    huge = bytes_input(triton_grpc, [b"\0" * (MAX_MESSAGE + 1024)])
    error = triton_error(lambda: client.infer(published["name"], [huge], headers=auth()))
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    # HTTP /v2: too many images is 413
    files = [base64.b64encode(photos[0].read_bytes()).decode()] * (limit + 1)
    response = httpx.post(f"{oip.url}/v2/models/{published['name']}/infer", headers=auth(),
                          json={"inputs": [{"name": "images", "datatype": "BYTES",
                                            "shape": [len(files)], "data": files}]},
                          timeout=TIMEOUT)
    assert response.status_code == 413 and f"limit is {limit}" in response.json()["error"]


def test_unauthenticated_without_the_key(oip, client, published, photos):
    for headers in (None, {"authorization": "Bearer wrong-key"}, {"authorization": KEY}):
        for call in (lambda: client.get_model_metadata(published["name"], headers=headers),
                     lambda: client.infer(published["name"],
                                          [bytes_input(triton_grpc, photos[:1])],
                                          headers=headers)):
            error = triton_error(call)
            assert error.status() == "StatusCode.UNAUTHENTICATED"
            assert "API key" in error.message() and KEY not in error.message()
    # open like their HTTP twins: liveness / readiness
    assert client.is_server_live() and client.is_server_ready()
    # the same key guards the HTTP /v2 paths
    response = httpx.get(f"{oip.url}/v2/models/{published['name']}", timeout=TIMEOUT)
    assert response.status_code == 401
    # and after every refusal above the worker still serves
    result = client.infer(published["name"], [bytes_input(triton_grpc, photos[:1])],
                          headers=auth())
    assert result.as_numpy("embedding").shape[0] == 1


# -- metrics and batching -------------------------------------------------------------------

def test_requests_and_images_counted_by_protocol(oip, client, http_client, published, photos):
    grpc_ok = dict(protocol="grpc", endpoint="ModelInfer", status="OK")
    http_ok = dict(protocol="http", endpoint="/v2/models/{name}/infer", status="200")
    before = {k: metric(oip.url, "cnn_codes_requests_total", **v)
              for k, v in (("grpc", grpc_ok), ("http", http_ok))}
    images_before = {p: metric(oip.url, "cnn_codes_images_total", protocol=p, endpoint="infer",
                               outcome="ok") for p in ("grpc", "http")}
    client.infer(published["name"], [bytes_input(triton_grpc, photos[:3])], headers=auth())
    http_client.infer(published["name"], [bytes_input(triton_http, photos[:2])], headers=auth())
    assert metric(oip.url, "cnn_codes_requests_total", **grpc_ok) - before["grpc"] == 1
    assert metric(oip.url, "cnn_codes_requests_total", **http_ok) - before["http"] == 1
    for protocol, count in (("grpc", 3), ("http", 2)):
        after = metric(oip.url, "cnn_codes_images_total", protocol=protocol, endpoint="infer",
                       outcome="ok")
        assert after - images_before[protocol] == count
    assert metric(oip.url, "cnn_codes_request_seconds_count", protocol="grpc",
                  endpoint="ModelInfer") >= 1


def test_http_and_grpc_requests_share_batches(oip, client, card, published, photos):
    """While the core works through a queue of full batches (gRPC UINT8), one HTTP /embed
    image and one gRPC image arrive; a batch of exactly 2 can only hold one of each.

    The two singles are sent once the first full batch has come back, so the core is known to
    be busy with the rest of the queue (full batches, ``BATCH_RUNS`` at a time) for however
    long this machine needs for ``blockers_n - 1`` of them.
    """
    blockers_n = 6
    batch_size = Settings.model_fields["max_batch_size"].default
    rng = np.random.default_rng(0)
    blocker = rng.integers(0, 256, (batch_size, *pixels(card, photos[:1]).shape[1:]),
                           dtype=np.uint8)
    single = pixels(card, photos[:1])
    photo = photos[1].read_bytes()

    def grpc_call(batch: np.ndarray) -> None:
        client.infer(published["name"], [uint8_input(triton_grpc, batch)], headers=auth(),
                     outputs=[triton_grpc.InferRequestedOutput("embedding")])

    def buckets() -> dict[str, float]:
        return {le: metric(oip.url, "cnn_codes_batch_size_bucket", le=le)
                for le in ("1.0", "2.0")}

    with httpx.Client(base_url=oip.url, headers=auth(), timeout=TIMEOUT) as http:
        def http_call() -> int:
            return http.post("/embed", files=[("images", ("x.jpg", photo, "image/jpeg"))]
                             ).status_code

        assert http_call() == 200  # the connection is open before the timed part
        for _ in range(10):
            before = buckets()
            with concurrent.futures.ThreadPoolExecutor(blockers_n + 2) as pool:
                blockers = [pool.submit(grpc_call, blocker) for _ in range(blockers_n)]
                concurrent.futures.wait(blockers, return_when=concurrent.futures.FIRST_COMPLETED)
                mixed = [pool.submit(http_call), pool.submit(grpc_call, single)]
                for future in blockers + mixed[1:]:
                    future.result()
                assert mixed[0].result() == 200
            after = buckets()
            pairs = (after["2.0"] - before["2.0"]) - (after["1.0"] - before["1.0"])
            if pairs >= 1:
                return
    pytest.fail("in 10 rounds no batch held both the HTTP and the gRPC request")


# -- not-ready and overload: the same front over a stand-in Encoder -----------------------

STANDBY = """
import asyncio, os, signal
from pathlib import Path
import numpy as np
from cnn_codes.settings import Settings
from models.card import OUTPUT_NAMES, ModelCard
from service.kserve.grpc_server import GrpcFront
from service.kserve.protocol import InferenceFront
from service.pipeline import InferencePipeline
from service.served import ModelHolder

async def main():
    card = ModelCard.model_validate_json(Path(os.environ["CARD"]).read_text())
    holder = ModelHolder(card)
    settings = Settings()
    flag, delay = Path(os.environ["READY_FLAG"]), float(os.environ["ENCODE_DELAY_S"])
    width = sum(card.dim(name) for name in OUTPUT_NAMES)

    async def encode(batch):  # stand-in for the Encoder service: slow, zeros
        await asyncio.sleep(delay)
        return np.zeros((len(batch), width), np.float32)

    async def is_ready():
        return flag.exists()

    pipeline = InferencePipeline(holder, settings, encode)
    front = GrpcFront(InferenceFront(holder, settings, pipeline, is_ready), settings)
    port = await front.start()
    print("LISTENING", port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await front.stop()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def standby(published: dict, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("standby")
    port = free_port()
    env = base_env(CARD=str(published["path"] / "model_card.json"),
                   READY_FLAG=str(tmp / "ready"), ENCODE_DELAY_S="1.5",
                   CNN_CODES_GRPC_PORT=str(port), CNN_CODES_GRPC_MAX_CONCURRENCY="1",
                   CNN_CODES_API_KEYS="[]", CNN_CODES_GRPC_GRACE_S="0")
    proc = subprocess.Popen([sys.executable, "-c", STANDBY], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("LISTENING"), line + proc.stdout.read()[-3000:]
        yield {"target": f"127.0.0.1:{port}", "flag": tmp / "ready", "name": published["name"]}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_standby_front_unavailable_until_ready_then_overloaded(standby, photos):
    with triton_grpc.InferenceServerClient(standby["target"]) as client:
        assert client.is_server_live()
        assert not client.is_server_ready()
        assert not client.is_model_ready(standby["name"])
        assert health_status(standby["target"], "") == "NOT_SERVING"
        error = triton_error(lambda: client.infer(standby["name"],
                                                  [bytes_input(triton_grpc, photos[:1])]))
        assert error.status() == "StatusCode.UNAVAILABLE" and "not ready" in error.message()

        standby["flag"].touch()
        wait_for(lambda: health_status(standby["target"], SERVICE) == "SERVING", timeout=10)
        assert client.is_server_ready()

        # one ModelInfer in progress (grpc_max_concurrency=1, a 1.5 s Encoder): the next one
        # is refused at once, and the first still completes
        results: list = []
        first = threading.Thread(target=lambda: results.append(client.infer(
            standby["name"], [bytes_input(triton_grpc, photos[:1])])))
        first.start()
        time.sleep(0.5)
        started = time.monotonic()
        error = triton_error(lambda: client.infer(standby["name"],
                                                  [bytes_input(triton_grpc, photos[:1])]))
        assert time.monotonic() - started < 1.0
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "overloaded" in error.message()
        first.join(timeout=30)
        assert results and results[0].as_numpy("logits").shape[0] == 1
