"""The output sink: where a finished output goes, and whether what it holds was written from the same
state, so a finished job's re-run rewrites nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from runner.files import fsync_rename, read_json_object, space_checked, write_json_atomic

ROW_GROUP_ROWS = 20_000  # small row groups let readers skip what they do not need


class ParquetSink:
    """One Parquet file, written atomically; its record (`output.json` in the state directory) holds
    the basis it was written from and the file's size and mtime, so a hand-edited file is rewritten."""

    def __init__(self, path: Path, state_dir: Path) -> None:
        self.path = path
        self._record = state_dir / "output.json"

    def current_counts(self, basis: dict[str, Any]) -> dict[str, int] | None:
        """Rows per status of the output already written from `basis`, or None if there is none."""
        last = read_json_object(self._record)
        try:
            st = self.path.stat()
        except OSError:
            return None
        if last is None or last.get("output") != str(self.path) or {k: last.get(k) for k in basis} != basis:
            return None
        if [st.st_size, st.st_mtime_ns] != last.get("file"):
            return None
        counts = last.get("counts")
        return counts if isinstance(counts, dict) else None

    def write(self, frame: pl.LazyFrame, basis: dict[str, Any]) -> dict[str, int]:
        """Write `frame` as the output (all or nothing) and return its rows per status."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with space_checked(self.path):
                frame.sink_parquet(tmp, row_group_size=ROW_GROUP_ROWS)
                fsync_rename(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        statuses = pl.scan_parquet(self.path).group_by("status").agg(pl.len().alias("rows")).collect()
        counts = dict(zip(statuses.get_column("status").to_list(), statuses.get_column("rows").to_list(), strict=True))
        st = self.path.stat()
        record = {"output": str(self.path), **basis, "file": [st.st_size, st.st_mtime_ns], "counts": counts}
        write_json_atomic(record, self._record)
        return counts
