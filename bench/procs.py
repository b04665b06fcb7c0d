"""Server processes under the harness's control, and their memory.

Every server is started in its own session (process group) and always stopped with SIGTERM to
the group (SIGKILL if it lingers), so no worker outlives a run. Memory is the sum over the
process tree (psutil): RSS (counts shared pages once per process) and PSS (shares them out).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx
import psutil

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants now; empty when ``pid`` is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_memory(pid: int) -> dict[str, int]:
    """RSS and PSS (bytes) summed over ``pid`` and all its descendants; process count."""
    rss = pss = count = 0
    for proc in _tree(pid):
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        count += 1
    return {"rss": rss, "pss": pss, "processes": count}


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` and its live descendants (0 when gone);
    the difference of two calls is what the tree used between them (children that exit in
    between are not counted)."""
    seconds = 0.0
    for proc in _tree(pid):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        seconds += times.user + times.system
    return seconds


class MemorySampler:
    """Samples :func:`tree_memory` in a thread and keeps the peak per phase (idle / load)."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.phase = "idle"
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        """Take one sample now and fold it into the current phase's peak."""
        sample = tree_memory(self.pid)
        peak = self.peaks.setdefault(self.phase, {"rss": 0, "pss": 0, "processes": 0})
        for key in peak:
            peak[key] = max(peak[key], sample[key])

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        """Peak RSS / PSS per phase, MiB."""
        return {phase: {"peak_rss_mib": round(p["rss"] / 2**20, 1),
                        "peak_pss_mib": round(p["pss"] / 2**20, 1),
                        "processes": p["processes"]}
                for phase, p in self.peaks.items()}


class ManagedServer:
    """A server command run in its own process group, logging to a file.

    Args:
        name: label for logs.
        argv: the command.
        env: its environment.
        cwd: its working directory.
        log_path: where its stdout + stderr go.
        term_root_only: :meth:`stop` sends SIGTERM to the root process alone and lets it stop
            its own children (Ray's driver shuts down the GCS and raylet it started; SIGTERM to
            the whole group would kill those first and leave the driver's shutdown hanging),
            then SIGKILLs whatever is left of the group.
    """

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path,
                 log_path: Path, *, term_root_only: bool = False) -> None:
        self.name = name
        self.term_root_only = term_root_only
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        """Launch the command (new session, so the whole group can be signalled)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        logger.info("starting %s: %s", self.name, " ".join(self.argv))
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        """The server's root process id."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float) -> float:
        """Call ``probe`` until it returns True; returns seconds waited.

        Raises:
            RuntimeError: the process exited, or ``timeout_s`` passed (log tail attached).
        """
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"{self.name} exited ({code}) before ready:\n"
                                   f"{self.log_tail()}")
            try:
                if probe():
                    return time.monotonic() - started
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM the process group (or its root, ``term_root_only``), SIGKILL the group if it
        lingers; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            logger.info("stopping %s (pgid %d)", self.name, self.proc.pid)
            try:
                if self.term_root_only:
                    self.proc.send_signal(signal.SIGTERM)
                else:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        # Workers that escaped the group wait (e.g. a re-parented child) are killed too.
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ManagedServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True when GET ``url`` answers 200."""
    return httpx.get(url, timeout=timeout_s).status_code == 200
