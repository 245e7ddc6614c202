"""The pipeline of one run, top to bottom: plan -> send -> state -> output.

    report = asyncio.run(run_job(job, api_key=key, options=RunOptions(), reporter=reporter))

Open the input and the store, plan (runner.plan), send (runner.send), assemble the output
(runner.output), record the run (runner.finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import itertools
import random
import secrets
import time
from collections.abc import Iterator
from typing import Any

from runner.breaker import Breaker
from runner.control import Control
from runner.errors import STATE_FAILURES
from runner.finish import Ending, finish, record
from runner.job.facts import load_facts, record_facts
from runner.job.inputs import open_input
from runner.job.resolve import Job, check_written_apart
from runner.money.accounting import Tally, accountant_for
from runner.money.ledger import ledger_dir
from runner.observe import summary
from runner.observe.progress import Reporter
from runner.plan import Dispatch, nothing, plan
from runner.records import Result
from runner.resume import settled_keys
from runner.runs import RunOptions as RunOptions  # re-exported
from runner.runs import RunReport as RunReport
from runner.runs import fingerprint
from runner.send import make_executor
from runner.send.base import Executor
from runner.send.endpoints import endpoint_url
from runner.state.rescue import RESCUE_MARK, find_rescued
from runner.state.store import Store
from runner.supervise import stop_on_signals, supervise


async def run_job(
    job: Job, *, api_key: str, options: RunOptions, reporter: Reporter, executor: Executor | None = None
) -> RunReport:
    """Run one job to completion, interruption or abort; the result is durable whichever happens.

    `executor` replaces the one the spec asks for (tests and benches pass runner.send.fake's)."""
    rescue_journal = job.output_path.with_name(f"{job.output_path.stem}{RESCUE_MARK}run.jsonl")
    check_written_apart(job, ledger_dir(), rescue_journal)  # before anything is sent, on either engine
    if job.spec.output.cascade is not None:  # stages that are runs like this one, then a join
        from runner.cascade.stages import run_cascade

        return await run_cascade(job, api_key=api_key, options=options, reporter=reporter)
    if job.spec.run.engine == "ray" and options.pilot_rows is None:  # pilots are a few rows: sent from here
        from runner.distributed.engine import run_on_ray

        return await run_on_ray(job, api_key=api_key, options=options, reporter=reporter)
    control = Control()
    if job.spec.run.mode != "online" and job.batch is not None and job.batch.basis == "unconfirmed":
        reporter.event("batch_unconfirmed", model=job.spec.model.name, warning=job.batch.why)
    with stop_on_signals(control, reporter):  # until supervise() takes over: a stop still ends the run well
        reporter.phase("reading input")
        source = open_input(job)
        store = Store(
            job.state_dir, f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}", rows=job.row_map
        )
        store.open()
        try:
            # Answers a run whose state broke could only hold in memory: kept before anything is planned.
            store.adopt_rescued(find_rescued(job.output_path, job.state_dir))
            return await _run(job, source, store, api_key, options, reporter, executor, control)
        finally:
            store.close()


async def _run(
    job: Job,
    source: Any,
    store: Store,
    api_key: str,
    options: RunOptions,
    reporter: Reporter,
    given: Executor | None,
    control: Control,
) -> RunReport:
    started_at = dt.datetime.now(dt.UTC)
    run, samples = job.spec.run, job.spec.output.samples
    tally = Tally(rows_total=source.rows, samples=samples)  # counted when the input was opened
    accountant = accountant_for(job)
    pilot = _pilot_sample(tally.rows_total, options) if options.pilot_rows else None
    reporter.phase("checking earlier answers")
    settled = settled_keys(job, store, fresh=options.fresh, retry_failed=options.retry_failed,
                           resend_lost=options.resend_lost, rows_total=tally.rows_total, reporter=reporter)  # fmt: skip

    outstanding: set[str] = set()  # requests handed to the executor and not answered yet
    # Answers of this turn of the event loop, settled and waiting for their one journal write.
    committing: list[tuple[Result, str | None]] = []
    loop = asyncio.get_running_loop()

    cpu = CpuWindow()
    breaker = Breaker.for_run(tally.rows_total)

    def deliver(result: Result) -> None:
        if not breaker.watching:  # nearly every result: the run's first answers were not all refused
            journal(result)
            return
        # The breaker holds the first answers' failures until it knows they are not the spec's fault.
        for admitted in breaker.admit(result):
            journal(admitted)
        if breaker.tripped and control.aborted is None:
            control.abort(breaker.error())

    def journal(result: Result) -> None:
        if cpu.first is None:
            cpu.first = time.process_time()
        if result.key not in outstanding and settled.has(result.key):
            return  # answered in an earlier run (a batch harvested twice): never journalled or booked twice
        outstanding.discard(result.key)
        committing.append(accountant.settle(result))
        if len(committing) == 1:  # the first answer of this turn: commit them all at its end
            loop.call_soon(commit)

    def commit() -> None:
        """Group commit: the answers that arrived in one turn of the event loop go to the journal in one
        write, and are counted once it is done (a kill before it loses them as it loses requests in
        flight: they are sent again, never counted twice)."""
        if not committing:
            return
        results = [result for result, _ in committing]
        try:
            store.add_many(results)
            if store.buffered >= run.checkpoint_rows:
                store.flush_soon()  # in a thread: sending goes on while the part is written
        except STATE_FAILURES as exc:  # the state folder takes no writes: stop; the answers are held (rescued)
            control.fail(exc)
        finally:
            for result, (_, tier) in zip(results, committing, strict=True):
                tally.record(result, tier)
            committing.clear()

    def checkpoint() -> None:
        """Every answer so far into a part, now (the end of sending; an executor about to let go of the
        last copy of answers)."""
        commit()
        try:
            store.flush()
        except STATE_FAILURES as exc:
            control.fail(exc)

    def checkpoint_soon() -> None:
        """The time-based checkpoint while sending: the part is written in a thread."""
        commit()
        try:
            store.flush_soon()
        except STATE_FAILURES as exc:
            control.fail(exc)

    control.checkpoint = checkpoint

    built_from = fingerprint(job)
    unchanged = not options.fresh and pilot is None and store.rows.is_current(built_from, settled, samples)
    if unchanged:  # nothing changed since a run that answered every row: no row needs rendering
        tally.rows_seen = tally.rows_settled = tally.rows_total
        requests = nothing()
    else:
        # The first rows are planned here, so a template that fails on each of them is refused (one
        # line, exit 2) before anything is sent, not raised from inside the sending tasks.
        batches = plan(job, source, settled)
        first = next(batches, None)
        store.rows.reset()
        dispatch = Dispatch(
            store.rows,
            source.keep_columns,
            tally,
            deliver,
            accountant.admit,
            control,
            pilot,
            outstanding,
            context_tokens=job.model.context,
        )
        requests = dispatch.requests(itertools.chain([] if first is None else [first], batches), built_from)

    control.notify = reporter.event
    if job.thinking.warning is not None:  # validate and estimate said it too
        reporter.event("thinking_warning", message=job.thinking.warning)
    auto_from_facts = _tool_choice_from_facts(job, control, reporter)
    reporter.phase("connecting")
    with endpoint_url(job) as base_url:
        # Nothing to send (an unchanged, finished job): no executor, so the SDK is never even loaded.
        idle = unchanged and given is None and run.mode == "online"
        executor = given or (Idle(job) if idle else make_executor(job, base_url, api_key, accountant.input_estimate))
        reporter.start(job, tally)
        if not unchanged:
            summary.check_ledger(job, reporter)  # before the first request: a warning, never a refusal
        try:
            with objects_so_far_frozen():
                await supervise(
                    executor.run(requests, deliver, control),
                    control=control,
                    checkpoint=checkpoint_soon,
                    tick=lambda: reporter.tick(tally, executor.gauges(), control),
                    every_s=min(run.checkpoint_seconds, reporter.interval_s),
                    grace_s=run.grace_s,
                    reporter=reporter,
                )
        finally:
            for held in breaker.release():  # a run shorter than the breaker's window: its failures stand
                journal(held)
            checkpoint()
            cpu.close()
            await executor.aclose()
    if store.broken is not None:
        _rescue(job, store, tally, control)
    sending = summary.sending(job, executor.gauges()) | cpu.summary(tally.answered) | _tool_choice(job, control)
    if control.tool_choice_auto and not auto_from_facts:
        # Learned in this run: later runs on this endpoint and model start in auto (runner.job.facts).
        record_facts(job.base_url, job.spec.model.name, source="run", forced_tool_choice=False)
    measured_cap = executor.gauges().get("measured_cap") if job.adaptive else None
    if measured_cap:
        # `auto` met the endpoint's cap: the next run here starts at it instead of ramping up to it.
        record_facts(job.base_url, job.spec.model.name, source="run", concurrency=measured_cap)
    ending = Ending(tally, control, accountant, started_at)
    if pilot is not None:
        booked = summary.book_spend(job, tally, store.run_id, reporter)
        report = record(job, store, ending, 0, False) | sending | {"ledger": booked}
        with contextlib.suppress(*STATE_FAILURES):
            store.record_run({**report, "pilot": True})
        if control.aborted is not None or control.failed is not None:  # the pilot could not run: say why
            return RunReport(*summary.outcome(job, control, None, options.resume_command), report)
        return RunReport(0, f"pilot: {tally.ok} rows answered", report)

    # Complete when every row was rendered and every request this run queued came back; rows whose
    # request was settled before are answered by definition. (This beats joining the whole row map.)
    complete = unchanged or (tally.all_rows_rendered and not outstanding)
    return finish(job, store, ending, options, reporter, complete=complete, sending=sending)


def _tool_choice_from_facts(job: Job, control: Control, reporter: Reporter) -> bool:
    """Start a structured job in tool_choice auto when a fact says this endpoint and model refuse a
    forced tool (learned by doctor or an earlier run); say so once. True when it did."""
    if job.shape is None or job.shape.mode != "tool":
        return False
    facts = load_facts(job.base_url, job.spec.model.name)
    if facts.forced_tool_choice is not False:
        return False
    control.tool_choice_auto = True
    reporter.event(
        "tool_choice_auto",
        message="this endpoint refuses a forced tool choice; asking with tool_choice auto, validating and "
        "repairing each answer",
        learned=f"{facts.source or 'a run'} on {facts.checked or 'an earlier day'}",
    )
    return True


def _tool_choice(job: Job, control: Control) -> dict[str, Any]:
    """For the summary: how a structured job asked for its tool call, when it was not forced."""
    if job.shape is None or job.shape.mode != "tool" or not control.tool_choice_auto:
        return {}
    return {"tool_choice": "auto (the endpoint refuses a forced tool choice; answers validated and repaired)"}


def _rescue(job: Job, store: Store, tally: Tally, control: Control) -> None:
    """The state broke: write the answers held in memory to a rescue journal, and say where in the
    run's last line. If no place takes them they are lost (said too): the summary stops counting them."""
    held = store.held
    if not held:
        return
    where = store.rescue(job.output_path)
    failure = control.failed or store.broken
    assert failure is not None
    if where is not None:
        note = f"the {len(held)} answers it held are in {where}, which the next run reads first"
    else:
        for result in held:
            tally.not_kept(result)
        note = f"the {len(held)} answers it held could be written neither beside the output nor in the temp folder"
    control.failed = type(failure)(f"{failure}; {note}")


class Idle:
    """The executor of a run with nothing to send: it reports the job's limit and sends nothing."""

    def __init__(self, job: Job) -> None:
        self._gauges = {"in_flight": 0, "limit": job.concurrency, "adaptive": job.adaptive, "overload_429_rate": 0.0}

    def gauges(self) -> dict[str, Any]:
        return dict(self._gauges)

    async def run(self, requests: Any, deliver: Any, control: Control) -> None:
        async for _ in requests:  # there are none
            raise AssertionError("an idle run was handed a request")

    async def aclose(self) -> None:
        return None


class CpuWindow:
    """This process's CPU time from the first answer to the end of sending (the last part written): what
    answering costs the runner, apart from starting and finishing. Benches compare it per answer with a
    bare SDK loop's; `process_time` is read twice a run, not once per answer."""

    __slots__ = ("first", "seconds")

    def __init__(self) -> None:
        self.first: float | None = None
        self.seconds: float | None = None

    def close(self) -> None:
        if self.first is not None:
            self.seconds = time.process_time() - self.first

    def summary(self, answered: int) -> dict[str, Any]:
        """For the summary: CPU seconds and ms per answer after the first (None without two answers)."""
        if self.seconds is None or answered < 2:
            return {"cpu_while_answering": None}
        per_answer = 1000 * self.seconds / (answered - 1)
        return {"cpu_while_answering": {"seconds": round(self.seconds, 4), "ms_per_answer": round(per_answer, 4)}}


@contextlib.contextmanager
def objects_so_far_frozen(young: int = 10_000) -> Iterator[None]:
    """While sending, the garbage collector leaves alone the objects that existed before (gc.freeze),
    and looks at young objects every `young` allocations rather than every 700.

    The objects from before are mostly the modules imported to get here (the SDK, polars, pydantic:
    ~200,000 objects), and every full collection would walk them again: the SDK makes enough objects
    for each answer that full collections came every few thousand answers, at ~50-100 ms each. And
    each young collection walks what the requests in flight hold, whatever its period: a longer one
    walks it less often (nearly everything else is freed by reference counting in between). Nothing is
    lost: objects are freed by reference counting as ever, and any cycle among the older objects is
    collected after sending (unfreeze hands them back, and the thresholds are put back)."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(young, thresholds[0]), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _pilot_sample(rows_total: int, options: RunOptions) -> frozenset[int]:
    """The row positions a pilot sends: a seeded random sample, the same on every try."""
    count = min(options.pilot_rows or 0, rows_total)
    return frozenset(random.Random(options.pilot_seed).sample(range(rows_total), count))
