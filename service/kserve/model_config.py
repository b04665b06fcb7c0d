"""Model metadata (Open Inference Protocol) and model configuration (Triton's extension), built
from the model card alone: nothing about the model is hard-coded.

References: ``inference_rest.md`` (model metadata) of
https://github.com/kserve/open-inference-protocol; Triton's
``extension_model_configuration.md`` and ``model_config.proto``.
"""

from __future__ import annotations

import json
from typing import Any

from cnn_codes.settings import Settings
from models.card import INPUT_NAME, OUTPUT_NAMES, ModelCard

PLATFORM = "onnxruntime_onnx"  # Triton's platform name for ONNX Runtime models
BACKEND = "onnxruntime"
_CARD_TO_OIP_DTYPE = {"uint8": "UINT8", "float32": "FP32", "float16": "FP16"}


def model_metadata(card: ModelCard) -> dict[str, Any]:
    """OIP model metadata from the card: ``name``, ``versions``, ``platform``,
    ``inputs``/``outputs`` as ``{"name", "datatype", "shape"}`` (-1 = any batch size).
    Outputs are always FP32: the Encoder returns float32 whatever the ONNX precision."""
    spec = card.inputs[0] if card.inputs else None
    size = card.preprocessing.crop_size
    inputs = [{"name": spec.name if spec else INPUT_NAME,
               "datatype": _CARD_TO_OIP_DTYPE.get(spec.dtype, "UINT8") if spec else "UINT8",
               "shape": [-1, size, size, 3]}]
    outputs = [{"name": out, "datatype": "FP32", "shape": [-1, card.dim(out)]}
               for out in OUTPUT_NAMES]
    return {"name": card.name, "versions": [str(card.version)], "platform": PLATFORM,
            "inputs": inputs, "outputs": outputs}

def model_config(card: ModelCard, settings: Settings) -> dict[str, Any]:
    """Triton model configuration (JSON form of ``inference.ModelConfig``) from the card.

    ``max_batch_size`` is the largest N one request may carry
    (``max_images_per_request``); dims exclude the batch dimension, as Triton's do when
    ``max_batch_size > 0``. Parameters carry what Triton's schema has no field for
    (preprocessing, class names, the BYTES form of the input), as strings.
    """
    prep = card.preprocessing
    size = prep.crop_size
    gpu = settings.providers and settings.providers[0] != "cpu"
    parameters = {
        "backbone": card.backbone,
        "precision": card.precision,
        "class_names": json.dumps(card.class_names),
        "preprocessing": prep.model_dump_json(),
        "onnx_sha256": card.onnx_sha256,
        "input_forms": (f"{INPUT_NAME}: UINT8 [N,{size},{size},3] RGB pixels, or BYTES [N] "
                        "encoded image files (JPEG, PNG, ...) resized by the server"),
        "adaptive_batching": (f"BentoML, max_batch_size={settings.max_batch_size}, "
                              f"max_latency_ms={settings.max_latency_ms}"),
    }
    return {
        "name": card.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "max_batch_size": settings.max_images_per_request,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_UINT8",
                   "format": "FORMAT_NHWC", "dims": [size, size, 3]}],
        "output": [{"name": out, "data_type": "TYPE_FP32", "dims": [card.dim(out)]}
                   for out in OUTPUT_NAMES],
        "dynamic_batching": {"preferred_batch_size": [settings.max_batch_size]},
        "instance_group": [{"name": card.name, "count": 1,
                            "kind": "KIND_GPU" if gpu else "KIND_CPU"}],
        "parameters": {k: {"string_value": v} for k, v in parameters.items()},
    }
