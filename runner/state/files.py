"""All-or-nothing file writes: a path is either absent, the old file, or the complete new one.

Every Parquet or JSON file the project writes goes through here: temporary name, fsync, rename, fsync
of the directory, so `kill -9` or a power cut at any instant leaves the old state or the new one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl


def write_atomic(frame: pl.DataFrame, path: Path) -> None:
    """Write Parquet so that `path` is either absent or complete: temp name, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + ".tmp")
    frame.write_parquet(tmp)
    fsync_rename(tmp, path)


def fsync_rename(tmp: Path, path: Path) -> None:
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
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    fsync_rename(tmp, path)
