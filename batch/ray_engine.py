"""The Ray engine of a batch embedding job: Ray Data ``map_batches`` over part numbers.

Each actor holds one onnxruntime session (a :class:`batch.job.ShardEmbedder`) and writes whole
parts with exactly the code of the local engine, so both engines give the same files and
resume the same way. Ray only decides which actor writes which part; the job's folder on shared
storage remains the record of what is done.
(https://docs.ray.io/en/latest/data/api/doc/ray.data.Dataset.map_batches.html)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from batch.job import EmbedJobSpec, ShardEmbedder, ShardResult, read_inputs
from batch.options import JobOptions
from models.decode import DecodeLimits
from models.repository import PublishedModel, verify
from models.runtime import SessionConfig

logger = logging.getLogger(__name__)


class PartWriter:
    """A Ray Data callable class: ``{"part": (B,) int64}`` -> rows and errors per part.

    Args (``fn_constructor_kwargs``):
        model_dir: the published model version's folder (verified again on the actor).
        spec_json: the job's :class:`EmbedJobSpec` as JSON.
        out_dir: the job's output folder.
        batch_size, decode_workers, limits, session_config: see :class:`ShardEmbedder`.
    """

    def __init__(self, model_dir: str, spec_json: str, out_dir: str, batch_size: int,
                 decode_workers: int, limits: DecodeLimits,
                 session_config: SessionConfig) -> None:
        self.out_dir = out_dir
        self.inputs = read_inputs(out_dir)
        self.embedder = ShardEmbedder(verify(model_dir), EmbedJobSpec.model_validate_json(
            spec_json), batch_size=batch_size, decode_workers=decode_workers, limits=limits,
            session_config=session_config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [self.embedder.write_part(self.out_dir, int(i), self.inputs)
                   for i in batch["part"]]
        return {"part": np.array([r.index for r in results], dtype=np.int64),
                "rows": np.array([r.rows for r in results], dtype=np.int64),
                "errors": np.array([r.errors for r in results], dtype=np.int64)}


def run_parts_on_ray(out_dir: Path, model: PublishedModel, spec: EmbedJobSpec,
                     parts: Sequence[int], options: JobOptions,
                     progress: Callable[[int], object]) -> list[ShardResult]:
    """Write ``parts`` of the job with Ray actors; returns one result per part written.

    Joins ``options.ray_address`` or starts a local Ray instance (no dashboard, no usage
    stats) that is shut down again afterwards.
    """
    if not parts:
        return []
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        init = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if options.ray_address is None:
            init["num_cpus"] = os.cpu_count() or 1
        ray.init(address=options.ray_address, **init)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        dataset = ray.data.from_items([{"part": int(i)} for i in parts])
        written = dataset.map_batches(
            PartWriter, batch_size=1, num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, options.ray_actors)),
            fn_constructor_kwargs=dict(
                model_dir=str(model.path), spec_json=spec.model_dump_json(),
                out_dir=str(Path(out_dir).resolve()), batch_size=options.batch_size,
                decode_workers=options.decode_workers, limits=options.limits,
                session_config=options.session_config))
        results = []
        for row in written.iter_rows():
            results.append(ShardResult(index=int(row["part"]), rows=int(row["rows"]),
                                       errors=int(row["errors"])))
            progress(int(row["rows"]))
        return results
    finally:
        if started_here:
            ray.shutdown()
