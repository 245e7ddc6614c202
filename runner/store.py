"""The store: every answer durable within seconds, resumable after any crash, compacted at the end.

Layout of a job's state directory (beside the output, `.glm-batch/<job name>/`)::

    lock                        flock held by the running process; names its pid and host
    journal-<run>.jsonl         write-ahead journal: each answer appended the moment it arrives
    results/part-<run>-<n>.parquet   answers (ok and failed), keyed by request key, from every run
    rows/rows-<n>.parquet       this run's input map: row position, id, request key, kept columns
    manifest.json               the last runs: spec hash, inputs, counts, tokens, duration, exit code

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

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

import polars as pl

from runner.errors import LockHeld
from runner.inputs import ID, ROW
from runner.records import RESULT_SCHEMA, Result, result_from_json, result_to_json, results_frame

KEY = "key"
# The answer columns of the output, in the order people read them; the id and kept columns come first.
OUTPUT_COLUMNS = (
    "response_text",
    "thinking",
    "stop_reason",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "latency_ms",
    "attempts",
    "status",
    "error_type",
    "error_message",
    "request_id",
    "model",
    "finished_at",
    "request_key",
    "run_id",
)


def write_atomic(frame: pl.DataFrame, path: Path) -> None:
    """Write Parquet so that `path` is either absent or complete: temp name, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + ".tmp")
    frame.write_parquet(tmp)
    _fsync_rename(tmp, path)


def _fsync_rename(tmp: Path, path: Path) -> None:
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
    _fsync_rename(tmp, path)


class JobLock:
    """An exclusive flock on the state directory; the kernel drops it when its process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None  # the dead holder's record, if we replaced one

    def acquire(self) -> None:
        """Take the lock or raise LockHeld naming the process that has it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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

    def release(self) -> None:
        """Clear the record and drop the lock."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


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


class Store:
    """One job's durable state for one run: the lock, the row map, the results, the final output."""

    def __init__(self, state_dir: Path, output_path: Path, run_id: str) -> None:
        self.state_dir = state_dir
        self.output_path = output_path
        self.run_id = run_id
        self.results_dir = state_dir / "results"
        self.rows_dir = state_dir / "rows"
        self.lock = JobLock(state_dir / "lock")
        self.corrupt: list[Path] = []  # parts found unreadable at open
        self._pending: list[Result] = []
        self._part_seq = 0
        self._rows_seq = 0
        self._journal: int | None = None
        self.recovered = 0  # answers recovered from journals of runs that died

    # ---- opening --------------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the job, sweep temp files left by a crash, quarantine unreadable parts, reset the row map."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        self.results_dir.mkdir(exist_ok=True)
        for tmp in self.state_dir.rglob("*.tmp"):
            tmp.unlink()
        for journal in sorted(self.state_dir.glob("journal-*.jsonl")):
            self._recover(journal)
        for part in sorted(self.results_dir.glob("*.parquet")):
            try:
                pl.read_parquet(part, columns=[KEY, "status"])
            except Exception:  # any failure to read means the file is not whole; never trust it
                self._quarantine(part)
        if self.rows_dir.exists():
            for old in self.rows_dir.glob("*.parquet"):
                old.unlink()
        self.rows_dir.mkdir(exist_ok=True)
        journal = self.state_dir / f"journal-{self.run_id}.jsonl"
        self._journal = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _recover(self, journal: Path) -> None:
        """Turn a dead run's journal into a part; a torn last line (the kill came mid-write) is dropped."""
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
        """Flush what is buffered, remove the empty journal and release the lock (safe to call twice)."""
        self.flush()
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None
            (self.state_dir / f"journal-{self.run_id}.jsonl").unlink(missing_ok=True)
        self.lock.release()

    def result_parts(self) -> list[Path]:
        """Every readable results part, oldest first."""
        return sorted(self.results_dir.glob("*.parquet"))

    def settled_keys(self, *, retry_failed: bool) -> pl.DataFrame:
        """Keys that need no request: answered ok, or failed for good (unless `retry_failed`)."""
        parts = self.result_parts()
        if not parts:
            return pl.DataFrame({KEY: []}, schema={KEY: pl.String})
        settled = pl.col("status") == "ok"
        if not retry_failed:
            settled = settled | ~pl.col("retryable")
        return pl.scan_parquet(parts).filter(settled).select(KEY).unique().collect()

    # ---- writing --------------------------------------------------------------------------------

    def add_rows(self, rows: pl.DataFrame) -> None:
        """Record a batch of this run's input rows (position, id, request key, kept columns) durably."""
        write_atomic(rows, self.rows_dir / f"rows-{self._rows_seq:08d}.parquet")
        self._rows_seq += 1

    def add(self, result: Result) -> None:
        """Journal one result at once (it survives a kill from here on) and buffer it for the next part."""
        assert self._journal is not None, "Store.open() first"
        os.write(self._journal, (result_to_json(result) + "\n").encode())
        self._pending.append(result)

    @property
    def buffered(self) -> int:
        """Results not yet on disk."""
        return len(self._pending)

    def flush(self) -> None:
        """Write buffered results as one new part file."""
        if not self._pending:
            return
        frame = results_frame(self._pending, self.run_id)
        write_atomic(frame, self.results_dir / f"part-{self.run_id}-{self._part_seq:06d}.parquet")
        self._part_seq += 1
        self._pending = []
        if self._journal is not None:
            # Everything journalled is now in the part. A kill between the rename and this truncate
            # leaves the same answers twice, which is harmless: answers are deduplicated by key.
            os.ftruncate(self._journal, 0)

    # ---- finishing ------------------------------------------------------------------------------

    def _best_results(self) -> pl.LazyFrame:
        """One result per key: an ok answer over an error, the newest over older ones."""
        return (
            pl.scan_parquet(self.result_parts(), schema=RESULT_SCHEMA)
            .with_columns((pl.col("status") == "ok").alias("_ok"))
            .sort([KEY, "_ok", "finished_at"])
            .unique(subset=[KEY], keep="last", maintain_order=True)
            .drop("_ok")
        )

    def unanswered_rows(self) -> int:
        """How many of this run's input rows have no result at all yet."""
        rows = pl.scan_parquet(sorted(self.rows_dir.glob("*.parquet")))
        answered = pl.scan_parquet(self.result_parts(), schema=RESULT_SCHEMA).select(KEY).unique()
        return int(rows.join(answered, on=KEY, how="anti").select(pl.len()).collect().item())

    def finalize(self, id_name: str) -> pl.DataFrame:
        """Compact answers into the output Parquet in input order (atomically); return status counts."""
        rows = pl.scan_parquet(sorted(self.rows_dir.glob("*.parquet")))
        kept = [c for c in rows.collect_schema().names() if c not in (ROW, ID, KEY)]
        output = (
            rows.join(self._best_results(), on=KEY, how="left", maintain_order="left")
            .sort(ROW)
            .rename({ID: id_name, KEY: "request_key"})
            .select(id_name, *kept, *OUTPUT_COLUMNS)
        )
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.output_path.with_name(self.output_path.name + ".tmp")
        output.sink_parquet(tmp)
        _fsync_rename(tmp, self.output_path)
        self._compact_results()
        return pl.scan_parquet(self.output_path).group_by("status").agg(pl.len().alias("rows")).collect()

    def _compact_results(self) -> None:
        """Fold all parts into one, so the next resume reads one file instead of thousands."""
        parts = self.result_parts()
        if len(parts) <= 1:
            return
        target = self.results_dir / f"part-{self.run_id}-compact.parquet"
        frame = self._best_results().collect()
        write_atomic(frame, target)
        for part in parts:
            if part != target:
                part.unlink()

    # ---- the manifest ---------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any]:
        """The manifest, or an empty one for a job that never ran."""
        path = self.state_dir / "manifest.json"
        if not path.exists():
            return {"runs": []}
        with contextlib.suppress(json.JSONDecodeError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return data
        return {"runs": []}

    def record_run(self, run: dict[str, Any], keep: int = 50) -> None:
        """Append this run's record to the manifest (keeping the last `keep`)."""
        manifest = self.read_manifest()
        manifest["runs"] = [*manifest.get("runs", []), run][-keep:]
        write_json_atomic(manifest, self.state_dir / "manifest.json")
