"""Search benchmarks (not tests): FAISS index kinds vs numpy brute force, and the near-duplicate
threshold on constructed duplicates of the sample photos.

Run: ``make bench-search`` (= ``python -m bench.search ann`` then ``dedup``), or one part:

``python -m bench.search ann [--sizes 10000,100000,1000000] [--queries 1000]``
    For each N: N vectors of D = 1280 with cluster structure (the real CNN codes of the sample
    photos, embedded by the model named, each the centre of a cluster: centre + Gaussian noise
    of a log-uniform scale, L2-normalised; held-out queries drawn the same way), then for
    ``exact`` / ``ivfpq`` / ``hnsw`` built with the parameters ``cnn-codes index build`` gives them
    (:func:`search.build.default_params`), side by side with a plain numpy brute force
    (``X @ q``, ``argpartition``) on the same queries: build seconds, single-query latency
    p50 / p99 (one thread, one query at a time), batched queries/s (all threads), bytes per
    vector (serialised index / N) and recall@10 against exact search.

``python -m bench.search dedup [--photos 40]``
    The first ``photos`` val photos (half ants, half bees) each get the four constructed
    near-duplicates of :func:`search.dedup.make_variants` (JPEG quality 10, half size, 5 %
    crop, PNG copy); the variants and all val photos are embedded (the batch job) and grouped
    by :func:`search.dedup.find_groups` at a sweep of thresholds: precision / recall of pairs,
    photos merged, recall per variant kind.

Writes ``bench/results/search.json`` (``--out``) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.machine import load_average, machine_info

logger = logging.getLogger("bench.search")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "hymenoptera"
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "search.json"
KINDS = ("exact", "ivfpq", "hnsw")
THRESHOLDS = (0.9, 0.95, 0.97, 0.98, 0.985, 0.99, 0.995)


def _model(args: argparse.Namespace):
    from cnn_codes.settings import Settings
    from models.repository import resolve

    settings = Settings()
    name, _, version = (args.model or settings.model_name).partition(":")
    return resolve(args.repository or settings.repository, name,
                   version or settings.model_version)


def _embed(model, sources: list[str], out: Path) -> Path:
    """The batch job (``cnn-codes embed``) over ``sources`` into ``out``."""
    from batch.options import JobOptions
    from batch.runner import run_job

    run_job(sources, out, model, options=JobOptions(progress=False))
    return out


def real_codes(model, data: Path, work: Path) -> np.ndarray:
    """The unit CNN codes of every sample photo (train + val)."""
    from search.sources import iter_chunks, open_sources

    folder = _embed(model, [str(data / "train"), str(data / "val")], work / "codes")
    return np.concatenate([c.vectors for c in iter_chunks(open_sources([folder]),
                                                          with_paths=False)])


def clustered(centres: np.ndarray, count: int, noise: float, rng) -> np.ndarray:
    """``count`` unit vectors: a random centre each plus Gaussian noise whose total norm is
    log-uniform in [``noise`` / 10, ``noise``] per vector (the centres are unit vectors; graded
    distances, as real neighbours have: noise of one scale makes all members of a cluster
    nearly equidistant, where any approximation ranks by chance), L2-normalised; float32."""
    from models.postprocess import l2_normalize

    dim = centres.shape[1]
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 65536):
        stop = min(count, start + 65536)
        picks = rng.integers(0, len(centres), stop - start)
        scale = np.exp(rng.uniform(np.log(noise / 10), np.log(noise), (stop - start, 1)))
        block = centres[picks] + rng.standard_normal((stop - start, dim), np.float32) * \
            (scale / np.sqrt(dim)).astype(np.float32)
        out[start:stop] = l2_normalize(block)
    return out


def numpy_topk(base: np.ndarray, queries: np.ndarray, k: int, block: int = 64) -> np.ndarray:
    """Brute-force top-k ids by inner product (the baseline), best first; ``block`` queries at
    a time (the score matrix of 1000 queries x 10^6 vectors would be 4 GB)."""
    out = []
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ base.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        out.append(np.take_along_axis(top, order, 1))
    return np.concatenate(out)


def _latencies(search_one, queries: np.ndarray, limit: int) -> dict:
    times = []
    for q in queries[:limit]:
        started = time.perf_counter()
        search_one(q[None, :])
        times.append(time.perf_counter() - started)
    ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "single_queries": len(ms)}


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return round(float(np.mean([len(set(a) & set(e)) / len(e)
                                for a, e in zip(found.tolist(), exact.tolist())])), 4)


def bench_ann(args: argparse.Namespace) -> dict:
    """The index kinds and the numpy baseline at each size (see the module)."""
    import faiss

    from search.build import default_params, factory_string, new_index
    from search.index import apply_search_params

    threads = faiss.omp_get_max_threads()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        centres = real_codes(_model(args), args.data, Path(tmp))
    rows = []
    for count in args.sizes:
        base = clustered(centres, count, args.noise, rng)
        queries = clustered(centres, args.queries, args.noise, rng)
        exact_ids = numpy_topk(base, queries, 10)
        started = time.perf_counter()
        numpy_topk(base, queries, 10)
        batch_s = time.perf_counter() - started
        row = {"n": count, "dim": base.shape[1], "kind": "numpy", "build_s": 0.0,
               "bytes_per_vector": base.shape[1] * 4, "recall_at_10": 1.0,
               "queries_per_s": round(len(queries) / batch_s, 1),
               **_latencies(lambda q: numpy_topk(base, q, 10), queries, args.single)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        for kind in KINDS:
            if kind == "hnsw" and count > args.hnsw_max:
                continue
            params = default_params(kind, count, base.shape[1])
            started = time.perf_counter()
            index = new_index(kind, base.shape[1], params)
            if kind == "ivfpq":
                train = base[rng.choice(count, size=min(count, args.max_train_rows),
                                        replace=False)]
                index.train(train)
            for start in range(0, count, 65536):
                index.add(base[start:start + 65536])
            build_s = time.perf_counter() - started
            apply_search_params(index, kind, params)
            nbytes = len(faiss.serialize_index(index))
            started = time.perf_counter()
            _, found = index.search(queries, 10)
            batch_s = time.perf_counter() - started
            faiss.omp_set_num_threads(1)
            latency = _latencies(lambda q: index.search(q, 10), queries, args.single)
            faiss.omp_set_num_threads(threads)
            row = {"n": count, "dim": base.shape[1], "kind": kind,
                   "factory": factory_string(kind, params), "params": params,
                   "build_s": round(build_s, 2), "bytes_per_vector": round(nbytes / count, 1),
                   "recall_at_10": _recall(found, exact_ids),
                   "queries_per_s": round(len(queries) / batch_s, 1), **latency}
            rows.append(row)
            print(json.dumps(row), flush=True)
            index = None  # freed before the next kind is built
        base = None
    return {"noise": args.noise, "queries": args.queries, "threads": threads, "rows": rows}


def bench_dedup(args: argparse.Namespace) -> dict:
    """The threshold sweep on constructed duplicates (see the module)."""
    from search.dedup import VARIANTS, find_groups, make_variants, pair_metrics

    model = _model(args)
    val = args.data / "val"
    half = args.photos // 2
    photos = sorted((val / "ants").glob("*.jpg"))[:half] + \
        sorted((val / "bees").glob("*.jpg"))[:args.photos - half]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        work = Path(tmp)
        truth: dict[str, str] = {}
        kind_of: dict[str, str] = {}
        for photo in photos:
            for variant, path in zip(VARIANTS, make_variants(photo, work / "dups")):
                truth[str(path.resolve())] = str(photo.resolve())
                kind_of[str(path.resolve())] = variant
        folders = [_embed(model, [str(val)], work / "emb-val"),
                   _embed(model, [str(work / "dups")], work / "emb-dups")]
        for threshold in args.thresholds:
            groups, _, _ = find_groups(folders, threshold)
            photo_of = [truth.get(p, p) for p in groups.paths]
            metrics = pair_metrics(groups.group_id.tolist(), photo_of)
            row_of = {p: i for i, p in enumerate(groups.paths)}
            per_variant = {}
            for variant in VARIANTS:
                pairs = [(row_of[p], row_of[o]) for p, o in truth.items() if kind_of[p] == variant]
                per_variant[variant] = round(float(np.mean(
                    [groups.group_id[a] == groups.group_id[b] for a, b in pairs])), 4)
            scores = groups.nearest_score
            rows.append({"threshold": threshold, **metrics, "recall_by_variant": per_variant})
            print(json.dumps(rows[-1]), flush=True)
        originals = [i for i, p in enumerate(groups.paths) if p not in truth]
        nearest_other_photo = np.array(
            [scores[i] for i in originals
             if truth.get(groups.paths[groups.nearest[i]], groups.paths[groups.nearest[i]])
             != groups.paths[i]])
    card = model.card
    return {"model": f"{card.name}:{card.version}", "backbone": card.backbone,
            "val_acc": card.training.get("val_acc"), "photos": len(photos),
            "variants": list(VARIANTS), "images": len(groups.paths),
            "nearest_other_photo_cosine": {
                q: round(float(np.percentile(nearest_other_photo, q)), 4)
                for q in (50, 90, 99, 100)} if len(nearest_other_photo) else None,
            "rows": rows}


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench.search {ann,dedup,all}``."""
    from cnn_codes.settings import apply_offline_env

    apply_offline_env()
    parser = argparse.ArgumentParser(prog="python -m bench.search",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["ann", "dedup", "all"], nargs="?", default="all")
    parser.add_argument("--model", help="NAME[:VERSION] (default: the served model setting)")
    parser.add_argument("--repository", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200, help="single-query timings")
    parser.add_argument("--noise", type=float, default=0.3,
                        help="largest norm of the noise added to a real code (unit vectors)")
    parser.add_argument("--max-train-rows", type=int, default=65536)
    parser.add_argument("--hnsw-max", type=int, default=10**7,
                        help="skip hnsw above this N (its build is the slowest)")
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--thresholds", type=lambda s: [float(x) for x in s.split(",")],
                        default=list(THRESHOLDS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    command = "python -m bench.search " + " ".join(argv or sys.argv[1:])
    started = datetime.now(timezone.utc).isoformat()
    result: dict = {"machine": machine_info()}
    if args.part in ("ann", "all"):
        result["ann"] = {"command": command, "started": started,
                         "load_average_start": load_average(), **bench_ann(args),
                         "load_average_end": load_average()}
        print(_table(result["ann"]["rows"], ["n", "kind", "build_s", "p50_ms", "p99_ms",
                                             "queries_per_s", "bytes_per_vector",
                                             "recall_at_10"]))
    if args.part in ("dedup", "all"):
        result["dedup"] = {"command": command, "started": started, **bench_dedup(args)}
        print(_table(result["dedup"]["rows"], ["threshold", "precision", "recall",
                                               "found_pairs", "true_pairs", "merged_photos"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    previous.update(result)  # a part run alone keeps the other part's last figures
    args.out.write_text(json.dumps(previous, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
