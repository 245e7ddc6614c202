"""The planning loop, one for run, estimate and validate: read rows, render, key, check what is settled.

    for batch in plan(job, source, settled):       # bounded batches, in input order
        for row in batch.rows:                     # each row's requests (one per sample), and which
            ...                                    # of them an earlier run already settled

`Dispatch` is the run's use of it: it records the row map, settles what needs no sending, and yields
each request to send once (rows with identical prompts share one request), stopping when the budget
cannot cover the next one. The estimate counts the same requests; validate prints the first ones,
rendered by the same RequestBuilder.render without the rest of the planner.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
from array import array
from collections.abc import AsyncIterator, Callable, Iterator, MutableSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from runner.control import Control
from runner.errors import STATE_FAILURES, UsageError
from runner.files import space_checked
from runner.job.inputs import ID, ROW
from runner.job.prompts import RequestBuilder, sample_key
from runner.job.resolve import Job
from runner.job.sandbox import NullInput, RenderError
from runner.money.accounting import Tally
from runner.money.tokens import LastTurnEstimate, estimate_request
from runner.records import KEY, Request, Result
from runner.send.base import Deliver
from runner.state.rescue import state_guard
from runner.state.rowmap import RowMap
from runner.state.settled import SettledKeys

RENDER_BATCH_ROWS = 2000  # rows rendered per step; small enough not to stall responses for long
COLUMN_BATCH_ROWS = 10_000  # the same stall where a prompt is rendered as columns (a fifth of the time a row)
FIRST_STEP_ROWS = 64  # the first step is short, so the first request goes out without waiting for 2000
ALL_FAIL_ROWS = 20  # when this many first rows all fail with one template error, the template is wrong


class Rows(Protocol):
    """Input rows in order, with `_row` and `_id`: runner.job.inputs.InputSource, or a cluster worker's block."""

    def batches(self, batch_rows: int) -> Iterator[pl.DataFrame]: ...


@dataclass(slots=True)
class PlannedRow:
    """One input row: its requests (one, or one per sample) and whether each is settled already;
    or, when its prompt failed to render, the error (and no requests). A row rendered as columns whose
    request was answered before holds no request at all (its parameters were never made): `done` is
    empty too, so `all(done)` says it is settled."""

    position: int
    id: str
    key: str  # the row's request key (sample 0), or `render-<id>` when it failed to render
    requests: list[Request]
    done: list[bool]
    error: RenderError | None = None
    estimate: int | None = None  # its one request's raw input-token estimate, where made with the prompt


@dataclass
class PlannedBatch:
    """A batch of input rows as read (position, id and the job's columns) and as planned."""

    frame: pl.DataFrame
    rows: list[PlannedRow]

    def row_map(self, keep_columns: tuple[str, ...]) -> pl.DataFrame:
        """The batch's lines of the row map: position, id, request key and the kept columns."""
        keys = pl.Series(KEY, [row.key for row in self.rows], dtype=pl.String)
        return self.frame.select(ROW, ID, *keep_columns).with_columns(keys)


def plan(job: Job, source: Rows, settled: SettledKeys, batch_rows: int = RENDER_BATCH_ROWS) -> Iterator[PlannedBatch]:
    """Render every input row into its requests, in bounded batches, marking the settled ones.

    Raises UsageError when the first rows all fail with the same template error: the template, not
    the data, is wrong, and a run would record every row as a render_error.
    """
    builder = RequestBuilder(job)
    if batch_rows == RENDER_BATCH_ROWS and builder.renders_columns:
        batch_rows = COLUMN_BATCH_ROWS
    first = True
    for whole in source.batches(batch_rows):
        # The first batch in steps: its first rows are checked (a broken template stops after
        # ALL_FAIL_ROWS rows, not a whole batch of them) and sent while the rest render.
        steps = (
            [whole.slice(0, ALL_FAIL_ROWS), whole.slice(ALL_FAIL_ROWS, FIRST_STEP_ROWS - ALL_FAIL_ROWS),
             whole.slice(FIRST_STEP_ROWS)]
            if first
            else [whole]
        )  # fmt: skip
        for frame in steps:
            if frame.height == 0:
                continue
            rows = _render(builder, frame, settled)
            if first:
                _check_template(job, rows, whole_input=whole.height < batch_rows)
                first = False
            yield PlannedBatch(frame, rows)


def _render(builder: RequestBuilder, frame: pl.DataFrame, settled: SettledKeys) -> list[PlannedRow]:
    """Each row of `frame` rendered into its requests (or its render error), each marked settled or
    not: as columns where the prompt allows it (RequestBuilder.key_batch), else row by row."""
    keyed = builder.key_batch(frame) if builder.samples == 1 else None
    if keyed is None:
        return _marked(_render_rows(builder, frame), settled)
    keys, prompts = keyed
    estimate = _last_turn_estimate(builder)
    positions, ids = frame.get_column(ROW).to_list(), frame.get_column(ID).to_list()
    done = settled.contains(pl.Series(KEY, keys, dtype=pl.String)).to_list()  # a row to build: null
    rows: list[PlannedRow] = []
    built: list[PlannedRow] = []  # rows `build` made (nulls, limits): marked below
    for index, key in enumerate(keys):
        position, row_id = positions[index], ids[index]
        if key is None:
            row = _render_rows(builder, frame.slice(index, 1))[0]
            built.append(row)
        elif done[index]:  # answered before: its parameters are never needed, so never made
            row = PlannedRow(position, row_id, key, [], [])
        else:
            prompt = prompts[index]
            request = builder.column_request(key, prompt)
            row = PlannedRow(position, row_id, key, [request], [False], None, estimate(prompt) if estimate else None)
        rows.append(row)
    _marked(built, settled)
    return rows


def _last_turn_estimate(builder: RequestBuilder) -> Callable[[Any], int] | None:
    """The raw estimate of a column-rendered request from its prompt (runner.money.tokens.LastTurnEstimate),
    where its prompt is the text of its last message and nothing else: None otherwise (a structured
    answer's request is reshaped), and then each request is estimated whole."""
    probe = builder.column_request("probe", "\x00probe")
    messages = probe.params.get("messages")
    if not (isinstance(messages, list) and messages and messages[-1] == {"role": "user", "content": "\x00probe"}):
        return None
    if "\x00probe" in str({name: value for name, value in probe.params.items() if name != "messages"}):
        return None
    return LastTurnEstimate(probe.params)


def _render_rows(builder: RequestBuilder, frame: pl.DataFrame) -> list[PlannedRow]:
    """Each row of `frame` rendered into its requests (or its render error), row by row."""
    return [
        PlannedRow(position, row_id, f"render-{row_id}", [], [], rendered)
        if isinstance(rendered, RenderError)
        else PlannedRow(position, row_id, rendered.key, builder.samples_of(rendered), [])
        for position, row_id, rendered in builder.render(frame.iter_rows(named=True))
    ]


def _marked(rows: list[PlannedRow], settled: SettledKeys) -> list[PlannedRow]:
    """`rows` with each request marked settled (answered before) or not."""
    wanted = pl.Series(KEY, [r.key for row in rows for r in row.requests], dtype=pl.String)
    done = iter(settled.contains(wanted).to_list())
    for row in rows:
        row.done = [next(done) for _ in row.requests]
    return rows


def _check_template(job: Job, rows: list[PlannedRow], whole_input: bool) -> None:
    """Raise UsageError when the first ALL_FAIL_ROWS rows (or every row of a shorter input) failed to
    render with the same kind of error: then the template, not the data, is wrong."""
    first = rows[:ALL_FAIL_ROWS]
    if not first or (len(first) < ALL_FAIL_ROWS and not whole_input):
        return
    # A row skipped for a null (input.nulls: skip) says nothing about the template; one over a
    # rendering limit (render_limit) does, like one the template fails on.
    kinds = {str(row.error).split(":", 1)[0] if row.error is not None else None for row in first
             if row.error is None or row.error.error_type in ("render_error", "render_limit")}  # fmt: skip
    if len(kinds) == 1 and None not in kinds and all(row.error is not None for row in first):
        raise UsageError(
            f"{job.spec_path}: prompt: the template fails on each of the first {len(first)} rows "
            f"({first[0].error}); fix the template"
        )


@dataclass
class Dispatch:
    """A run's side of planning: records the row map, settles rows, yields each request to send once."""

    rows: RowMap
    keep_columns: tuple[str, ...]
    tally: Tally
    deliver: Deliver  # where a row that failed to render is recorded
    # May this request, of this many input tokens (raw estimate), be sent within the budget? (reserves it)
    admit: Callable[[Request, int], bool]
    control: Control
    pilot: frozenset[int] | None = None  # a pilot sends only these row positions
    # Requests handed to the executor and not yet answered: the run is complete when none are left.
    outstanding: MutableSet[str] = field(default_factory=set)
    # The model's context window: a prompt estimated above it is refused here (the endpoint would
    # refuse it too, 400/1261), its row failed with the reason, and nothing is sent.
    context_tokens: int | None = None

    async def requests(self, batches: Iterator[PlannedBatch], fingerprint: dict[str, Any]) -> AsyncIterator[Request]:
        """Yield the requests to send. Stops early, leaving the row map unsealed, when the budget
        cannot cover the next request; seals it when every input row was rendered."""
        queued = RequestKeys(self.rows.scratch_dir)  # rows' keys queued this run: one request per distinct prompt
        tally = self.tally
        # The row map and the queued keys' scratch live in the state folder: when it stops taking writes,
        # dispatch stops (answers in flight still arrive and are held; runner.state.rescue).
        state_dir = self.rows.rows_dir.parent
        try:
            for batch in batches:
                with state_guard(state_dir):
                    self.rows.add(batch.row_map(self.keep_columns))
                tally.rows_seen += batch.frame.height
                # Answered before; or, in a pilot (which sends only its sample of rows), not wanted now.
                wanted = [row for row in batch.rows if row.error is None and not self._settled(row)]
                # A row with the same prompt earlier in this run has the same key, the same samples and
                # the same `done`: its requests were queued then (the row's key stands for all of them).
                with state_guard(state_dir):
                    flags = queued.add_batch([row.key for row in wanted])
                fresh = iter(flags)  # in the order of `wanted`
                context, admit, outstanding, pilot = self.context_tokens, self.admit, self.outstanding, self.pilot
                for row in batch.rows:
                    if row.error is not None:
                        self._render_failure(row)
                        continue
                    if all(row.done):  # answered before
                        tally.rows_settled += 1
                        continue
                    if pilot is not None and row.position not in pilot:  # a pilot's row outside its sample
                        tally.rows_left_out += 1
                        continue
                    if not next(fresh):
                        # An identical request is queued already: its answer answers this row too.
                        tally.requests_shared += sum(not done for done in row.done)
                        continue
                    for pending, is_done in zip(row.requests, row.done, strict=True):
                        if is_done:
                            continue
                        # once: the context and the budget (made with the prompt where it was rendered as columns)
                        estimated = row.estimate if row.estimate is not None else estimate_request(pending.params)
                        if context is not None and estimated > context:
                            self._over_context(pending, estimated)
                            continue
                        if not admit(pending, estimated):
                            self.control.end_dispatch("budget")  # what was admitted is paid for in advance: send it
                            return
                        outstanding.add(pending.key)
                        tally.requests_queued += 1
                        yield pending
                await asyncio.sleep(0)  # let answers in between batches
            with state_guard(state_dir):
                self.rows.seal(fingerprint)  # reached only when every input row was rendered
            tally.all_rows_rendered = True
        except STATE_FAILURES as exc:
            self.control.fail(exc)
        finally:
            queued.close()  # its scratch files, also when the run stops early or the generator is dropped

    def _over_context(self, request: Request, estimated: int) -> None:
        """Fail a request whose prompt cannot fit the model's context window, without sending it."""
        self.deliver(
            Result(
                key=request.key,
                status="error",
                attempts=0,
                latency_ms=None,
                finished_at=dt.datetime.now(dt.UTC),
                model=str(request.params.get("model")),
                error_type="over_context",
                error_message=(
                    f"the prompt is about {estimated:,} tokens, over the model's context window of "
                    f"{self.context_tokens or 0:,}; shorten it (nothing was sent)"
                ),
            )
        )

    def _settled(self, row: PlannedRow) -> bool:
        return all(row.done) or (self.pilot is not None and row.position not in self.pilot)

    def _render_failure(self, row: PlannedRow) -> None:
        """Record a row whose prompt cannot be rendered as failed (each of its samples); nothing is sent."""
        for index in range(self.tally.samples):
            self.deliver(
                Result(
                    key=sample_key(row.key, index),
                    status="skipped" if isinstance(row.error, NullInput) else "error",
                    attempts=0,
                    latency_ms=None,
                    finished_at=dt.datetime.now(dt.UTC),
                    error_type=row.error.error_type if row.error is not None else "render_error",
                    error_message=str(row.error),
                )
            )


class RequestKeys:
    """The request keys a run has queued, in 8 bytes of memory a key (a Python set of str takes ~120):
    for a 10M-row input they would otherwise be the largest thing a run holds.

    A request key is 32 hex digits, the first 128 bits of a sha256 (runner.job.prompts). The newest
    keys are kept as strings in a set; every `run_keys` of them become a run, sorted by the key's high
    64 bits. A run keeps those high halves in memory (a sorted UInt64 Series) and its low halves, in
    the same order, in a file in `spill_dir` (or in memory without one). `add_batch` looks a batch of
    keys up in every run at once by binary search on the high halves; only a key whose high half is
    found (a key queued before: a row sharing a prompt) has its low half read back (one pread) and
    compared. So two keys are taken for one only when all 128 bits are equal, exactly as the store
    takes them: never on a 64-bit coincidence. A key of any other form (none is made today) stays in
    an ordinary set. The files are scratch for one run: `close` removes them.
    """

    def __init__(self, spill_dir: Path | None = None, run_keys: int = 200_000) -> None:
        self._run_keys = run_keys
        self._spill_dir = spill_dir
        self._recent: set[str] = set()
        self._other: set[str] = set()  # keys that are not 32 hex digits
        self._runs: list[_Run] = []
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in self._recent or key in self._other or self._in_runs([key])[0])

    def add(self, key: str) -> bool:
        """Add one key; True if it was not in the set yet."""
        return self.add_batch([key])[0]

    def add_batch(self, keys: list[str]) -> list[bool]:
        """Add `keys` in order; for each, True if it was new (not seen before, nor earlier in `keys`)."""
        known = self._in_runs(keys)
        recent, other = self._recent, self._other
        fresh: list[bool] = []
        joined = "\n".join(keys)  # each key 32 hex digits: one check for the usual batch, not one a key
        if not other and len(joined) == 33 * len(keys) - 1 and _HEX_KEYS.fullmatch(joined):
            for key, old in zip(keys, known, strict=True):
                if old or key in recent:
                    fresh.append(False)
                else:
                    recent.add(key)
                    fresh.append(True)
        else:
            for key, old in zip(keys, known, strict=True):
                if old or key in recent or key in other:
                    fresh.append(False)
                    continue
                (recent if _HEX_KEY.fullmatch(key) else other).add(key)
                fresh.append(True)
        self.size += sum(fresh)
        if len(recent) >= self._run_keys:  # only between batches: a batch is checked against one state
            self._freeze()
        return fresh

    def contains_batch(self, keys: list[str]) -> list[bool]:
        """Is each of `keys` in the set? (Vectorised over the runs, as `add_batch` looks keys up.)"""
        known = self._in_runs(keys)
        return [old or key in self._recent or key in self._other for key, old in zip(keys, known, strict=True)]

    @property
    def run_bytes(self) -> int:
        """Bytes the sorted runs hold in memory (polars buffers, which tracemalloc does not see)."""
        return sum(run.nbytes for run in self._runs)

    def close(self) -> None:
        """Remove the run files (the set is empty afterwards)."""
        for run in self._runs:
            run.close()
        self._runs, self._recent, self._other, self.size = [], set(), set(), 0

    def _freeze(self) -> None:
        """Turn the recent keys into a sorted run."""
        run = _halves(list(self._recent)).sort("high", "low")
        path = None
        if self._spill_dir is not None:
            self._spill_dir.mkdir(parents=True, exist_ok=True)
            path = self._spill_dir / f"queued-{len(self._runs):05d}.u64"
        self._runs.append(_Run(run.get_column("high"), run.get_column("low"), path))
        self._recent = set()

    def _in_runs(self, keys: list[str]) -> list[bool]:
        """Is each key in one of the runs? (Vectorised: a binary search per run, not per key.)"""
        if not self._runs or not keys:
            return [False] * len(keys)
        halves = _halves(keys)  # a key that is not 32 hex digits: null halves, never found
        high, low = halves.get_column("high").fill_null(0), halves.get_column("low")
        found = [False] * len(keys)
        for run in self._runs:
            first = run.high.search_sorted(high, side="left")
            count = run.high.search_sorted(high, side="right").cast(pl.Int64) - first.cast(pl.Int64)
            for i in (count > 0).arg_true().to_list():  # the high half is there: compare the low half
                wanted = low[i]
                if wanted is not None and not found[i]:
                    found[i] = wanted in run.lows(int(first[i]), int(count[i]))
        return found


def _halves(keys: list[str]) -> pl.DataFrame:
    """Each key's high and low 64 bits (UInt64 columns `high`, `low`), parsed by polars; both null for a
    key that is not 32 lowercase hex digits."""
    column = pl.col("key")
    hexed = column.str.contains("^[0-9a-f]{32}$")

    def half(start: int) -> pl.Expr:
        return pl.when(hexed).then(column.str.slice(start, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False))

    return pl.DataFrame({"key": keys}, schema={"key": pl.String}).select(half(0).alias("high"), half(16).alias("low"))


class _Run:
    """Sorted keys of a RequestKeys: high halves in memory, low halves in memory or in a file."""

    def __init__(self, high: pl.Series, low: pl.Series, path: Path | None) -> None:
        self.high = high
        self._low: pl.Series | None = low
        self._fd: int | None = None
        self._path = path
        if path is not None:
            with space_checked(path), path.open("wb") as f:  # a full disk stops the run like a row-map file
                array("Q", low.to_list()).tofile(f)  # native byte order: read back by this process only
            self._fd, self._low = os.open(path, os.O_RDONLY), None

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: the high halves, and the low halves unless they are in a file."""
        return int(self.high.estimated_size()) + (int(self._low.estimated_size()) if self._low is not None else 0)

    def lows(self, start: int, count: int) -> list[int]:
        """The low halves of the keys at positions start .. start + count - 1."""
        if self._low is not None:
            return list(self._low.slice(start, count).to_list())
        assert self._fd is not None
        return list(array("Q", os.pread(self._fd, 8 * count, 8 * start)))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)


_HEX_KEY = re.compile("[0-9a-f]{32}")
_HEX_KEYS = re.compile("[0-9a-f]{32}(?:\n[0-9a-f]{32})*")  # keys joined by newlines, each 32 hex digits


async def nothing() -> AsyncIterator[Request]:
    """No requests: a re-run of a finished job over unchanged inputs."""
    return
    yield  # pragma: no cover - makes this an (empty) async generator
