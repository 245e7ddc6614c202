"""Cost: estimate before the run, account during it, cap it, track it across runs."""

from __future__ import annotations

import json

import polars as pl
import pytest

from runner.job.catalog import models
from runner.money.ledger import ledger_dir as usage_folder
from runner.money.ledger import usage
from runner.money.pricing import PriceTable, tier_label
from runner.simulator.simulator import SimulatorThread
from tests.conftest import cli, sample_rows, write_csv

GLM46_CNY = PriceTable("glm-4.6", "CNY", tuple(models()["glm-4.6"].prices["CNY"].tiers), confirmed=False)
GLM46_USD = PriceTable("glm-4.6", "USD", tuple(models()["glm-4.6"].prices["USD"].tiers), confirmed=True)


@pytest.mark.parametrize(
    ("input_tokens", "output_tokens", "tier", "prices"),
    [
        (0, 0, "in<32000,out<200", (2, 8)),
        (31_999, 199, "in<32000,out<200", (2, 8)),
        (31_999, 200, "in<32000", (3, 14)),  # the answer crossed 0.2K
        (100, 5_000, "in<32000", (3, 14)),
        (32_000, 0, "all", (4, 16)),  # the prompt reached 32K
        (199_999, 100_000, "all", (4, 16)),
    ],
)
def test_bigmodel_tiers_switch_exactly_at_their_boundaries(input_tokens, output_tokens, tier, prices) -> None:
    chosen = GLM46_CNY.tier(input_tokens, output_tokens)
    assert tier_label(chosen) == tier
    assert (chosen.input, chosen.output) == prices


def test_zai_has_one_tier_whatever_the_length() -> None:
    assert tier_label(GLM46_USD.tier(150_000, 90_000)) == "all"
    assert GLM46_USD.cost(input_tokens=1_000_000, output_tokens=1_000_000) == pytest.approx(0.6 + 2.2)


def test_cached_tokens_are_billed_at_the_cached_price_and_count_toward_the_tier() -> None:
    # 1,000 fresh + 31,000 cached input tokens = 32,000: the long-prompt tier applies.
    cost = GLM46_CNY.cost(input_tokens=1_000, output_tokens=100, cache_read_tokens=31_000)
    assert cost == pytest.approx((1_000 * 4 + 31_000 * 0.8 + 100 * 16) / 1e6)
    assert GLM46_USD.cost(input_tokens=0, output_tokens=0, cache_read_tokens=1_000_000) == pytest.approx(0.11)


def test_the_worst_case_covers_the_dearer_short_answer_tier() -> None:
    # With max_tokens 150 the answer always stays in the out<200 tier; the worst case is 150 tokens there.
    assert GLM46_CNY.worst_case(input_tokens=1_000, max_tokens=150) == pytest.approx((1_000 * 2 + 150 * 8) / 1e6)
    assert GLM46_CNY.worst_case(input_tokens=1_000, max_tokens=5_000) == pytest.approx((1_000 * 3 + 5_000 * 14) / 1e6)


def test_every_output_row_carries_its_cost(make_job) -> None:
    job = make_job(sample_rows(5), model={"prices": {"input": 1.0, "output": 10.0}})

    assert cli("run", str(job.spec)).exit_code == 0

    out = pl.read_parquet(job.output)
    expected = [(i * 1.0 + o * 10.0) / 1e6 for i, o in zip(out["input_tokens"], out["output_tokens"], strict=True)]
    assert out.get_column("cost").to_list() == pytest.approx(expected)
    summary = json.loads(job.summary.read_text())
    assert summary["cost"]["spent"] == pytest.approx(sum(expected), abs=1e-6)


def rows_in(language: str, n: int, start: int = 0) -> list[dict[str, str]]:
    if language == "zh":
        return [
            {
                "id": f"z{i}",
                "text": f"第{i}条评论：这个产品质量很好，物流也很快，我非常满意，会推荐给朋友。" * (1 + i % 3),
            }
            for i in range(start, start + n)
        ]
    return [
        {"id": f"e{i}", "text": f"Review {i}: the battery lasts all day and the screen is sharp. " * (1 + i % 3)}
        for i in range(start, start + n)
    ]


@pytest.mark.parametrize("language", ["en", "zh"])
def test_after_one_run_the_input_estimate_is_within_ten_percent(make_job, sim: SimulatorThread, language) -> None:
    # The simulator counts tokens unlike the estimator's defaults (x1.3 and its own CJK rate).
    sim.configure(token_scale=1.3)
    first = rows_in(language, 60)
    job = make_job(first)
    assert cli("run", str(job.spec)).exit_code == 0

    new = rows_in(language, 60, start=1000)
    write_csv(job.input, first + new)
    report = json.loads(cli("estimate", str(job.spec), "--json").stdout)
    assert report["requests_to_send"] == 60
    before = sim.stats()["input_tokens"]
    assert cli("run", str(job.spec)).exit_code == 0
    actual = sim.stats()["input_tokens"] - before

    assert report["input_tokens"]["expected"] == pytest.approx(actual, rel=0.10)
    assert report["input_tokens"]["calibration"]["samples"] == 60


def test_exact_counts_with_the_tokenizer_api_and_generates_nothing(make_job, sim: SimulatorThread) -> None:
    sim.configure(token_scale=1.6)
    job = make_job(rows_in("zh", 40))

    report = json.loads(cli("estimate", str(job.spec), "--json", "--exact").stdout)

    assert sim.stats()["requests"] == 0
    assert sim.stats()["outcomes"]["tokenizer"] == 40
    assert cli("run", str(job.spec)).exit_code == 0
    assert report["input_tokens"]["expected"] == pytest.approx(sim.stats()["input_tokens"], rel=0.05)


def test_an_estimate_sends_nothing_and_says_what_it_assumed(make_job, sim: SimulatorThread) -> None:
    job = make_job(sample_rows(30), model={"max_tokens": 100, "name": "glm-4-air-250414"})  # batch-eligible

    result = cli("estimate", str(job.spec), "--json")

    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert sim.stats()["requests"] == 0
    assert report["requests_to_send"] == 30
    assert report["output_tokens"]["expected"] == 30 * 50
    assert "assumed" in report["output_tokens"]["basis"]
    assert report["cost"]["low"] <= report["cost"]["expected"] <= report["cost"]["high"] <= report["cost"]["ceiling"]
    assert report["batch_api_expected"] == pytest.approx(report["cost"]["expected"] / 2, abs=1e-6)  # 6 decimals
    assert report["wall_time_s"]["latency_basis"] == "assumed"


def test_pilot_answers_are_kept_and_never_sent_again(make_job, sim: SimulatorThread) -> None:
    rows = sample_rows(50)
    job = make_job(rows)

    report = json.loads(cli("estimate", str(job.spec), "--json", "--pilot", "10").stdout)

    assert sim.stats()["requests"] == 10
    assert report["rows_answered_already"] == 10
    assert report["output_tokens"]["basis"] == "mean of 10 measured answers, 95% interval of the mean"
    assert cli("run", str(job.spec), "--limit", "10").exit_code == 0
    sent_before = sim.stats()["requests"]
    assert sent_before > 10  # the pilot's rows were drawn at random, not the first ten
    assert cli("run", str(job.spec)).exit_code == 0
    assert sim.stats()["requests"] == 50
    assert sim.stats()["prompts_answered_twice"] == 0
    summary = json.loads(job.summary.read_text())
    assert summary["rows_settled_before"] == sent_before
    # The run reports how close the estimate was, in its summary.
    assert abs(summary["cost"]["estimate"]["error_pct"]) < 15


def test_the_budget_stops_dispatch_before_it_can_be_exceeded(make_job, sim: SimulatorThread) -> None:
    sim.configure(latency_s=0.01)
    rows = sample_rows(300)
    job = make_job(rows, model={"prices": {"input": 2000.0, "output": 8000.0}}, run={"max_cost": 5.0})

    result = cli("run", str(job.spec))

    assert result.exit_code == 4
    assert "run.max_cost" in result.stderr and "continue later" in result.stderr
    summary = json.loads(job.summary.read_text())
    assert 0 < summary["answered_ok"] < 300
    assert summary["cost"]["spent"] <= 5.0
    assert not job.output.exists()

    # Raising the cap lets a later run continue where it stopped, paying only for the rest.
    assert cli("run", str(job.spec), "--set", "run.max_cost=1000").exit_code == 0
    assert sim.stats()["prompts_answered_twice"] == 0
    assert pl.read_parquet(job.output).height == 300


def test_a_budget_needs_prices(make_job) -> None:
    job = make_job(model={"name": "glm-4"}, run={"max_cost": 1.0})  # no CNY price known

    result = cli("run", str(job.spec))

    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "glm-4 has no CNY price" in line and "price unknown" in line
    assert "model.prices" in line


def test_ledger_rows_add_up_to_the_runs_totals(make_job, sim: SimulatorThread) -> None:
    job = make_job(sample_rows(20))
    assert cli("run", str(job.spec)).exit_code == 0
    write_csv(job.input, sample_rows(35))
    assert cli("run", str(job.spec)).exit_code == 0
    out = pl.read_parquet(job.output)

    ledger = usage()

    assert ledger.get_column("run_id").n_unique() == 2
    assert ledger.get_column("requests_ok").sum() == 35
    assert ledger.get_column("input_tokens").sum() == out.get_column("input_tokens").sum()
    assert ledger.get_column("output_tokens").sum() == out.get_column("output_tokens").sum()
    assert ledger.get_column("cost").sum() == pytest.approx(out.get_column("cost").sum())
    shown = cli("usage", "--by", "job")
    assert shown.exit_code == 0 and "job" in shown.stdout


def test_usage_rejects_an_unknown_grouping() -> None:
    result = cli("usage", "--by", "colour")

    assert result.exit_code == 2
    assert "choose from job, model, day, endpoint" in result.stderr


def test_a_dry_run_needs_no_api_key(make_job, sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(sample_rows(6))
    monkeypatch.delenv("ZHIPUAI_API_KEY")
    assert cli("run", str(job.spec)).exit_code == 2  # a real run does need one

    result = cli("run", str(job.spec), "--dry-run")

    assert result.exit_code == 0, result.stderr
    assert "would send 6 requests for 6 rows" in result.stdout and sim.stats()["requests"] == 0


def test_simulated_spend_is_booked_apart_and_the_summary_says_so(make_job, sim: SimulatorThread) -> None:
    """A run on the built-in simulator books into the ledger's `simulated/` folder and its summary says
    `"simulated": true`; the summary's spend is split by price tier, and the tiers add up to it."""
    real = make_job(sample_rows(3), name="real")  # the loopback simulator by URL: booked as real money
    pretend = make_job(sample_rows(4), name="pretend", model={"endpoint": "simulator"})
    assert cli("run", str(real.spec)).exit_code == 0
    assert cli("run", str(pretend.spec)).exit_code == 0

    summaries = {name: json.loads(files.summary.read_text()) for name, files in (("real", real), ("pretend", pretend))}
    assert summaries["real"]["simulated"] is False and summaries["pretend"]["simulated"] is True
    assert set(usage().get_column("job")) == {"real"}  # the real ledger holds only real spend
    booked = pl.read_parquet(sorted((usage_folder() / "simulated").rglob("*.parquet")))
    assert set(booked.get_column("job")) == {"pretend"}
    for summary in summaries.values():
        cost = summary["cost"]
        assert cost["by_tier"] == {"in<32000,out<200": pytest.approx(cost["spent"])} and cost["spent"] > 0


def test_exact_counts_a_sample_of_200_prompts(make_job, sim: SimulatorThread) -> None:
    job = make_job(rows_in("en", 260))

    assert cli("estimate", str(job.spec), "--json", "--exact").exit_code == 0

    assert sim.stats()["outcomes"]["tokenizer"] == 200 and sim.stats()["requests"] == 0


def test_a_job_that_never_ran_is_calibrated_by_its_models_runs_in_the_ledger(make_job, sim: SimulatorThread) -> None:
    sim.configure(token_scale=1.3)
    other = make_job(rows_in("en", 30), name="other")
    assert cli("run", str(other.spec)).exit_code == 0

    new = make_job(rows_in("en", 30, start=500), name="new")
    report = json.loads(cli("estimate", str(new.spec), "--json").stdout)

    assert report["input_tokens"]["calibration"]["basis"] == "measured on 30 answers of glm-4.6"
    before = sim.stats()["input_tokens"]
    assert cli("run", str(new.spec)).exit_code == 0
    assert report["input_tokens"]["expected"] == pytest.approx(sim.stats()["input_tokens"] - before, rel=0.10)
