"""The breaker for systematic failures (runner.breaker): when a run's first answers all fail with the
same request-shaped error, it stops with exit 3 and the endpoint's message, and those rows stay
pending; scattered 400s among good answers never trip it."""

from __future__ import annotations

import json

import polars as pl

from runner.breaker import MAX_ANSWERS, Breaker
from tests.conftest import cli, sample_rows


def test_every_request_refused_alike_stops_the_run_and_leaves_the_rows_pending(make_job, sim) -> None:
    sim.configure(faults=("400_1214",), fault_rate=1.0)
    job = make_job(sample_rows(400), run={"concurrency": 4})

    stopped = cli("run", str(job.spec))

    threshold = Breaker.for_run(400).threshold
    assert threshold == MAX_ANSWERS  # 5% of 400 rows
    assert stopped.exit_code == 3, stopped.stderr[-2000:]
    assert "1214" in stopped.stderr and "Invalid parameter" in stopped.stderr  # the endpoint's words
    assert "stop_sequences" in stopped.stderr  # what to change
    sent = sim.stats()["requests"]
    assert threshold <= sent <= threshold + 4 * 3  # the window, and what was in flight or queued then

    # The spec (here: the endpoint) fixed, the same command finishes every row: none was failed for good.
    sim.configure(fault_rate=0.0)
    finished = cli("run", str(job.spec))
    assert finished.exit_code == 0, finished.stderr[-2000:]
    out = pl.read_parquet(job.output)
    assert out.height == 400 and set(out.get_column("status")) == {"ok"}


def test_scattered_400s_among_good_answers_fail_their_rows_and_do_not_trip_it(make_job, sim) -> None:
    sim.configure(faults=("400_1214",), fault_rate=0.2, seed=7)
    job = make_job(sample_rows(200), run={"concurrency": 4})

    result = cli("run", str(job.spec))

    assert result.exit_code == 1, result.stderr[-2000:]  # finished, with some rows failed
    out = pl.read_parquet(job.output)
    failed = out.filter(pl.col("status") == "error")
    assert 10 < failed.height < 80
    assert set(failed.get_column("error_type")) == {"400/1214"}
    assert sim.stats()["requests"] == 200  # every row was sent once
    assert json.loads(job.summary.read_text())["answered_error"] == failed.height


def test_a_run_shorter_than_the_window_keeps_its_failures(make_job, sim) -> None:
    sim.configure(faults=("400_1214",), fault_rate=1.0)
    job = make_job(sample_rows(3))

    result = cli("run", str(job.spec))

    assert result.exit_code == 1, result.stderr[-2000:]
    assert set(pl.read_parquet(job.output).get_column("error_type")) == {"400/1214"}
