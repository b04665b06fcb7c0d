"""Supervising ``bentoml serve`` for ``cnn-codes serve``: the instance's own temporary folder,
the crash-loop watch over BentoML's service workers, and stopping the service.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from cnn_codes.settings import Settings

logger = logging.getLogger(__name__)

TMP_MARKER = ".cnn-codes-tmp"  # marks a folder prepare_tmp_dir may empty
WORKER_MODULE = "_bentoml_impl.worker.service"  # BentoML 1.4's service worker (circus child)
POLL_S = 0.5
STOP_WAIT_S = 45.0  # above the Encoder's shutdown grace (< 30 s) plus uvicorn's drain


def instance_tmp_dir(bentoml_home: str, settings: Settings,
                     system_tmp: str | None = None) -> Path:
    """The instance's own temporary folder: ``tmp_dir``, or else
    ``<system temp>/cnn-codes-tmp-<12 hex of sha256(BENTOML_HOME)>``: the same folder for
    every start of one instance (so a start empties what a crashed run left), and a short
    path (BentoML puts its Unix sockets below ``TMPDIR``; their paths must stay < 104 bytes).
    """
    if settings.tmp_dir is not None:
        return Path(os.path.abspath(settings.tmp_dir))
    key = hashlib.sha256(os.path.abspath(bentoml_home).encode()).hexdigest()[:12]
    return Path(system_tmp or tempfile.gettempdir()) / f"cnn-codes-tmp-{key}"


def prepare_tmp_dir(path: Path) -> None:
    """Create ``path`` (mode 0700, with the :data:`TMP_MARKER` file) or check that it is one of
    ours from an earlier run, then empty it.

    Raises:
        OSError: not a folder of this user (a symlink, someone else's), or a non-empty folder
            without :data:`TMP_MARKER` (never emptied: it may not be a temp folder at all).
    """
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        raise OSError(f"{path} is not a folder owned by this user (set CNN_CODES_TMP_DIR)")
    marker = path / TMP_MARKER
    if not marker.is_file() and any(path.iterdir()):
        raise OSError(f"{path} is not empty and lacks {TMP_MARKER}: not a cnn-codes temp "
                      "folder, refusing to empty it (set CNN_CODES_TMP_DIR)")
    os.chmod(path, 0o700)
    for child in path.iterdir():
        if child.name == TMP_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    marker.write_text("the temporary folder of one cnn-codes serve instance; emptied at "
                      "start-up, removed at exit\n")


class WorkerWatch:
    """Counts deaths of ``bentoml serve``'s service workers (processes running
    :data:`WORKER_MODULE` below ``root_pid``), polled by :meth:`check`.

    Args:
        root_pid: the ``bentoml serve`` process.
        max_failures: deaths within ``window_s`` that mean a crash loop; 0 = never.
        window_s: the sliding window, seconds.
    """

    def __init__(self, root_pid: int, max_failures: int, window_s: float) -> None:
        import psutil  # a BentoML dependency

        self._psutil = psutil
        self.root = psutil.Process(root_pid)
        self.max_failures = max_failures
        self.window_s = window_s
        self.last = ""
        self._known: dict[tuple[int, float], str] = {}
        self._deaths: collections.deque[float] = collections.deque()

    def _workers(self) -> dict[tuple[int, float], str]:
        found: dict[tuple[int, float], str] = {}
        try:
            children = self.root.children(recursive=True)
        except self._psutil.Error:
            return self._known  # the root is exiting: wait() will tell
        for child in children:
            try:
                cmdline = child.cmdline()
                key = (child.pid, child.create_time())
            except self._psutil.Error:
                continue
            if WORKER_MODULE in cmdline:
                at = cmdline.index("--service-name") + 1 if "--service-name" in cmdline else 0
                found[key] = cmdline[at] if 0 < at < len(cmdline) else "?"
        return found

    def check(self) -> bool:
        """Poll once; False when the workers died ``max_failures`` times within the window."""
        current = self._workers()
        now = time.monotonic()
        for key, service in self._known.items():
            if key not in current:
                self._deaths.append(now)
                self.last = f"service {service}, pid {key[0]}"
                logger.warning("worker of service %s (pid %d) exited; BentoML restarts it",
                               service, key[0])
        self._known = current
        while self._deaths and self._deaths[0] < now - self.window_s:
            self._deaths.popleft()
        return not (self.max_failures and len(self._deaths) >= self.max_failures)


def stop_service(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc`` (BentoML's arbiter stops its workers), SIGKILL it and its children if
    it is still there after :data:`STOP_WAIT_S`."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
