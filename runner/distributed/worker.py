"""A sending actor of a Ray run: one block of input rows in, its row-map lines out, every answer journalled;
a retried block never pays twice for what its dead attempt got (docs/decisions.md, "Ray runs")."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import ray

from runner.control import Control
from runner.distributed.slots import LeasedSlots
from runner.distributed.terms import Reservation
from runner.job.inputs import ROW, InputSource
from runner.job.resolve import Job
from runner.money.accounting import Accountant, Tally
from runner.money.tokens import estimate_request
from runner.plan import RequestKeys, plan
from runner.records import KEY, Request, Result, result_to_json
from runner.run import Run
from runner.send import online_executor
from runner.send.client import Client
from runner.send.online import OnlineExecutor
from runner.state.rowmap import RowMap
from runner.state.settled import SettledKeys
from runner.state.store import Store

REPORT = "_report"  # the column carrying a block's report on its first line


@dataclass(frozen=True)
class ActorConfig:
    """What every sending actor of one run is built from (pickled once per actor)."""

    job: Job
    run_id: str
    base_url: str
    api_key: str
    limiter: Any  # ActorHandle[ClusterLimiter]: the run's one in-flight limit and budget
    settled: list[Any]  # [ObjectRef of the sorted settled keys]: in a list, so Ray hands over the ref
    accountant: Accountant  # prices answers; its budget is None (the limiter keeps the budget)
    source: InputSource  # for the id rule and the kept columns (its lazy frame is not read here)
    workers: int  # attempts each actor may have waiting for a slot
    budgeted: bool = False


class BlockRows:
    """One block of input rows (with `_row` and `_id`), as runner.plan.plan reads rows."""

    def __init__(self, frame: pl.DataFrame) -> None:
        self._frame = frame

    def batches(self, batch_rows: int) -> Iterator[pl.DataFrame]:
        """The block, whole."""
        yield self._frame


class BlockLines(RowMap):
    """The row-map lines of one block, kept for the map's output instead of written (the driver writes them).

    `scratch_dir` is where planning spills the keys the block queued (runner.plan.RequestKeys): one
    directory per block call, which no other call, actor or job uses (see SendingActor.scratch_for)."""

    def __init__(self, scratch_dir: Path) -> None:
        super().__init__(scratch_dir)  # no map file is written here: `add` keeps the lines in memory
        self.scratch_dir = scratch_dir
        self.lines: list[pl.DataFrame] = []

    def add(self, rows: pl.DataFrame) -> None:
        """Keep the lines."""
        self.lines.append(rows)

    def seal(self, fingerprint: dict[str, Any]) -> None:
        """Nothing: the driver seals the run's map."""


def block_output(lines: pl.DataFrame, report: str) -> pa.Table:
    """A block's row-map lines with its report on the first line (`_report`, null on the others).
    Built as one value and nulls: a literal broadcast with when/then keeps a copy of it per row under
    the nulls (a 500-row block with a 360 KB report went out as 178 MB)."""
    column = pl.Series(REPORT, [report, *[None] * (lines.height - 1)][: lines.height], dtype=pl.String)
    return lines.with_columns(column).to_arrow()


@dataclass
class RunAnswers:
    """The request keys this run has answered so far, by any actor: journals first, then parts, so an
    answer moving from a journal into a part (renamed in, then the journal cut) is seen in one or the other.

    The keys of the parts are kept as the local engine keeps the keys it queued (runner.plan.RequestKeys:
    sorted runs of 16 bytes a key), not as a set of str (~130 bytes a key: over 1 GB an actor at 10M rows)."""

    state_dir: Path
    run_id: str
    _in_parts: RequestKeys = field(default_factory=RequestKeys)
    _parts_read: set[str] = field(default_factory=set)

    def among(self, keys: list[str]) -> set[str]:
        """Which of `keys` this run has an answer for already."""
        journalled: set[str] = set()
        for journal in self.state_dir.glob(f"journal-{self.run_id}-*.jsonl"):
            for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    journalled.add(json.loads(line)["key"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill, or cut by a flush while we read
        for part in (self.state_dir / "results").glob(f"part-{self.run_id}-*.parquet"):
            if part.name not in self._parts_read:  # parts never change once renamed in: read each once
                self._in_parts.add_batch(pl.read_parquet(part, columns=[KEY]).get_column(KEY).to_list())
                self._parts_read.add(part.name)
        in_parts = self._in_parts.contains_batch(keys)
        return {k for k, found in zip(keys, in_parts, strict=True) if found or k in journalled}

    @property
    def held_bytes(self) -> int:
        """Bytes of the parts' keys held in sorted runs (the newest keys, not yet in a run, are Python's)."""
        return self._in_parts.run_bytes


class SendingActor:
    """The map_batches callable: one per actor, sending its blocks' requests under the cluster limit."""

    def __init__(self, config: ActorConfig) -> None:
        self._config = config
        self._job = config.job
        self._settled = SettledKeys(ray.get(config.settled[0]))
        # A restarted actor keeps its Ray id; the pid tells its incarnations (and their journals) apart.
        actor = ray.get_runtime_context().get_actor_id() or "local"
        self.worker_id = f"{actor[-8:]}-{os.getpid()}"
        self._store = Store(self._job.state_dir, config.run_id, writer=self.worker_id, rows=self._job.row_map)
        self._store.open_journal()
        self._answers = RunAnswers(self._job.state_dir, config.run_id)
        self._instance = uuid.uuid4().hex  # names this process's reservations (Reservation.instance)
        self._reservations = itertools.count(1)
        self._attempted: set[str] = set()  # reserved keys an attempt has taken a slot for, not answered yet
        self._executor: OnlineExecutor | None = None
        self._leased: LeasedSlots | None = None
        self._blocks = 0  # block calls running on this actor now

    def _slots(self, client: Client) -> LeasedSlots:
        def overload(exc: Exception) -> tuple[Any, float | None]:
            fault = client.classify(exc)
            return fault.overload, fault.retry_after

        run = self._job.spec.run
        self._leased = LeasedSlots(
            self._config.limiter,
            self.worker_id,
            classify=overload,
            workers=self._config.workers,
            paced=run.requests_per_minute is not None or run.tokens_per_minute is not None,
            expected_output_tokens=self._job.spec.model.max_tokens,
        )
        return self._leased

    def _attempting(self, request: Request) -> int:
        """The request's input estimate, which the executor asks as an attempt of it takes its slot (the
        slot's token charge): from here on the request may be billed, so a budget reservation it has is
        settled by its answer or kept, never handed back unused (_return_unsent)."""
        if self._config.budgeted:
            self._attempted.add(request.key)
        return self._config.accountant.input_estimate(request)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        """Plan, send and journal one block; its row-map lines, the first carrying the block's report."""
        config, job = self._config, self._job
        if self._executor is None:  # made here, inside the actor's event loop
            self._executor = online_executor(job, config.base_url, config.api_key, self._attempting, self._slots)
        self._blocks += 1
        try:
            return await self._send_block(batch)
        finally:
            self._blocks -= 1
            if self._blocks == 0 and self._leased is not None:
                await self._leased.give_back_idle()  # before Ray Data can end this actor, now idle

    async def _send_block(self, batch: pa.Table) -> pa.Table:
        config, job = self._config, self._job
        assert self._executor is not None
        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)
        frame = frame.with_columns(config.source.ids(frame))
        planned = list(plan(job, BlockRows(frame), self._settled, batch_rows=frame.height))
        wanted = list(
            dict.fromkeys(
                r.key for b in planned for row in b.rows for r, d in zip(row.requests, row.done, strict=True) if not d
            )
        )
        # Claims first, answers second (runner.distributed.claims): a key its owner released meanwhile
        # is found answered. Keys another block owns are its to send; the driver checks they were.
        block = f"row-{frame.get_column(ROW)[0]}"  # its first row: the same for a retry of it
        others = set(await config.limiter.claim.remote(block, wanted)) if wanted else set()
        answered = self._answers.among(wanted)
        for b in planned:
            for row in b.rows:
                row.done = [
                    d or r.key in answered or r.key in others for d, r in zip(row.done, row.requests, strict=True)
                ]

        results: list[tuple[str, str | None]] = []
        reserved: dict[str, Reservation] = {}  # key -> its budget reservation at the limiter, until answered

        def answered_now(result: Result, tier: str | None) -> None:
            reservation = reserved.pop(result.key, None)
            if reservation is not None:  # fire and forget: the limiter applies it once, whenever it comes
                config.limiter.settle.remote(self.worker_id, reservation, result.cost or 0.0)
                self._attempted.discard(result.key)
            results.append((result_to_json(result), tier))

        # The driver's rule for each answer, on this actor's store, with the block's row-map lines; the
        # budget is the limiter's (reserved in _reserving), so the accountant only prices.
        lines = BlockLines(self.scratch_for(block))
        tally = Tally(samples=job.spec.output.samples)
        run = Run(job, config.source, self._store, tally, config.accountant, self._settled, Control(), rows=lines,
                  on_answer=answered_now)  # fmt: skip
        control = run.control
        requests = self._reserving(run.requests(iter(planned)), control, reserved)
        try:
            await self._executor.run(requests, run.deliver, control)
        finally:
            self._return_unsent(reserved)
            shutil.rmtree(lines.scratch_dir, ignore_errors=True)  # RequestKeys.close removes its files, not the dir
            run.checkpoint()  # durable as a part before the block's lines are returned
        await config.limiter.release_claims.remote(block)
        report = {
            "results": results,
            "rows_settled": tally.rows_settled,
            "requests_queued": tally.requests_queued,
            "unanswered": sorted(run.outstanding),
            "stopped": control.reason,
            "aborted": str(control.aborted) if control.aborted else None,
            "failed": str(control.failed) if control.failed else None,
            "failed_code": control.failed.exit_code if control.failed else None,
            "retries": control.retries,
            "worker": self.worker_id,
            "deferred": sorted(others - answered),  # sent by the block that owns them
        }
        return block_output(pl.concat(lines.lines), json.dumps(report))

    def scratch_for(self, block: str) -> Path:
        """A block call's scratch directory: under the job's state (so two jobs never share one), named
        by this actor incarnation and the block (so neither two actors nor two blocks running at once
        on one actor do). The call removes it when it ends; one left by a killed actor goes with the
        next run's row-map reset, which clears the whole `rows/queued` (RowMap.reset)."""
        return self._store.rows.scratch_dir / f"{self.worker_id}-{block}"

    async def _reserving(
        self, requests: AsyncIterator[Request], control: Control, reserved: dict[str, Reservation]
    ) -> AsyncIterator[Request]:
        """The requests, each with its worst case reserved at the limiter first (when the run has a budget),
        into `reserved`; stops, as the local engine does, at the first one the budget cannot cover."""
        config = self._config
        async for request in requests:
            if config.budgeted:
                amount = config.accountant.worst_case(estimate_request(request.params))
                reservation = Reservation(self._instance, next(self._reservations))
                reserved[request.key] = reservation  # before the call: a block cancelled meanwhile returns it
                if not await config.limiter.reserve.remote(self.worker_id, reservation, amount):
                    del reserved[request.key]  # refused: nothing is reserved under it
                    control.end_dispatch("budget")
                    return
            yield request

    def _return_unsent(self, reserved: dict[str, Reservation]) -> None:
        """The block is over (ended, stopped or cancelled): hand back the reservations of its requests that
        no attempt took a slot for, which were never sent, so the budget is free for other blocks now
        rather than booked as spent when this actor's lease drops. Those of requests attempted and not
        answered stay open (they may have been billed): the lease's end books them at their worst case."""
        unsent = [reservation for key, reservation in reserved.items() if key not in self._attempted]
        self._attempted.difference_update(reserved)
        if unsent:  # fire and forget, as a settle: the limiter applies each once, whenever it comes
            self._config.limiter.release.remote(self.worker_id, unsent)
