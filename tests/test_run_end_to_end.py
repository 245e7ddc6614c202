"""A job runs end to end: every input row gets exactly one output row holding its own answer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl

from runner.simulator.answers import answer_for
from runner.simulator.simulator import SimulatorThread
from tests.conftest import cli, sample_rows


def expected_answer(text: str) -> str:
    """What the simulator answers to the default test template's prompt for `text`."""
    return answer_for(f"Be brief.\nSummarise: {text}")


def test_every_row_gets_its_own_answer_in_input_order(make_job, sim: SimulatorThread) -> None:
    rows = sample_rows(50)
    job = make_job(rows)

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(job.output)
    assert out.get_column("id").to_list() == [r["id"] for r in rows]
    assert out.get_column("text").to_list() == [r["text"] for r in rows]
    assert out.get_column("response_text").to_list() == [expected_answer(r["text"]) for r in rows]
    assert set(out.get_column("status")) == {"ok"}
    assert out.get_column("attempts").to_list() == [1] * 50
    assert sim.stats()["ok"] == 50


def test_output_has_the_documented_columns_and_usage(make_job) -> None:
    job = make_job(sample_rows(3))

    assert cli("run", str(job.spec)).exit_code == 0

    out = pl.read_parquet(job.output)
    # README (What a run writes): the id, the kept columns, then these, in this order.
    assert out.columns == [
        "id", "text", "response_text", "thinking", "stop_reason", "input_tokens", "output_tokens",
        "thinking_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "cost", "reused_from",
        "latency_ms", "attempts", "repairs", "status", "error_type", "error_message", "request_id", "model",
        "finished_at", "request_key", "run_id", "api",
    ]  # fmt: skip
    summary = json.loads(job.summary.read_text())
    assert out.get_column("run_id").to_list() == [summary["run_id"]] * 3
    assert out.get_column("api").to_list() == ["online"] * 3
    assert (out.get_column("input_tokens") > 0).all()
    assert (out.get_column("output_tokens") > 0).all()
    assert out.get_column("stop_reason").to_list() == ["end_turn"] * 3
    assert out.get_column("request_id").str.starts_with("msg_").all()
    assert out.get_column("model").to_list() == ["glm-4.6"] * 3


def test_streaming_captures_the_full_message_and_usage(make_job) -> None:
    rows = sample_rows(5)
    job = make_job(
        rows, model={"stream": True, "max_tokens": 256, "thinking": {"type": "enabled", "budget_tokens": 128}}
    )

    assert cli("run", str(job.spec)).exit_code == 0

    out = pl.read_parquet(job.output)
    assert out.get_column("response_text").to_list() == [expected_answer(r["text"]) for r in rows]
    # Zhipu streams zeros in message_start; the real counts arrive in message_delta and must be kept.
    assert (out.get_column("input_tokens") > 0).all()
    assert out.get_column("thinking").str.starts_with("Considering answer-").all()


def test_a_max_tokens_past_the_sdk_guard_is_streamed_not_refused(make_job) -> None:
    job = make_job(sample_rows(2), model={"max_tokens": 64000})

    assert cli("run", str(job.spec)).exit_code == 0
    assert set(pl.read_parquet(job.output).get_column("status")) == {"ok"}


def test_duplicate_rows_are_answered_once_and_both_get_the_answer(make_job, sim: SimulatorThread) -> None:
    rows = [{"id": "a", "text": "same"}, {"id": "b", "text": "same"}, {"id": "c", "text": "other"}]
    job = make_job(rows)

    assert cli("run", str(job.spec)).exit_code == 0

    out = pl.read_parquet(job.output)
    assert out.get_column("response_text").to_list() == [expected_answer("same")] * 2 + [expected_answer("other")]
    assert sim.stats()["requests"] == 2


def test_rows_without_an_id_column_get_stable_content_ids(make_job) -> None:
    job = make_job(sample_rows(4), input={"id_column": None})

    assert cli("run", str(job.spec)).exit_code == 0
    first = pl.read_parquet(job.output).get_column("id").to_list()
    assert cli("run", str(job.spec), "--fresh").exit_code == 0
    assert pl.read_parquet(job.output).get_column("id").to_list() == first
    assert len(set(first)) == 4


def test_sampling_params_travel_in_the_body(make_job, sim: SimulatorThread) -> None:
    job = make_job(sample_rows(2), model={"temperature": 0.3, "top_p": 0.9})

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr  # SDK 2.x raises TypeError if these go as arguments


def test_limit_reads_only_the_first_rows(make_job, sim: SimulatorThread) -> None:
    job = make_job(sample_rows(30))

    assert cli("run", str(job.spec), "--limit", "7").exit_code == 0

    assert pl.read_parquet(job.output.with_name("job.limit-7.parquet")).height == 7
    assert sim.stats()["requests"] == 7


def test_a_summary_is_written_beside_the_output(make_job) -> None:
    job = make_job(sample_rows(10))

    assert cli("run", str(job.spec)).exit_code == 0

    summary = json.loads(job.summary.read_text())
    assert summary["exit_code"] == 0
    assert summary["rows_total"] == 10
    assert summary["answered_ok"] == 10
    assert summary["tokens"]["input"] > 0
    assert summary["latency_ms"]["p50"] is not None
    assert summary["output"] == str(job.output)
    # README: counts, tokens, wall time, throughput, latency percentiles, retries, exit code.
    assert summary["elapsed_s"] > 0 and summary["requests_per_s"] > 0
    assert set(summary["latency_ms"]) >= {"p50", "p90", "p99"} and summary["retries"] == {}


def shipped_jobs(tmp_path: Path) -> Path:
    """A copy of the repository's jobs/ and data/ (the shipped jobs write their output beside them)."""
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo / "jobs", tmp_path / "jobs")
    shutil.copytree(repo / "data", tmp_path / "data")
    return tmp_path / "jobs"


def test_the_demo_job_runs_offline_on_the_builtin_simulator(tmp_path) -> None:
    jobs = shipped_jobs(tmp_path)

    result = cli("run", str(jobs / "demo.yaml"), "--set", "run.backoff_initial_s=0.01")

    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "demo.parquet")
    assert out.height == 200
    assert set(out.get_column("status")) == {"ok"}


def test_a_row_whose_values_break_the_template_fails_alone(make_job, sim: SimulatorThread) -> None:
    rows = [{"id": "a", "text": "fine"}, {"id": "b", "text": "also fine"}]
    job = make_job(rows, prompt={"template": "{{ text ~ (1 / (0 if id == 'b' else 1)) }}"})

    result = cli("run", str(job.spec))

    assert result.exit_code == 1
    out = pl.read_parquet(job.output)
    assert out.get_column("status").to_list() == ["ok", "error"]
    assert out.get_column("error_type").to_list() == [None, "render_error"]
    assert "ZeroDivisionError" in out.get_column("error_message")[1]
    assert sim.stats()["requests"] == 1


def test_validate_names_the_row_a_template_fails_on(make_job, sim: SimulatorThread) -> None:
    rows = [{"id": "a", "text": "fine"}, {"id": "b", "text": "also fine"}]
    job = make_job(rows, prompt={"template": "{{ text ~ (1 / (0 if id == 'b' else 1)) }}"})

    result = cli("validate", str(job.spec))

    assert result.exit_code == 2
    assert "the prompt template fails on row 1 (id b): ZeroDivisionError: division by zero" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_an_estimate_counts_the_rows_a_template_fails_on(make_job, sim: SimulatorThread) -> None:
    rows = [{"id": "a", "text": "fine"}, {"id": "b", "text": "also fine"}, {"id": "c", "text": "ok"}]
    job = make_job(rows, prompt={"template": "{{ text ~ (1 / (0 if id == 'b' else 1)) }}"})

    result = cli("estimate", str(job.spec), "--json")

    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["requests_to_send"] == 2
    assert report["render_failures"] == {"rows": 1, "first": "row 1 (id b): ZeroDivisionError: division by zero"}


def test_the_sentiment_job_labels_real_reviews_and_measures_itself(tmp_path) -> None:
    jobs = shipped_jobs(tmp_path)

    result = cli("run", str(jobs / "sentiment.yaml"), "--set", "simulator.latency_s=0")

    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "sentiment.parquet")
    assert out.height == 2000
    assert set(out.get_column("label")) == {"positive", "negative"}
    quality = json.loads((tmp_path / "out" / "sentiment.summary.json").read_text())["quality"]
    assert quality["metrics"]["rows_with_gold"] == 2000
    assert 0.5 < quality["metrics"]["accuracy"] < 1.0
    assert quality["repaired"] > 0  # the job asks the simulator for some invalid first answers


def test_thinking_tokens_are_counted_per_row_and_in_the_summary(make_job) -> None:
    job = make_job(sample_rows(4), model={"max_tokens": 256, "thinking": {"type": "enabled", "budget_tokens": 128}})
    quiet = make_job(sample_rows(4), name="quiet", model={"thinking": {"type": "disabled"}})

    assert cli("run", str(job.spec)).exit_code == 0
    assert cli("run", str(quiet.spec)).exit_code == 0

    out = pl.read_parquet(job.output)
    assert (out.get_column("thinking_tokens") > 0).all()
    assert (out.get_column("thinking_tokens") < out.get_column("output_tokens")).all()  # a part of the output
    summary = json.loads(job.summary.read_text())
    assert summary["tokens"]["thinking"] == out.get_column("thinking_tokens").sum()
    assert json.loads(quiet.summary.read_text())["tokens"]["thinking"] == 0
