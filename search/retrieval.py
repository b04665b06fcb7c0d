"""Retrieval quality of a model's codes (``cnn-codes eval retrieval``): val queries against the
train gallery of an ImageFolder, by cosine.

* kNN accuracy at k: a query's class is the majority class of its k nearest gallery codes
  (ties: the class of the nearest among the tied ones);
* mean average precision: each query ranks the whole gallery, relevant = same class;
* beside them what needs no model: a constant guess (always the gallery's majority class) and
  the expected AP of a random ranking, ``(H_N + (R - 1) / (N - 1) * (N - H_N)) / N`` for R
  relevant among N (H_N the N-th harmonic number).

Torch-free: numpy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from models.postprocess import l2_normalize


class RetrievalReport(BaseModel):
    """Retrieval figures of one model version's codes on one ImageFolder split pair.

    Attributes:
        model: ``name:version``; layer: the codes' layer.
        gallery, queries: codes in each (error rows excluded); classes: the class names.
        knn_accuracy: k (as text) -> accuracy; map: mean average precision.
        chance_knn_accuracy: accuracy of always answering the gallery's majority class.
        best_constant_accuracy: accuracy of the best constant answer (the queries' own
            majority class: an upper bound no model-free guess can know in advance).
        chance_map: expected mAP of a random ranking.
    """

    model: str
    layer: str
    gallery: int
    queries: int
    classes: list[str]
    knn_accuracy: dict[str, float]
    map: float
    chance_knn_accuracy: float
    best_constant_accuracy: float
    chance_map: float


def knn_accuracy(scores: np.ndarray, gallery_labels: np.ndarray, query_labels: np.ndarray,
                 k: int) -> float:
    """Share of queries whose k nearest gallery items (rows of ``scores``: query x gallery
    cosines) vote for their own class."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    right = 0
    for row, truth in zip(gallery_labels[order], query_labels):
        counts = Counter(row.tolist())
        best = max(counts.values())
        winner = next(label for label in row.tolist() if counts[label] == best)  # nearest tie
        right += winner == truth
    return right / len(query_labels)


def mean_average_precision(scores: np.ndarray, gallery_labels: np.ndarray,
                           query_labels: np.ndarray) -> float:
    """mAP of every query ranking the whole gallery (relevant = same class; queries without a
    relevant item are left out)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    relevant = gallery_labels[order] == query_labels[:, None]
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, scores.shape[1] + 1)
    counts = relevant.sum(axis=1)
    ap = (relevant * hits / ranks).sum(axis=1) / np.maximum(counts, 1)
    return float(ap[counts > 0].mean())


def chance_map(gallery_labels: np.ndarray, query_labels: np.ndarray) -> float:
    """Expected mAP of random rankings of the gallery for these queries."""
    n = len(gallery_labels)
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    per_class = Counter(gallery_labels.tolist())
    values = [(harmonic + (per_class[q] - 1) / max(n - 1, 1) * (n - harmonic)) / n
              for q in query_labels.tolist() if per_class[q] > 0]
    return float(np.mean(values))


def evaluate(gallery: np.ndarray, gallery_labels: Sequence[str], queries: np.ndarray,
             query_labels: Sequence[str], *, model: str, layer: str,
             ks: Sequence[int] = (1, 5)) -> RetrievalReport:
    """The :class:`RetrievalReport` of ``queries`` against ``gallery`` (codes of one model
    version; normalised here)."""
    g_labels, q_labels = np.asarray(gallery_labels), np.asarray(query_labels)
    scores = l2_normalize(queries) @ l2_normalize(gallery).T
    majority = Counter(g_labels.tolist()).most_common(1)[0][0]
    return RetrievalReport(
        model=model, layer=layer, gallery=len(g_labels), queries=len(q_labels),
        classes=sorted(set(g_labels.tolist()) | set(q_labels.tolist())),
        knn_accuracy={str(k): round(knn_accuracy(scores, g_labels, q_labels, k), 4)
                      for k in ks},
        map=round(mean_average_precision(scores, g_labels, q_labels), 4),
        chance_knn_accuracy=round(float(np.mean(q_labels == majority)), 4),
        best_constant_accuracy=round(Counter(q_labels.tolist()).most_common(1)[0][1]
                                     / len(q_labels), 4),
        chance_map=round(chance_map(g_labels, q_labels), 4))
