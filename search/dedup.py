"""``cnn-codes dedup``: group near-duplicate images by their CNN codes.

Every vector's ``k`` nearest other vectors are found with a FAISS index (exact by default); a
pair whose cosine is at least ``threshold`` is an edge, and the connected components of those
edges are the groups (so a chain a~b~c is one group even when a and c are further apart). One
output row per image: ``path``, ``group_id`` (dense, 0..G-1, in row order of first
appearance), ``group_size``, ``nearest_path`` / ``nearest_score`` (its nearest other image,
whatever the threshold: how close the call was).

Also the evaluation used by the tests and ``bench/search.py``: constructed duplicates of real
photos (:func:`make_variants`) and precision / recall of the pairs found (:func:`pair_metrics`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from search.build import _progress, check_trainable, default_params, new_index
from search.manifest import Kind
from search.sources import gather_rows, iter_chunks, open_counted

logger = logging.getLogger(__name__)

#: Default cosine threshold of ``cnn-codes dedup``, chosen by measurement on constructed
#: duplicates of the sample photos (``python -m bench.search dedup``, README "Search"): with the
#: default model (random init) the codes of different photos reach cosine 0.99+, so only a
#: threshold this high merges no two photos. Codes of another model may need another.
DEFAULT_THRESHOLD = 0.998

#: The constructed near-duplicates of a photo (see :func:`make_variants`).
VARIANTS = ("jpeg_q10", "half", "crop5", "png")


class DedupReport(BaseModel):
    """Summary of a ``cnn-codes dedup`` run (printed as JSON).

    Attributes:
        out: the groups file.
        model: ``name:version`` of the codes; layer: their layer.
        threshold, k, kind: the settings.
        images: rows with a vector (error rows are not grouped); skipped: error rows.
        groups: groups (singletons included); duplicate_groups: groups of two or more;
        images_in_duplicate_groups: images in those; pairs: image pairs within a group.
        seconds: wall time.
    """

    out: str
    model: str
    layer: str
    threshold: float
    k: int
    kind: str
    images: int
    skipped: int
    groups: int
    duplicate_groups: int
    images_in_duplicate_groups: int
    pairs: int
    seconds: float


@dataclass
class Groups:
    """The outcome of :func:`find_groups`, row-aligned arrays of length N."""

    paths: list[str]
    group_id: np.ndarray
    group_size: np.ndarray
    nearest: np.ndarray        # row of the nearest other image, -1 when none
    nearest_score: np.ndarray  # its cosine (NaN when none)


def _components(count: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Dense component labels (0.., in order of first row) of the graph with ``count`` nodes."""
    parent = np.arange(count)

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in zip(src.tolist(), dst.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(count)], dtype=np.int64)
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # label groups by their first row
    return order[inverse].astype(np.int64)


def find_groups(folders: Sequence[str | Path], threshold: float = DEFAULT_THRESHOLD, *,
                k: int = 10, kind: Kind = "exact", chunk_rows: int = 16384,
                max_train_rows: int = 65536, progress: bool = False) -> tuple[Groups, int, object]:
    """Near-duplicate groups of the vectors of ``folders``.

    Returns:
        ``(groups, skipped error rows, job spec)``.

    Raises:
        SourceError: see :func:`search.sources.open_sources`; or no vectors.
    """
    sources, counts, total = open_counted(folders, "to group")
    spec = sources[0].spec
    params = default_params(kind, total, spec.dim)
    check_trainable(kind, total, params)
    index = new_index(kind, spec.dim, params)
    if kind == "ivfpq":
        rng = np.random.default_rng(0)
        ids = np.sort(rng.choice(total, size=min(max_train_rows, total), replace=False))
        index.train(gather_rows(sources, ids, chunk_rows=chunk_rows))
    from search.index import apply_search_params

    paths: list[str] = []
    bar = _progress(total, "dedup: add", progress)
    for chunk in iter_chunks(sources, chunk_rows=chunk_rows):
        index.add(chunk.vectors)
        paths.extend(chunk.paths)
        bar.update(len(chunk.vectors))
    bar.close()
    apply_search_params(index, kind, params)
    nearest = np.full(total, -1, np.int64)
    nearest_score = np.full(total, np.nan, np.float32)
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    bar = _progress(total, "dedup: search", progress)
    for chunk in iter_chunks(sources, chunk_rows=chunk_rows, with_paths=False):
        scores, found = index.search(chunk.vectors, min(k + 1, total))
        rows = np.arange(chunk.start, chunk.start + len(chunk.vectors))
        other = (found >= 0) & (found != rows[:, None])
        has, first = other.any(1), other.argmax(1)  # results are sorted: first = nearest
        pick = np.arange(len(rows))[has]
        nearest[rows[has]] = found[pick, first[has]]
        nearest_score[rows[has]] = scores[pick, first[has]]
        edge = other & (scores >= threshold)
        src.append(np.broadcast_to(rows[:, None], found.shape)[edge])
        dst.append(found[edge])
        bar.update(len(chunk.vectors))
    bar.close()
    group_id = _components(total, np.concatenate(src), np.concatenate(dst))
    sizes = np.bincount(group_id)
    groups = Groups(paths=paths, group_id=group_id, group_size=sizes[group_id],
                    nearest=nearest, nearest_score=np.clip(nearest_score, -1.0, 1.0))
    return groups, sum(c[1] for c in counts), spec


def write_groups(groups: Groups, out: str | Path) -> None:
    """``groups`` as Parquet at ``out``, atomically (whole file or none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch.folder import atomic_file

    has = groups.nearest >= 0
    table = pa.table({
        "path": pa.array(groups.paths, pa.string()),
        "group_id": pa.array(groups.group_id, pa.int64()),
        "group_size": pa.array(groups.group_size, pa.int32()),
        "nearest_path": pa.array([groups.paths[n] if ok else None
                                  for n, ok in zip(groups.nearest.tolist(), has.tolist())],
                                 pa.string()),
        "nearest_score": pa.array(groups.nearest_score, pa.float32(), mask=~has),
    })
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as handle:
        pq.write_table(table, handle, compression="zstd")


def dedup(folders: Sequence[str | Path], out: str | Path,
          threshold: float = DEFAULT_THRESHOLD, *, k: int = 10, kind: Kind = "exact",
          progress: bool = False) -> DedupReport:
    """:func:`find_groups` then :func:`write_groups`; the run's report."""
    started = time.perf_counter()
    groups, skipped, spec = find_groups(folders, threshold, k=k, kind=kind, progress=progress)
    write_groups(groups, out)
    sizes = np.bincount(groups.group_id)
    dup = sizes[sizes > 1]
    return DedupReport(out=str(out), model=f"{spec.model_name}:{spec.model_version}",
                       layer=spec.layer, threshold=threshold, k=k, kind=kind,
                       images=len(groups.paths), skipped=skipped, groups=len(sizes),
                       duplicate_groups=len(dup), images_in_duplicate_groups=int(dup.sum()),
                       pairs=int((dup * (dup - 1) // 2).sum()),
                       seconds=round(time.perf_counter() - started, 3))


# --- evaluation on constructed duplicates ----------------------------------------------------

def make_variants(photo: str | Path, out_dir: str | Path) -> list[Path]:
    """Near-duplicates of ``photo`` in ``out_dir``, one per :data:`VARIANTS`: re-encoded as
    JPEG at quality 10, resized to half its size, 5 % cropped off its top and left, and a
    lossless PNG copy. The photo is decoded by :func:`models.decode.load_rgb`, the one decode.
    """
    from PIL import Image

    from models.decode import load_rgb

    photo, out_dir = Path(photo), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = load_rgb(photo.read_bytes())
    width, height = image.size
    stem = photo.stem
    made = {
        "jpeg_q10": (image, f"{stem}.jpeg_q10.jpg", {"quality": 10}),
        "half": (image.resize((max(1, width // 2), max(1, height // 2)),
                              Image.Resampling.LANCZOS), f"{stem}.half.jpg", {"quality": 90}),
        "crop5": (image.crop((round(width * 0.05), round(height * 0.05), width, height)),
                  f"{stem}.crop5.jpg", {"quality": 90}),
        "png": (image, f"{stem}.png", {}),
    }
    paths = []
    for name in VARIANTS:
        variant, filename, options = made[name]
        target = out_dir / filename
        variant.save(target, **options)
        paths.append(target)
    return paths


def pair_metrics(predicted: Sequence[int], truth: Sequence[str]) -> dict[str, float | int]:
    """Precision and recall of the pairs of images put in one group.

    Args:
        predicted: group id per image.
        truth: the photo each image is (a variant's original), per image.

    Returns:
        ``true_pairs`` (pairs of images of one photo), ``found_pairs`` (pairs in one predicted
        group), ``correct_pairs`` (both), ``precision``, ``recall``, ``merged_groups``
        (predicted groups holding images of two or more photos) and ``merged_photos`` (photos
        in such groups).
    """
    def pairs(counter: Counter) -> int:
        return sum(c * (c - 1) // 2 for c in counter.values())

    true_pairs = pairs(Counter(truth))
    found_pairs = pairs(Counter(predicted))
    correct = pairs(Counter(zip(predicted, truth)))
    photos_by_group: dict[int, set[str]] = {}
    for group, photo in zip(predicted, truth):
        photos_by_group.setdefault(group, set()).add(photo)
    merged = [g for g in photos_by_group.values() if len(g) > 1]
    return {"true_pairs": true_pairs, "found_pairs": found_pairs, "correct_pairs": correct,
            "precision": round(correct / found_pairs, 4) if found_pairs else 1.0,
            "recall": round(correct / true_pairs, 4) if true_pairs else 1.0,
            "merged_groups": len(merged), "merged_photos": sum(len(g) for g in merged)}
