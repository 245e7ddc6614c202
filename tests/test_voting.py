"""Samples and the majority vote: each row asked k times, each sample paid for once, one voted answer."""

from __future__ import annotations

import datetime as dt
import json

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.job.inputs import ROW
from runner.job.prompts import SAMPLE, expand_samples
from runner.observe.quality import agreement_summary
from runner.output.voting import vote
from runner.records import KEY, RESULT_SCHEMA
from runner.simulator.simulator import SimulatorThread
from tests.conftest import cli

REVIEWS = [
    {"id": "1", "text": "Great phone, I love it", "gold": "positive"},
    {"id": "2", "text": "Terrible battery, broke in a week", "gold": "negative"},
    {"id": "3", "text": "The best purchase this year", "gold": "positive"},
    {"id": "4", "text": "Awful support and a bad screen", "gold": "negative"},
]
SAMPLED = {"labels": ["positive", "negative", "neutral"], "keep_columns": [], "samples": 3}
WARM = {"temperature": 0.7}


def _answer(label: str) -> str:
    return json.dumps({"label": label})


def _lines(samples: list[list[dict[str, object]]]) -> pl.LazyFrame:
    """Store lines for hand-written rows: per row, per sample, the result's fields that matter."""
    now = dt.datetime(2026, 11, 24, tzinfo=dt.UTC)
    records = []
    for row, results in enumerate(samples):
        for index, fields in enumerate(results):
            record: dict[str, object] = dict.fromkeys(RESULT_SCHEMA)
            record |= {"finished_at": now, "attempts": 1, "repairs": 0, "input_tokens": 10, "output_tokens": 2}
            record |= {ROW: row, "id": str(row), KEY: f"k{row}-s{index}", SAMPLE: index, **fields}
            records.append(record)
    schema = {**RESULT_SCHEMA, ROW: pl.Int64(), "id": pl.String(), SAMPLE: pl.Int64()}
    return pl.DataFrame(records, schema=schema).lazy()


def test_the_majority_answer_wins_and_agreement_is_its_share_of_the_samples() -> None:
    lines = _lines(
        [
            [{"status": "ok", "parsed_json": _answer(a), "response_text": a} for a in ("neg", "pos", "pos")],
            [{"status": "ok", "parsed_json": _answer(a), "response_text": a} for a in ("pos", "neg", "neu")],
        ]
    )

    voted = vote(lines, 3).sort(ROW).collect()

    assert voted.get_column("parsed_json").to_list() == [_answer("pos"), _answer("pos")]
    # A three-way tie goes to the earliest sample's answer; its text speaks for the row.
    assert voted.get_column("response_text").to_list() == ["pos", "pos"]
    assert voted.get_column("agreement").to_list() == pytest.approx([2 / 3, 1 / 3])
    assert voted.get_column("status").to_list() == ["ok", "ok"]
    assert voted.get_column("sample_answers").to_list()[1] == [_answer("pos"), _answer("neg"), _answer("neu")]
    # The row cost all of its samples.
    assert voted.get_column("input_tokens").to_list() == [30, 30]
    assert voted.get_column("attempts").to_list() == [3, 3]
    assert voted.schema["attempts"] == pl.Int32


def test_invalid_samples_vote_for_nothing_and_count_against_agreement() -> None:
    invalid = {"status": "invalid", "error_type": "invalid", "error_message": "label: not one of the labels"}
    lines = _lines(
        [
            [invalid, {"status": "ok", "parsed_json": _answer("pos")}, invalid],
            [invalid, invalid, invalid],
        ]
    )

    voted = vote(lines, 3).sort(ROW).collect()

    assert voted.get_column("status").to_list() == ["ok", "invalid"]
    assert voted.get_column("parsed_json").to_list() == [_answer("pos"), None]
    assert voted.get_column("agreement").to_list() == [pytest.approx(1 / 3), None]
    assert voted.get_column("sample_answers").to_list()[0] == [None, _answer("pos"), None]
    assert voted.get_column("error_message")[1] == "label: not one of the labels"


def test_a_failed_sample_fails_the_row_and_says_which_sample() -> None:
    failed = {"status": "error", "error_type": "api_error_400", "error_message": "Prompt too long"}
    ok = {"status": "ok", "parsed_json": _answer("pos")}
    voted = vote(_lines([[ok, failed, ok]]), 3).collect()

    assert voted.get_column("status").to_list() == ["error"]
    assert voted.get_column("error_message").to_list() == ["sample 2 of 3: Prompt too long"]
    assert voted.get_column("agreement").to_list() == pytest.approx([2 / 3])


def _reference_vote(outcomes: list[tuple[str, str | None]], k: int) -> tuple[str, str | None, float | None]:
    """The vote written the plain way: (status, winning answer, agreement) from (status, answer) pairs."""
    answers = [answer for status, answer in outcomes if status == "ok"]
    counts = {a: answers.count(a) for a in answers}
    winner = max(counts, key=lambda a: (counts[a], -answers.index(a))) if counts else None
    statuses = [status for status, _ in outcomes]
    status = "error" if "error" in statuses else "ok" if winner is not None else "invalid"
    return status, winner, counts[winner] / k if winner is not None else None


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=7).flatmap(
        lambda k: st.lists(
            st.lists(
                st.one_of(
                    st.tuples(st.just("ok"), st.sampled_from(["a", "b", "c"])),
                    st.tuples(st.sampled_from(["invalid", "error"]), st.none()),
                ),
                min_size=k,
                max_size=k,
            ),
            min_size=1,
            max_size=6,
        ).map(lambda rows: (k, rows))
    )
)
def test_the_vote_agrees_with_a_plain_reference_on_any_outcomes(case) -> None:
    k, rows = case
    lines = _lines(
        [
            [{"status": status, "parsed_json": None if answer is None else _answer(answer)} for status, answer in row]
            for row in rows
        ]
    )

    voted = vote(lines, k).sort(ROW).collect()

    for i, row in enumerate(rows):
        status, winner, agreement = _reference_vote(row, k)
        assert voted.get_column("status")[i] == status
        if status != "error":  # an errored row speaks through its failed sample, which has no answer
            assert voted.get_column("parsed_json")[i] == (None if winner is None else _answer(winner))
        assert voted.get_column("agreement")[i] == (None if agreement is None else pytest.approx(agreement))
        assert voted.get_column("input_tokens")[i] == 10 * k


def test_sample_keys_keep_the_row_keys_bucket_digits() -> None:
    rows = pl.LazyFrame({ROW: [0, 1], KEY: ["ab12", "cd34"]})

    lines = expand_samples(rows, 3).collect()

    assert lines.get_column(KEY).to_list() == ["ab12", "ab12-s1", "ab12-s2", "cd34", "cd34-s1", "cd34-s2"]
    assert lines.get_column(SAMPLE).to_list() == [0, 1, 2, 0, 1, 2]


def test_each_row_is_asked_k_times_and_each_sample_is_paid_for_once(make_job, sim: SimulatorThread) -> None:
    job = make_job(REVIEWS, output=SAMPLED, model=WARM, eval={"gold_column": "gold"})

    assert cli("run", str(job.spec)).exit_code == 0

    stats = sim.stats()
    assert stats["ok"] == 3 * len(REVIEWS)
    assert stats["distinct_prompts_answered"] == len(REVIEWS)
    out = pl.read_parquet(job.output)
    assert out.height == len(REVIEWS)
    assert out.get_column("label").to_list() == ["positive", "negative", "positive", "negative"]
    assert out.get_column("agreement").to_list() == [1.0] * 4  # this simulator never wavers
    assert out.get_column("input_tokens").sum() == stats["input_tokens"]  # every sample is in the row's usage
    summary = json.loads(job.summary.read_text())
    assert summary["samples_per_row"] == 3
    assert summary["quality"]["voting"]["unanimous_rows"] == 4

    assert cli("run", str(job.spec)).exit_code == 0
    assert sim.stats()["requests"] == stats["requests"]  # a re-run sends nothing


def test_the_vote_picks_what_most_samples_said(make_job, sim: SimulatorThread) -> None:
    # Every ask wavers: with three labels the simulator's three answers to a prompt are the 2nd, the
    # 3rd and again the 2nd label after the usual one, so the vote is the 2nd with 2 votes of 3.
    sim.configure(sample_disagreement=1.0)
    job = make_job(REVIEWS[:1], output=SAMPLED, model=WARM)

    assert cli("run", str(job.spec)).exit_code == 0

    out = pl.read_parquet(job.output)
    assert out.get_column("label").to_list() == ["negative"]  # usual answer: positive
    assert out.get_column("agreement").to_list() == pytest.approx([2 / 3])
    answers = sorted(json.loads(a)["label"] for a in out.get_column("sample_answers")[0])
    assert answers == ["negative", "negative", "neutral"]


def test_raising_samples_later_sends_only_the_new_samples(make_job, sim: SimulatorThread) -> None:
    job = make_job(REVIEWS, output=SAMPLED, model=WARM)
    assert cli("run", str(job.spec)).exit_code == 0
    before = sim.stats()["ok"]

    assert cli("run", str(job.spec), "--set", "output.samples=5").exit_code == 0

    assert sim.stats()["ok"] - before == 2 * len(REVIEWS)
    out = pl.read_parquet(job.output)
    assert [len(a) for a in out.get_column("sample_answers")] == [5] * len(REVIEWS)


def test_a_run_stopped_midway_resumes_without_paying_for_any_sample_twice(make_job, sim: SimulatorThread) -> None:
    rows = [{"id": str(i), "text": f"review {i}: great, I love it"} for i in range(100)]
    prices = {"prices": {"input": 2000.0, "output": 8000.0}, **WARM}
    job = make_job(rows, output=SAMPLED, model=prices, run={"max_cost": 5.0})

    assert cli("run", str(job.spec)).exit_code == 4  # the budget stops it part of the way
    first = sim.stats()["ok"]
    assert 0 < first < 3 * len(rows)

    assert cli("run", str(job.spec), "--set", "run.max_cost=1000").exit_code == 0

    stats = sim.stats()
    assert stats["ok"] == 3 * len(rows)  # every sample answered exactly once across the two runs
    assert stats["distinct_prompts_answered"] == len(rows)
    out = pl.read_parquet(job.output)
    assert [len(a) for a in out.get_column("sample_answers")] == [3] * len(rows)


def test_only_the_failed_sample_is_sent_again(make_job, sim: SimulatorThread) -> None:
    # Each prompt's first request gets a 400 that no retry fixes; its other samples are answered.
    sim.configure(faults=("400_1261",), fault_attempts=1)
    job = make_job(REVIEWS, output=SAMPLED, model=WARM)

    assert cli("run", str(job.spec)).exit_code == 1
    out = pl.read_parquet(job.output)
    assert out.get_column("status").to_list() == ["error"] * len(REVIEWS)
    assert all(m.startswith("sample ") and " of 3: " in m for m in out.get_column("error_message"))
    assert "0 rows answered ok, 4 failed, 0 pending" in cli("status", str(job.spec)).stdout
    sent = sim.stats()["requests"]

    assert cli("run", str(job.spec), "--retry-failed").exit_code == 0

    assert sim.stats()["requests"] - sent == len(REVIEWS)  # one sample per row, not three
    out = pl.read_parquet(job.output)
    assert out.get_column("status").to_list() == ["ok"] * len(REVIEWS)
    assert out.get_column("agreement").to_list() == [1.0] * len(REVIEWS)


def test_validate_says_how_many_requests_the_samples_make(make_job, sim: SimulatorThread) -> None:
    job = make_job(REVIEWS, output=SAMPLED, model=WARM)

    result = cli("validate", str(job.spec))

    assert result.exit_code == 0
    assert "4 rows x 3 samples = 12 requests" in " ".join(result.stdout.split())
    assert sim.stats()["requests"] == 0


def test_an_estimate_counts_every_sample(make_job, sim: SimulatorThread) -> None:
    job = make_job(REVIEWS, output=SAMPLED, model=WARM)

    report = json.loads(cli("estimate", str(job.spec), "--json").stdout)

    assert report["requests_to_send"] == 3 * len(REVIEWS)
    assert sim.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("output", "model", "fragment"),
    [
        ({"samples": 3}, WARM, "output: samples above 1 vote between structured answers"),
        (SAMPLED, {"temperature": 0}, "output.samples: at model.temperature 0 every sample is the same answer"),
        ({**SAMPLED, "samples": 0}, WARM, "output.samples: Input should be greater than or equal to 1"),
    ],
)
def test_samples_that_cannot_vote_are_refused(make_job, sim, output, model, fragment) -> None:
    job = make_job(REVIEWS, output=output, model=model)

    result = cli("run", str(job.spec))

    assert result.exit_code == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert sim.stats()["requests"] == 0


def test_agreement_summary_matches_a_hand_computed_fixture() -> None:
    frame = pl.DataFrame(
        {
            "gold": ["a", "a", "b", "b", "a"],
            "label": ["a", "b", "b", "a", None],
            "status": ["ok", "ok", "ok", "ok", "invalid"],
            "agreement": [1.0, 1 / 3, 1.0, 2 / 3, None],
        }
    )

    report = agreement_summary(frame, 3, "gold")

    assert report.mean_agreement == round((1 + 1 / 3 + 1 + 2 / 3) / 4, 4)
    assert (report.unanimous_rows, report.split_rows) == (2, 2)
    assert report.accuracy_unanimous == 1.0  # rows 1 and 3: both right
    assert report.accuracy_split == 0.0  # rows 2 and 4: both wrong
    assert report.agreement_distribution == {"3 of 3": 2, "2 of 3": 1, "1 of 3": 1, "no answer": 1}


def test_the_report_says_how_the_samples_agreed(make_job, sim: SimulatorThread, tmp_path) -> None:
    sim.configure(sample_disagreement=1.0)  # every row splits 2 to 1 (see above)
    job = make_job(REVIEWS, output=SAMPLED, model=WARM, eval={"gold_column": "gold"})
    assert cli("run", str(job.spec)).exit_code == 0
    page = tmp_path / "report.html"

    result = cli("report", str(job.spec), "--html", str(page))

    assert result.exit_code == 0, result.stderr
    line = (
        "3 samples a row: mean agreement 0.6667; 0 rows unanimous, 4 split; accuracy n/a when unanimous, 0.0 when split"
    )
    assert line in " ".join(result.stdout.split())  # the terminal may wrap it
    assert f'<p id="voting">{line}.</p>' in page.read_text()
