"""The job lock: one run of a job at a time, named in the lock file, taken over from a dead holder."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from runner.errors import LockHeld, UsageError
from runner.files import json_object


class JobLock:
    """An exclusive flock on the state directory; the kernel drops it when its process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None  # the dead holder's record, if we replaced one

    def acquire(self) -> None:
        """Take the lock or raise LockHeld naming the process that has it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a directory, or a file we may not write, where the lock must be
            raise UsageError(
                f"{self.path}: cannot take the job lock ({exc.strerror}); it must be a file this user can "
                "write: remove it or fix its permissions"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
            raise LockHeld(
                f"another run of this job is in progress ({who}); wait for it to finish, or stop it, "
                f"then run again (lock: {self.path})"
            ) from None
        previous = _read_holder(fd)
        if previous.get("pid") and not _alive(int(previous["pid"]), previous.get("host")):
            self.took_over = previous  # a run that died without cleaning up; the flock was already free
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": dt.datetime.now(dt.UTC).isoformat()}
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def holder(self) -> dict[str, Any] | None:
        """The record of the live process holding the lock, or None; takes nothing, writes nothing."""
        if not self.path.exists():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {}
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        """Clear the record and drop the lock."""
        if self._fd is not None:
            with contextlib.suppress(OSError):  # an immutable or read-only folder: the flock still drops
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    return json_object(os.pread(fd, 4096, 0)) or {}


def _alive(pid: int, host: str | None) -> bool:
    if host and host != socket.gethostname():
        return True  # cannot tell for another machine; the flock is the real arbiter
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
