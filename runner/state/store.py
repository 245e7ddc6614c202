"""The store: every answer durable within seconds, resumable after any crash, compacted at the end.

Layout of a job's state directory (beside the output, `.glm-batch/<job name>/`)::

    lock                        flock held by the running process; names its pid and host
    journal-<run>.jsonl         write-ahead journal: each answer appended the moment it arrives
    results/part-<run>-<n>.parquet   answers (ok and failed), keyed by request key, from every run
    rows/rows-<n>.parquet       the input map: row position, id, request key, kept columns
    rows/fingerprint.json       what the map was built from (spec hash, input sizes and mtimes)
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
from runner.job.inputs import ID, ROW
from runner.output import voting
from runner.records import KEY, RESULT_SCHEMA, Result, result_from_json, result_to_json, results_frame

ROW_MAP_FILE_ROWS = 100_000  # rows per row-map file: few files, bounded memory
BUCKET_ROWS = 100_000  # results per bucket when compacting and joining
OUTPUT_CHUNK_ROWS = 50_000  # rows put in order at a time when writing the output
ROW_GROUP_ROWS = 20_000  # small row groups let row-range reads skip what they do not need
# The answer columns of the output, in the order people read them; the id and kept columns come first.
OUTPUT_COLUMNS = (
    "response_text",
    "thinking",
    "stop_reason",
    "input_tokens",
    "output_tokens",
    "thinking_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cost",
    "latency_ms",
    "attempts",
    "repairs",
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


class SettledKeys:
    """The request keys that need no sending, sorted, with a vectorised membership test.

    A sorted Series and binary search: each batch costs O(batch * log N), and nothing is rebuilt per
    batch (a join would hash all N keys again for every batch of a million-row resume).
    """

    def __init__(self, sorted_keys: pl.Series) -> None:
        self._keys = sorted_keys
        self.size = sorted_keys.len()

    @classmethod
    def none(cls) -> SettledKeys:
        """No key is settled (a --fresh run)."""
        return cls(pl.Series(KEY, [], dtype=pl.String))

    def covers(self, keys: pl.LazyFrame) -> bool:
        """Is every key in `keys` settled? (A hash anti-join: for a whole map, not a batch.)"""
        missing = keys.join(self._keys.to_frame(KEY).lazy(), on=KEY, how="anti").select(pl.len()).collect()
        return int(missing.item()) == 0

    def contains(self, keys: pl.Series) -> pl.Series:
        """A boolean Series: is each of `keys` settled?"""
        if self.size == 0:
            return pl.Series([False] * keys.len(), dtype=pl.Boolean)
        pos = self._keys.search_sorted(keys, side="left").clip(0, self.size - 1)
        return self._keys.gather(pos) == keys


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
        self._rows: list[pl.DataFrame] = []  # row map waiting to be written
        self._rows_buffered = 0
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
                # A torn write loses the footer, so reading the footer is the check (and it is cheap).
                if pl.read_parquet_schema(part).keys() != RESULT_SCHEMA.keys():
                    raise ValueError("unexpected columns")
            except Exception:  # any failure to read means the file is not whole; never trust it
                self._quarantine(part)
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
        """Flush what is buffered, remove the empty journal and release the lock (safe to call twice).

        The row map rendered so far is written too: a run that stopped early leaves it unsealed, so
        the next run does not trust it, but `glm-batch status` can count the rows it holds."""
        self.flush()
        self._write_rows()
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None
            (self.state_dir / f"journal-{self.run_id}.jsonl").unlink(missing_ok=True)
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

    # ---- the row map ----------------------------------------------------------------------------

    def row_map_is_current(self, fingerprint: dict[str, Any], settled: SettledKeys, samples: int = 1) -> bool:
        """True when the last complete row map was built from these very inputs and this spec, and every
        key in it (every sample's key) is settled: then no row needs rendering and the run only has to
        write the output."""
        path = self.rows_dir / "fingerprint.json"
        try:
            if json.loads(path.read_text(encoding="utf-8")) != fingerprint:
                return False
        except (OSError, json.JSONDecodeError):
            return False
        return settled.covers(self._request_lines(samples).select(KEY))

    def _request_lines(self, samples: int) -> pl.LazyFrame:
        """The row map with one line per request: per row, or per (row, sample) when sampling."""
        rows = self._row_map()
        return voting.expand(rows, samples) if samples > 1 else rows

    def row_progress(self, samples: int = 1, total_rows: int | None = None) -> dict[str, int] | None:
        """How many rows are answered ok, failed, or still pending (of `total_rows`, or of the rows the
        last run mapped); None if no run has mapped the input yet. A sampled row is ok when every
        sample is, failed when any sample did."""
        if not self.rows_dir.exists() or not any(self.rows_dir.glob("rows-*.parquet")):
            return None
        lines = self._request_lines(samples).select(ROW, KEY)
        parts = self.result_parts()
        if parts:
            results = pl.scan_parquet(parts).group_by(KEY).agg((pl.col("status") == "ok").any().alias("ok"))
            lines = lines.join(results, on=KEY, how="left")
        else:
            lines = lines.with_columns(pl.lit(None, pl.Boolean).alias("ok"))
        per_row = lines.group_by(ROW).agg(
            pl.col("ok").fill_null(False).all().alias("all_ok"),  # a request with no result is not ok
            (pl.col("ok") == False).any().alias("any_failed"),  # noqa: E712
        )
        counts = per_row.select(
            pl.len().alias("rows"), pl.col("all_ok").sum().alias("ok"), pl.col("any_failed").sum().alias("failed")
        ).collect()
        rows, ok, failed = (int(counts.item(0, c)) for c in ("rows", "ok", "failed"))
        return {"ok": ok, "failed": failed, "pending": max(rows, total_rows or 0) - ok - failed}

    def reset_row_map(self) -> None:
        """Forget the previous map; this run writes a new one as it renders."""
        (self.rows_dir / "fingerprint.json").unlink(missing_ok=True)
        for old in self.rows_dir.glob("*.parquet"):
            old.unlink()
        self._rows_seq = 0
        self._rows, self._rows_buffered = [], 0

    def add_rows(self, rows: pl.DataFrame) -> None:
        """Record a batch of input rows (position, id, request key, kept columns), in input order.

        The map is written in large files: it is only trusted once sealed, and a run that dies before
        sealing it leaves a map the next run throws away, so it needs no per-batch durability.
        """
        self._rows.append(rows)
        self._rows_buffered += rows.height
        if self._rows_buffered >= ROW_MAP_FILE_ROWS:
            self._write_rows()

    def _write_rows(self) -> None:
        if self._rows:
            write_atomic(pl.concat(self._rows), self.rows_dir / f"rows-{self._rows_seq:08d}.parquet")
            self._rows_seq += 1
            self._rows, self._rows_buffered = [], 0

    def seal_row_map(self, fingerprint: dict[str, Any]) -> None:
        """Mark the map complete (every input row rendered) and record what it was built from."""
        self._write_rows()
        write_json_atomic(fingerprint, self.rows_dir / "fingerprint.json")

    # ---- writing --------------------------------------------------------------------------------

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

    def _compacted(self, parts: list[Path]) -> bool:
        return bool(parts) and all("-compact-" in p.name for p in parts)

    def compact_results(self) -> list[Path]:
        """Fold all parts into compact buckets holding one result per key (an ok answer over an error,
        the newest over older ones); return the bucket files. Nothing to do when already compact."""
        parts = self.result_parts()
        if self._compacted(parts) or not parts:
            return parts
        results = pl.scan_parquet(parts, schema=RESULT_SCHEMA)
        buckets = Buckets.for_rows(int(results.select(pl.len()).collect().item()))
        written = []
        for b in range(buckets.count):
            target = self.results_dir / f"part-{self.run_id}-compact-{b:03d}.parquet"
            tmp = target.with_name(target.name + ".tmp")
            (
                results.filter(buckets.member(b))
                .with_columns((pl.col("status") == "ok").alias("_ok"))
                .sort([KEY, "_ok", "finished_at"])
                .unique(subset=[KEY], keep="last", maintain_order=True)
                .drop("_ok")
                .sink_parquet(tmp)
            )
            _fsync_rename(tmp, target)
            written.append(target)
        for part in parts:
            part.unlink()
        return written

    def _row_map(self) -> pl.LazyFrame:
        self._write_rows()
        return pl.scan_parquet(sorted(self.rows_dir.glob("rows-*.parquet")))

    def _output_record(self, parts: list[Path]) -> dict[str, Any]:
        """What an output was built from: the row map's fingerprint and the answer files."""
        try:
            fingerprint = json.loads((self.rows_dir / "fingerprint.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            fingerprint = None
        return {"output": str(self.output_path), "row_map": fingerprint, "parts": [p.name for p in parts]}

    def _output_is_current(self, record: dict[str, Any]) -> dict[str, int] | None:
        """The status counts of the existing output, if it was written from exactly this state."""
        try:
            last = json.loads((self.state_dir / "output.json").read_text(encoding="utf-8"))
            st = self.output_path.stat()
        except (OSError, json.JSONDecodeError):
            return None
        if record["row_map"] is None or {k: last.get(k) for k in record} != record:
            return None
        if [st.st_size, st.st_mtime_ns] != last.get("file"):
            return None
        counts = last.get("counts")
        return counts if isinstance(counts, dict) else None

    def finalize(self, id_name: str, fields: dict[str, pl.DataType] | None = None, samples: int = 1) -> pl.DataFrame:
        """Write the output Parquet in input order (atomically) from the compacted answers; return
        the status counts. Each key bucket is joined on its own and the output is assembled in row
        ranges, so memory stays bounded by a bucket. An output already written from this very state
        (same row map, same answers, file untouched) is left as it is."""
        parts = self.compact_results()
        record = self._output_record(parts)
        counts = self._output_is_current(record)
        if counts is not None:
            return pl.DataFrame({"status": list(counts), "rows": list(counts.values())})
        frame = self._write_output(parts, id_name, fields or {}, samples)
        st = self.output_path.stat()
        counts = dict(zip(frame.get_column("status").to_list(), frame.get_column("rows").to_list(), strict=True))
        write_json_atomic(
            {**record, "file": [st.st_size, st.st_mtime_ns], "counts": counts}, self.state_dir / "output.json"
        )
        return frame

    def _write_output(
        self, parts: list[Path], id_name: str, fields: dict[str, pl.DataType], samples: int
    ) -> pl.DataFrame:
        rows = self._row_map()
        kept = [c for c in rows.collect_schema().names() if c not in (ROW, ID, KEY)]
        lines = self._request_lines(samples)
        answers = pl.scan_parquet(parts, schema=RESULT_SCHEMA)
        buckets = Buckets.for_rows(int(answers.select(pl.len()).collect().item()))
        pieces = []
        for b in range(buckets.count):
            piece = self.state_dir / f"output-{b:03d}.parquet.tmp"
            share = answers.filter(buckets.member(b))
            joined = lines.filter(buckets.member(b)).join(share, on=KEY, how="left", maintain_order="left")
            if samples > 1:  # all of a row's samples are in this bucket: vote here
                joined = voting.vote(joined, samples).sort(ROW)  # back in row order, as pieces must be
            joined.sink_parquet(piece, row_group_size=ROW_GROUP_ROWS)
            pieces.append(piece)
        # Each piece is in row order. The output is put together as consecutive row ranges, each read
        # from all pieces (row-group statistics skip the rest), sorted on its own and written to a file
        # of its own, one at a time; then those files are streamed into the output in order.
        # (merge_sorted, a global sort, or one concat of all ranges each held the whole output.)
        merged = pl.scan_parquet(pieces)
        total = int(rows.select(pl.len()).collect().item())
        ranges = []
        for start in range(0, max(total, 1), OUTPUT_CHUNK_ROWS):
            target = self.state_dir / f"range-{start // OUTPUT_CHUNK_ROWS:06d}.parquet.tmp"
            chunk = merged.filter(pl.col(ROW).is_between(start, start + OUTPUT_CHUNK_ROWS - 1)).sort(ROW)
            chunk.sink_parquet(target, row_group_size=ROW_GROUP_ROWS)
            ranges.append(target)
        for piece in pieces:
            piece.unlink()
        output = pl.scan_parquet(ranges).rename({ID: id_name, KEY: "request_key"})
        if fields:  # structured answers: one typed column per top-level field, beside the kept columns
            parsed = pl.col("parsed_json").str.json_decode(pl.Struct(fields)).alias("_parsed")
            output = output.with_columns(parsed).unnest("_parsed")
        voted = voting.VOTE_COLUMNS if samples > 1 else ()
        output = output.select(id_name, *kept, *fields, *voted, *OUTPUT_COLUMNS)
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.output_path.with_name(self.output_path.name + ".tmp")
        output.sink_parquet(tmp, row_group_size=ROW_GROUP_ROWS)
        _fsync_rename(tmp, self.output_path)
        for part in ranges:
            part.unlink()
        return pl.scan_parquet(self.output_path).group_by("status").agg(pl.len().alias("rows")).collect()

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
