"""The store: every answer durable within seconds, resumable after any crash, compacted at the end.

Layout of a job's state directory (beside the output, `.glm-batch/<job name>/`)::

    lock                        flock held by the running process (runner.state.lock)
    journal-<run>.jsonl         write-ahead journal: each answer appended the moment it arrives
    results/part-<run>-<n>.parquet   answers (ok and failed), keyed by request key, from every run
    rows/                       the row map (runner.state.rowmap)
    manifest.json               the last runs: spec hash, inputs, counts, tokens, duration, exit code
    output.json                 what the current output file was written from (runner.output.sinks)

An answer is appended to the journal with one write() as soon as it arrives, so a killed process loses
only the requests that were still in flight; every `checkpoint_seconds` the journal's answers become a
Parquet part and the journal is emptied. The next run folds any journal a dead run left into a part.
Every Parquet or JSON file is written to a temporary name, fsynced and renamed, so `kill -9` at any
instant leaves either the old state or the new one. A part file that still fails to read (a torn disk write) is moved to
`corrupt/` and its rows are sent again; it is never read as if it were whole.

Answers are keyed by request key, not by row: a row is done when its request has a durable ok answer
from any run, which is what makes re-runs, template edits and growing inputs cost only the new requests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from runner.errors import DiskFull, UsageError
from runner.records import (
    KEY,
    RESULT_SCHEMA,
    Result,
    journal_line,
    result_from_json,
    results_frame,
    scan_results,
    with_valid_unicode,
)
from runner.state.files import (
    NO_SPACE,
    fsync_rename,
    no_space,
    read_manifest,
    space_checked,
    write_atomic,
    write_json_atomic,
)
from runner.state.lock import JobLock
from runner.state.rowmap import RowMap
from runner.state.settled import SettledKeys as SettledKeys  # re-exported: callers import it from here

BUCKET_ROWS = 100_000  # results per bucket when compacting and joining


class Buckets:
    """A split of request keys into `count` buckets of about BUCKET_ROWS results, by leading hex digits.

    Keys are sha256 hex, so the leading digits spread evenly. Compacting and joining one bucket at a
    time bounds memory by the bucket, not by the job: a 10M-row job finishes like a 100k-row one.
    """

    def __init__(self, count: int) -> None:
        self.count = count

    @classmethod
    def for_rows(cls, rows: int) -> Buckets:
        """Enough buckets for `rows` results (at most 256: two hex digits)."""
        return cls(max(1, min(256, -(-rows // BUCKET_ROWS))))

    def member(self, bucket: int) -> pl.Expr:
        """True for the keys in `bucket`."""
        lead = pl.col(KEY).str.slice(0, 2).str.to_integer(base=16, strict=False).fill_null(0)
        return lead % self.count == bucket


class Store:
    """One job's durable state for one run: the lock, the answers (journal and parts), the row map,
    and the records of runs and estimates."""

    def __init__(self, state_dir: Path, run_id: str, writer: str | None = None, rows: str = "rows") -> None:
        self.state_dir = state_dir
        self.run_id = run_id
        # One of several processes writing answers for one run (a Ray actor): its journal and parts are
        # named `<run>-<writer>` so writers never share a file; the answers still carry the run's id.
        self._files_id = f"{run_id}-{writer}" if writer else run_id
        self.results_dir = state_dir / "results"
        self.rows = RowMap(state_dir / rows)  # a limited run keeps its own (Job.row_map), the job's stays
        self.lock = JobLock(state_dir / "lock")
        self.corrupt: list[Path] = []  # parts found unreadable at this open (and moved to corrupt/)
        self.quarantined: list[Path] = []  # every part ever set aside in corrupt/
        self._pending: list[Result] = []
        self._part_seq = 0
        self._journal: int | None = None
        self._journal_path = state_dir / f"journal-{self._files_id}.jsonl"
        self._journal_size = 0  # bytes of whole lines in the journal: where a torn write is cut back to
        self._journal_kept = False
        self.row_map_dropped = False  # the row map was torn and has been dropped (it is rebuilt)
        self.recovered = 0  # answers recovered from journals of runs that died

    # ---- opening --------------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the job, sweep temp files left by a crash, fold dead runs' journals into parts, quarantine
        unreadable parts, and drop a torn row map (a cache, rebuilt as the run renders)."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            (self.state_dir / "results").mkdir(exist_ok=True)
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise no_space(self.state_dir) from None
            raise UsageError(
                f"{self.state_dir}: cannot use it as the job's state directory ({exc.strerror}); "
                "fix its permissions or set output.state_dir"
            ) from None
        self.lock.acquire()
        for tmp in self.state_dir.rglob("*.tmp"):
            tmp.unlink()
        for journal in sorted(self.state_dir.glob("journal-*.jsonl")):
            self.recover(journal)
        for part in sorted(self.results_dir.glob("*.parquet")):
            try:
                # A torn write loses the footer, so reading the footer is the check (and it is cheap).
                columns = pl.read_parquet_schema(part).keys()
                if KEY not in columns or not columns <= RESULT_SCHEMA.keys():  # older parts lack newer columns
                    raise ValueError("unexpected columns")
            except Exception:  # any failure to read means the file is not whole; never trust it
                self._quarantine(part)
        self.quarantined = sorted((self.state_dir / "corrupt").glob("*.parquet"))
        self.rows.rows_dir.mkdir(exist_ok=True)
        self.row_map_dropped = self.rows.drop_if_torn()
        self.open_journal()

    def open_journal(self) -> None:
        """Start this run's journal. A writer beside the run's driver (which holds the lock and swept the
        directory) calls only this, not `open`."""
        self._journal = os.open(self._journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def recover(self, journal: Path) -> None:
        """Turn a dead writer's journal into a part; a torn last line (the kill came mid-write) is dropped."""
        results = []
        for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                results.append(result_from_json(line))
            except (ValueError, TypeError):
                continue
        if results:
            run_id = journal.stem.removeprefix("journal-")
            write_atomic(results_frame(results, run_id), self.results_dir / f"part-{run_id}-recovered.parquet")
            self.recovered += len(results)
        journal.unlink()

    def _quarantine(self, part: Path) -> None:
        dest = self.state_dir / "corrupt"
        dest.mkdir(exist_ok=True)
        part.rename(dest / part.name)
        self.corrupt.append(dest / part.name)

    def close(self) -> None:
        """Flush what is buffered, remove the empty journal and release the lock (safe to call twice).

        The row map rendered so far is written too: a run that stopped early leaves it unsealed, so
        the next run does not trust it, but `glm-batch status` can count the rows it holds."""
        try:
            self.flush()
            self.rows.write()
        except DiskFull:
            # The answers stay in the journal, which the next run folds into a part; keep it.
            self._journal_kept = True
        finally:
            if self._journal is not None:
                os.close(self._journal)
                self._journal = None
                if not self._journal_kept:
                    self._journal_path.unlink(missing_ok=True)
            self.lock.release()

    def result_parts(self) -> list[Path]:
        """Every readable results part, oldest first."""
        return sorted(self.results_dir.glob("*.parquet"))

    def settled_keys(self, *, retry_failed: bool) -> SettledKeys:
        """Keys that need no request: answered ok, or failed for good (unless `retry_failed`)."""
        parts = self.result_parts()
        if not parts:
            return SettledKeys(pl.Series(KEY, [], dtype=pl.String))
        settled = pl.col("status") == "ok"
        if not retry_failed:
            settled = settled | ~pl.col("retryable")
        keys = pl.scan_parquet(parts).filter(settled).select(KEY).unique().sort(KEY).collect()
        return SettledKeys(keys.get_column(KEY))

    # ---- writing --------------------------------------------------------------------------------

    def add(self, result: Result) -> None:
        """Journal one result at once (it survives a kill from here on) and buffer it for the next part."""
        assert self._journal is not None, "Store.open() first"
        try:
            data = journal_line(result)
        except orjson.JSONEncodeError:  # a lone surrogate in its text: kept as U+FFFD, not a crash
            result = with_valid_unicode(result)
            data = journal_line(result)
        try:
            written = os.write(self._journal, data)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            written = -1
        if written != len(data):
            # Cut a torn line off again: glued to the next answer's line it would make both unreadable.
            os.ftruncate(self._journal, self._journal_size)
            raise no_space(self._journal_path)
        self._journal_size += written
        self._pending.append(result)

    def add_part(self, frame: pl.DataFrame, label: str) -> None:
        """Keep answers that came from elsewhere (salvaged from an output) as a part of their own."""
        write_atomic(frame, self.results_dir / f"part-{self.run_id}-{label}.parquet")

    @property
    def buffered(self) -> int:
        """Results not yet on disk."""
        return len(self._pending)

    def flush(self) -> None:
        """Write buffered results as one new part file."""
        if not self._pending:
            return
        frame = results_frame(self._pending, self.run_id)
        write_atomic(frame, self.results_dir / f"part-{self._files_id}-{self._part_seq:06d}.parquet")
        self._part_seq += 1
        self._pending = []
        if self._journal is not None:
            # Everything journalled is now in the part. A kill between the rename and this truncate
            # leaves the same answers twice, which is harmless: answers are deduplicated by key.
            os.ftruncate(self._journal, 0)
            self._journal_size = 0

    # ---- finishing ------------------------------------------------------------------------------

    def progress(self, samples: int = 1, total_rows: int | None = None) -> dict[str, int] | None:
        """Rows answered ok, failed and pending, from the row map and the answers (see RowMap.progress)."""
        return self.rows.progress(self.result_parts(), samples, total_rows)

    def _compacted(self, parts: list[Path]) -> bool:
        return bool(parts) and all("-compact-" in p.name for p in parts)

    def compact_results(self) -> list[Path]:
        """Fold all parts into compact buckets holding one result per key (an ok answer over an error,
        the newest over older ones); return the bucket files. Nothing to do when already compact."""
        parts = self.result_parts()
        if self._compacted(parts) or not parts:
            return parts
        results = scan_results(parts)
        buckets = Buckets.for_rows(int(results.select(pl.len()).collect().item()))
        written = []
        for b in range(buckets.count):
            target = self.results_dir / f"part-{self.run_id}-compact-{b:03d}.parquet"
            tmp = target.with_name(target.name + ".tmp")
            with space_checked(target):
                (
                    results.filter(buckets.member(b))
                    .with_columns((pl.col("status") == "ok").alias("_ok"))
                    .sort([KEY, "_ok", "finished_at"])
                    .unique(subset=[KEY], keep="last", maintain_order=True)
                    .drop("_ok")
                    .sink_parquet(tmp)
                )
            fsync_rename(tmp, target)
            written.append(target)
        for part in parts:
            part.unlink()
        return written

    # ---- the manifest ---------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any]:
        """The manifest, or an empty one for a job that never ran."""
        return read_manifest(self.state_dir)

    def read_estimate(self) -> dict[str, Any] | None:
        """The last `glm-batch estimate` report for this job, if there is one."""
        try:
            data = json.loads((self.state_dir / "estimate.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def write_estimate(self, report: dict[str, Any]) -> None:
        """Keep an estimate so the next run can say how close it was."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(report, self.state_dir / "estimate.json")

    def record_run(self, run: dict[str, Any], keep: int = 50) -> None:
        """Append this run's record to the manifest (keeping the last `keep`)."""
        manifest = self.read_manifest()
        manifest["runs"] = [*manifest.get("runs", []), run][-keep:]
        write_json_atomic(manifest, self.state_dir / "manifest.json")
