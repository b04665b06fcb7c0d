"""How a batch job runs (:class:`JobOptions`), shared by the local and the Ray engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cnn_codes.settings import usable_cores
from models.decode import DecodeLimits
from models.runtime import SessionConfig

Engine = Literal["local", "ray"]


@dataclass(frozen=True)
class JobOptions:
    """How a job runs (not what it computes, which is :class:`batch.job.EmbedJobSpec`).

    Attributes:
        batch_size: images per onnxruntime run.
        decode_workers: pipeline threads per process (Ray: per actor), each decoding a batch
            and then running it (:class:`batch.job.ShardEmbedder`).
        limits: per-image limits (the HTTP API's).
        session_config: onnxruntime providers and threads.
        engine: ``local`` (this process) or ``ray`` (Ray Data ``map_batches`` over parts,
            one onnxruntime session per actor).
        ray_address: Ray cluster to join (``auto``, ``ray://host:10001``); None starts a local
            Ray instance. On a cluster the model repository and the output folder must be on
            storage every node sees.
        ray_actors: Ray actors (model replicas).
        progress: draw a progress bar (tqdm) on stderr.
    """

    batch_size: int = 8
    decode_workers: int = field(default_factory=usable_cores)
    limits: DecodeLimits = field(default_factory=DecodeLimits.default)
    session_config: SessionConfig = SessionConfig()
    engine: Engine = "local"
    ray_address: str | None = None
    ray_actors: int = 1
    progress: bool = True
