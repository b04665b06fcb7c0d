"""Precision variants: int8 (static QDQ quantisation) and fp16, checked against fp32 first."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import CLI, REPO_ROOT, base_env, last_json_line
from export.quantize import (Int8Options, VariantThresholds, check_interface, compare_variant,
                             convert_fp16, head_nodes, load_images, normalisation_prefix,
                             quantize_int8, thresholds_dict)
from models.card import ModelCard, VariantCheck
from models.repository import list_versions, resolve

# A one-epoch MobileNetV3-Small trained from scratch is the worst case for post-training
# quantisation (int8 vs fp32 embedding cosine ~0.98 on the val photos, below the production
# default 0.99, see README "Precision variants"), and its figures move with the host's CPU (one
# CI host gave cosine min 0.45 with full-range weights on 2026-12-02, this one 0.95): the
# publish path is tested with thresholds any working int8 model meets, and the figures are
# checked against the thresholds the card records; the rejection path with the defaults
# tightened.
RELAXED_THRESHOLDS = thresholds_dict(VariantThresholds(
    min_cosine=0.8, min_cosine_floor=0.3, min_top1_agreement=0.6, max_prob_diff=0.5))
# the same thresholds as the settings the export command reads (CNN_CODES_VARIANT_<FIELD>)
RELAXED = {f"CNN_CODES_VARIANT_{field.upper()}": str(value)
           for field, value in RELAXED_THRESHOLDS.items()}


def variant_export(run_dir: Path, repository: Path, precision: str, **env: str):
    """``cnn-codes export --precision`` on 16 parity and 32 calibration photos (not failing)."""
    return subprocess.run(
        [*CLI, "export", str(run_dir), "--repository", str(repository), "--name", "ab",
         "--precision", precision, "--parity-limit", "16", "--calibration-limit", "32"],
        env=base_env(**env), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def int8_model(trained_run, tmp_path_factory) -> dict:
    repository = tmp_path_factory.mktemp("int8-repo")
    proc = variant_export(trained_run, repository, "int8", **RELAXED)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {"repository": repository, "result": last_json_line(proc.stdout),
            "published": resolve(repository, "ab")}


def test_int8_is_published_with_its_figures(int8_model, data_dir):
    result, published = int8_model["result"], int8_model["published"]
    card = published.card
    assert result["version"] == card.version == 1 and result["precision"] == "int8"
    assert card.precision == "int8" and card.parity is not None and card.parity.n_images == 16
    check = card.variant_check
    assert check is not None and check.precision == "int8" and check.n_images == 16
    assert check.source == str(data_dir / "val") and check.provider == "CPUExecutionProvider"
    limits = RELAXED_THRESHOLDS
    assert check.thresholds == limits
    assert limits["min_cosine_floor"] <= check.embedding_cosine_min <= check.embedding_cosine_mean
    assert limits["min_cosine"] <= check.embedding_cosine_mean <= 1.0
    assert 0.0 < check.features_cosine_min <= check.features_cosine_mean <= 1.0
    assert limits["min_top1_agreement"] <= check.top1_agreement <= 1.0
    assert 0.0 <= check.max_prob_diff <= limits["max_prob_diff"]
    assert set(check.max_abs_diff) == {"logits", "embedding", "features"}
    assert check.reference_onnx_sha256 and check.reference_onnx_sha256 != card.onnx_sha256
    assert check.conversion["calibration_images"] == 32
    assert check.conversion["calibration_source"] == str(data_dir / "train")
    assert check.conversion["float_head"] is True
    assert check.conversion["reduce_range"] is False  # full-range weights by default
    assert check.conversion["checked_on_int8_dot_product"] in {"vnni", "no-vnni", "unknown"}
    assert result["variant_check"]["embedding_cosine_mean"] == check.embedding_cosine_mean
    # the interface the service relies on is the fp32 one
    assert [(t.name, t.dtype, t.shape) for t in card.inputs] == [("images", "uint8",
                                                                   (-1, 224, 224, 3))]
    assert [(t.name, t.dtype, t.shape) for t in card.outputs] == [
        ("logits", "float32", (-1, 2)), ("embedding", "float32", (-1, 1024)),
        ("features", "float32", (-1, 576))]


def test_int8_graph_keeps_the_interface_and_quantises_the_trunk(int8_model):
    model = onnx.load(str(int8_model["published"].onnx_path))
    onnx.checker.check_model(model)
    (images,) = model.graph.input
    dims = images.type.tensor_type.shape.dim
    assert images.name == "images" and images.type.tensor_type.elem_type == TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [224, 224, 3]
    assert [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] == [
        ("logits", TensorProto.FLOAT), ("embedding", TensorProto.FLOAT),
        ("features", TensorProto.FLOAT)]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 40 and ops.count("DequantizeLinear") > 40
    # the uint8 pixels go through the float normalisation, never through a QuantizeLinear
    assert {n.op_type for n in model.graph.node if "images" in n.input} <= {"Transpose", "Cast",
                                                                            "Shape"}
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers["logits"].op_type == "Gemm"  # float head: outputs not re-quantised
    weights = {i.name: i for i in model.graph.initializer}
    int8_weights = [w for w in weights.values() if w.data_type == TensorProto.INT8]
    assert len(int8_weights) >= 50  # every trunk conv's weight


def test_int8_is_served_by_onnxruntime_cpu_with_dynamic_batch(int8_model, data_dir):
    from models.runtime import OnnxEncoder, split_outputs

    published = int8_model["published"]
    encoder = OnnxEncoder.create(str(published.onnx_path), published.card)
    assert encoder.provider == "CPUExecutionProvider"
    files = sorted((data_dir / "val").rglob("*.jpg"))[:5]
    images, _ = load_images(files, published.card.preprocessing)
    five = split_outputs(encoder.run(images), published.card)
    one = split_outputs(encoder.run(images[3:4]), published.card)
    assert {k: v.shape for k, v in five.items()} == {
        "logits": (5, 2), "embedding": (5, 1024), "features": (5, 576)}
    for name in five:
        assert five[name].dtype == np.float32 and np.isfinite(five[name]).all()
        np.testing.assert_allclose(five[name][3:4], one[name], rtol=1e-4, atol=1e-4)


def test_variant_below_a_threshold_is_not_published(trained_run, tmp_path):
    repository = tmp_path / "repo"
    proc = variant_export(trained_run, repository, "int8",
                          CNN_CODES_VARIANT_MIN_COSINE="0.999999")
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "int8 variant not published" in proc.stderr
    assert "embedding_cosine_mean" in proc.stderr and "CNN_CODES_VARIANT_MIN_COSINE" in proc.stderr
    result = last_json_line(proc.stdout)
    assert result["published"] is False and result["variant_check"]["n_images"] == 16
    assert any(f.startswith("embedding_cosine_mean") for f in result["failures"])
    assert list_versions(repository, "ab") == []
    assert not (repository / "ab").exists() or not any((repository / "ab").iterdir())


def test_fp16_keeps_io_types_and_matches_fp32_on_cpu(published, data_dir, tmp_path):
    reference = published["path"] / "model.onnx"
    card = ModelCard.model_validate_json((published["path"] / "model_card.json").read_text())
    info = convert_fp16(reference, tmp_path / "fp16.onnx")
    check_interface(reference, tmp_path / "fp16.onnx")  # uint8 in, float32 out, dynamic batch
    assert info["keep_io_types"] is True
    model = onnx.load(str(tmp_path / "fp16.onnx"))
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    images, _ = load_images(sorted((data_dir / "val").rglob("*.jpg"))[:8], card.preprocessing)
    check = compare_variant(reference, tmp_path / "fp16.onnx", images, precision="fp16")
    assert check.provider == "CPUExecutionProvider" and check.n_images == 8
    assert check.embedding_cosine_min > 0.999 and check.top1_agreement == 1.0
    assert not VariantThresholds().failures(check)


def tiny_model(path: Path) -> None:
    """uint8 (N, 8, 8, 3) -> normalise -> Conv -> Relu -> Conv -> Relu -> mean pool -> Gemm x2."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("scale", np.array(255.0)), ("mean", np.full((1, 3, 1, 1), 0.45)),
        ("std", np.full((1, 3, 1, 1), 0.225)), ("w1", rng.normal(0, 0.3, (8, 3, 3, 3))),
        ("b1", np.zeros(8)), ("w2", rng.normal(0, 0.2, (16, 8, 3, 3))), ("b2", np.zeros(16)),
        ("w3", rng.normal(0, 0.2, (16, 12))), ("b3", np.zeros(12)),
        ("w4", rng.normal(0, 0.3, (12, 2))), ("b4", np.zeros(2))]]
    nodes = [
        helper.make_node("Transpose", ["images"], ["nchw"], perm=[0, 3, 1, 2], name="t"),
        helper.make_node("Cast", ["nchw"], ["f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Div", ["f", "scale"], ["x01"], name="div"),
        helper.make_node("Sub", ["x01", "mean"], ["xc"], name="sub"),
        helper.make_node("Div", ["xc", "std"], ["x"], name="norm"),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("ReduceMean", ["r2"], ["features"], axes=[2, 3], keepdims=0,
                         name="pool"),
        helper.make_node("Gemm", ["features", "w3", "b3"], ["fc"], name="fc"),
        helper.make_node("Relu", ["fc"], ["embedding"], name="relu3"),
        helper.make_node("Gemm", ["embedding", "w4", "b4"], ["logits"], name="classifier"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.UINT8,
                                                      ["batch", 8, 8, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", d])
         for n, d in (("logits", 2), ("embedding", 12), ("features", 16))], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_quantize_int8_on_a_constructed_graph(tmp_path):
    tiny_model(tmp_path / "fp32.onnx")
    model = onnx.load(str(tmp_path / "fp32.onnx"))
    assert sorted(normalisation_prefix(model)) == ["cast", "div", "norm", "sub", "t"]
    assert head_nodes(model) == ["pool", "fc", "relu3", "classifier"]  # relu2 stays with conv2
    rng = np.random.default_rng(1)
    calibration = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    info = quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calibration,
                         options=Int8Options(batch_size=4))
    assert info["calibration_images"] == 16 and "classifier" in info["float_nodes"]
    quantized = onnx.load(str(tmp_path / "int8.onnx"))
    check_interface(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    conv_inputs = {i for n in quantized.graph.node if n.op_type == "Conv" for i in n.input}
    dq_outputs = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    assert conv_inputs and all(i in dq_outputs for i in conv_inputs)  # both convs int8
    gemm_inputs = {i for n in quantized.graph.node if n.op_type == "Gemm" for i in n.input}
    assert not gemm_inputs & dq_outputs  # the head stays float
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    check = compare_variant(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", images,
                            precision="int8")
    assert check.n_images == 6 and check.embedding_cosine_min > 0.95

    whole = quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8-head.onnx", calibration,
                          options=Int8Options(batch_size=4, float_head=False))
    assert "classifier" not in whole["float_nodes"]
    quantized = onnx.load(str(tmp_path / "int8-head.onnx"))
    dq_outputs = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    gemms = [n for n in quantized.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2 and all(n.input[1] in dq_outputs for n in gemms)
    check_interface(tmp_path / "fp32.onnx", tmp_path / "int8-head.onnx")


def test_reduce_range_keeps_int8_weights_within_seven_bits(tmp_path):
    """``--int8-reduce-range`` (``Int8Options.reduce_range``): every int8 weight in [-64, 64],
    so onnxruntime's u8s8 kernels on CPUs without VNNI cannot saturate; the default uses the
    full range. Both record it, and the CPU the check ran on, for the card."""
    tiny_model(tmp_path / "fp32.onnx")
    calibration = np.random.default_rng(2).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    ranges = {}
    for reduce_range in (False, True):
        out = tmp_path / f"int8-{reduce_range}.onnx"
        info = quantize_int8(tmp_path / "fp32.onnx", out, calibration,
                             options=Int8Options(batch_size=4, reduce_range=reduce_range))
        assert info["reduce_range"] is reduce_range
        assert info["checked_on_int8_dot_product"] in {"vnni", "no-vnni", "unknown"}
        weights = [w for w in (numpy_helper.to_array(i)
                               for i in onnx.load(str(out)).graph.initializer
                               if i.data_type == TensorProto.INT8)
                   if w.ndim == 4]  # the conv kernels (not their int8 zero points)
        assert len(weights) == 2
        ranges[reduce_range] = (min(int(w.min()) for w in weights),
                                max(int(w.max()) for w in weights))
    assert ranges[True][0] >= -64 and ranges[True][1] <= 64  # onnxruntime: (-64, 64)
    assert ranges[False][0] < -64 or ranges[False][1] > 64  # symmetric: the largest |w| -> 127


def test_thresholds_name_every_missed_metric():
    check = VariantCheck(precision="int8", n_images=10, embedding_cosine_mean=0.98,
                         embedding_cosine_min=0.75, top1_agreement=0.9, max_prob_diff=0.2)
    failures = VariantThresholds().failures(check)
    assert [f.split()[0] for f in failures] == ["embedding_cosine_mean", "embedding_cosine_min",
                                                "top1_agreement", "max_prob_diff"]
    assert "CNN_CODES_VARIANT_MAX_PROB_DIFF" in failures[-1]
    assert not VariantThresholds(0.9, 0.7, 0.9, 0.25).failures(check)


def test_thresholds_come_from_settings(monkeypatch):
    from cnn_codes.settings import Settings

    assert VariantThresholds.from_settings(Settings()) == VariantThresholds()
    monkeypatch.setenv("CNN_CODES_VARIANT_MIN_COSINE", "0.995")
    monkeypatch.setenv("CNN_CODES_VARIANT_MAX_PROB_DIFF", "0.01")
    got = VariantThresholds.from_settings(Settings())
    assert got.min_cosine == 0.995 and got.max_prob_diff == 0.01
    assert got.min_top1_agreement == 0.98


def test_cards_without_variant_check_still_load(published):
    raw = (published["path"] / "model_card.json").read_text()
    card = ModelCard.model_validate_json(raw)
    assert card.precision == "fp32" and card.variant_check is None
    legacy = card.model_dump(mode="json", exclude={"variant_check"})
    assert ModelCard.model_validate(legacy).variant_check is None
