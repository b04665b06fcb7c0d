"""``cnn-codes embed``: batch job, images -> Parquet CNN codes, resumable (see :mod:`batch.job`).

Exit statuses: see :data:`EXIT_STATUSES` (also the command's ``--help``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cnn_codes.commands._common import positive_int, report_error
from cnn_codes.settings import Settings, usable_cores

if TYPE_CHECKING:
    from batch.options import JobOptions

EXIT_OK = 0
EXIT_BAD_JOB = 2
EXIT_DISK_FULL = 3

EXIT_STATUSES = f"""\
exit status:
  {EXIT_OK}  done; images that failed are rows with an error_code, not a failed job
  1  unexpected error (a traceback; e.g. a missing execution provider)
  {EXIT_BAD_JOB}  bad arguments, a source that names nothing, unknown model or damaged model
     files, OUT holding another job (other model, layer, ...), or OUT in use by a job
     running now (its PID and host are named; one job per output folder at a time)
  {EXIT_DISK_FULL}  no space left on OUT's disk (ENOSPC) or disk quota exceeded (EDQUOT); the
     complete parts are kept: free space and run the same command again to finish
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``embed SOURCES... --out DIR`` on ``subparsers``."""
    p = subparsers.add_parser("embed",
                              help="batch job: CNN codes of many images -> Parquet, resumable",
                              description="Batch job: CNN codes of many images -> Parquet "
                                          "parts in OUT, resumable (run it again to finish).",
                              epilog=EXIT_STATUSES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+",
                   help="directories, glob patterns, or manifests (.txt a path per line; "
                        ".csv/.parquet with a 'path' column)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (part-NNNNN.parquet); run again to resume")
    p.add_argument("--model", help="NAME[:VERSION|ALIAS] (default: the served model setting)")
    p.add_argument("--repository", type=Path)
    p.add_argument("--layer", choices=["embedding", "features"], default="embedding",
                   help="penultimate layer (embedding) or pooled conv output (features)")
    p.add_argument("--no-normalize", action="store_true", help="keep raw (not L2) vectors")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="stored value type (float16 halves the files)")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="images per part file")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="images per onnxruntime run (8: the CPU's best, README 'Batch "
                        "embedding jobs'; larger for a GPU)")
    p.add_argument("--decode-workers", type=int, default=0,
                   help="pipeline threads per process (each decodes a batch, then runs it "
                        "through onnxruntime), 0 = one per core")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="ray: Ray Data map_batches over parts, one model per actor")
    p.add_argument("--ray-address", help="Ray cluster to join (default: start a local one)")
    p.add_argument("--ray-actors", type=positive_int, default=1,
                   help="Ray actors (model replicas)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def job_options(args: argparse.Namespace, settings: Settings) -> "JobOptions":
    """The :class:`batch.options.JobOptions` of the flags and ``settings``."""
    from batch.options import JobOptions
    from models.decode import DecodeLimits
    from models.runtime import SessionConfig

    return JobOptions(
        batch_size=args.batch_size, decode_workers=args.decode_workers or usable_cores(),
        limits=DecodeLimits.from_settings(settings),
        session_config=SessionConfig.from_settings(settings), engine=args.engine,
        ray_address=args.ray_address, ray_actors=args.ray_actors,
        progress=not args.no_progress)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run (or resume) the job and print its report as JSON; returns the exit status
    (:data:`EXIT_STATUSES`): 2 on a bad or busy job, 3 on a full disk."""
    from batch.job import DiskFullError, JobMismatchError
    from batch.lock import JobLockedError
    from batch.runner import run_job
    from batch.sources import SourceError
    from models.repository import ModelIntegrityError, ModelNotFoundError, resolve

    name, _, version = (args.model or settings.model_name).partition(":")
    options = job_options(args, settings)
    try:
        model = resolve(args.repository or settings.repository, name,
                        version or settings.model_version)
        report = run_job(args.sources, args.out, model, layer=args.layer,
                         normalize=not args.no_normalize, dtype=args.dtype,
                         shard_size=args.shard_size, options=options)
    except (SourceError, JobMismatchError, JobLockedError, ModelNotFoundError,
            ModelIntegrityError) as exc:
        report_error(f"cnn-codes embed: {exc}")
        return EXIT_BAD_JOB
    except DiskFullError as exc:
        report_error(f"cnn-codes embed: {exc}")
        return EXIT_DISK_FULL
    print(report.model_dump_json())
    return EXIT_OK
