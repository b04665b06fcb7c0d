"""``cnn-codes dedup EMB_DIR... --threshold T --out groups.parquet``: near-duplicate groups of
batch-job CNN codes (see :mod:`search.dedup`).

Exit statuses: 0 done; 1 unexpected error; 2 bad arguments (a folder that is not a finished
embed output, folders of different model versions or layers, no vectors).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cnn_codes.commands._common import positive_int, report_error
from cnn_codes.settings import Settings


def _cosine(text: str) -> float:
    value = float(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a cosine in [-1, 1], got {value}")
    return value


_cosine.__name__ = "cosine"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``dedup`` on ``subparsers``."""
    from search.dedup import DEFAULT_THRESHOLD

    p = subparsers.add_parser(
        "dedup", help="near-duplicate groups of embedded images -> Parquet",
        description="Group near-duplicate images of cnn-codes embed output: each image's k "
                    "nearest others by cosine, pairs at or above THRESHOLD joined, connected "
                    "components = groups. One row per image: path, group_id, group_size, "
                    "nearest_path, nearest_score.",
        epilog="exit status: 0 done; 1 unexpected error; 2 bad arguments (not a finished "
               "embed output, mixed model versions or layers, no vectors)")
    p.add_argument("emb_dirs", nargs="+", type=Path, metavar="EMB_DIR")
    p.add_argument("--out", type=Path, required=True, help="groups file (.parquet), atomic")
    p.add_argument("--threshold", type=_cosine, default=DEFAULT_THRESHOLD,
                   help=f"cosine at or above which two images are duplicates (default "
                        f"{DEFAULT_THRESHOLD}, measured on the default model: README)")
    p.add_argument("-k", type=positive_int, default=10, help="neighbours examined per image")
    p.add_argument("--kind", choices=["exact", "ivfpq", "hnsw"], default="exact",
                   help="index used for the neighbour search (exact: 4*D bytes per image)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Find the groups, write them, print the report as JSON."""
    from search.dedup import dedup
    from search.sources import SourceError

    try:
        report = dedup(args.emb_dirs, args.out, args.threshold, k=args.k, kind=args.kind,
                       progress=not args.no_progress)
    except SourceError as exc:
        report_error(f"cnn-codes dedup: {exc}")
        return 2
    print(report.model_dump_json())
    return 0
