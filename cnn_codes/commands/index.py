"""``cnn-codes index build|query``: a FAISS index of batch-job CNN codes, and queries against it
(see :mod:`search`).

Exit statuses: see :data:`EXIT_STATUSES` (also the command's ``--help``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cnn_codes.commands._common import positive_int, report_error
from cnn_codes.settings import Settings

EXIT_OK = 0
EXIT_BAD_INPUT = 2

EXIT_STATUSES = f"""\
exit status:
  {EXIT_OK}  done (query: images that cannot be used are items with an "error", not a failure)
  1  unexpected error (a traceback)
  {EXIT_BAD_INPUT}  bad arguments: a folder that is not a finished cnn-codes embed output, folders
     of different model versions or layers (what differs is named), no vectors, OUT exists
     (without --overwrite), not an index folder, or the index's model version missing or
     different from the one in the repository
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``index build`` and ``index query`` on ``subparsers``."""
    p = subparsers.add_parser("index", help="FAISS index of CNN codes: build, query",
                              description="Nearest-neighbour index of cnn-codes embed output.",
                              epilog=EXIT_STATUSES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="index_command", required=True)

    b = sub.add_parser("build", help="embed folders -> index folder (atomic)",
                       description="Build an index of the vectors of one or more cnn-codes "
                                   "embed output folders (one model version and layer) and "
                                   "publish it atomically at OUT, with a manifest that "
                                   "records recall@10 against exact search.",
                       epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("emb_dirs", nargs="+", type=Path, metavar="EMB_DIR",
                   help="cnn-codes embed output folders")
    b.add_argument("--out", type=Path, required=True, help="index folder to create")
    b.add_argument("--kind", choices=["exact", "ivfpq", "hnsw"], default="exact",
                   help="exact (flat), ivfpq (IVF + 4-bit PQ, compressed) or hnsw (graph)")
    b.add_argument("--nlist", type=positive_int, help="ivfpq: inverted lists (default 4 sqrt N)")
    b.add_argument("--m", type=positive_int,
                   help="ivfpq: PQ sub-quantisers, a divisor of D (default near D/4)")
    b.add_argument("--nprobe", type=positive_int, help="ivfpq: lists searched per query")
    b.add_argument("--hnsw-m", type=positive_int, help="hnsw: graph degree M (default 32)")
    b.add_argument("--ef-construction", type=positive_int, help="hnsw: default 80")
    b.add_argument("--ef-search", type=positive_int, help="hnsw: default 64")
    b.add_argument("--recall-queries", type=int, default=500,
                   help="random rows whose recall@10 vs exact search is measured (0 = skip)")
    b.add_argument("--max-train-rows", type=positive_int, default=65536,
                   help="ivfpq: most vectors it is trained on (a random sample)")
    b.add_argument("--chunk-rows", type=positive_int, default=16384,
                   help="rows read and added at a time (bounds memory)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run)

    q = sub.add_parser("query", help="nearest indexed images of images, as JSON",
                       description="Embed IMAGEs with the index's model version (from the "
                                   "repository) and print their k nearest indexed images "
                                   "(path, cosine) as JSON.",
                       epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("index_dir", type=Path, metavar="INDEX_DIR")
    q.add_argument("images", nargs="+", metavar="IMAGE")
    q.add_argument("-k", type=positive_int, default=10, help="neighbours per image")
    q.add_argument("--repository", type=Path, help="model repository (default: the setting)")
    q.set_defaults(func=run)
    return p


def _params(args: argparse.Namespace) -> dict:
    given = {"nlist": args.nlist, "m": args.m, "nprobe": args.nprobe, "M": args.hnsw_m,
             "ef_construction": args.ef_construction, "ef_search": args.ef_search}
    return {k: v for k, v in given.items() if v is not None}


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``index build`` or ``index query``, whichever was chosen; the exit status."""
    return (run_build if args.index_command == "build" else run_query)(args, settings)


def run_build(args: argparse.Namespace, settings: Settings) -> int:
    """Build and publish the index; print its manifest as JSON."""
    from search.build import build_index
    from search.sources import SourceError

    try:
        manifest = build_index(args.emb_dirs, args.out, args.kind, params=_params(args),
                               recall_queries=args.recall_queries,
                               max_train_rows=args.max_train_rows, chunk_rows=args.chunk_rows,
                               seed=args.seed, overwrite=args.overwrite,
                               progress=not args.no_progress)
    except (SourceError, FileExistsError) as exc:
        report_error(f"cnn-codes index build: {exc}")
        return EXIT_BAD_INPUT
    print(manifest.model_dump_json())
    return EXIT_OK


def run_query(args: argparse.Namespace, settings: Settings) -> int:
    """Embed the images with the index's model version and print their neighbours
    (:class:`search.query.IndexWithModel`, the query path ``viz neighbours`` draws too)."""
    from models.decode import DecodeLimits
    from models.repository import ModelIntegrityError, ModelNotFoundError
    from models.runtime import SessionConfig
    from search.index import IndexDamagedError
    from search.query import IndexWithModel

    try:
        opened = IndexWithModel.open(args.index_dir, args.repository or settings.repository)
    except (FileNotFoundError, IndexDamagedError, ModelNotFoundError,
            ModelIntegrityError) as exc:
        report_error(f"cnn-codes index query: {exc}")
        return EXIT_BAD_INPUT
    results = opened.query(args.images, args.k, limits=DecodeLimits.from_settings(settings),
                           session_config=SessionConfig.from_settings(settings))
    manifest = opened.index.manifest
    json.dump({"index": str(args.index_dir), "model": manifest.model_ref,
               "layer": manifest.layer, "kind": manifest.kind, "k": args.k,
               "results": [r.as_dict() for r in results]}, sys.stdout)
    sys.stdout.write("\n")
    return EXIT_OK
