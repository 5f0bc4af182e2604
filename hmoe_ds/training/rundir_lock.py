"""One run per output directory: an exclusive ``flock`` held by rank 0 for the run's whole life.

With node-local checkpoints (``checkpoint.use_node_local_storage``) every node
has its own output directory, and each node's local rank 0 holds that one's lock.

Two runs writing into one ``run.output_dir`` interleave checkpoints, metrics and
``latest``; nothing else in the directory would notice. Rank 0 takes the lock
before it writes anything, and the error names the other run's pid, host and
start time. The lock is ``flock(2)`` on the directory itself, so the kernel
releases it when the process ends in any way, SIGKILL included: a lock can
never be left held by a dead run. Who holds it is written to
``<output_dir>/.hmoe_run.lock`` while held and removed on release; finding that
file with the lock free means the previous run was killed, which is noted and
taken over. ``flock`` is per machine on most network file systems, so the
guarantee covers runs launched from the same node (where rank 0 runs).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from hmoe_ds.errors import ExperimentError, RunDirLocked  # RunDirLocked re-exported from its old place

__all__ = ["HOLDER_FILE", "RunDirLock", "RunDirLocked", "holder_of"]

HOLDER_FILE = ".hmoe_run.lock"


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a run that has not said who it is yet"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')}; "
            f"{holder.get('command', '')})")


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def holder_of(output_dir: str | Path) -> dict[str, Any] | None:
    """Who holds ``output_dir`` now (its holder record), or ``None`` if no live run does. Takes no lock."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return None
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return _read_holder(directory / HOLDER_FILE)
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunDirLock:
    """The lock on one output directory; :meth:`acquire` once, :meth:`release` at the end (also at exit)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.directory = Path(output_dir)
        self._fd: int | None = None
        self._created = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, command: str = "") -> str | None:
        """Take the lock or raise :class:`RunDirLocked`; returns a note when a dead run's lock was taken over."""
        if self._fd is not None:
            return None
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            self._created = True  # removed again on release if the run never wrote into it
        if not self.directory.is_dir():
            raise ExperimentError(f"run.output_dir={self.directory} is a file; choose a directory path")
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = _read_holder(self.directory / HOLDER_FILE)
            raise RunDirLocked(
                f"run.output_dir={self.directory} is in use by another run: {_describe(holder)}. Two runs must not "
                "write into one directory: wait for it to end (or stop it), or choose another run.output_dir"
            ) from None
        self._fd = fd
        holder_path = self.directory / HOLDER_FILE
        stale = _read_holder(holder_path) if holder_path.exists() else None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command}
        tmp = holder_path.with_name(f"{HOLDER_FILE}.tmp.{os.getpid()}")
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, holder_path)
        atexit.register(self.release)
        if stale is not None:
            return (f"took over the lock of {self.directory} from {_describe(stale)}, which ended without "
                    "releasing it (killed?)")
        return None

    def release(self) -> None:
        """Drop the holder record and the lock (idempotent); an untouched directory we created goes too."""
        if self._fd is None:
            return
        try:
            (self.directory / HOLDER_FILE).unlink(missing_ok=True)
            if self._created and not any(self.directory.iterdir()):
                self.directory.rmdir()
        except OSError:
            pass  # the kernel drops the lock below whatever happened to the file
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
