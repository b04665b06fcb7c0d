"""One job at a time per output folder: an exclusive ``flock`` on ``OUT/_lock``.

Two jobs writing the same folder would remove each other's temporary files (the stale-temp
clean-up of :func:`batch.job.prepare`) and write the same parts twice, so a job holds the
folder's lock for its whole run and a second job on the folder is refused at once (the lock is
taken without waiting). The lock file records the holder (PID, host, start time) so the refusal
can name it.

The kernel releases an ``flock`` when its holder's file descriptor is closed, which includes the
holder dying in any way (``SIGKILL``, OOM killer, power loss of a client): a stale lock file
never blocks a later job; it is simply taken over. The file itself stays in the folder (pyarrow
skips names that start with ``_``); removing it would let two jobs lock two different files.
On NFS, Linux emulates ``flock`` with byte-range locks, so the lock holds across clients; a file
system without lock support fails the lock with an ``OSError`` (``ENOLCK``), and some network
or FUSE file systems lock per machine only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = "_lock"

# resolved folder -> the lock this process holds on it
_HELD: dict[str, "OutputFolderLock"] = {}


class JobLockedError(RuntimeError):
    """Another job (process) holds the output folder's lock.

    Attributes:
        out_dir: the folder.
        holder: the holder's record (``pid``, ``host``, ``since``), or None if unreadable.
    """

    def __init__(self, out_dir: Path, holder: dict | None) -> None:
        self.out_dir = out_dir
        self.holder = holder
        if holder:
            who = (f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                   f"since {holder.get('since', '?')}")
        else:
            who = "a process that has not recorded itself yet"
        super().__init__(f"{out_dir} is in use by another job ({who}); wait for it to finish "
                         "or use another output folder")


def _key(out_dir: str | Path) -> str:
    return os.path.realpath(out_dir)


def holds_lock(out_dir: str | Path) -> bool:
    """Whether this process holds the lock of ``out_dir`` (an acquired
    :class:`OutputFolderLock`)."""
    return _key(out_dir) in _HELD


def read_holder(out_dir: str | Path) -> dict | None:
    """The record in ``OUT/_lock``: ``{"pid", "host", "since"}`` of the last holder (whether or
    not it still holds the lock), or None if there is none or it is being written."""
    try:
        record = json.loads((Path(out_dir) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class OutputFolderLock:
    """The exclusive, non-blocking lock of one job's output folder (``OUT/_lock``).

    Use as a context manager (or :meth:`acquire` / :meth:`release`); the folder is created if
    needed. A second lock on the same folder, from another process or from this one, raises
    :class:`JobLockedError`.

    Args:
        out_dir: the job's output folder.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self._fd: int | None = None

    def acquire(self) -> "OutputFolderLock":
        """Take the lock without waiting and record this process in the lock file.

        Raises:
            JobLockedError: another job holds it.
            OSError: the folder or the lock file cannot be created or locked (e.g. ``ENOSPC``
                on a full disk, ``ENOLCK`` on a file system without locks).
        """
        if self._fd is not None:
            raise RuntimeError(f"the lock of {self.out_dir} is already held by this object")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise JobLockedError(self.out_dir, self._holder_record()) from None
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        except BaseException:
            os.close(fd)  # closing releases the flock, if it was taken
            raise
        self._fd = fd
        _HELD[_key(self.out_dir)] = self
        logger.debug("locked %s (%s)", self.out_dir, record)
        return self

    def _holder_record(self) -> dict | None:
        # the holder truncates, then writes its record: retry briefly if we read in between
        for _ in range(20):
            record = read_holder(self.out_dir)
            if record is not None:
                return record
            time.sleep(0.01)
        return None

    def release(self) -> None:
        """Release the lock (a no-op if not held); the lock file stays, emptied."""
        if self._fd is None:
            return
        _HELD.pop(_key(self.out_dir), None)
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # the record names holders only while they hold it
        except OSError as exc:
            logger.debug("could not clear %s: %s", self.out_dir / LOCK_FILE, exc)
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> "OutputFolderLock":
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
