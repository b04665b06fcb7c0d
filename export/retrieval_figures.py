"""Retrieval quality recorded in the model card at export: the exported model's codes of the
val photos (queries) against the train photos (gallery) of the ImageFolder it was trained on,
by cosine (:func:`search.retrieval.evaluate`: kNN accuracy at k = 1, 5, mean average precision,
and what a constant guess and a random ranking score).

The codes go through the one decode (:mod:`models.decode`) and the one session factory
(:func:`models.runtime.open_session`), exactly as ``cnn-codes embed`` computes them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from export.variant_check import load_images, sample_paths
from models.card import INPUT_NAME
from models.preprocessing import PreprocessSpec
from models.runtime import open_session

logger = logging.getLogger(__name__)


def _codes(session, files: list[Path], spec: PreprocessSpec,
           batch_size: int) -> tuple[np.ndarray, list[str]]:
    """``(N, D)`` float32 embeddings of the files that decode, and their class (parent folder)."""
    images, used = load_images(files, spec)
    chunks = [session.run(["embedding"], {INPUT_NAME: images[i:i + batch_size]})[0]
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks).astype(np.float32), [p.parent.name for p in used]


def retrieval_figures(onnx_path: Path, spec: PreprocessSpec, data_root: Path, *, name: str,
                      limit: int | None = 512, batch_size: int = 32) -> dict | None:
    """The retrieval figures of ``onnx_path`` on ``data_root/{train,val}/<class>/``.

    Args:
        onnx_path: the exported model (outputs ``embedding``).
        spec: its preprocessing.
        data_root: an ImageFolder root with ``train`` (gallery) and ``val`` (queries).
        name: the model reference recorded with the figures.
        limit: at most this many photos per split (a seeded sample); None = all.

    Returns:
        :class:`search.retrieval.RetrievalReport` as a dict, or None when a split is missing
        or has fewer than two classes (nothing meaningful to report).
    """
    from export.onnx_export import collect_images
    from search.retrieval import evaluate

    train, val = data_root / "train", data_root / "val"
    if not (train.is_dir() and val.is_dir()):
        logger.info("no %s and %s: no retrieval figures in the card", train, val)
        return None
    gallery_files = sample_paths(collect_images(train), limit)
    query_files = sample_paths(collect_images(val), limit)
    if not gallery_files or not query_files:
        return None
    session = open_session(onnx_path)
    gallery, g_labels = _codes(session, gallery_files, spec, batch_size)
    queries, q_labels = _codes(session, query_files, spec, batch_size)
    if len(set(g_labels)) < 2:
        return None
    report = evaluate(gallery, g_labels, queries, q_labels, model=name, layer="embedding")
    logger.info("retrieval: %s", report.model_dump_json())
    return report.model_dump(mode="json") | {"source": str(data_root)}
