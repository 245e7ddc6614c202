"""One run of one job: what it holds and what it does with each answer. The engine opens it, a sender
fills it (a Ray actor keeps one per block), runner.finish ends it.

    run = Run.open(job, source, store, options, control, reporter)
    sending = await sender.send(run, api_key, reporter, signals)   # every result into run.deliver
"""

from __future__ import annotations

import asyncio
import ctypes
import datetime as dt
import random
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from runner.breaker import Breaker
from runner.control import Control
from runner.errors import STATE_FAILURES
from runner.files import RESCUE_MARK
from runner.job.inputs import InputSource
from runner.job.resolve import Job, check_written_apart
from runner.money.accounting import Accountant, Tally, accountant_for
from runner.money.ledger import ledger_dir
from runner.observe.cpu import CpuWindow
from runner.observe.progress import Reporter
from runner.observe.summary import Sending
from runner.plan import Dispatch, Planned
from runner.records import Answers, Request, RequestBlock, Result
from runner.resume import settled_keys
from runner.runs import RunOptions, fingerprint
from runner.state.openkeys import OpenKeys
from runner.state.rowmap import RowMap
from runner.state.settled import SettledKeys
from runner.state.store import Store
from runner.supervise import Signals


@dataclass
class Run:
    """One run's state, and the rule for each result: priced, counted and journalled once."""

    job: Job
    source: InputSource
    store: Store
    tally: Tally
    accountant: Accountant
    settled: SettledKeys  # request keys an earlier run answered: never sent, journalled or booked again
    control: Control
    rows: RowMap | None = None  # where planning writes the row map: the store's, or a Ray block's lines
    pilot: frozenset[int] | None = None  # a pilot sends only these row positions
    built_from: dict[str, Any] = field(default_factory=dict)  # the fingerprint the row map is sealed with
    unchanged: bool = False  # nothing changed since a run that answered every row: nothing to render
    breaker: Breaker | None = None
    on_answer: Callable[[Result, str | None], None] | None = None  # a Ray actor reports each answer
    # Requests handed to a sender, not answered yet (in batch mode every row's: ~33 bytes a key, not ~170).
    outstanding: OpenKeys = field(default_factory=OpenKeys)
    cpu: CpuWindow = field(default_factory=CpuWindow)
    # Answers of this turn of the event loop, settled and waiting for their one journal write.
    committing: list[tuple[Result, str | None]] = field(default_factory=list)
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @classmethod
    def open(
        cls, job: Job, source: InputSource, store: Store, options: RunOptions, control: Control, reporter: Reporter
    ) -> Run:
        """The run over an opened input and store: its prices, pilot sample, settled keys, and whether
        anything changed since a run that answered every row."""
        started_at = dt.datetime.now(dt.UTC)
        samples = job.spec.output.samples
        tally = Tally(rows_total=source.rows, samples=samples)  # counted when the input was opened
        accountant = accountant_for(job)
        pilot = _pilot_sample(tally.rows_total, options) if options.pilot_rows else None
        reporter.phase("checking earlier answers")
        settled = settled_keys(job, store, fresh=options.fresh, retry_failed=options.retry_failed,
                               resend_lost=options.resend_lost, rows_total=tally.rows_total,
                               reporter=reporter)  # fmt: skip
        built_from = fingerprint(job)
        unchanged = not options.fresh and pilot is None and store.rows.is_current(built_from, settled, samples)
        if unchanged:  # every row is answered: none needs rendering
            tally.rows_seen = tally.rows_settled = tally.rows_total
            tally.all_rows_rendered = True
        control.notify = reporter.event
        # The keys in flight are the accountant's admitted ones, in its table: held once, not twice.
        run = cls(job, source, store, tally, accountant, settled, control, pilot=pilot, built_from=built_from,
                  unchanged=unchanged, breaker=Breaker.for_run(tally.rows_total), started_at=started_at,
                  outstanding=accountant.in_flight())  # fmt: skip
        control.checkpoint = run.checkpoint
        control.deliver_answers = run.deliver_answers
        return run

    @property
    def one_table(self) -> bool:
        """Are the keys in flight the accountant's admitted ones (Run.open's), or a set of their own (a Ray
        actor's block, whose accountant admits for every block of the actor)?"""
        return self.outstanding.table is self.accountant.open_table

    @property
    def complete(self) -> bool:
        """Has every row a result? Every row was rendered and every request queued came back (rows whose
        request was settled before are answered by definition); this beats joining the whole row map."""
        return self.unchanged or (self.tally.all_rows_rendered and not self.outstanding)

    def requests(self, batches: Iterator[Planned]) -> AsyncIterator[Request]:
        """The requests to send from planned batches, each once (runner.plan.Dispatch), row map recorded."""
        return self._dispatch().requests(batches, self.built_from)

    def blocks(self, batches: Iterator[Planned]) -> AsyncIterator[RequestBlock]:
        """`requests` a block at a time (runner.plan.Dispatch.blocks), for an executor that takes blocks."""
        return self._dispatch().blocks(batches, self.built_from)

    def _dispatch(self) -> Dispatch:
        return Dispatch(
            self.rows or self.store.rows,
            self.source.keep_columns,
            self.tally,
            self.deliver,
            self.accountant.admit_block,
            self.control,
            self.pilot,
            None if self.one_table else self.outstanding,  # (one table: admitting them put them in flight)
            context_tokens=self.job.model.context,
        )

    def deliver(self, result: Result) -> None:
        """One result from the sender, journalled; the breaker holds the run's first failures until it
        knows they are not the spec's fault."""
        breaker = self.breaker
        if breaker is None or not breaker.watching:  # nearly every result
            self._journal(result)
            return
        for admitted in breaker.admit(result):
            self._journal(admitted)
        if breaker.tripped and self.control.aborted is None:
            self.control.abort(breaker.error())

    def deliver_answers(self, answers: Answers) -> None:
        """A block of ok answers from the sender (runner.records.Answers): what `deliver` does with each
        as a Result, done for the block at once (priced, held for the part, counted). While the breaker
        still watches, or a Ray actor reports each answer, they go one by one through `deliver`."""
        if (self.breaker is not None and self.breaker.watching) or self.on_answer is not None:
            for result in answers.results():
                self.deliver(result)
            return
        self.cpu.begin()
        self.commit()  # what came before, first
        settled, opened = self.settled, None
        if self.one_table:
            opened = self.accountant.take(answers.keys)
            ours = [value is not None for value in opened]
        else:
            ours = self.outstanding.take_many(answers.keys)
        if not all(ours):  # answered in an earlier run (a batch harvested twice): never journalled or booked twice
            kept = [mine or not settled.has(key) for key, mine in zip(answers.keys, ours, strict=True)]
            answers = answers.only(kept)
            opened = [value for value, keep in zip(opened, kept, strict=True) if keep] if opened is not None else None
        tiers = self.accountant.settle_answers(answers, opened)
        try:
            self.store.add_answers(answers)
            if self.store.buffered >= self.job.spec.run.checkpoint_rows:
                self.store.flush_soon()
        except STATE_FAILURES as exc:  # as in `commit`: the run stops, the answers are held (rescued)
            self.control.fail(exc)
        finally:
            self.tally.record_answers(answers, tiers)

    def _journal(self, result: Result) -> None:
        self.cpu.begin()
        if self.one_table:
            opened = self.accountant.take_one(result.key)
            if opened is None and self.settled.has(result.key):
                return  # answered in an earlier run (a batch harvested twice): never journalled or booked twice
            self.committing.append(self.accountant.price(result, opened))
        else:
            if result.key not in self.outstanding and self.settled.has(result.key):
                return  # as above
            self.outstanding.discard(result.key)
            self.committing.append(self.accountant.settle(result))
        if len(self.committing) == 1:  # the first answer of this turn: commit them all at its end
            try:
                asyncio.get_running_loop().call_soon(self.commit)
            except RuntimeError:  # no event loop here: at once
                self.commit()

    def commit(self) -> None:
        """Group commit: the answers that arrived in one turn of the event loop go to the journal in one
        write, and are counted once it is done (a kill before it loses them as it loses requests in
        flight: they are sent again, never counted twice)."""
        if not self.committing:
            return
        settled, self.committing = self.committing, []
        results = [result for result, _ in settled]
        try:
            self.store.add_many(results)
            if self.store.buffered >= self.job.spec.run.checkpoint_rows:
                self.store.flush_soon()  # in a thread: sending goes on while the part is written
        except STATE_FAILURES as exc:  # the state folder takes no writes: stop; the answers are held (rescued)
            self.control.fail(exc)
        finally:
            for result, (_, tier) in zip(results, settled, strict=True):
                self.tally.record(result, tier)
                if self.on_answer is not None:
                    self.on_answer(result, tier)

    def checkpoint(self, soon: bool = False) -> None:
        """Fold what was journalled into a durable part: now, or in a thread (`soon`: the time-based
        checkpoint while sending, Store.flush_soon); a state that takes no writes stops the run."""
        self.commit()
        try:
            if soon:
                self.store.flush_soon()
            else:
                self.store.flush()
        except STATE_FAILURES as exc:
            self.control.fail(exc)

    def sent(self) -> None:
        """Sending is over: the failures a breaker still holds stand (a run shorter than its window),
        and everything is checkpointed."""
        for held in self.breaker.release() if self.breaker is not None else ():
            self._journal(held)
        self.checkpoint()
        self.cpu.close()
        # The tables that held every request in flight (a batch's: all of them at once) are empty now but
        # keep their size; made anew, their memory goes back before finishing (compaction, the output).
        one_table = self.one_table
        self.accountant.shrink()
        if not self.outstanding:
            self.outstanding = self.accountant.in_flight() if one_table else OpenKeys()
        give_back_memory()


class Sender(Protocol):
    """How a run's requests go out (this process's executor, or Ray's actors): every result into the
    run, stopping when its control says so. Returns how it sent, for the summary."""

    async def send(self, run: Run, api_key: str, reporter: Reporter, signals: Signals) -> Sending: ...


def check_places(job: Job) -> None:
    """Before anything is sent: refuse places a run may write that the job's inputs would read."""
    rescue_journal = job.output_path.with_name(f"{job.output_path.stem}{RESCUE_MARK}run.jsonl")
    check_written_apart(job, ledger_dir(), rescue_journal)


def give_back_memory() -> None:
    """Hand the heap pages Python freed back to the system (glibc's malloc_trim; elsewhere nothing): once
    sending is over, what planning and the keys in flight left (~60 MB at a million rows in batch mode)
    is not carried into the finish, where the run's memory peaks."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc
        return
    trim(0)


def _pilot_sample(rows_total: int, options: RunOptions) -> frozenset[int]:
    """The row positions a pilot sends: a seeded random sample, the same on every try."""
    count = min(options.pilot_rows or 0, rows_total)
    return frozenset(random.Random(options.pilot_seed).sample(range(rows_total), count))
