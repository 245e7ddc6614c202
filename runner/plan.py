"""The planning loop, one for run, estimate and validate: read rows, render, key, check what is settled.

    for batch in plan(job, source, settled):       # bounded batches, in input order
        for row in batch.rows:                     # each row's requests (one per sample), and which
            ...                                    # of them an earlier run already settled

`Dispatch` is the run's use of it: it records the row map, settles what needs no sending, and yields
each request to send once (rows with identical prompts share one request), stopping when the budget
cannot cover the next one. The estimate counts the same requests; validate prints the first ones.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import polars as pl

from runner.errors import UsageError
from runner.job.inputs import ID, ROW
from runner.job.prompts import RequestBuilder, sample_key
from runner.job.resolve import Job
from runner.job.templates import RenderError
from runner.money.accounting import Tally
from runner.records import KEY, Request, Result
from runner.send.base import Control, Deliver
from runner.state.rowmap import RowMap
from runner.state.store import SettledKeys

RENDER_BATCH_ROWS = 2000  # rows rendered per step; small enough not to stall responses for long
ALL_FAIL_ROWS = 20  # when this many first rows all fail with one template error, the template is wrong


class Rows(Protocol):
    """Input rows in order, with `_row` and `_id`: runner.job.inputs.InputSource, or a cluster worker's block."""

    def batches(self, batch_rows: int) -> Iterator[pl.DataFrame]: ...


@dataclass(slots=True)
class PlannedRow:
    """One input row: its requests (one, or one per sample) and whether each is settled already;
    or, when its prompt failed to render, the error (and no requests)."""

    position: int
    id: str
    key: str  # the row's request key (sample 0), or `render-<id>` when it failed to render
    requests: list[Request]
    done: list[bool]
    error: RenderError | None = None


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
    first = True
    for frame in source.batches(batch_rows):
        rows: list[PlannedRow] = []
        for values in frame.iter_rows(named=True):
            position, row_id = values[ROW], values[ID]
            try:
                request = builder.build(values)
            except RenderError as exc:
                rows.append(PlannedRow(position, row_id, f"render-{row_id}", [], [], exc))
            else:
                rows.append(PlannedRow(position, row_id, request.key, builder.samples_of(request), []))
        if first:
            _check_template(job, rows, whole_input=frame.height < batch_rows)
            first = False
        wanted = pl.Series(KEY, [r.key for row in rows for r in row.requests], dtype=pl.String)
        done = iter(settled.contains(wanted).to_list())
        for row in rows:
            row.done = [next(done) for _ in row.requests]
        yield PlannedBatch(frame, rows)


def _check_template(job: Job, rows: list[PlannedRow], whole_input: bool) -> None:
    """Raise UsageError when the first ALL_FAIL_ROWS rows (or every row of a shorter input) failed to
    render with the same kind of error: then the template, not the data, is wrong."""
    first = rows[:ALL_FAIL_ROWS]
    if not first or (len(first) < ALL_FAIL_ROWS and not whole_input):
        return
    # A row skipped for a null (input.nulls: skip) says nothing about the template.
    kinds = {str(row.error).split(":", 1)[0] if row.error is not None else None for row in first
             if row.error is None or row.error.error_type == "render_error"}  # fmt: skip
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
    admit: Callable[[Request], bool]  # may this request be sent within the budget? (reserves it)
    control: Control
    pilot: frozenset[int] | None = None  # a pilot sends only these row positions
    # Requests handed to the executor and not yet answered: the run is complete when none are left.
    outstanding: set[str] = field(default_factory=set)

    async def requests(self, batches: Iterator[PlannedBatch], fingerprint: dict[str, Any]) -> AsyncIterator[Request]:
        """Yield the requests to send. Stops early, leaving the row map unsealed, when the budget
        cannot cover the next request; seals it when every input row was rendered."""
        queued: set[str] = set()
        tally = self.tally
        for batch in batches:
            self.rows.add(batch.row_map(self.keep_columns))
            tally.rows_seen += batch.frame.height
            for row in batch.rows:
                if row.error is not None:
                    self._render_failure(row)
                    continue
                # Answered before; or, in a pilot (which sends only its sample of rows), not wanted now.
                if all(row.done) or (self.pilot is not None and row.position not in self.pilot):
                    tally.rows_settled += 1
                    continue
                for pending, is_done in zip(row.requests, row.done, strict=True):
                    if is_done or pending.key in queued:
                        tally.requests_shared += not is_done  # an identical request is queued: it answers this row too
                        continue
                    if not self.admit(pending):
                        self.control.end_dispatch("budget")  # what was admitted is paid for in advance: send it
                        return
                    queued.add(pending.key)
                    self.outstanding.add(pending.key)
                    tally.requests_queued += 1
                    yield pending
            await asyncio.sleep(0)  # let answers in between batches
        self.rows.seal(fingerprint)  # reached only when every input row was rendered
        tally.all_rows_rendered = True

    def _render_failure(self, row: PlannedRow) -> None:
        """Record a row whose prompt cannot be rendered as failed (each of its samples); nothing is sent."""
        for index in range(self.tally.samples):
            self.deliver(
                Result(
                    key=sample_key(row.key, index),
                    status="error",
                    attempts=0,
                    latency_ms=None,
                    finished_at=dt.datetime.now(dt.UTC),
                    error_type=row.error.error_type if row.error is not None else "render_error",
                    error_message=str(row.error),
                )
            )


async def nothing() -> AsyncIterator[Request]:
    """No requests: a re-run of a finished job over unchanged inputs."""
    return
    yield  # pragma: no cover - makes this an (empty) async generator
