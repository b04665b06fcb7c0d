"""Batch embedding jobs (``cnn-codes embed``): real photos in, Parquet CNN codes out.

Checks every input lands in exactly one row, good rows equal onnxruntime run directly on the
same preprocessed image, bad files become rows with their error code, a job killed mid-way
resumes without duplicates or gaps, and the Ray engine writes the same rows as the local one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from batch.sources import SourceError, list_inputs
from conftest import CLI, REPO_ROOT, base_env, last_json_line, run_cli
from models.card import ModelCard
from models.decode import decode_file
from models.postprocess import l2_normalize
from models.runtime import open_session

SHARD = 40


def read_job(out: Path) -> dict[str, dict]:
    """``{path: row}`` of a job's output folder; fails on a duplicated path."""
    table = pads.dataset(out, format="parquet").to_table()
    rows = table.to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a path appears in more than one row"
    return {r["path"]: r for r in rows}


def embed_args(published: dict, *sources: str | Path, out: Path, **flags: str) -> list[str]:
    args = ["embed", *map(str, sources), "--out", str(out), "--no-progress",
            "--repository", str(published["repository"]),
            "--model", f"{published['name']}:{published['version']}"]
    for flag, value in flags.items():
        args += [f"--{flag.replace('_', '-')}", value]
    return args


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A folder of files that are not usable images, next to the photos."""
    folder = tmp_path_factory.mktemp("bad")
    photo = sorted((data_dir / "val" / "ants").glob("*.jpg"))[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(photo[: len(photo) // 3])
    (folder / "notes.jpg").write_text("these are not pixels\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "readme.md").write_text("not listed: no image extension\n")
    return folder


@pytest.fixture(scope="module")
def gif(data_dir: Path) -> Path:
    """The sample data's one GIF (a train photo), given as a file source."""
    return next((data_dir / "train").rglob("*.gif"))


@pytest.fixture(scope="module")
def clean_job(published: dict, data_dir: Path, bad_files: Path, gif: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted job over the val photos, the GIF and the bad files."""
    out = tmp_path_factory.mktemp("embed") / "clean"
    proc = run_cli(*embed_args(published, data_dir / "val", bad_files, gif, out=out,
                               shard_size=str(SHARD)))
    return {"out": out, "report": last_json_line(proc.stdout), "rows": read_job(out)}


def test_every_input_is_one_row_and_equals_onnxruntime(clean_job, published, data_dir,
                                                       bad_files, gif):
    rows, report = clean_job["rows"], clean_job["report"]
    expected = [str(p.resolve()) for p in (data_dir / "val").rglob("*") if p.is_file()] + [
        str(p.resolve()) for p in bad_files.iterdir() if p.suffix != ".md"] + [str(gif)]
    assert sorted(rows) == sorted(expected)
    assert report["images"] == len(expected) and report["errors"] == 3
    assert report["parts_total"] == report["parts_written"] == -(-len(expected) // SHARD)
    assert sorted(p.name for p in clean_job["out"].glob("part-*.parquet")) == [
        f"part-{i:05d}.parquet" for i in range(report["parts_total"])]

    card = ModelCard.model_validate_json((published["path"] / "model_card.json").read_text())
    session = open_session(str(published["path"] / "model.onnx"))
    photos = sorted(p for p in rows if p.startswith(str(data_dir / "val")))
    for path in [str(gif), *photos[::30]]:
        row = rows[path]
        assert row["error_code"] is None and row["model_version"] == published["version"]
        assert row["model_name"] == published["name"]
        image = decode_file(path, card.preprocessing)[None]
        direct = l2_normalize(session.run(["embedding"], {"images": image})[0])[0]
        got = np.asarray(row["embedding"], dtype=np.float32)
        assert got.shape == (card.dim("embedding"),)
        np.testing.assert_allclose(got, direct, atol=2e-5)
    # photos really differ (a collapsed model would give one vector for all)
    vectors = np.stack([np.asarray(r["embedding"]) for r in rows.values() if r["embedding"]])
    assert float(np.mean(vectors @ vectors.T)) < 0.99

    codes = {Path(p).name: r["error_code"] for p, r in rows.items() if r["error_code"]}
    assert codes == {"truncated.jpg": "truncated", "notes.jpg": "not_an_image",
                     "empty.png": "empty"}
    for path, row in rows.items():
        assert (row["embedding"] is None) == (row["error_code"] is not None), path
        assert (row["error"] is None) == (row["error_code"] is None), path


def test_killed_job_resumes_without_duplicates_or_gaps(clean_job, published, data_dir,
                                                       bad_files, gif, tmp_path):
    out = tmp_path / "killed"
    args = embed_args(published, data_dir / "val", bad_files, gif, out=out, shard_size=str(SHARD),
                      batch_size="8")
    proc = subprocess.Popen([*CLI, *args], env=base_env(), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out / "part-00001.parquet").exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "no part written in 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*")}
    total = clean_job["report"]["parts_total"]
    assert 2 <= len(before) < total, "the kill came too late to test a resume"

    report = last_json_line(run_cli(*args).stdout)
    assert report["parts_skipped"] == len(before)
    assert report["parts_written"] == total - len(before)
    # the local engine writes parts in order, so the kept ones are the first, full ones
    assert sorted(before) == [f"part-{i:05d}.parquet" for i in range(len(before))]
    assert report["images"] == len(clean_job["rows"]) - len(before) * SHARD
    for name, stat in before.items():  # complete parts are kept, not rewritten
        path = out / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stat
    assert not list(out.glob(".*.tmp"))
    rows = read_job(out)
    assert sorted(rows) == sorted(clean_job["rows"])
    for path, row in rows.items():
        want = clean_job["rows"][path]
        assert row["error_code"] == want["error_code"]
        if want["embedding"] is not None:
            np.testing.assert_allclose(row["embedding"], want["embedding"], atol=2e-5)

    # a finished job run again writes nothing
    again = last_json_line(run_cli(*args).stdout)
    assert again["parts_written"] == 0 and again["parts_skipped"] == total


def test_output_folder_of_another_job_is_refused(clean_job, published, data_dir, bad_files,
                                                gif):
    args = embed_args(published, data_dir / "val", bad_files, gif, out=clean_job["out"],
                      shard_size=str(SHARD), layer="features")
    proc = subprocess.run([*CLI, *args], env=base_env(), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "holds another job" in proc.stderr and "layer" in proc.stderr
    assert "features" in proc.stderr
    # nothing of the finished job was touched
    assert read_job(clean_job["out"]).keys() == clean_job["rows"].keys()


def test_sources_directories_globs_and_manifests(tmp_path: Path, data_dir: Path):
    ants = sorted((data_dir / "val" / "ants").glob("*.jpg"))[:3]
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "some.txt"
    manifest.write_text(f"# three ants\n{ants[0]}\n../rel.jpg\n\n{ants[1]}\n")
    csv = tmp_path / "table.csv"
    csv.write_text(f"path,label\n{ants[2]},ant\n")
    listed = list_inputs([manifest, csv])
    assert listed == sorted([str(ants[0]), str(ants[1]), str(ants[2]),
                             str(tmp_path / "rel.jpg")])
    globbed = list_inputs([str(data_dir / "val" / "*" / "*.jpg")])
    walked = list_inputs([data_dir / "val"])
    assert set(globbed) <= set(walked) and len(walked) - len(globbed) == sum(
        1 for p in walked if not p.endswith(".jpg"))
    assert list_inputs([data_dir / "val", str(data_dir / "val" / "ants" / "*")]) == walked
    for bad in ([tmp_path / "missing"], [str(tmp_path / "*.nothing")]):
        with pytest.raises(SourceError):
            list_inputs(bad)
    (tmp_path / "nopath.csv").write_text("file\nx.jpg\n")
    with pytest.raises(SourceError, match="path"):
        list_inputs([tmp_path / "nopath.csv"])


def test_ray_engine_writes_the_same_rows(clean_job, published, data_dir, tmp_path):
    pytest.importorskip("ray") if os.environ.get("CI", "").lower() != "true" else None
    photos = sorted(p for p in clean_job["rows"] if clean_job["rows"][p]["error_code"] is None)
    manifest = tmp_path / "subset.txt"
    manifest.write_text("\n".join(photos[::6]) + "\n")
    out = tmp_path / "ray"
    proc = run_cli(*embed_args(published, manifest, out=out, shard_size="9", engine="ray",
                               ray_actors="1"), env=base_env(RAY_USAGE_STATS_ENABLED="0"))
    report = last_json_line(proc.stdout)
    assert report["parts_written"] == report["parts_total"] == -(-len(photos[::6]) // 9)
    rows = read_job(out)
    assert sorted(rows) == photos[::6]
    for path, row in rows.items():
        np.testing.assert_allclose(row["embedding"], clean_job["rows"][path]["embedding"],
                                   atol=2e-5)
    assert json.loads((out / "_job.json").read_text())["shard_size"] == 9


def test_float16_output_halves_the_vectors_and_keeps_them(clean_job, published, tmp_path):
    import pyarrow.parquet as pq

    photos = sorted(p for p in clean_job["rows"] if clean_job["rows"][p]["error_code"] is None)
    manifest = tmp_path / "subset.txt"
    manifest.write_text("\n".join(photos[:64]) + "\n")
    outs = {}
    for dtype in ("float32", "float16"):
        outs[dtype] = tmp_path / dtype
        run_cli(*embed_args(published, manifest, out=outs[dtype], dtype=dtype))
    schema = pq.read_schema(outs["float16"] / "part-00000.parquet")
    assert str(schema.field("embedding").type) == (
        f"fixed_size_list<element: halffloat>[{len(clean_job['rows'][photos[0]]['embedding'])}]")
    sizes = {d: (o / "part-00000.parquet").stat().st_size for d, o in outs.items()}
    assert sizes["float16"] < 0.7 * sizes["float32"], sizes
    rows = read_job(outs["float16"])
    assert sorted(rows) == photos[:64]
    for path, row in rows.items():
        np.testing.assert_allclose(np.asarray(row["embedding"], dtype=np.float32),
                                   clean_job["rows"][path]["embedding"], atol=1e-3)


def test_special_and_huge_files_are_error_rows_not_a_dead_job(published, data_dir, tmp_path):
    """A FIFO named f.jpg (would block a reader forever), a symlink to /dev/zero (endless), an
    8 GiB sparse file and a file over MAX_FILE_BYTES: each is its own error row, the photo
    beside them is embedded, and the job finishes."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    photo = sorted((data_dir / "val" / "ants").glob("*.jpg"))[0]
    (folder / "photo.jpg").write_bytes(photo.read_bytes())
    os.mkfifo(folder / "f.jpg")
    (folder / "z.jpg").symlink_to("/dev/zero")
    with open(folder / "sparse.jpg", "wb") as handle:
        handle.truncate(8 * 2**30)
    (folder / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (2 * 2**20))
    out = tmp_path / "out"
    proc = run_cli(*embed_args(published, folder, out=out),
                   env=base_env(CNN_CODES_MAX_FILE_BYTES=str(2**20)), timeout=300)
    assert last_json_line(proc.stdout)["errors"] == 4
    rows = {Path(path).name: row for path, row in read_job(out).items()}
    assert {name: row["error_code"] for name, row in rows.items()} == {
        "photo.jpg": None, "f.jpg": "not_a_file", "z.jpg": "not_a_file",
        "sparse.jpg": "too_large", "big.png": "too_large"}
    assert rows["photo.jpg"]["embedding"] is not None
    assert all(rows[name]["embedding"] is None for name in rows if name != "photo.jpg")


def photo_manifest(data_dir: Path, folder: Path, count: int) -> Path:
    """A manifest of ``count`` distinct inputs: symlinks in ``folder`` to the val photos,
    cycled (the job's input list is de-duplicated, so repeating a path would not add inputs)."""
    photos = sorted((data_dir / "val").rglob("*.jpg"))
    folder.mkdir()
    lines = []
    for i in range(count):
        link = folder / f"{i:05d}.jpg"
        link.symlink_to(photos[i % len(photos)])
        lines.append(f"{link}\n")
    manifest = folder.parent / f"{folder.name}.txt"
    manifest.write_text("".join(lines))
    return manifest


def refusal_line(stderr: str) -> str:
    """The one line of a refused job's stderr that says why."""
    lines = [line for line in stderr.splitlines() if line.startswith("cnn-codes embed:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_second_job_on_a_busy_folder_is_refused_and_the_first_finishes(published, data_dir,
                                                                      tmp_path):
    """Two jobs on one folder: the second used to delete the first's temporary part (the
    stale-temp clean-up) and the first died with a FileNotFoundError. Now the second is refused
    at once, exit 2, naming the holder's PID and the folder, and the first finishes whole."""
    import socket

    count = 1200
    manifest = photo_manifest(data_dir, tmp_path / "many", count)
    out = tmp_path / "out"
    args = embed_args(published, manifest, out=out, shard_size="40", batch_size="2",
                      decode_workers="1")
    first = subprocess.Popen([*CLI, *args], env=base_env(), cwd=REPO_ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (out / "part-00000.parquet").exists():  # the first job is writing parts
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no part written in 300 s"
            time.sleep(0.02)
        second = subprocess.run([*CLI, *args], env=base_env(), cwd=REPO_ROOT, text=True,
                                capture_output=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert first.poll() is None, "the first job ended before the second one was refused"
        line = refusal_line(second.stderr)
        assert f"PID {first.pid} on {socket.gethostname()}" in line and str(out) in line
        assert "in use by another job" in line
        assert json.loads((out / "_lock").read_text())["pid"] == first.pid
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, stderr[-3000:]
    report = last_json_line(stdout)
    assert report["images"] == count and report["errors"] == 0
    assert report["parts_written"] == report["parts_total"] == count // 40
    rows = read_job(out)  # one row per input, none twice
    assert sorted(rows) == sorted(manifest.read_text().splitlines())
    assert all(row["embedding"] is not None for row in rows.values())
    assert not list(out.glob(".*.tmp"))
    # the lock went with the first job: the folder is free again
    again = last_json_line(run_cli(*args).stdout)
    assert again["parts_written"] == 0 and again["parts_skipped"] == count // 40


def test_folder_lock_is_released_when_its_holder_is_killed(published, data_dir, tmp_path):
    """A live holder keeps the folder (and its temporary files) from other jobs; once it is
    SIGKILLed the kernel drops its flock and a job runs, clearing the dead one's temp file."""
    import socket

    manifest = photo_manifest(data_dir, tmp_path / "few", 12)
    out = tmp_path / "out"
    args = embed_args(published, manifest, out=out, shard_size="5")
    holder = subprocess.Popen(
        [*CLI[:1], "-c", "import sys, time\nfrom batch.lock import OutputFolderLock\n"
         "OutputFolderLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(600)",
         str(out)], env=base_env(), cwd=REPO_ROOT, text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        record = json.loads((out / "_lock").read_text())  # who holds it, for the refusal
        assert (record["pid"], record["host"]) == (holder.pid, socket.gethostname())
        in_progress = out / ".part-00000.parquet.tmp"  # the holder's part being written
        in_progress.write_bytes(b"not yet a parquet file")
        refused = subprocess.run([*CLI, *args], env=base_env(), cwd=REPO_ROOT, text=True,
                                 capture_output=True, timeout=300)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert f"PID {holder.pid}" in refusal_line(refused.stderr)
        assert in_progress.read_bytes() == b"not yet a parquet file"
        assert not list(out.glob("part-*"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    report = last_json_line(run_cli(*args).stdout)  # the dead holder's lock is gone
    assert report["parts_written"] == report["parts_total"] == 3 and report["images"] == 12
    assert sorted(read_job(out)) == sorted(manifest.read_text().splitlines())
    assert not in_progress.exists()  # stale now, so removed by the job holding the lock


# Runs `cnn-codes ARGS` in a process whose disk under FULL_DISK_DIR has FULL_DISK_BYTES free:
# the raw file writes there (what write(2) would do) store what fits, then fail with ENOSPC.
FULL_DISK_WRAPPER = '''\
import builtins, errno, io, os, runpy, sys

ROOT = os.path.realpath(os.environ["FULL_DISK_DIR"]) + os.sep
free = [int(os.environ["FULL_DISK_BYTES"])]


class FullDiskFile(io.FileIO):
    def write(self, data):
        data = memoryview(data).cast("B")
        if free[0] <= 0 and len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = super().write(data[:free[0]])
        free[0] -= written
        return written


real_open = builtins.open


def open(file, mode="r", buffering=-1, *args, **kwargs):
    if (isinstance(file, (str, os.PathLike)) and mode in ("wb", "xb", "ab")
            and os.path.realpath(file).startswith(ROOT)):
        raw = FullDiskFile(file, mode)
        return raw if buffering == 0 else io.BufferedWriter(raw)
    return real_open(file, mode, buffering, *args, **kwargs)


builtins.open = open
sys.argv[0] = "cnn-codes"
runpy.run_module("cnn_codes.cli", run_name="__main__", alter_sys=True)
'''


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_full_disk_is_one_line_and_exit_3_and_a_rerun_completes(disk, published, data_dir,
                                                                tmp_path):
    """The output disk fills up mid-job: exit 3 and one line naming the problem and the
    folder (was: a traceback, exit 1); the complete parts stay valid, the half-written one is
    gone, and the same command, once there is room, writes only the rest.

    ``tmpfs``: a real 256 KiB tmpfs (needs mount rights: root; skipped without), grown with a
    remount afterwards. ``injected``: any machine; file writes under OUT store what fits in
    256 KiB, then fail with ENOSPC, as write(2) does on a full disk."""
    import pyarrow.parquet as pq

    manifest = photo_manifest(data_dir, tmp_path / "photos", 100)
    out = tmp_path / "disk" / "out"
    out.parent.mkdir()
    args = embed_args(published, manifest, out=out, shard_size="20")
    command, env = [*CLI, *args], base_env()
    if disk == "tmpfs":
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                                str(out.parent)], capture_output=True, text=True)
        if mount.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    else:
        wrapper = tmp_path / "full_disk.py"
        wrapper.write_text(FULL_DISK_WRAPPER)
        command = [CLI[0], str(wrapper), *args]
        env = base_env(FULL_DISK_DIR=str(out.parent), FULL_DISK_BYTES=str(256 * 1024))
    try:
        full = subprocess.run(command, env=env, cwd=REPO_ROOT, text=True, capture_output=True,
                              timeout=600)
        assert full.returncode == 3, full.stderr[-3000:]
        line = refusal_line(full.stderr)
        assert "No space left on device" in line and str(out) in line
        assert "run the same command again" in line
        kept = sorted(out.glob("part-*.parquet"))
        assert 1 <= len(kept) < 5, kept
        assert f"{len(kept)} of 5 parts complete" in line
        assert not list(out.glob(".*.tmp"))  # the part being written was removed
        for part in kept:  # what is there is whole
            assert pq.read_table(part).num_rows == 20
        before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept}
        if disk == "tmpfs":  # make room
            subprocess.run(["mount", "-o", "remount,size=8m", str(out.parent)], check=True)
        report = last_json_line(run_cli(*args).stdout)
        assert report["parts_skipped"] == len(kept)
        assert report["parts_written"] == 5 - len(kept)
        assert report["images"] == 100 - 20 * len(kept) and report["errors"] == 0
        for name, stat in before.items():
            assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stat
        rows = read_job(out)
        assert sorted(rows) == sorted(manifest.read_text().splitlines())
        assert all(row["embedding"] is not None for row in rows.values())
    finally:
        if disk == "tmpfs":
            subprocess.run(["umount", "-l", str(out.parent)], check=False)
