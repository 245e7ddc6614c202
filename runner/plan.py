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
import bisect
import datetime as dt
import os
import re
from array import array
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
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
from runner.money.tokens import (
    LATIN_CHARS_PER_TOKEN,
    MESSAGE_OVERHEAD_TOKENS,
    LastTurnEstimate,
    estimate_request,
    over_context,
)
from runner.records import KEY, Request, RequestBlock, Result
from runner.send.base import Deliver
from runner.state.openkeys import OpenKeys
from runner.state.rescue import state_guard
from runner.state.rowmap import RowMap
from runner.state.settled import SettledKeys, bucket_filter, buckets, mark

RENDER_BATCH_ROWS = 2000  # rows rendered per step; small enough not to stall responses for long
COLUMN_BATCH_ROWS = 25_000  # the same stall where a prompt is rendered as columns (a fifth of the time a row)
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


@dataclass
class PlannedColumns:
    """A batch planned as columns (a prompt that substitutes columns, one sample a row): each row's key,
    prompt and whether an earlier run settled it, with no object a row; the rows that went through
    `build` (a null a prompt reads, a prompt over the rendering limit) as PlannedRows, by index."""

    frame: pl.DataFrame
    keys: list[str]  # each row's request key, or `render-<id>` for a built row that failed to render
    prompts: list[str | None]  # each row's prompt; None for a built row
    done: list[bool]
    estimates: list[int] | None  # each row's raw input-token estimate where made from its prompt, else None
    built: dict[int, PlannedRow]
    builder: RequestBuilder

    def row_map(self, keep_columns: tuple[str, ...]) -> pl.DataFrame:
        """The batch's lines of the row map: position, id, request key and the kept columns."""
        keys = pl.Series(KEY, self.keys, dtype=pl.String)
        return self.frame.select(ROW, ID, *keep_columns).with_columns(keys)


Planned = PlannedBatch | PlannedColumns


def plan(job: Job, source: Rows, settled: SettledKeys, batch_rows: int = RENDER_BATCH_ROWS) -> Iterator[PlannedBatch]:
    """Render every input row into its requests, in bounded batches, marking the settled ones.

    Raises UsageError when the first rows all fail with the same template error: the template, not
    the data, is wrong, and a run would record every row as a render_error.
    """
    for batch in _planned(job, source, settled, batch_rows, columns=False):
        assert isinstance(batch, PlannedBatch)
        yield batch


def plan_columns(job: Job, source: Rows, settled: SettledKeys) -> Iterator[Planned]:
    """`plan` for a run's dispatch: a batch whose prompt renders as columns comes as PlannedColumns
    (no object a row), any other as a PlannedBatch; the first rows always as rows (checked as `plan`
    checks them)."""
    return _planned(job, source, settled, RENDER_BATCH_ROWS, columns=True)


def _planned(job: Job, source: Rows, settled: SettledKeys, batch_rows: int, *, columns: bool) -> Iterator[Planned]:
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
            if columns and not first:
                planned = _columns(builder, frame, settled)
                if planned is not None:
                    yield planned
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
            prompt = prompts[index] or ""  # a row with a key has a prompt (a null one went through `build`)
            request = builder.column_request(key, prompt)
            row = PlannedRow(position, row_id, key, [request], [False], None, estimate(prompt) if estimate else None)
        rows.append(row)
    _marked(built, settled)
    return rows


def _columns(builder: RequestBuilder, frame: pl.DataFrame, settled: SettledKeys) -> PlannedColumns | None:
    """`frame` planned as columns (PlannedColumns), or None when its prompt cannot be rendered as columns
    (more than one sample, or a column polars would print otherwise than Jinja)."""
    if builder.samples != 1:
        return None
    column = builder.prompt_column(frame)
    if column is None:
        return None
    prompts: list[str | None] = column.to_list()
    made = builder.keys_of(prompts)
    estimate = _last_turn_estimate(builder)
    estimates = _estimates(estimate, column, prompts) if estimate is not None else None
    built: dict[int, PlannedRow] = {}
    if None in made:  # rows `build` makes (a null, a prompt over the limit): their key, error or request
        for index in [i for i, key in enumerate(made) if key is None]:
            built[index] = _render_rows(builder, frame.slice(index, 1))[0]
            prompts[index] = None
        _marked(list(built.values()), settled)
        for index, row in built.items():
            made[index] = row.key
    keys: list[str] = made  # type: ignore[assignment]  # every None was filled in above
    done: list[bool] = settled.contains(pl.Series(KEY, keys, dtype=pl.String)).to_list()
    for index, row in built.items():
        done[index] = bool(row.done) and all(row.done)
    return PlannedColumns(frame, keys, prompts, done, estimates, built, builder)


def _estimates(estimate: LastTurnEstimate, column: pl.Series, prompts: list[str | None]) -> list[int]:
    """`estimate(prompt)` for each prompt (0 for a null), made as one polars expression for ASCII prompts
    (their estimate is their length alone: the same float operations in the same order, so the same
    integers) and one by one for the rest."""
    chars = column.str.len_chars()
    raw = (estimate.before + (chars.cast(pl.Float64) / LATIN_CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS)).ceil()
    values: list[int | None] = raw.cast(pl.Int64).clip(1).to_list()
    ascii_only = chars.cast(pl.UInt64) == column.str.len_bytes().cast(pl.UInt64)
    if ascii_only.all(ignore_nulls=False):  # the usual batch: every prompt's estimate made above
        return values  # type: ignore[return-value]  # no null (all() with a null is not True)
    plain: list[bool | None] = ascii_only.to_list()
    return [
        value if is_plain and value is not None else (estimate(prompt) if prompt is not None else 0)
        for value, is_plain, prompt in zip(values, plain, prompts, strict=True)
    ]


def _last_turn_estimate(builder: RequestBuilder) -> LastTurnEstimate | None:
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
    """A run's side of planning: records the row map, settles rows, hands each request over once, in
    blocks (`blocks`) or one by one (`requests`)."""

    rows: RowMap
    keep_columns: tuple[str, ...]
    tally: Tally
    deliver: Deliver  # where a row that failed to render is recorded
    # How many of these requests (keys, raw input-token estimates), in order, may be sent within the
    # budget? (Accountant.admit_block: reserves them.)
    admit: Callable[[list[str], list[int]], int]
    control: Control
    pilot: frozenset[int] | None = None  # a pilot sends only these row positions
    # Requests handed to the executor and not yet answered: the run is complete when none are left. None:
    # `admit` keeps them (the Accountant's table, Run.one_table).
    outstanding: OpenKeys | set[str] | None = field(default_factory=set)
    # The model's context window: a prompt estimated above it is refused here (the endpoint would
    # refuse it too, 400/1261), its row failed with the reason, and nothing is sent.
    context_tokens: int | None = None

    async def blocks(self, batches: Iterator[Planned], fingerprint: dict[str, Any]) -> AsyncIterator[RequestBlock]:
        """The requests to send, a block at a time, each handed over (outstanding, counted) as it is
        yielded. Stops early, leaving the row map unsealed, when the budget cannot cover the next
        request; seals it when every input row was rendered."""
        async for block in self._admitted(batches, fingerprint):
            if self.outstanding is not None:
                self.outstanding.update(block.keys)
            self.tally.requests_queued += len(block)
            yield block

    async def requests(self, batches: Iterator[Planned], fingerprint: dict[str, Any]) -> AsyncIterator[Request]:
        """`blocks`, one request at a time, each handed over as it is yielded: for an executor that
        takes requests one by one (the online one, a cluster worker's)."""
        outstanding, tally = self.outstanding, self.tally
        admitted = self._admitted(batches, fingerprint)
        try:
            async for block in admitted:
                for request in block.requests():
                    if outstanding is not None:
                        outstanding.add(request.key)
                    tally.requests_queued += 1
                    yield request
        finally:
            await admitted.aclose()

    async def _admitted(self, batches: Iterator[Planned], fingerprint: dict[str, Any]) -> AsyncGenerator[RequestBlock]:
        """Each batch's requests to send, admitted by the budget a block at a time (the longest run of them
        it covers, tried again for the rest once those are handed over); the rows before the first one
        it cannot cover settled, failed or counted as the row by row rule does them."""
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
                with state_guard(state_dir):
                    triage = (
                        self._columns(batch, queued) if isinstance(batch, PlannedColumns) else self._rows(batch, queued)
                    )
                start, count = 0, len(triage.keys)
                while start < count:
                    admitted = self.admit(triage.keys[start:], triage.estimates[start:])
                    if admitted == 0:
                        self._account(triage, triage.row_of[start])
                        self.control.end_dispatch("budget")  # what was admitted is paid for in advance: send it
                        return
                    stop = start + admitted
                    self._account(triage, triage.row_of[stop] if stop < count else batch.frame.height)
                    yield RequestBlock(triage.keys[start:stop], triage.items[start:stop], triage.build)
                    start = stop
                self._account(triage, batch.frame.height)
                await asyncio.sleep(0)  # let answers in between batches
            with state_guard(state_dir):
                self.rows.seal(fingerprint)  # reached only when every input row was rendered
            tally.all_rows_rendered = True
        except STATE_FAILURES as exc:
            self.control.fail(exc)
        finally:
            queued.close()  # its scratch files, also when the run stops early or the generator is dropped

    def _rows(self, batch: PlannedBatch, queued: RequestKeys) -> _Triage:
        """A batch of rows sorted for dispatch, row by row."""
        # Answered before; or, in a pilot (which sends only its sample of rows), not wanted now.
        wanted = [row for row in batch.rows if row.error is None and not self._settled(row)]
        # A row with the same prompt earlier in this run has the same key, the same samples and the same
        # `done`: its requests were queued then (the row's key stands for all of them).
        fresh = iter(queued.add_batch([row.key for row in wanted]))  # in the order of `wanted`
        triage = _Triage()
        context, pilot = self.context_tokens, self.pilot
        for index, row in enumerate(batch.rows):
            if row.error is not None:
                triage.failed.append((index, row))
            elif all(row.done):  # answered before
                triage.settled.append(index)
            elif pilot is not None and row.position not in pilot:  # a pilot's row outside its sample
                triage.left_out.append(index)
            elif not next(fresh):  # an identical request is queued already: its answer answers this row too
                triage.shared.append(index)
                triage.shared_requests.append(sum(not done for done in row.done))
            else:
                for pending, is_done in zip(row.requests, row.done, strict=True):
                    if is_done:
                        continue
                    # once: the context and the budget (made with the prompt where it was rendered as columns)
                    estimated = row.estimate if row.estimate is not None else estimate_request(pending.params)
                    if over_context(estimated, context):
                        triage.over.append((index, pending, estimated))
                        continue
                    triage.row_of.append(index)
                    triage.keys.append(pending.key)
                    triage.estimates.append(estimated)
                    triage.items.append(pending)
        return triage

    def _columns(self, batch: PlannedColumns, queued: RequestKeys) -> _Triage:
        """A batch planned as columns sorted for dispatch, as `_rows` sorts its rows, in list operations
        over the batch (a row that went through `build` by `_rows`' rule)."""
        keys, done, built, pilot = batch.keys, batch.done, batch.built, self.pilot
        triage = _Triage(build=batch.builder.column_request)
        if built or pilot is not None:
            positions = batch.frame.get_column(ROW).to_list()
            wanted: list[int] = []
            for index, is_done in enumerate(done):
                row = built.get(index)
                if row is not None and row.error is not None:
                    triage.failed.append((index, row))
                elif is_done:
                    triage.settled.append(index)
                elif pilot is not None and positions[index] not in pilot:
                    triage.left_out.append(index)
                else:
                    wanted.append(index)
        elif not any(done):  # a re-plan after a template edit: nothing answered before
            wanted = list(range(len(keys)))
        else:
            triage.settled = [index for index, is_done in enumerate(done) if is_done]
            wanted = [index for index, is_done in enumerate(done) if not is_done]
        everyone = len(wanted) == len(keys)
        fresh = queued.add_batch(keys if everyone else [keys[index] for index in wanted])
        prompts, made = batch.prompts, batch.estimates
        if everyone and not built and all(fresh):  # every row's request is new: the batch's own columns
            triage.row_of, triage.keys, triage.items = wanted, keys, prompts  # type: ignore[assignment]
            triage.estimates = made if made is not None else [estimate_request(batch.builder.column_request(
                key, prompt or "").params) for key, prompt in zip(keys, prompts, strict=True)]  # fmt: skip
            self._over_context_out(triage)
            return triage
        triage.shared = [index for index, new in zip(wanted, fresh, strict=True) if not new]
        triage.shared_requests = [1] * len(triage.shared)
        chosen = [index for index, new in zip(wanted, fresh, strict=True) if new]
        items: list[Request | str] = [
            built[index].requests[0] if index in built else prompts[index] or "" for index in chosen
        ]
        if made is not None and not built:
            estimates = [made[index] for index in chosen]
        else:
            estimates = [
                made[index]
                if made is not None and index not in built
                else estimate_request(_request(item, keys[index], triage).params)
                for index, item in zip(chosen, items, strict=True)
            ]
        triage.row_of, triage.items, triage.estimates = chosen, items, estimates
        triage.keys = [keys[index] for index in chosen]
        self._over_context_out(triage)
        return triage

    def _over_context_out(self, triage: _Triage) -> None:
        """Take the requests estimated over the model's context window out of `triage`'s requests to send,
        into its failures (`over`)."""
        context, estimates = self.context_tokens, triage.estimates
        if context is None or not any(estimated > context for estimated in estimates):
            return
        keep = [estimated <= context for estimated in estimates]
        triage.over = [
            (index, _request(item, key, triage), estimated)
            for index, key, item, estimated, kept in zip(
                triage.row_of, triage.keys, triage.items, estimates, keep, strict=True
            )
            if not kept
        ]
        triage.row_of, triage.keys, triage.items, triage.estimates = (
            [index for index, kept in zip(triage.row_of, keep, strict=True) if kept],
            [key for key, kept in zip(triage.keys, keep, strict=True) if kept],
            [item for item, kept in zip(triage.items, keep, strict=True) if kept],
            [estimated for estimated in estimates if estimated <= context],
        )

    def _account(self, triage: _Triage, stop: int) -> None:
        """Settle, fail and count the triaged rows before row `stop` not done yet, as the row by row rule
        does each row it reaches."""
        tally = self.tally
        settled = bisect.bisect_left(triage.settled, stop)
        tally.rows_settled += settled - triage.counted_settled
        triage.counted_settled = settled
        left_out = bisect.bisect_left(triage.left_out, stop)
        tally.rows_left_out += left_out - triage.counted_left_out
        triage.counted_left_out = left_out
        shared = bisect.bisect_left(triage.shared, stop)
        tally.requests_shared += sum(triage.shared_requests[triage.counted_shared : shared])
        triage.counted_shared = shared
        while triage.failed and triage.failed[0][0] < stop:
            self._render_failure(triage.failed.pop(0)[1])
        while triage.over and triage.over[0][0] < stop:
            _, request, estimated = triage.over.pop(0)
            self._over_context(request, estimated)

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


@dataclass
class _Triage:
    """One planned batch sorted for dispatch: rows by what becomes of them (row indices in order), and
    the requests to send (`keys`, `estimates`, `items`; `row_of`: each one's row), in row order."""

    failed: list[tuple[int, PlannedRow]] = field(default_factory=list)  # failed to render
    settled: list[int] = field(default_factory=list)  # answered before
    left_out: list[int] = field(default_factory=list)  # outside a pilot's sample
    shared: list[int] = field(default_factory=list)  # an identical request queued already
    shared_requests: list[int] = field(default_factory=list)  # how many requests each of those shares
    over: list[tuple[int, Request, int]] = field(default_factory=list)  # over the context window, with estimate
    row_of: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    estimates: list[int] = field(default_factory=list)
    items: list[Request | str] = field(default_factory=list)
    build: Callable[[str, str], Request] | None = None  # a prompt's Request (items that are prompts)
    counted_settled: int = 0  # how many of each list `Dispatch._account` counted so far
    counted_left_out: int = 0
    counted_shared: int = 0


def _request(item: Request | str, key: str, triage: _Triage) -> Request:
    """A triaged item's Request: itself, or made from its prompt."""
    if isinstance(item, Request):
        return item
    assert triage.build is not None
    return triage.build(key, item)


class RequestKeys:
    """The request keys a run has queued, in 8 bytes of memory a key (a Python set of str takes ~120):
    for a 10M-row input they would otherwise be the largest thing a run holds.

    A request key is 32 hex digits, the first 128 bits of a sha256 (runner.job.prompts). The newest
    keys are kept as strings in a set; every `run_keys` of them become a run, sorted by the key's high
    64 bits. A run keeps those high halves in memory (a sorted UInt64 Series) and its low halves, in
    the same order, in a file in `spill_dir` (or in memory without one). A filter of 2**26 bits (8 MB,
    runner.state.settled.bucket_filter) marks the buckets of every high half in a run: `add_batch`
    looks a batch of keys up there first, and only the few in a marked bucket in every run, by binary
    search on the high halves (a re-plan's keys are nearly all new: a search of each run for each was
    most of its cost); only a key whose high half is
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
        self._filter: pl.Series | None = None  # a bit a bucket of high halves: set where a run holds one
        self._recent_halves: list[pl.DataFrame] = []  # the high and low halves of the keys in `recent`
        self._loose: list[str] = []  # keys in `recent` added one by one (their halves not made yet)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (
            key in self._recent or key in self._other or self._in_runs([key], _halves([key]))[0]
        )

    def add(self, key: str) -> bool:
        """Add one key; True if it was not in the set yet."""
        if key in self._recent or key in self._other or (self._runs and self._in_runs([key], _halves([key]))[0]):
            return False
        if _HEX_KEY.fullmatch(key):
            self._recent.add(key)
            self._loose.append(key)  # its halves are made when `recent` becomes a run
        else:
            self._other.add(key)
        self.size += 1
        if len(self._recent) >= self._run_keys:
            self._freeze()
        return True

    def add_batch(self, keys: list[str]) -> list[bool]:
        """Add `keys` in order; for each, True if it was new (not seen before, nor earlier in `keys`)."""
        hexed = _all_hex(keys)  # each key 32 hex digits: one check for the usual batch, not one a key
        halves = _halves(keys, hexed)  # made once: looked up in the runs, and kept for the next run
        known = self._in_runs(keys, halves)
        recent, other = self._recent, self._other
        fresh: list[bool]
        if hexed and not other and not any(known):  # the usual batch: new keys, or ones seen in `recent`
            # `recent.add` returns None: a key already there is not new, one added is.
            fresh = [not (key in recent or recent.add(key)) for key in keys]  # type: ignore[func-returns-value]
        elif hexed and not other:
            fresh = [not (old or key in recent or recent.add(key)) for key, old in zip(keys, known, strict=True)]  # type: ignore[func-returns-value]
        else:
            fresh = []
            for key, old in zip(keys, known, strict=True):
                if old or key in recent or key in other:
                    fresh.append(False)
                    continue
                (recent if _HEX_KEY.fullmatch(key) else other).add(key)
                fresh.append(True)
        self.size += sum(fresh)
        # The halves of the keys `recent` took (the new hex keys), for `_freeze`.
        if keys:
            self._recent_halves.append(halves.filter(pl.Series(fresh, dtype=pl.Boolean) & halves["high"].is_not_null()))
        if len(recent) >= self._run_keys:  # only between batches: a batch is checked against one state
            self._freeze()
        return fresh

    def contains_batch(self, keys: list[str]) -> list[bool]:
        """Is each of `keys` in the set? (Vectorised over the runs, as `add_batch` looks keys up.)"""
        known = self._in_runs(keys, _halves(keys))
        return [old or key in self._recent or key in self._other for key, old in zip(keys, known, strict=True)]

    @property
    def run_bytes(self) -> int:
        """Bytes the sorted runs hold in memory (polars buffers, which tracemalloc does not see)."""
        return sum(run.nbytes for run in self._runs)

    def close(self) -> None:
        """Remove the run files (the set is empty afterwards)."""
        for run in self._runs:
            run.close()
        self._runs, self._recent, self._other, self.size, self._filter = [], set(), set(), 0, None
        self._recent_halves, self._loose = [], []

    def _freeze(self) -> None:
        """Turn the recent keys into a sorted run."""
        loose = [_halves(self._loose, hexed=True)] if self._loose else []
        run = pl.concat(self._recent_halves + loose).sort("high", "low")  # the halves of the keys in `recent`
        assert run.height == len(self._recent)
        self._recent_halves, self._loose = [], []
        path = None
        if self._spill_dir is not None:
            self._spill_dir.mkdir(parents=True, exist_ok=True)
            path = self._spill_dir / f"queued-{len(self._runs):05d}.u64"
        self._runs.append(_Run(run.get_column("high"), run.get_column("low"), path))
        self._recent = set()
        if self._filter is None:
            self._filter = bucket_filter(run.get_column("high"))
        else:
            mark(self._filter, run.get_column("high"))

    def _in_runs(self, keys: list[str], halves: pl.DataFrame) -> list[bool]:
        """Is each key (its `halves`) in one of the runs? (Vectorised: a binary search per run, not per key.)"""
        if not self._runs or not keys:
            return [False] * len(keys)
        # A key that is not 32 hex digits has null halves: never found.
        high, low = halves.get_column("high").fill_null(0), halves.get_column("low")
        found = [False] * len(keys)
        assert self._filter is not None
        maybe = self._filter.gather(buckets(high))  # False: no run holds a key in this key's bucket
        if not maybe.any():
            return found
        picked = maybe.arg_true()
        asked, positions = high.gather(picked), picked.to_list()
        for run in self._runs:
            last = run.high.len() - 1
            first = run.high.search_sorted(asked, side="left")
            there = run.high.gather(first.clip(0, last)) == asked
            if not there.any():  # nearly always: none of the batch's high halves is in this run
                continue
            for j in there.arg_true().to_list():  # the high half is there: compare the low half
                i = positions[j]
                wanted = low[i]
                if wanted is not None and not found[i]:
                    start = int(first[j])
                    count = int(run.high.search_sorted(high[i], side="right")) - start
                    found[i] = wanted in run.lows(start, count)
        return found


def _all_hex(keys: list[str]) -> bool:
    """Is every key 32 lowercase hex digits? (One check of the keys joined, in C, not one a key.)"""
    joined = "\n".join(keys)
    if not keys or len(joined) != 33 * len(keys) - 1:
        return False
    try:
        data = joined.encode("ascii")
    except UnicodeEncodeError:
        return False
    # A newline after every 32 characters and nowhere else, and nothing but hex digits between them.
    return data[32::33] == b"\n" * (len(keys) - 1) and not data.translate(None, b"0123456789abcdef\n")


def _halves(keys: list[str], hexed: bool = False) -> pl.DataFrame:
    """Each key's high and low 64 bits (UInt64 columns `high`, `low`), parsed by polars; both null for a
    key that is not 32 lowercase hex digits (`hexed`: every key is known to be)."""
    column = pl.col("key")

    def half(start: int) -> pl.Expr:
        parsed = column.str.slice(start, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False)
        return parsed if hexed else pl.when(column.str.contains("^[0-9a-f]{32}$")).then(parsed)

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


async def nothing() -> AsyncIterator[Request]:
    """No requests: a re-run of a finished job over unchanged inputs."""
    return
    yield  # pragma: no cover - makes this an (empty) async generator
