"""Execution provider selection (no GPU needed) and the torch-free serving path."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, base_env
from models.card import ModelCard
from cnn_codes.settings import Settings
from models.runtime import (OnnxEncoder, ProviderUnavailableError, SessionConfig,
                             select_providers, split_outputs)

CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]
GPU_BOX = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cpu_is_always_last():
    assert select_providers(["cpu"], CPU_ONLY) == ["CPUExecutionProvider"]
    assert select_providers(["cpu", "cuda"], GPU_BOX) == ["CUDAExecutionProvider",
                                                          "CPUExecutionProvider"]


def test_gpu_order_is_kept_when_available():
    assert select_providers(["tensorrt", "cuda"], GPU_BOX) == GPU_BOX
    assert select_providers(["cuda", "tensorrt"], GPU_BOX) == [
        "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"]


def test_missing_gpu_provider_is_an_error_by_default():
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider"):
        select_providers(["cuda"], CPU_ONLY)


def test_missing_gpu_provider_with_fallback_warns(caplog):
    assert select_providers(["tensorrt", "cuda"], CPU_ONLY, allow_cpu_fallback=True) == [
        "CPUExecutionProvider"]
    assert "TensorrtExecutionProvider is not available" in caplog.text


def test_unknown_provider_name():
    with pytest.raises(ValueError, match="known"):
        select_providers(["tpu"], GPU_BOX)


def test_session_reports_what_it_got(published):
    card = ModelCard.model_validate_json((published["path"] / "model_card.json").read_text())
    encoder = OnnxEncoder.create(str(published["path"] / "model.onnx"), card,
                                 SessionConfig(providers=("cpu",)))
    assert encoder.provider == "CPUExecutionProvider"
    packed = encoder.run(np.zeros((3, 224, 224, 3), np.uint8))
    parts = split_outputs(packed, card)
    assert {k: v.shape for k, v in parts.items()} == {
        "logits": (3, 2), "embedding": (3, 1024), "features": (3, 576)}
    with pytest.raises(ValueError, match="uint8"):
        encoder.run(np.zeros((1, 224, 224, 3), np.float32))
    with pytest.raises(ProviderUnavailableError):
        import onnxruntime as ort
        if "CUDAExecutionProvider" in ort.get_available_providers():
            pytest.skip("this machine has CUDA: the error path cannot be shown here")
        OnnxEncoder.create(str(published["path"] / "model.onnx"), card,
                           SessionConfig(providers=("cuda",)))


def test_session_settings_and_optimized_model_cache(published, tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_CODES_PROVIDERS", '["cpu"]')
    monkeypatch.setenv("CNN_CODES_INTRA_OP_THREADS", "1")
    monkeypatch.setenv("CNN_CODES_GRAPH_OPTIMIZATION", "extended")
    monkeypatch.setenv("CNN_CODES_OPTIMIZED_MODEL_DIR", str(tmp_path / "cache"))
    config = SessionConfig.from_settings(Settings())
    assert (config.intra_op_threads, config.graph_optimization) == (1, "extended")
    card = ModelCard.model_validate_json((published["path"] / "model_card.json").read_text())
    onnx_path = str(published["path"] / "model.onnx")
    first = OnnxEncoder.create(onnx_path, card, config)
    cached = list((tmp_path / "cache").glob("*.onnx"))
    assert len(cached) == 1 and card.onnx_sha256[:16] in cached[0].name
    assert "extended" in cached[0].name and "cpu" in cached[0].name
    second = OnnxEncoder.create(onnx_path, card, config)  # loads the cached graph
    assert second.session.get_session_options().graph_optimization_level.name == \
        "ORT_DISABLE_ALL"
    batch = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    np.testing.assert_allclose(first.run(batch), second.run(batch), rtol=1e-5, atol=1e-6)


def test_serving_imports_no_torch():
    code = ("import sys, service.service, models.runtime, models.decode, models.repository; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=base_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
