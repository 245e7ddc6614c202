"""The local sender: a run's requests planned and sent from this process, by the executor the spec chose
(online through the SDK, or Zhipu's Batch API; runner.send)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from runner.control import Control
from runner.job.facts import load_facts, record_facts
from runner.job.resolve import Job
from runner.observe import summary
from runner.observe.progress import Reporter
from runner.observe.summary import Sending
from runner.plan import Planned, nothing, plan_columns
from runner.run import Run
from runner.send import make_executor
from runner.send.base import BlockExecutor, Executor, Gauges
from runner.send.endpoints import endpoint_url
from runner.supervise import Signals, supervise


class LocalSender:
    """Sends a run from this process; `executor` replaces the spec's (runner.send.fake's in tests)."""

    def __init__(self, executor: Executor | None = None) -> None:
        self._given = executor

    async def send(self, run: Run, api_key: str, reporter: Reporter, signals: Signals) -> Sending:
        """Plan and send every request the run has not settled; how it sent, for the summary."""
        job, control = run.job, run.control
        planned: Iterator[Planned] | None = None  # an unchanged job: no row needs rendering
        if not run.unchanged:
            # The first rows are planned here, so a template that fails on each of them is refused (one
            # line, exit 2) before anything is sent, not raised from inside the sending tasks.
            batches = plan_columns(job, run.source, run.settled)
            first = next(batches, None)
            run.store.rows.reset()
            planned = itertools.chain([] if first is None else [first], batches)
        auto_from_facts = _tool_choice_from_facts(job, control, reporter)
        reporter.phase("connecting")
        with endpoint_url(job) as base_url:
            # Nothing to send (an unchanged, finished job): no executor, so the SDK is never even loaded.
            idle = run.unchanged and self._given is None and job.spec.run.mode == "online"
            executor = self._given or (
                Idle(job) if idle else make_executor(job, base_url, api_key, run.accountant.input_estimate)
            )
            reporter.start(job, run.tally)
            # An executor that takes blocks is handed each planned batch's requests at once.
            if planned is None:
                sending = executor.run(nothing(), run.deliver, control)
            elif isinstance(executor, BlockExecutor):
                sending = executor.run_blocks(run.blocks(planned), run.deliver, control)
            else:
                sending = executor.run(run.requests(planned), run.deliver, control)
            try:
                await supervise(
                    sending,
                    control=control,
                    checkpoint=lambda: run.checkpoint(soon=True),
                    tick=lambda: reporter.tick(run.tally, executor.gauges(), control),
                    every_s=min(job.spec.run.checkpoint_seconds, reporter.interval_s),
                    grace_s=job.spec.run.grace_s,
                    signals=signals,
                )
            finally:
                run.sent()
                await executor.aclose()
        if control.tool_choice_auto and not auto_from_facts:
            # Learned in this run: later runs on this endpoint and model start in auto (runner.job.facts).
            record_facts(job.base_url, job.spec.model.name, source="run", forced_tool_choice=False)
        measured_cap = executor.gauges().measured_cap if job.adaptive else None
        if measured_cap:
            # `auto` met the endpoint's cap: the next run here starts at it instead of ramping up to it.
            record_facts(job.base_url, job.spec.model.name, source="run", concurrency=measured_cap)
        return summary.sending(job, executor.gauges(), tool_choice=_tool_choice(job, control))


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


def _tool_choice(job: Job, control: Control) -> str | None:
    """For the summary: how a structured job asked for its tool call, when it was not forced."""
    if job.shape is None or job.shape.mode != "tool" or not control.tool_choice_auto:
        return None
    return "auto (the endpoint refuses a forced tool choice; answers validated and repaired)"


class Idle:
    """The executor of a run with nothing to send: it reports the job's limit and sends nothing."""

    def __init__(self, job: Job) -> None:
        self._gauges = Gauges(in_flight=0, limit=job.concurrency, adaptive=job.adaptive, overload_429_rate=0.0)

    def gauges(self) -> Gauges:
        return self._gauges

    async def run(self, requests: Any, deliver: Any, control: Control) -> None:
        async for _ in requests:  # there are none
            raise AssertionError("an idle run was handed a request")

    async def aclose(self) -> None:
        return None
