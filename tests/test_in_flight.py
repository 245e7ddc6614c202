"""A result's `finished_at - latency_ms` is exactly when its last call held a slot, so the requests in
flight that the report draws (runner.observe.runstats.timeline) never exceed the job's concurrency,
whatever the resolution of the clock the latency is measured with (a VM's clock source may tick in
milliseconds; the browser test of the report saw 4.001 in flight at concurrency 4)."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import polars as pl

from runner.engine import execute
from runner.job.resolve import load_job
from runner.local import LocalSender
from runner.observe.progress import make_reporter
from runner.observe.report import load_report
from runner.runs import RunOptions
from runner.send.client import Client
from runner.send.limits import Limits
from runner.send.online import OnlineExecutor
from runner.simulator.simulator import SimulatorThread
from tests.conftest import API_KEY, cli, sample_rows


def most_in_flight(output: Path) -> int:
    """The most calls whose [finished_at - latency_ms, finished_at) intervals overlap at any instant."""
    frame = pl.read_parquet(output).filter(pl.col("latency_ms").is_not_null())
    end = frame.get_column("finished_at").dt.epoch("us").to_list()
    latency_us = (frame.get_column("latency_ms") * 1000).round(0).cast(pl.Int64).to_list()
    events = sorted([(e - lat, 1) for e, lat in zip(end, latency_us, strict=True)] + [(e, -1) for e in end])
    now = top = 0
    for _, step in events:  # at one instant an end (-1) sorts before a start (+1): a slot handed on
        now += step
        top = max(top, now)
    return top


def coarse_clock() -> float:
    """A monotonic clock ticking every 4 ms, like a jiffies clock source."""
    return math.floor(time.monotonic() * 250) / 250


def test_requests_in_flight_never_exceed_the_concurrency_even_with_a_coarse_clock(
    make_job, sim: SimulatorThread
) -> None:
    sim.configure(latency_s=0.001, latency_jitter_s=0.004)
    files = make_job(sample_rows(60), run={"concurrency": 4})
    job = load_job(files.spec)
    executor = OnlineExecutor(
        Client(sim.url, API_KEY, timeout_s=10, stream=False),
        Limits(concurrency=4, requests_per_minute=None, tokens_per_minute=None),
        max_attempts=2,
        estimate_tokens=lambda request: 100,
        clock=coarse_clock,
    )

    report = asyncio.run(
        execute(
            job, api_key=API_KEY, options=RunOptions(), reporter=make_reporter("json"), sender=LocalSender(executor)
        )
    )

    assert report.exit_code == 0, report.message
    assert most_in_flight(files.output) <= 4
    assert 0 < max(load_report(files.output).run["timeline"]["concurrency"]) <= 4


def test_a_run_draws_at_most_its_concurrency_in_flight(make_job) -> None:
    job = make_job(sample_rows(120), run={"concurrency": 4})
    assert cli("run", str(job.spec)).exit_code == 0

    assert most_in_flight(job.output) <= 4
    assert 0 < max(load_report(job.output).run["timeline"]["concurrency"]) <= 4
