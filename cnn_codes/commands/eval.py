"""``cnn-codes eval retrieval``: kNN accuracy (k = 1, 5) and mAP of a model version's codes, val
queries against the train gallery of an ImageFolder (see :mod:`search.retrieval`).

Exit statuses: 0 done; 1 unexpected error; 2 bad arguments (no train/ and val/ folders, unknown
or damaged model).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cnn_codes.commands._common import report_error
from cnn_codes.settings import Settings


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``eval retrieval`` on ``subparsers``."""
    p = subparsers.add_parser("eval", help="evaluate a model's codes: retrieval",
                              description="Evaluate a published model's CNN codes.")
    sub = p.add_subparsers(dest="eval_command", required=True)
    r = sub.add_parser(
        "retrieval", help="kNN accuracy and mAP, val queries vs train gallery",
        description="Embed DATA/train (gallery) and DATA/val (queries) with the batch job, "
                    "then print kNN accuracy (k = 1, 5) and mean average precision by cosine, "
                    "next to a constant guess and a random ranking, as JSON.",
        epilog="exit status: 0 done; 1 unexpected error; 2 no DATA/train and DATA/val, or an "
               "unknown or damaged model")
    r.add_argument("--model", help="NAME[:VERSION|ALIAS] (default: the served model setting)")
    r.add_argument("--repository", type=Path)
    r.add_argument("--data", type=Path, help="ImageFolder with train/ and val/ (default: the "
                                             "sample data setting)")
    r.add_argument("--layer", choices=["embedding", "features"], default="embedding")
    r.add_argument("--work", type=Path, help="keep the embed folders here (default: a temp "
                                             "folder, removed; an existing one is resumed)")
    r.set_defaults(func=run)
    return p


def _codes(folder: Path, split: Path):
    import numpy as np

    from search.sources import iter_chunks, open_sources

    chunks = list(iter_chunks(open_sources([folder])))
    vectors = np.concatenate([c.vectors for c in chunks])
    labels = [Path(p).relative_to(split.resolve()).parts[0] for c in chunks for p in c.paths]
    return vectors, labels


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Embed both splits, evaluate, print the report as JSON."""
    from batch.options import JobOptions
    from batch.runner import run_job
    from models.repository import ModelIntegrityError, ModelNotFoundError, resolve
    from search.retrieval import evaluate

    data = (args.data or settings.sample_data).resolve()
    if not (data / "train").is_dir() or not (data / "val").is_dir():
        report_error(f"cnn-codes eval retrieval: {data} has no train/ and val/ folders")
        return 2
    name, _, version = (args.model or settings.model_name).partition(":")
    try:
        model = resolve(args.repository or settings.repository, name,
                        version or settings.model_version)
    except (ModelNotFoundError, ModelIntegrityError) as exc:
        report_error(f"cnn-codes eval retrieval: {exc}")
        return 2
    card = model.card
    with tempfile.TemporaryDirectory(prefix="cnn-codes-eval-") as tmp:
        work = args.work or Path(tmp)
        codes = {}
        for split in ("train", "val"):
            folder = work / f"{card.name}-{card.version}-{args.layer}-{split}"
            run_job([str(data / split)], folder, model, layer=args.layer,
                    options=JobOptions(progress=False))
            codes[split] = _codes(folder, data / split)
    report = evaluate(*codes["train"], *codes["val"], model=f"{card.name}:{card.version}",
                      layer=args.layer)
    print(report.model_dump_json())
    return 0
