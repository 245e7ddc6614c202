"""Money truth: every billed turn is in the output's tokens and cost, online and in batch, whatever the
row ended as; a batch job's budget reserves at the batch price.

The simulator's bill (billed_tokens per API) is the judge: the output's token sums must equal it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from runner.job.resolve import load_job
from runner.money.accounting import accountant_for
from runner.money.pricing import price_table
from runner.records import Request
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, sample_rows
from tests.test_batch_mode import BATCH_MODEL, CRASH, FAST_POLL, crash_env, expected

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


SCHEMA = {
    "output": {
        "path": "out/{name}.parquet",
        "schema": {
            "type": "object",
            "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]}},
            "required": ["sentiment"],
        },
        "max_repairs": 1,
    }
}


def billed_cost(sim: SimulatorThread, files: JobFiles, api: str) -> float:
    """What the simulator's bill costs at the model's price (flat for glm-4-air-250414); Zhipu's Batch
    API charges half the online price."""
    table = price_table(load_job(files.spec))
    assert table is not None
    tokens = sim.stats()["billed_tokens"][api]
    online = table.cost(input_tokens=tokens["input"], output_tokens=tokens["output"])
    return online / 2 if api == "batch" else online


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_the_outputs_cost_is_what_was_billed_on_a_schema_job_with_invalid_rows(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, mode: str
) -> None:
    """Half the rows answer invalid on their first turn and on their repair: they end `invalid`, the others
    `ok`. Every turn was billed, and the output's cost is the bill's, to the unit."""
    sim.configure(invalid_rate=0.5, invalid_turns=2)
    files = make_job(rows=sample_rows(40), model=BATCH_MODEL, **SCHEMA, run=_mode(mode))
    cli("run", str(files.spec))
    out = pl.read_parquet(files.output)
    statuses = set(out.get_column("status"))
    assert {"ok", "invalid"} <= statuses, statuses
    assert out.get_column("cost").sum() == pytest.approx(billed_cost(sim, files, mode), rel=1e-9)


def _mode(mode: str) -> dict[str, Any]:
    return {"mode": mode, "batch": FAST_POLL} if mode == "batch" else {}


@pytest.mark.parametrize(
    "fault",
    [
        {"invalid_rate": 0.5, "invalid_turns": 1},  # half the rows are repaired in the second round
        {"batch_network_error_rate": 0.3},  # cut answers (billed) are asked again in the second round
    ],
    ids=["repair", "network_error"],
)
def test_the_outputs_cost_is_what_was_billed_after_a_kill_between_rounds(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, tmp_path: Path, fault: dict[str, float]
) -> None:
    """kill -9 once the second round's batch exists: the turns its rows had billed in the round before
    are priced with theirs by the resumed run (no turn lost from the output, none twice)."""
    sim.configure(**fault)
    # Enough rounds that no row is cut in every one of them (0.3 ** 3 over 40 rows happened 1 run in 5).
    run = {"mode": "batch", "batch": {**FAST_POLL, "max_rounds": 10}}
    files = make_job(rows=sample_rows(40), model=BATCH_MODEL, **SCHEMA, run=run)
    script = tmp_path / "crash.py"
    script.write_text(CRASH.format(method="create", nth=2))  # the second create: the second round's batch
    crashed = subprocess.run([sys.executable, str(script), "after", str(files.spec)], env=crash_env(tmp_path))
    assert crashed.returncode == 9
    assert cli("run", str(files.spec)).exit_code == 0
    out = pl.read_parquet(files.output)
    assert set(out.get_column("status")) == {"ok"}
    if "invalid_rate" in fault:
        assert (out.get_column("repairs") > 0).any()
    assert sim.stats()["outcomes"]["batch_created"] >= 2  # resumed, the second round not sent again
    assert_output_holds_the_bill(out, sim, "batch")
    assert out.get_column("cost").sum() == pytest.approx(billed_cost(sim, files, "batch"), rel=1e-9)
