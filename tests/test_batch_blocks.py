"""Batch answers taken as blocks of columns (issue 23): a harvest hands the run its plain answers a block
at a time (runner.records.Answers, Run.deliver_answers) instead of a Result each. A block must be
priced, counted, stored and rescued exactly as the same answers one by one: the same cost to the last
bit, the same ledger counters, the same stored rows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import polars as pl

from runner.job.catalog import PriceTier
from runner.money.accounting import Accountant, Tally
from runner.money.pricing import Budget, PriceTable
from runner.money.tokens import Calibration
from runner.records import KEY, Answer, Answers, Request, results_frame
from runner.send.base import Conversation
from runner.state.store import Store

# Two input tiers, the first split on the answer's length: answers fall on both sides of each bound.
TIERS = (
    PriceTier(max_input_tokens=32, max_output_tokens=20, input=0.8, cached_input=0.16, output=2.0),
    PriceTier(max_input_tokens=32, input=0.8, cached_input=0.16, output=8.0),
    PriceTier(input=1.2, cached_input=0.24, output=16.0),
)


def _answers() -> list[tuple[str, Answer]]:
    """Answers of every plain kind: cached input or none, thinking or none, two models, every tier."""
    made = []
    for index in range(60):
        made.append(
            (
                f"{index:032x}",
                Answer(
                    text=f"answer {index} ü",
                    thinking="because" if index % 5 == 0 else None,
                    stop_reason="end_turn" if index % 7 else "max_tokens",
                    input_tokens=3 + index,
                    output_tokens=(index * 7) % 41,
                    cache_read_input_tokens=index % 4 or None,
                    cache_creation_input_tokens=None,
                    request_id=f"req-{index}" if index % 9 else None,
                    model="glm-4-air-250414" if index % 3 else "glm-4-flash",
                    thinking_tokens=2 if index % 5 == 0 else 0,
                ),
            )
        )
    return made


def _accountant() -> Accountant:
    table = PriceTable("glm-4-air-250414", "CNY", TIERS, confirmed=True)
    accountant = Accountant(table, Calibration(), Budget(1000.0), max_tokens=64, batch_share=0.5, reserve_share=0.5)
    for key, _ in _answers()[:-3]:  # the last three were not admitted by this run (a batch it reattached)
        assert accountant.admit(Request(key, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
    return accountant


def test_a_block_is_priced_counted_and_stored_as_its_answers_one_by_one() -> None:
    finished_at = dt.datetime(2026, 3, 1, 23, 59, tzinfo=dt.UTC)
    one_by_one, by_block = _accountant(), _accountant()
    tally_one, tally_block = Tally(), Tally()
    results = []
    for attempts, (key, answer) in enumerate(_answers(), start=1):
        conversation = Conversation(Request(key, {}), None)
        conversation.add(answer)
        result, tier = one_by_one.settle(
            conversation.result(attempts=attempts, latency_ms=None, api="batch", finished_at=finished_at)
        )
        tally_one.record(result, tier)
        results.append(result)

    block = Answers(finished_at, "batch")
    for attempts, (key, answer) in enumerate(_answers(), start=1):
        block.add(key, answer, attempts)
    tally_block.record_answers(block, by_block.settle_answers(block))

    assert block.results() == results
    assert block.frame("run").equals(results_frame(results, "run"))
    assert block.frame("run").schema == results_frame(results, "run").schema
    assert by_block.budget is not None and one_by_one.budget is not None
    assert (by_block.budget.spent, by_block.budget.reserved) == (one_by_one.budget.spent, one_by_one.budget.reserved)
    for name in ("ok", "failed", "input_tokens", "output_tokens", "thinking_tokens", "cache_read_input_tokens",
                 "cost", "cost_by_tier", "est_input_tokens", "by_day"):  # fmt: skip
        assert getattr(tally_block, name) == getattr(tally_one, name), name
    assert len(tally_one.cost_by_tier) == 3 and len(tally_one.by_day) == 2  # every tier, both models


def test_a_kept_part_and_a_rescue_hold_a_block_as_they_hold_its_results(tmp_path: Path) -> None:
    """Held for the next part without a journal line, like batch Results; what `held` gives back for a
    rescue is the same Results; an answer text that is no UTF-8 is kept as U+FFFD."""
    finished_at = dt.datetime.now(dt.UTC)
    block = Answers(finished_at, "batch")
    for key, answer in _answers()[:10]:
        block.add(key, answer, 1)
    torn = Answers(finished_at, "batch")
    key, answer = _answers()[10]
    torn.add(key, dataclasses.replace(answer, text="cut \ud800 here"), 1)

    store = Store(tmp_path / "state", run_id="run")
    store.open()
    try:
        journal = next((tmp_path / "state").glob("journal-*.jsonl"))
        store.add_answers(block)
        store.add_answers(torn)
        assert journal.read_bytes() == b""
        assert sorted(store.held, key=lambda r: r.key)[:10] == block.results()
        store.flush()
        assert store.held == []
        kept = pl.read_parquet(store.result_parts()).sort(KEY)
        assert kept.filter(pl.col(KEY) != key).equals(block.frame("run"))
        assert kept.filter(pl.col(KEY) == key).get_column("response_text").to_list() == ["cut \ufffd here"]
    finally:
        store.close()
