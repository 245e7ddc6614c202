"""All-or-nothing file writes: a path is either absent, the old file, or the complete new one.

Every Parquet or JSON file the project writes goes through here: temporary name, fsync, rename, fsync
of the directory, so `kill -9` or a power cut at any instant leaves the old state or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import DiskFull

if TYPE_CHECKING:
    import polars as pl

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(path: Path) -> DiskFull:
    """The error for a write to `path` that found no space."""
    return DiskFull(
        f"no space left on the device holding {path}; free some space there, then run the same command again"
    )


@contextlib.contextmanager
def space_checked(path: Path) -> Iterator[None]:
    """Turn a failed write for lack of space (OSError ENOSPC/EDQUOT, or polars' wrapping of it) into
    DiskFull naming `path`; the temporary file it may have left is removed."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise no_space(path) from None
        raise
    except Exception as exc:
        # polars reports an I/O error of its own writer as a ComputeError. Looked up, not imported: a
        # module that writes only JSON (the batch book, read by `status`) must not load polars, and an
        # error polars raised means polars is loaded.
        polars_errors = sys.modules.get("polars.exceptions")
        full = "No space left" in str(exc) or "Disk quota" in str(exc)
        if full and polars_errors is not None and isinstance(exc, polars_errors.ComputeError):
            raise no_space(path) from None
        raise


def write_atomic(frame: pl.DataFrame, path: Path) -> None:
    """Write Parquet so that `path` is either absent or complete: temp name, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with space_checked(path):
            frame.write_parquet(tmp)
            fsync_rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_rename(tmp: Path, path: Path) -> None:
    """Make `tmp` durable and move it to `path` in one step (and make the move durable)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_json_atomic(data: dict[str, Any], path: Path) -> None:
    """Write JSON with the same all-or-nothing guarantee as the part files."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with space_checked(path):
            tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
            fsync_rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(state_dir: Path) -> dict[str, Any]:
    """A job's manifest (the runs it records), or an empty one for a job that never ran or whose
    manifest is not JSON. Here, beside the writes, so `status` reads it without the store (polars)."""
    path = state_dir / "manifest.json"
    if not path.exists():
        return {"runs": []}
    with contextlib.suppress(json.JSONDecodeError):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return {"runs": []}
