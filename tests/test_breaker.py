"""The breaker for systematic failures (runner.breaker): when a run's first answers all fail with the
same request-shaped error, it stops with exit 3 and the endpoint's message, and those rows stay
pending; scattered 400s among good answers never trip it."""

from __future__ import annotations

import datetime as dt
import json

import polars as pl
import pytest

from runner.breaker import MAX_ANSWERS, Breaker
from runner.records import Result
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


def test_a_spec_the_endpoint_refuses_stops_with_what_to_change_and_the_fixed_spec_finishes(make_job, sim) -> None:
    sim.configure(anthropic_max_stop_sequences=1)  # an endpoint that takes one stop sequence
    job = make_job(sample_rows(100), model={"stop_sequences": ["END", "STOP"]})

    stopped = cli("run", str(job.spec))

    assert stopped.exit_code == 3, stopped.stderr[-2000:]
    assert "stop_sequences: at most 1 allowed" in stopped.stderr and "change" in stopped.stderr
    assert sim.stats()["requests"] < 100
    fixed = cli("run", str(job.spec), "--set", "model.stop_sequences=[END]")
    assert fixed.exit_code == 0, fixed.stderr[-2000:]
    assert set(pl.read_parquet(job.output).get_column("status")) == {"ok"}


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


def result(key: str, error_type: str | None = None, attempts: int = 1) -> Result:
    """An answered request: ok, or failed for good with `error_type`."""
    return Result(
        key=key,
        status="error" if error_type else "ok",
        attempts=attempts,
        latency_ms=None,
        finished_at=dt.datetime.now(dt.UTC),
        error_type=error_type,
        error_message="Invalid parameter" if error_type else None,
    )


def test_failures_held_while_deciding_are_handed_back_in_order_when_a_good_answer_comes() -> None:
    breaker = Breaker(threshold=5)
    assert [list(breaker.admit(result(k, "400/1214"))) for k in "abc"] == [[], [], []]
    released = list(breaker.admit(result("d")))
    assert [r.key for r in released] == ["a", "b", "c", "d"] and not breaker.watching
    assert [r.key for r in breaker.admit(result("e", "400/1214"))] == ["e"]  # disarmed for good


def test_unsent_rows_and_other_errors_are_not_the_same_refusal() -> None:
    breaker = Breaker(threshold=2)
    assert [r.key for r in breaker.admit(result("render", "render_error", attempts=0))] == ["render"]
    assert list(breaker.admit(result("a", "400/1214"))) == []
    assert [r.key for r in breaker.admit(result("b", "400/1261"))] == ["a", "b"]  # a row too long: its own
    assert not breaker.tripped


@pytest.mark.parametrize(("rows", "window"), [(1, 5), (100, 5), (101, 6), (260, 13), (400, 20), (10**6, 20)])
def test_the_window_is_five_percent_of_the_rows_at_least_5_and_at_most_20(rows: int, window: int) -> None:
    assert Breaker.for_run(rows).threshold == window


@pytest.mark.parametrize("code", ["1210", "1213", "1214", "1215"])
def test_each_request_shaped_400_trips_it_and_a_row_shaped_one_does_not(code: str) -> None:
    shaped, own = Breaker(threshold=2), Breaker(threshold=2)
    for key in "ab":
        assert list(shaped.admit(result(key, f"400/{code}"))) == []
        list(own.admit(result(key, "400/1261")))  # a prompt too long is that row's own failure
    assert shaped.tripped and not own.tripped
