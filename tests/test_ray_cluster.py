"""The Ray engine of ``cnn-codes embed`` on a real multi-node Ray cluster, with a node killed.

Ray's own ``ray.cluster_utils.Cluster`` starts a head node and a worker node as separate
processes on this machine (GCS, raylets, object stores: what ``ray start --head`` / ``ray start
--address`` start). The job joins by address, exactly as a user's job joins their cluster, with
one actor on each node. Once the actor on the worker node is writing parts, that node's
processes are SIGKILLed (``remove_node(allow_graceful=False)``: a machine that died). Ray retries
the lost tasks on the surviving actor; the output must have exactly one row per input, equal to
the local engine's rows (``clean_job``), and no half-written part left behind.
(https://docs.ray.io/en/latest/ray-contribute/testing-tips.html, "Testing on a multi-node
cluster").
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CLI, REPO_ROOT, base_env, last_json_line, wait_until
from test_batch_embed import clean_job, bad_files, embed_args, gif, read_job  # noqa: F401

pytestmark = pytest.mark.timeout(600)


def _children(pid: int) -> list[int]:
    """Every descendant process id of ``pid`` (read from ``/proc``, Linux)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture
def cluster():
    """A two-node Ray cluster (head + worker, one CPU each); every process removed afterwards."""
    if os.environ.get("CI", "").lower() != "true":
        pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                      head_node_args=dict(num_cpus=1, include_dashboard=False))
    try:
        worker = cluster.add_node(num_cpus=1)
        yield cluster, worker
    finally:
        cluster.shutdown()


def test_job_survives_a_worker_node_killed_mid_job(cluster, clean_job, published, tmp_path):
    cluster, worker = cluster
    photos = sorted(p for p, r in clean_job["rows"].items() if r["error_code"] is None)
    manifest = tmp_path / "photos.txt"
    manifest.write_text("\n".join(photos) + "\n")
    out = tmp_path / "cluster"
    args = embed_args(published, manifest, out=out, shard_size="2", engine="ray",
                      ray_address=cluster.address, ray_actors="2")
    log = tmp_path / "job.log"
    with open(log, "w") as handle:
        job = subprocess.Popen([*CLI, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=handle, text=True, env=base_env(RAY_USAGE_STATS_ENABLED="0"))
    try:
        raylet = worker.all_processes["raylet"][0].process.pid

        def actor_on_worker_node_has_written() -> bool:
            assert job.poll() is None, f"job ended before the kill:\n{log.read_text()[-3000:]}"
            on_node = [p for p in _children(raylet) if "PartWriter" in _cmdline(p)]
            return bool(on_node) and len(list(out.glob("part-*.parquet"))) >= 3

        wait_until(actor_on_worker_node_has_written,
                   "an actor on the worker node and 3 parts written", timeout=180, interval=0.1)
        written_before = len(list(out.glob("part-*.parquet")))
        cluster.remove_node(worker, allow_graceful=False)
        stdout, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, log.read_text()[-4000:]
    report = last_json_line(stdout)
    parts_total = -(-len(photos) // 2)
    assert written_before < parts_total, "the node was killed after the job had finished"
    assert report["parts_total"] == parts_total and report["errors"] == 0
    assert report["parts_written"] + report["parts_skipped"] == parts_total
    rows = read_job(out)  # fails on a path in two rows
    assert sorted(rows) == photos
    for path, row in rows.items():
        np.testing.assert_allclose(row["embedding"], clean_job["rows"][path]["embedding"],
                                   atol=2e-5)
    assert not list(out.glob(".*.tmp")), "a half-written part was left behind"
