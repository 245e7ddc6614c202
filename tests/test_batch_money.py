"""Money truth: every billed turn is in the output's tokens and cost, online and in batch, whatever the
row ended as; a batch job's budget reserves at the batch price.

The simulator's bill (billed_tokens per API) is the judge: the output's token sums must equal it.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl
import pytest

from runner.job.resolve import load_job
from runner.money.accounting import accountant_for
from runner.records import Request
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, sample_rows
from tests.test_batch_mode import BATCH_MODEL, FAST_POLL, expected

LABELS = {"output": {"path": "out/{name}.parquet", "labels": ["positive", "negative", "neutral"]}}


def assert_output_holds_the_bill(out: pl.DataFrame, sim: SimulatorThread, api: str) -> None:
    billed = sim.stats()["billed_tokens"][api]
    assert out.get_column("input_tokens").fill_null(0).sum() == billed["input"]
    assert out.get_column("output_tokens").fill_null(0).sum() == billed["output"]


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_rows_ending_invalid_carry_the_cost_of_every_billed_turn(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, mode: str
) -> None:
    """Every answer is schema-invalid, repairs too: each row ends `invalid` after its turns, all billed."""
    sim.configure(invalid_rate=1.0, invalid_turns=10)
    rows = [{"id": f"r{i}", "text": f"item {i} was fine"} for i in range(12)]
    batch = {"run": {"mode": "batch", "batch": FAST_POLL}} if mode == "batch" else {}
    files = make_job(rows=rows, model=BATCH_MODEL, **LABELS, **batch)
    cli("run", str(files.spec))
    out = pl.read_parquet(files.output)
    assert set(out.get_column("status")) == {"invalid"}
    assert_output_holds_the_bill(out, sim, mode)
    assert (out.get_column("cost") > 0).all()
    assert set(out.get_column("api")) == {mode}


def test_cut_network_error_answers_are_asked_again_and_blocked_ones_fail_as_content_filter(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """Lines ending `network_error` (a cut answer) are sent again; lines ending `sensitive` (blocked,
    empty) fail as content_filter in the batch; both were billed, and the rows' tokens hold every turn."""
    sim.configure(batch_network_error_rate=0.2, batch_sensitive_rate=0.1)
    rows = sample_rows(60)
    files = make_job(rows=rows, model=BATCH_MODEL, run={"mode": "batch", "batch": {**FAST_POLL, "max_rounds": 6}})
    cli("run", str(files.spec))
    out = pl.read_parquet(files.output)
    blocked = out.filter(pl.col("status") == "error")
    assert blocked.height > 0 and set(blocked.get_column("error_type")) == {"content_filter"}
    assert set(blocked.get_column("api")) == {"batch"} and (blocked.get_column("cost") > 0).all()
    answered = out.filter(pl.col("status") == "ok")
    assert answered.height + blocked.height == len(rows)
    by_id = dict(zip(out.get_column("id"), expected(rows), strict=True))
    assert all(text == by_id[i] for i, text in answered.select("id", "response_text").iter_rows())
    assert sim.stats()["billed"]["batch"] > len(rows)  # the cut answers were billed, and asked again
    assert_output_holds_the_bill(out, sim, "batch")


def test_a_batch_jobs_budget_reserves_each_request_at_the_batch_price(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    request = Request(
        "k", {"model": BATCH_MODEL["name"], "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    )
    worst = {}
    for mode in ("online", "batch", "hybrid"):
        files = make_job(name=mode, model=BATCH_MODEL, run={"mode": mode, "max_cost": 1.0})
        accountant = accountant_for(load_job(files.spec))
        worst[mode] = accountant.worst_case(100)
        assert accountant.admit(request)
    assert worst["batch"] == pytest.approx(worst["online"] / 2) and worst["hybrid"] == worst["online"]
