"""The row map: which request answers which input row, recorded as a run renders.

    rows/rows-<n>.parquet    row position, id, request key and kept columns, in input order
    rows/fingerprint.json    what the map was built from (spec hash, input sizes and mtimes)
    rows/covered.json        the answer files that were seen to settle every key of the sealed map
    rows/queued/             scratch of the rendering run: the keys it queued (runner.plan.RequestKeys)

Why it is trusted only sealed, and the cover record: docs/decisions.md, "The store and the row map".
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.files import read_json_object, write_atomic, write_json_atomic

if TYPE_CHECKING:
    import polars as pl

    from runner.state.settled import SettledKeys

# polars (and the modules naming its columns) is imported by the methods that read or write the map's
# files, not here: `status` and a run's "will it send?" check read only its small JSON records.

ROW_MAP_FILE_ROWS = 100_000  # rows per row-map file: few files, bounded memory


def file_identities(paths: list[Path]) -> list[list[Any]]:
    """Each file's name, size and mtime: what tells a file that was replaced or changed from the one seen."""
    identities: list[list[Any]] = []
    for path in paths:
        st = path.stat()
        identities.append([path.name, st.st_size, st.st_mtime_ns])
    return identities


class RowMap:
    """One job's row map, in `rows_dir`: appended while a run renders, sealed when it has every row."""

    def __init__(self, rows_dir: Path) -> None:
        self.rows_dir = rows_dir
        self.scratch_dir = rows_dir / "queued"  # a rendering run's scratch files; removed by `reset`
        self._seq = 0
        self._buffer: list[pl.DataFrame] = []
        self._buffered = 0

    def files(self) -> list[Path]:
        """The map's files, in input order."""
        return sorted(self.rows_dir.glob("rows-*.parquet"))

    def fingerprint(self) -> dict[str, Any] | None:
        """What the sealed map was built from; None when it is not sealed."""
        return read_json_object(self.rows_dir / "fingerprint.json")

    def drop_if_torn(self) -> bool:
        """Forget the whole map if any of its files does not read (a torn write, a truncated copy): it
        is a cache of the input, rebuilt by the next render. True if it was dropped."""
        import polars as pl

        for path in self.files():
            try:
                pl.read_parquet_schema(path)
            except Exception:  # any failure to read the footer means the file is not whole
                self.reset()
                return True
        return False

    def is_current(self, fingerprint: dict[str, Any], settled: SettledKeys, samples: int = 1) -> bool:
        """True when the sealed map was built from these very inputs and this spec, and every key in it
        (every sample's key) is settled: then no row needs rendering and a run only writes the output."""
        from runner.records import KEY

        if self.fingerprint() != fingerprint:
            return False
        if settled.basis is not None and self._covered_by(settled.basis, samples):
            return True  # the keys were not even read
        if not settled.covers(self.request_lines(samples).select(KEY)):
            return False
        if settled.basis is not None:
            self.record_cover(settled.basis["parts"], [settled.basis["retry_failed"]], samples)
        return True

    def record_cover(self, parts: list[list[Any]], retry_failed: list[bool], samples: int) -> None:
        """Record that answer files `parts` (file_identities) settle every key of this sealed map, with
        --retry-failed at each value in `retry_failed` (both when every answer is ok)."""
        fingerprint = self.fingerprint()
        if fingerprint is None:
            return
        record = {"fingerprint": fingerprint, "samples": samples, "rows": file_identities(self.files()),
                  "parts": parts, "retry_failed": retry_failed}  # fmt: skip
        write_json_atomic(record, self.rows_dir / "covered.json")

    def _covered_by(self, basis: dict[str, Any], samples: int) -> bool:
        record = read_json_object(self.rows_dir / "covered.json")
        return (
            record is not None
            and record.get("fingerprint") == self.fingerprint()
            and record.get("samples") == samples
            and record.get("rows") == file_identities(self.files())
            and record.get("parts") == basis["parts"]
            and basis["retry_failed"] in record.get("retry_failed", [])
        )

    def unsettled(self, settled: SettledKeys, samples: int = 1) -> int | None:
        """How many requests of the last sealed map have no settled answer; None with no sealed map."""
        from runner.records import KEY

        if self.fingerprint() is None:
            return None
        keys = self.request_lines(samples).select(KEY).unique()
        return int(settled.missing(keys))

    def reset(self) -> None:
        """Forget the previous map; this run writes a new one as it renders."""
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        (self.rows_dir / "covered.json").unlink(missing_ok=True)
        (self.rows_dir / "fingerprint.json").unlink(missing_ok=True)
        for old in self.rows_dir.glob("*.parquet"):
            old.unlink()
        shutil.rmtree(self.scratch_dir, ignore_errors=True)  # left by a run that was killed
        self._seq = 0
        self._buffer, self._buffered = [], 0

    def add(self, rows: pl.DataFrame) -> None:
        """Record a batch of input rows (position, id, request key, kept columns), in input order."""
        self._buffer.append(rows)
        self._buffered += rows.height
        if self._buffered >= ROW_MAP_FILE_ROWS:
            self.write()

    def write(self) -> None:
        """Write what is buffered as the next map file."""
        if self._buffer:
            import polars as pl

            write_atomic(pl.concat(self._buffer), self.rows_dir / f"rows-{self._seq:08d}.parquet")
            self._seq += 1
            self._buffer, self._buffered = [], 0

    def seal(self, fingerprint: dict[str, Any]) -> None:
        """Mark the map complete (every input row rendered) and record what it was built from."""
        self.write()
        write_json_atomic(fingerprint, self.rows_dir / "fingerprint.json")

    def scan(self) -> pl.LazyFrame:
        """The whole map, one line per row."""
        import polars as pl

        self.write()
        return pl.scan_parquet(self.files())

    def request_lines(self, samples: int) -> pl.LazyFrame:
        """The map with one line per request: per row, or per (row, sample) when sampling."""
        from runner.job.prompts import expand_samples

        rows = self.scan()
        return expand_samples(rows, samples) if samples > 1 else rows

    def progress(
        self, result_parts: list[Path], samples: int = 1, total_rows: int | None = None
    ) -> dict[str, int] | None:
        """How many rows are answered ok, failed, or still pending (of `total_rows`, or of the rows the
        last run mapped); None if no run has mapped the input yet. A sampled row is ok when every
        sample is, failed when any sample did."""
        import polars as pl

        from runner.job.inputs import ROW
        from runner.records import KEY

        if not self.rows_dir.exists() or not self.files():
            return None
        lines = self.request_lines(samples).select(ROW, KEY)
        if result_parts:
            results = (
                pl.scan_parquet(result_parts)
                .group_by(KEY)
                .agg(
                    (pl.col("status") == "ok").any().alias("ok"), (pl.col("status") == "skipped").all().alias("skipped")
                )
            )
            lines = lines.join(results, on=KEY, how="left")
        else:
            lines = lines.with_columns(pl.lit(None, pl.Boolean).alias("ok"), pl.lit(None, pl.Boolean).alias("skipped"))
        per_row = lines.group_by(ROW).agg(
            pl.col("ok").fill_null(False).all().alias("all_ok"),  # a request with no result is not ok
            ((pl.col("ok") == False) & ~pl.col("skipped")).any().alias("any_failed"),  # noqa: E712
            pl.col("skipped").fill_null(False).all().alias("all_skipped"),  # input.nulls: skip
        )
        counts = per_row.select(
            pl.len().alias("rows"),
            pl.col("all_ok").sum().alias("ok"),
            pl.col("any_failed").sum().alias("failed"),
            pl.col("all_skipped").sum().alias("skipped"),
        ).collect()
        rows, ok, failed, skipped = (int(counts.item(0, c)) for c in ("rows", "ok", "failed", "skipped"))
        pending = max(rows, total_rows or 0) - ok - failed - skipped
        return {"ok": ok, "failed": failed, "skipped": skipped, "pending": pending}

    def recorded_progress(
        self, output_record: Path, part_names: list[str], fingerprint: dict[str, Any], samples: int = 1
    ) -> dict[str, int] | None:
        """What `progress` would say, read from the output's record instead of joining the map with the
        answers: the rows per status the output was last written with (runner.output.sinks keeps them
        in `output_record`), when it was written from this sealed map, built from `fingerprint` (the
        current spec and inputs, so no row of the input is missing from it), and from the answer files
        named `part_names` (the current ones). None when any of that differs: then `progress` it is.

        Answers are stored by request key and the map is the input rendered, so the same map and the
        same answer files give the same counts. For a job without samples only: a sampled row's output
        line is the samples' vote, not `progress`'s all-ok / any-failed.
        """
        sealed = self.fingerprint()
        if samples != 1 or sealed is None or sealed != fingerprint:
            return None
        record = read_json_object(output_record)
        if record is None:
            return None
        counts = record.get("counts")
        if record.get("row_map") != sealed or record.get("parts") != part_names or not isinstance(counts, dict):
            return None
        if not all(isinstance(n, int) for n in counts.values()):
            return None
        ok, skipped = counts.get("ok", 0), counts.get("skipped", 0)
        pending = counts.get("null", 0)  # a row with no answer (not written by a complete run; to be sure)
        failed = sum(counts.values()) - ok - skipped - pending
        return {"ok": ok, "failed": failed, "skipped": skipped, "pending": pending}
