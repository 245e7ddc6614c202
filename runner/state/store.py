"""The store: every answer durable within seconds, resumable after any crash, compacted at the end.

Layout of a job's state directory (beside the output, `.glm-batch/<job name>/`)::

    lock                        flock held by the running process (runner.state.lock)
    journal-<run>.jsonl         write-ahead journal: each answer appended the moment it arrives (a batch
                                answer's is its downloaded result file: see Store.add)
    results/part-<run>-<n>.parquet   answers (ok and failed), keyed by request key, from every run
    rows/                       the row map (runner.state.rowmap)
    manifest.json               the last runs: spec hash, inputs, counts, tokens, duration, exit code
    output.json                 what the current output file was written from (runner.output.sinks)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from runner.errors import STATE_FAILURES, GlmBatchError, UsageError
from runner.files import (
    NO_SPACE,
    no_space,
    read_json_object,
    read_manifest,
    space_checked,
    write_atomic,
    write_json_atomic,
)
from runner.records import (
    KEY,
    RESULT_SCHEMA,
    Answers,
    Result,
    journal_line,
    read_journal,
    results_frame,
    results_of_frame,
    scan_results,
    settles,
    with_valid_unicode,
)
from runner.state.lock import JobLock
from runner.state.rescue import read_rescued, state_failure, state_guard, write_rescue
from runner.state.rowmap import RowMap
from runner.state.settled import SettledKeys

BATCH_PART_ROWS = 10_000  # batch answers held (not journalled) before they count toward a checkpoint

BUCKET_ROWS = 100_000  # results per bucket when compacting and joining


def deleted(journal: Path) -> FileNotFoundError:
    """The error for a journal found unlinked while open: its folder was deleted."""
    return FileNotFoundError(errno.ENOENT, "deleted while the run was writing it", str(journal))


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
        return self.index() == bucket

    def index(self) -> pl.Expr:
        """Each key's bucket."""
        return pl.col(KEY).str.slice(0, 2).str.to_integer(base=16, strict=False).fill_null(0) % self.count


def _groups(parts: list[Path], sizes: list[int], most: int) -> list[list[Path]]:
    """Consecutive parts in groups of at most `most` results (a larger part alone)."""
    groups: list[list[Path]] = []
    held = 0
    for part, size in zip(parts, sizes, strict=True):
        if not groups or held + size > most:
            groups.append([])
            held = 0
        groups[-1].append(part)
        held += size
    return groups


def _one_a_key(bucket: pl.DataFrame) -> pl.DataFrame:
    """A bucket's results, one a key in key order: its ok answer over an error, the newest over older ones,
    the later of equals. Which rows stay is found on three narrow columns; the wide ones are then taken a
    column at a time, each let go as it is taken, so the bucket is held about once, not three times (a
    sort and a unique of the whole frame each made a copy)."""
    ok = (pl.col("status") == "ok").alias("_ok")
    kept = (
        bucket.select(KEY, ok, "finished_at")
        .with_row_index("_at")
        .sort([KEY, "_ok", "finished_at"], maintain_order=True)
        .filter(pl.col(KEY).is_last_distinct())
        .get_column("_at")
    )
    return pl.DataFrame([bucket.drop_in_place(name).gather(kept) for name in list(bucket.columns)])


def whole_part(part: Path) -> bool:
    """Whether an answer part can be trusted: its footer reads (a torn write loses it; reading it is cheap)
    and its columns are answers' (an older part may lack newer ones)."""
    try:
        columns = pl.read_parquet_schema(part).keys()
    except Exception:  # any failure to read means the file is not whole; never trust it
        return False
    return KEY in columns and columns <= RESULT_SCHEMA.keys()


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
        # Blocks of batch answers taken as columns (`add_answers`), held like batch Results in `_pending`.
        self._frames: list[pl.DataFrame] = []
        self._held = 0  # of `_pending`: batch answers, held for their part without a journal line (see `add`)
        self._part_seq = 0
        self._journal: int | None = None
        self._journal_path = state_dir / f"journal-{self._files_id}.jsonl"
        self._journal_size = 0  # bytes of whole lines in the journal: where a torn write is cut back to
        self._journal_kept = False
        self.row_map_dropped = False  # the row map was torn and has been dropped (it is rebuilt)
        self.recovered = 0  # answers recovered from journals of runs that died
        # The state folder stopped taking writes (this run's failure): from then on answers are only held
        # in memory (`_pending`), and `rescue` writes them to a rescue journal when sending has stopped.
        self.broken: GlmBatchError | None = None
        self._next_alive_check = 0.0
        # A part being written by `flush_soon` in a worker thread: its future, its results and blocks (held
        # until it is durable) and the journal set aside for them; the thread, made on first use.
        self._writing: tuple[Future[None], list[Result], list[pl.DataFrame], Path] | None = None
        self._writer: ThreadPoolExecutor | None = None

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
        try:
            # A folder that takes no writes (read-only, immutable) or a full disk: one line, nothing sent.
            with state_guard(self.state_dir):
                self._sweep()
        except Exception:
            self.lock.release()
            raise

    def _sweep(self) -> None:
        """What `open` does once the lock is held: clear a crash's temp files, fold dead runs' journals,
        quarantine unreadable parts, drop a torn row map, start this run's journal."""
        for tmp in self.state_dir.rglob("*.tmp"):
            tmp.unlink()
        for journal in sorted(self.state_dir.glob("journal-*.jsonl")):
            self.recover(journal)
        for part in sorted(self.results_dir.glob("*.parquet")):
            if not whole_part(part):
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
        results = read_journal(journal)
        if results:
            name = journal.stem.removeprefix("journal-")  # `<run>`, or `<run>.<n>`: one set aside by flush_soon
            run_id = name.split(".")[0]
            write_atomic(results_frame(results, run_id), self.results_dir / f"part-{name}-recovered.parquet")
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
            with state_guard(self.state_dir):
                self.rows.write()
        except STATE_FAILURES:
            # The answers stay in the journal, which the next run folds into a part; keep it.
            self._journal_kept = True
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            if self._journal is not None:
                os.close(self._journal)
                self._journal = None
                if not self._journal_kept:
                    with contextlib.suppress(OSError):  # a folder that takes no writes takes no unlink
                        self._journal_path.unlink(missing_ok=True)
            self.lock.release()

    def result_parts(self) -> list[Path]:
        """Every readable results part, oldest first."""
        return sorted(self.results_dir.glob("*.parquet"))

    def settled_keys(self, *, retry_failed: bool) -> SettledKeys:
        """Keys that need no request: answered ok, or failed for good (unless `retry_failed`)."""
        parts = self.result_parts()
        if not parts:
            return SettledKeys.none()
        settled = settles(retry_failed)
        try:
            keys = pl.scan_parquet(parts).filter(settled).select(KEY).unique().sort(KEY).collect()
        except (pl.exceptions.PolarsError, OSError):
            # A part whose footer reads but whose data does not (torn inside): read part by part, set the
            # ones that fail aside in corrupt/ (as at open), and keep what the others hold.
            frames = []
            for part in parts:
                try:
                    frames.append(pl.read_parquet(part, columns=[KEY, "status", "retryable"]).filter(settled))
                except (pl.exceptions.PolarsError, OSError):
                    with contextlib.suppress(OSError):  # not even movable: it is skipped all the same
                        self._quarantine(part)
            self.quarantined = sorted((self.state_dir / "corrupt").glob("*.parquet"))
            keys = (
                pl.concat([f.select(KEY) for f in frames]).unique().sort(KEY)
                if frames
                else pl.DataFrame({KEY: []}, schema={KEY: pl.String})
            )
        return SettledKeys(keys.get_column(KEY))

    # ---- writing --------------------------------------------------------------------------------

    def add(self, result: Result) -> None:
        """Journal one result at once (it survives a kill from here on) and buffer it for the next part."""
        self.add_many([result])

    def add_many(self, results: list[Result]) -> None:
        """Journal results with one write (a group commit: the answers of one turn of the event loop),
        and buffer them for the next part. Once it returns they survive a kill; if it raises, they are
        held in memory for the rescue journal.

        An answer read from a batch's result file (`api` "batch") is only held for the next part: its
        result file, downloaded and fsynced before a line was read, and the batch book, which records
        the batch harvested only after the checkpoint that writes that part, are its write-ahead record
        (a run killed before then harvests the batch again). No line is written for those."""
        assert self._journal is not None, "Store.open() first"
        lines = []
        for i, result in enumerate(results):
            if result.api == "batch":
                self._held += 1
                continue
            try:
                lines.append(journal_line(result))
            except orjson.JSONEncodeError:  # a lone surrogate in its text: kept as U+FFFD, not a crash
                results[i] = result = with_valid_unicode(result)
                lines.append(journal_line(result))
        self._pending.extend(results)  # held before the write: if the write fails they are rescued from here
        if self.broken is not None or not lines:  # the folder takes no writes: held for the rescue journal
            return
        self._journal_write(lines[0] if len(lines) == 1 else b"".join(lines))
        self._check_alive()

    def add_answers(self, answers: Answers) -> None:
        """Hold a block of batch answers (runner.records.Answers) for the next part, as `add_many` holds
        batch Results: their downloaded result file is their write-ahead record, so no journal line.
        An answer text that is no UTF-8 (a lone surrogate) sends the block the Results' way."""
        try:
            frame = answers.frame(self.run_id)
        except UnicodeEncodeError:
            self.add_many(answers.results())
            return
        self._frames.append(frame)
        self._held += frame.height

    def _journal_write(self, data: bytes) -> None:
        """Append whole lines to the journal; on a failure, cut a torn write off and break the store
        (the answers stay held in `_pending`, rescued when sending has stopped)."""
        assert self._journal is not None
        failure: GlmBatchError | None = None
        try:
            written = os.write(self._journal, data)
        except OSError as exc:
            failure = state_failure(exc, self.state_dir)
            written = -1
        if written != len(data):
            # Cut a torn line off again: glued to the next answer's line it would make both unreadable.
            with contextlib.suppress(OSError):
                os.ftruncate(self._journal, self._journal_size)
            raise self._broke(failure or no_space(self._journal_path))
        self._journal_size += written

    def _check_alive(self) -> None:
        """Twice a second at most, one fstat: has the journal been unlinked under us (the folder deleted)?"""
        assert self._journal is not None
        now = time.monotonic()
        if now >= self._next_alive_check:  # twice a second at most: one fstat
            self._next_alive_check = now + 0.5
            if os.fstat(self._journal).st_nlink == 0:  # unlinked under us: the folder was deleted
                failure = state_failure(deleted(self._journal_path), self.state_dir)
                raise self._broke(failure or no_space(self.state_dir))

    def _broke(self, failure: GlmBatchError) -> GlmBatchError:
        """Remember the first failure of the state's files; from now on answers are only held."""
        if self.broken is None:
            self.broken = failure
        return failure

    def add_part(self, frame: pl.DataFrame, label: str) -> None:
        """Keep answers that came from elsewhere (salvaged from an output) as a part of their own."""
        write_atomic(frame, self.results_dir / f"part-{self.run_id}-{label}.parquet")

    @property
    def buffered(self) -> int:
        """Results not yet in a part, as checkpoint_rows counts them: batch answers held (not journalled)
        only once there are BATCH_PART_ROWS of them, so a harvest writes parts of that many, not of
        checkpoint_rows, and holds no more than that in memory."""
        return self._pending_count() - (self._held if self._held < BATCH_PART_ROWS else 0)

    def _pending_count(self) -> int:
        return len(self._pending) + sum(frame.height for frame in self._frames)

    def _pending_frame(self, results: list[Result], frames: list[pl.DataFrame]) -> tuple[list[Result], pl.DataFrame]:
        """Held results and blocks as one part's frame (a lone surrogate in a batch answer's text is kept
        as U+FFFD); the results as they went into it."""
        try:
            frame = results_frame(results, self.run_id)
        except UnicodeEncodeError:
            results = [with_valid_unicode(result) for result in results]
            frame = results_frame(results, self.run_id)
        return results, pl.concat([frame, *frames], how="vertical") if frames else frame

    def flush_soon(self) -> None:
        """Start writing the buffered results as one new part in a worker thread, unless one is being
        written; the event loop goes on sending meanwhile (a Parquet write and its two fsyncs held it
        ~10-50 ms a part). Their journal is set aside under a name of its own (`journal-<run>.<n>.jsonl`)
        and answers go on to a fresh one; the set-aside journal is deleted once the part is durable. A
        kill before that leaves both, and the next run folds the journal into a part too (an answer twice
        is harmless: answers are keyed). Raises like `flush`, now or at a later call, for a failed write."""
        self._collect(wait=False)
        if self.broken is not None:
            raise self.broken
        if self._writing is not None or not self._pending_count() or self._journal is None:
            return
        aside = self.state_dir / f"journal-{self._files_id}.{self._part_seq:06d}.jsonl"
        try:
            with state_guard(self.state_dir):
                if os.fstat(self._journal).st_nlink == 0:
                    raise deleted(self._journal_path)  # the folder was deleted: what it takes goes nowhere
                os.rename(self._journal_path, aside)  # the open descriptor follows it
                fresh = os.open(self._journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except STATE_FAILURES as exc:
            raise self._broke(exc) from None
        os.close(self._journal)
        self._journal, self._journal_size = fresh, 0
        results, frames, self._pending, self._frames, self._held = self._pending, self._frames, [], [], 0
        results, frame = self._pending_frame(results, frames)
        part = self.results_dir / f"part-{self._files_id}-{self._part_seq:06d}.parquet"
        self._part_seq += 1
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm-batch-parts")
        self._writing = (self._writer.submit(self._write_part, frame, part), results, frames, aside)

    def _write_part(self, frame: pl.DataFrame, part: Path) -> None:
        """In the writer thread: one part, durably (a failure of the folder as DiskFull/StateUnwritable)."""
        with state_guard(self.state_dir):
            write_atomic(frame, part)

    def _collect(self, *, wait: bool) -> None:
        """Take the result of the part being written (waiting for it if `wait`): drop its set-aside
        journal once it is durable, or hold its results again (for `rescue`) if the write failed."""
        if self._writing is None:
            return
        future, results, frames, aside = self._writing
        if not wait and not future.done():
            return
        self._writing = None
        try:
            future.result()
        except STATE_FAILURES as exc:
            self._pending = results + self._pending
            self._frames = frames + self._frames
            raise self._broke(exc) from None
        with contextlib.suppress(OSError):  # left behind, it is folded again next time: harmless
            aside.unlink()

    def flush(self) -> None:
        """Write buffered results as one new part file (after the one `flush_soon` may be writing).
        Raises DiskFull or StateUnwritable when the folder takes no more writes (or was deleted); the
        results stay held for `rescue`."""
        if self._writing is not None:
            with contextlib.suppress(*STATE_FAILURES):  # a failed write is kept in `broken`, raised below
                self._collect(wait=True)
        if self.broken is not None:
            raise self.broken
        try:
            with state_guard(self.state_dir):
                if self._journal is not None and os.fstat(self._journal).st_nlink == 0:
                    # The journal was unlinked under us (the folder deleted): what it takes goes nowhere.
                    raise deleted(self._journal_path)
                if not self._pending_count():
                    return
                self._pending, frame = self._pending_frame(self._pending, self._frames)
                write_atomic(frame, self.results_dir / f"part-{self._files_id}-{self._part_seq:06d}.parquet")
                self._part_seq += 1
                self._pending, self._frames = [], []
                self._held = 0
                if self._journal is not None:
                    # Everything journalled is now in the part. A kill between the rename and this truncate
                    # leaves the same answers twice, which is harmless: answers are deduplicated by key.
                    os.ftruncate(self._journal, 0)
                    self._journal_size = 0
        except STATE_FAILURES as exc:
            raise self._broke(exc) from None

    @property
    def held(self) -> list[Result]:
        """Answers this run holds in memory only (not in a part file)."""
        writing = self._writing[1] if self._writing is not None else []
        frames = [*(self._writing[2] if self._writing is not None else []), *self._frames]
        return [*writing, *self._pending, *(result for frame in frames for result in results_of_frame(frame))]

    def rescue(self, output_path: Path) -> Path | None:
        """Write the answers held in memory to a rescue journal (runner.state.rescue) beside
        `output_path`, or under the temp folder; its path, or None when nothing was held or no place took
        it. Called once sending has stopped, after the state broke."""
        held = self.held
        if not held:
            return None
        held = [with_valid_unicode(result) for result in held]  # batch answers were never checked
        return write_rescue(held, self.run_id, output_path, self.state_dir)

    def adopt_rescued(self, journals: list[Path]) -> None:
        """Keep the answers of rescue journals left by runs whose state broke as parts of this store,
        then delete each journal (only once its part is durable)."""
        for journal in journals:
            run_id, results = read_rescued(journal)
            if results:
                with state_guard(self.state_dir):
                    write_atomic(results_frame(results, run_id), self.results_dir / f"part-{run_id}-rescued.parquet")
            with contextlib.suppress(OSError):  # kept twice at worst: answers are deduplicated by key
                journal.unlink(missing_ok=True)

    # ---- finishing ------------------------------------------------------------------------------

    def progress(self, samples: int = 1, total_rows: int | None = None) -> dict[str, int] | None:
        """Rows answered ok, failed and pending, from the row map and the answers (see RowMap.progress)."""
        return self.rows.progress(self.result_parts(), samples, total_rows)

    def compact_results(self) -> list[Path]:
        """Fold all parts into compact buckets holding one result per key (an ok answer over an error,
        the newest over older ones); return the bucket files. Nothing to do when already compact."""
        parts = self.result_parts()
        if not parts or all("-compact-" in p.name for p in parts):
            return parts
        sizes = [int(scan_results([part]).select(pl.len()).collect().item()) for part in parts]
        buckets = Buckets.for_rows(sum(sizes))
        scratch = self.state_dir / f"compacting-{self._files_id}"
        shutil.rmtree(scratch, ignore_errors=True)  # a compaction cut short: its pieces only
        scratch.mkdir(parents=True)
        written = []
        try:
            if buckets.count > 1:  # split first: each part is read once, not once a bucket
                for group, members in enumerate(_groups(parts, sizes, BUCKET_ROWS)):
                    frame = scan_results(members).collect()
                    index = frame.select(buckets.index()).to_series()
                    for b in index.unique().sort().to_list():  # a piece at a time: not the group twice
                        target = scratch / f"{b:03d}-{group:05d}.parquet"
                        with space_checked(target):  # read once, soon
                            frame.filter(index == b).write_parquet(target, compression="lz4", statistics=False)
                    del frame, index
            for b in range(buckets.count):
                target = self.results_dir / f"part-{self.run_id}-compact-{b:03d}.parquet"
                # One bucket at a time, held whole: memory is bounded by BUCKET_ROWS (a streamed sort over
                # every part held about twice as much, more the more parts there were).
                pieces = sorted(scratch.glob(f"{b:03d}-*.parquet")) if buckets.count > 1 else parts
                bucket = scan_results(pieces).collect() if pieces else pl.DataFrame(schema=RESULT_SCHEMA)
                compact = _one_a_key(bucket)
                del bucket
                write_atomic(compact, target)
                del compact
                written.append(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        for part in parts:
            part.unlink()
        return written

    # ---- the manifest ---------------------------------------------------------------------------

    def read_estimate(self) -> dict[str, Any] | None:
        """The last `glm-batch estimate` report for this job, if there is one."""
        return read_json_object(self.state_dir / "estimate.json")

    def write_estimate(self, report: dict[str, Any]) -> None:
        """Keep an estimate so the next run can say how close it was."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(report, self.state_dir / "estimate.json")

    def record_run(self, run: dict[str, Any], keep: int = 50) -> None:
        """Append this run's record to the manifest (keeping the last `keep`)."""
        manifest = read_manifest(self.state_dir)
        manifest["runs"] = [*manifest.get("runs", []), run][-keep:]
        with state_guard(self.state_dir):
            write_json_atomic(manifest, self.state_dir / "manifest.json")
