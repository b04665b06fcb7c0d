"""Pictures of CNN codes: a 2-D t-SNE map of a batch job's codes, and nearest-neighbour grids.

* :func:`code_map` (``cnn-codes viz codes``): the codes of ``cnn-codes embed`` output folders
  (read with :mod:`search.sources`) embedded in 2-D by t-SNE (van der Maaten & Hinton, 2008,
  "Visualizing Data using t-SNE", JMLR 9; scikit-learn's :class:`sklearn.manifold.TSNE`),
  one colour per label (the parent folder of each image), optionally with the images as
  thumbnails at their points: the classic picture of a CNN-code space (CS231n, "Visualizing
  what ConvNets learn").
* :func:`neighbour_grid` (``cnn-codes viz neighbours``): query images with their k nearest
  indexed images and cosine scores, one row per query, through the one query path of
  :mod:`search.query`.

Every image shown is decoded by :mod:`models.decode` with the model card's preprocessing
(resize + centre crop), so a panel shows what the model saw. Torch-free.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnnotationBbox, OffsetImage

from diagnostics.figures import Drawn, save_drawn
from models.decode import DecodeLimits, decode_file
from models.errors import ImageError
from models.preprocessing import PreprocessSpec
from models.runtime import SessionConfig

logger = logging.getLogger(__name__)

MIN_TSNE_POINTS = 5
"""Fewest codes :func:`tsne_2d` accepts (t-SNE's perplexity must stay below the count)."""


@dataclass(frozen=True)
class Codes:
    """Codes read from ``cnn-codes embed`` output folders.

    Attributes:
        paths: image path of each row.
        vectors: ``(N, D)`` float32, unit length (L2-normalised by :mod:`search.sources`).
        labels: the parent folder name of each path (the ImageFolder class).
        model_name, model_version: the model version that made them.
        layer: ``embedding`` or ``features``.
        total: usable rows in the folders (``N`` is at most this; see ``max_points``).
    """

    paths: list[str]
    vectors: np.ndarray
    labels: list[str]
    model_name: str
    model_version: int
    layer: str
    total: int

    @property
    def model(self) -> str:
        """``NAME:VERSION``."""
        return f"{self.model_name}:{self.model_version}"


def label_of(path: str) -> str:
    """The label of an image path: its parent folder's name (``.../val/ants/x.jpg`` -> ants)."""
    return Path(path).parent.name or "?"


def read_codes(emb_dirs: Sequence[str | Path], *, max_points: int | None = None,
               seed: int = 0) -> Codes:
    """The usable codes of ``cnn-codes embed`` output folders (error rows left out).

    Args:
        emb_dirs: finished embed output folders of one model version and layer.
        max_points: keep a seeded random sample of at most this many rows (None = all).
        seed: the sample's seed.

    Returns:
        :class:`Codes`, rows in folder order (the sample keeps that order).

    Raises:
        search.sources.SourceError: not an embed output, unfinished, mixed model versions or
            layers, or no vector at all.
    """
    from search.sources import iter_chunks, open_counted

    sources, _, total = open_counted(emb_dirs, "to map")
    paths: list[str] = []
    chunks: list[np.ndarray] = []
    for chunk in iter_chunks(sources):
        paths.extend(chunk.paths)
        chunks.append(chunk.vectors)
    vectors = np.concatenate(chunks).astype(np.float32, copy=False)
    if max_points is not None and len(paths) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(paths), max_points,
                                                          replace=False))
        logger.info("mapping a random sample of %d of %d codes", max_points, len(paths))
        paths, vectors = [paths[i] for i in keep], vectors[keep]
    spec = sources[0].spec
    return Codes(paths=paths, vectors=vectors, labels=[label_of(p) for p in paths],
                 model_name=spec.model_name, model_version=spec.model_version,
                 layer=spec.layer, total=total)


def tsne_2d(vectors: np.ndarray, *, perplexity: float | None = None,
            seed: int = 0) -> tuple[np.ndarray, float]:
    """2-D t-SNE of CNN codes (scikit-learn's :class:`~sklearn.manifold.TSNE`, cosine
    distance, PCA initialisation, automatic learning rate).

    Args:
        vectors: ``(N, D)`` float32 codes, N >= :data:`MIN_TSNE_POINTS`.
        perplexity: effective neighbour count; None = ``min(30, (N - 1) / 3)``. Must be
            below N.
        seed: ``random_state`` (the same codes and seed give the same map).

    Returns:
        ``((N, 2) float32 map coordinates, the perplexity used)``; the units are arbitrary.

    Raises:
        ValueError: fewer than :data:`MIN_TSNE_POINTS` codes, or perplexity >= N.
    """
    from sklearn.manifold import TSNE

    vectors = np.asarray(vectors, dtype=np.float32)
    n = len(vectors)
    if vectors.ndim != 2 or n < MIN_TSNE_POINTS:
        raise ValueError(f"t-SNE needs at least {MIN_TSNE_POINTS} codes, got {n}")
    perplexity = float(perplexity if perplexity is not None else min(30.0, (n - 1) / 3))
    if not 0 < perplexity < n:
        raise ValueError(f"perplexity must be in (0, {n}) for {n} codes, got {perplexity}")
    tsne = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
                learning_rate="auto", random_state=seed)
    return tsne.fit_transform(vectors).astype(np.float32), perplexity


def _thumbnail(path: str, spec: PreprocessSpec, limits: DecodeLimits) -> np.ndarray | None:
    """The model's view of ``path`` at the thumbnail size, or None (logged) if it fails now."""
    try:
        return decode_file(path, spec, limits)
    except ImageError as exc:
        logger.warning("no thumbnail for %s: %s", path, exc)
        return None


def code_map(emb_dirs: Sequence[str | Path], out: Path, *, repository: str | Path,
             thumbnails: bool = False, thumbnail_px: int = 40, max_points: int = 2000,
             perplexity: float | None = None, seed: int = 0,
             limits: DecodeLimits | None = None) -> Drawn:
    """A t-SNE map of the codes of embed output folders as a PNG (one panel).

    Args:
        emb_dirs: finished ``cnn-codes embed`` output folders of one model version and layer.
        out: PNG path.
        repository: model repository holding the version that made the codes; read only
            with ``thumbnails`` (its card's preprocessing crops the thumbnails).
        thumbnails: draw each image, ``thumbnail_px`` pixels square, at its point (framed in
            its label's colour).
        thumbnail_px: thumbnail side, pixels.
        max_points: map at most this many codes (a seeded random sample).
        perplexity: t-SNE perplexity (default ``min(30, (N - 1) / 3)``).
        seed: sample and t-SNE seed.
        limits: decode limits for the thumbnails.

    Returns:
        The PNG with its layout; ``details`` has ``points``, ``total``, ``labels`` (count per
        label), ``perplexity``, ``thumbnails`` (drawn), ``model``, ``layer``.

    Raises:
        search.sources.SourceError: see :func:`read_codes`.
        ValueError: too few codes for t-SNE.
        models.repository.ModelNotFoundError, models.repository.ModelIntegrityError: with
            ``thumbnails``, the model version is not (validly) in ``repository``.
    """
    codes = read_codes(emb_dirs, max_points=max_points, seed=seed)
    spec = None
    if thumbnails:
        from models.repository import resolve

        card = resolve(repository, codes.model_name, codes.model_version).card
        spec = card.preprocessing.with_crop_size(thumbnail_px)
    points, used_perplexity = tsne_2d(codes.vectors, perplexity=perplexity, seed=seed)
    counts = Counter(codes.labels)
    names = sorted(counts)
    colours = {name: colormaps["tab10"](i % 10) for i, name in enumerate(names)}

    fig = Figure(figsize=(9, 8), layout="constrained")
    ax = fig.subplots()
    labels = np.array(codes.labels)
    for name in names:
        mask = labels == name
        ax.scatter(points[mask, 0], points[mask, 1], s=14, color=colours[name],
                   label=f"{name} ({counts[name]})", zorder=2)
    drawn_thumbs = 0
    if spec is not None:
        limits = limits or DecodeLimits.default()
        for (x, y), path, name in zip(points, codes.paths, codes.labels):
            pixels = _thumbnail(path, spec, limits)
            if pixels is None:
                continue
            box = AnnotationBbox(OffsetImage(pixels, zoom=1.0), (x, y), frameon=True, pad=0.1,
                                 bboxprops={"edgecolor": colours[name], "linewidth": 1.5})
            box.set_zorder(3)
            ax.add_artist(box)
            drawn_thumbs += 1
    ax.legend(title="label (parent folder)", fontsize=8, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    shown = f"{len(codes.paths)} of {codes.total}" if len(codes.paths) < codes.total \
        else f"{len(codes.paths)}"
    ax.set_title(f"t-SNE of {shown} {codes.layer} codes (D={codes.vectors.shape[1]}) of "
                 f"{codes.model}, cosine, perplexity {used_perplexity:.3g}", fontsize=10)
    return save_drawn(fig, out, rows=1, columns=1, figure="codes", points=len(codes.paths),
                      total=codes.total, labels=dict(sorted(counts.items())),
                      perplexity=used_perplexity, thumbnails=drawn_thumbs, model=codes.model,
                      layer=codes.layer)


def _short(text: str, width: int = 24) -> str:
    """``text`` cut to ``width`` characters with an ellipsis."""
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def _show(ax, pixels: np.ndarray | None, title: str, *, edge: str | None = None,
          message: str | None = None) -> None:
    """One grid cell: an image (or a message), a small title, a coloured frame."""
    if pixels is not None:
        ax.imshow(pixels)
    else:
        ax.text(0.5, 0.5, message or "?", ha="center", va="center", wrap=True, fontsize=7,
                transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)
    if edge is not None:
        for spine in ax.spines.values():
            spine.set_edgecolor(edge)
            spine.set_linewidth(3)


def neighbour_grid(index_dir: str | Path, images: Sequence[str | Path], out: Path, *,
                   repository: str | Path, k: int = 5, limits: DecodeLimits | None = None,
                   session_config: SessionConfig = SessionConfig()) -> Drawn:
    """Each query image with its ``k`` nearest indexed images, one row per query (PNG).

    The queries are embedded and searched by :class:`search.query.IndexWithModel` (the path
    of ``cnn-codes index query``). A neighbour's frame is green when its label (parent folder)
    is the query's, red otherwise; its title gives rank, cosine score and label. A query that
    cannot be used keeps its row with the error in its first cell.

    Args:
        index_dir: a ``cnn-codes index build`` folder.
        images: query image files.
        out: PNG path.
        repository: model repository holding the index's model version.
        k: neighbours per query (at most the index's count).
        limits: decode limits (queries and neighbour thumbnails).
        session_config: onnxruntime providers and threads.

    Returns:
        The PNG with its layout (``rows`` = queries, ``columns`` = 1 + k); ``details`` has
        ``model``, ``index``, ``k`` and ``results`` (per query: image, error, neighbours with
        rank/path/score).

    Raises:
        FileNotFoundError: not an index folder.
        search.index.IndexDamagedError, models.repository.ModelNotFoundError,
        models.repository.ModelIntegrityError: see :meth:`search.query.IndexWithModel.open`.
        ValueError: no images, or ``k`` < 1.
    """
    from search.query import IndexWithModel

    if not images:
        raise ValueError("no query images")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    limits = limits or DecodeLimits.default()
    opened = IndexWithModel.open(index_dir, repository)
    results = opened.query([str(p) for p in images], k, limits=limits,
                           session_config=session_config)
    spec = opened.model.card.preprocessing
    k = min(k, opened.index.manifest.count)
    rows, columns = len(results), 1 + k
    fig = Figure(figsize=(1.7 * columns + 0.3, 1.95 * rows + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, columns, squeeze=False))
    for r, result in enumerate(results):
        query_label = label_of(result.image)
        if result.error is not None:
            _show(axes[r, 0], None, f"query: {Path(result.image).name}",
                  message=f"{result.error[0]}:\n{result.error[1][:80]}")
        else:
            _show(axes[r, 0], _thumbnail(result.image, spec, limits),
                  f"query ({query_label})\n{_short(Path(result.image).name)}", edge="black")
        neighbours = result.neighbors or []
        for c in range(1, columns):
            if c > len(neighbours):
                axes[r, c].remove()
                continue
            n = neighbours[c - 1]
            label = label_of(n.path)
            pixels = _thumbnail(n.path, spec, limits)
            _show(axes[r, c], pixels, f"#{n.rank} cos {n.score:.3f}\n{label}",
                  edge="tab:green" if label == query_label else "tab:red",
                  message="no longer readable")
    manifest = opened.index.manifest
    fig.suptitle(f"{k} nearest of {manifest.count} indexed images ({manifest.kind}, "
                 f"{manifest.layer} codes of {manifest.model_ref}); frame green = same folder "
                 f"as the query", fontsize=9)
    return save_drawn(fig, out, rows=rows, columns=columns, figure="neighbours",
                      model=manifest.model_ref, index=str(index_dir), k=k,
                      results=[r.as_dict() for r in results])
