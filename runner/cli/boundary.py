"""The command line's outer edge: standard streams whose failure (closed, a broken pipe, a full device)
never changes a run's outcome, and `crash`: an unexpected exception as one line and a crash log, exit 70."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, TextIO

CRASH_EXIT = 70  # EX_SOFTWARE (sysexits.h): an internal error, not the job's fault


class _QuietStream(io.TextIOBase):
    """A text stream over stdout or stderr whose writes never raise: on the first failure (EPIPE,
    ENOSPC, EIO, a character the encoding cannot spell) the file descriptor is pointed at /dev/null,
    so this and every later write (ours, rich's, a C library's) goes nowhere, quietly."""

    def __init__(self, inner: TextIO) -> None:
        super().__init__()
        self._inner = inner

    def _silence(self) -> None:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._inner.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass
        with contextlib.suppress(OSError, ValueError):  # what the failed write left now drains into /dev/null
            self._inner.flush()

    def write(self, s: str) -> int:
        try:
            self._inner.write(s)
        except (OSError, ValueError, UnicodeError):
            self._silence()
        return len(s)

    def flush(self) -> None:
        try:
            self._inner.flush()
        except (OSError, ValueError):
            self._silence()

    def isatty(self) -> bool:
        try:
            return self._inner.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._inner.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._inner.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._inner.errors

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def ensure_utf8_mode() -> None:
    """Re-run this very command in Python's UTF-8 mode when the locale would have it decode file names
    as ASCII (`LC_ALL=C` where the C.UTF-8 locale is missing, or PYTHONUTF8=0). In that mode a non-ASCII
    path reaches Python as surrogate escapes, which polars cannot open. Once only (PYTHONUTF8 says so)."""
    if sys.flags.utf8_mode or sys.getfilesystemencoding().lower().replace("-", "") == "utf8":
        return
    if os.environ.get("PYTHONUTF8") == "1":
        return
    os.environ["PYTHONUTF8"] = "1"
    with contextlib.suppress(OSError):  # if it cannot, carry on as we are: an ASCII path still works
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def harden_streams() -> None:
    """Make the process's standard streams unable to change a run's outcome (see the module doc)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:  # closed by the caller (`2>&-`): hold the slot with /dev/null
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdin is None:
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if stream is None:
            stream = open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        elif isinstance(stream, io.TextIOWrapper):
            # Keep the locale's encoding (ASCII under PYTHONIOENCODING=ascii) but never fail on a character
            # it cannot spell: a non-ASCII path is printed escaped rather than ending a paid run.
            stream.reconfigure(errors="backslashreplace")
        setattr(sys, name, _QuietStream(stream))


def crash_dir() -> Path:
    """Where crash logs go: $XDG_STATE_HOME/glm-batch/crashes (default ~/.local/state/...)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "glm-batch" / "crashes"


def crash(exc: BaseException) -> int:
    """Report an unexpected exception as one line plus a crash log; return the exit code (70)."""
    now = dt.datetime.now(dt.UTC)
    name = f"crash-{now:%Y%m%dT%H%M%S}-{os.getpid()}.log"
    text = f"glm-batch crash at {now.isoformat()}\nargv: {sys.argv!r}\npython: {sys.version}\n\n" + "".join(
        traceback.format_exception(exc)
    )
    from runner.errors import GlmBatchError
    from runner.files import write_text

    where: str | None = None
    for folder in (crash_dir(), Path(tempfile.gettempdir()) / "glm-batch-crashes"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            where = str(write_text(folder / name, text, key="crash log", exclusive=True))
            break
        except (OSError, GlmBatchError):
            continue
    what = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    log = f"the traceback is in {where}" if where is not None else "no crash log could be written"
    print(f"glm-batch: internal error (exit {CRASH_EXIT}): {what[:300]}; {log}; please report it", file=sys.stderr)
    return CRASH_EXIT
