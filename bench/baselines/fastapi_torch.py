"""Baseline: the service most people write. FastAPI + uvicorn, torch eager, one request at a time.

Same weights (the run's checkpoint, rebuilt with ``export.onnx_export.model_from_checkpoint``),
same decode path and limits (``models.decode.decode_batch``), same normalisation as the ONNX
graph (``training.data.normalize_uint8``), same post-processing (``models.postprocess``: L2,
softmax, top-k), same response shapes as ``/embed`` and ``/classify`` of the real service.
Only the model call is the baseline's own: torch eager instead of onnxruntime. No batching
across requests: each request runs its own forward pass in FastAPI's thread pool (a plain
``def`` endpoint, as the FastAPI docs suggest for blocking code).

Run (the harness does this)::

    BENCH_RUN_DIR=bench/.cache/model/mobilenet_v3_large/run \\
        uvicorn bench.baselines.fastapi_torch:app --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI, File, Form, UploadFile

from export.onnx_export import load_run_checkpoint, model_from_checkpoint
from models.decode import DecodeLimits, decode_batch
from models.postprocess import prepare_vectors, softmax, top_k as top_k_indices
from training.data import normalize_uint8

logger = logging.getLogger("bench.fastapi_torch")

_state = load_run_checkpoint(Path(os.environ["BENCH_RUN_DIR"]), "best")
MODEL, SPEC = model_from_checkpoint(_state)
CLASS_NAMES: list[str] = list(_state["class_names"])
del _state
LIMITS = DecodeLimits.default()
app = FastAPI(title="fastapi + torch eager baseline")


def _forward(files: list[UploadFile]) -> tuple[list[int], dict[int, dict], object | None]:
    """Decode each upload (the service's decode), run the decodable ones in one eager pass."""
    decoded = decode_batch([upload.file.read() for upload in files], SPEC, LIMITS)
    errors = {i: {"code": e.code, "message": e.message} for i, e in decoded.errors.items()}
    if not decoded.positions:
        return decoded.positions, errors, None
    with torch.inference_mode():
        out = MODEL(normalize_uint8(torch.from_numpy(decoded.arrays), SPEC))
    return decoded.positions, errors, out


@app.get("/readyz")
def readyz() -> dict:
    """Ready once the module (and so the model) is loaded."""
    return {"ready": True}


@app.post("/embed")
def embed(images: Annotated[list[UploadFile], File()],
          layer: Annotated[str, Form()] = "embedding",
          normalize: Annotated[bool, Form()] = True) -> dict:
    """CNN codes per image, shaped like the real service's ``/embed`` answer."""
    positions, errors, out = _forward(images)
    vectors: dict[int, list[float]] = {}
    if out is not None:
        matrix = prepare_vectors(getattr(out, layer).numpy(), normalize=normalize)
        for row, position in enumerate(positions):
            vectors[position] = matrix[row].tolist()
    results = [{"index": i, "filename": f.filename, "embedding": vectors.get(i),
                "error": errors.get(i)} for i, f in enumerate(images)]
    dim = len(next(iter(vectors.values()))) if vectors else None
    return {"layer": layer, "dim": dim, "dtype": "float32", "normalized": normalize,
            "results": results}


@app.post("/classify")
def classify(images: Annotated[list[UploadFile], File()],
             top_k: Annotated[int, Form()] = 5) -> dict:
    """Top-k softmax classes per image, shaped like the real service's ``/classify``."""
    positions, errors, out = _forward(images)
    k = min(top_k, len(CLASS_NAMES))
    rows: dict[int, list[dict]] = {}
    if out is not None:
        probs = softmax(out.logits.numpy())
        classes = top_k_indices(probs, k)
        for row, position in enumerate(positions):
            rows[position] = [{"label": CLASS_NAMES[c], "index": c,
                               "probability": float(probs[row, c])}
                              for c in classes[row].tolist()]
    results = [{"index": i, "filename": f.filename, "predictions": rows.get(i),
                "error": errors.get(i)} for i, f in enumerate(images)]
    return {"top_k": k, "results": results}
