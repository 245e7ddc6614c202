"""Thinking that fits the job (runner.job.thinking): GLM-4.5/4.6 think by default and GLM-4.7 always
does, reasoning is billed as output and counts against max_tokens. Labeling jobs send thinking
disabled unless the spec says otherwise, validate and estimate warn when the reasoning may not fit,
and Zhipu's own finish reasons are not taken for answers: network_error is retried, sensitive fails
its row as content_filter."""

from __future__ import annotations

import json

import polars as pl

from tests.conftest import cli, sample_rows

LABELS = {"labels": ["positive", "negative", "neutral"], "keep_columns": []}


def test_a_label_job_with_a_small_budget_on_a_thinking_model_is_labeled_not_truncated(make_job, sim) -> None:
    sim.configure(anthropic_thinking="model")  # the route thinks unless told not to, as the native API does
    job = make_job(sample_rows(20), model={"max_tokens": 32}, output=LABELS)

    validated = cli("validate", str(job.spec))
    assert validated.exit_code == 0
    assert "thinking: disabled for this labeling job" in validated.stdout
    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr[-2000:]
    out = pl.read_parquet(job.output)
    assert set(out.get_column("status")) == {"ok"} and out.get_column("label").is_not_null().all()
    assert (out.get_column("thinking_tokens") == 0).all()


def test_a_job_that_asks_for_thinking_keeps_it_and_is_warned_about_a_small_budget(make_job) -> None:
    job = make_job(
        sample_rows(3), model={"max_tokens": 64, "thinking": {"type": "enabled", "budget_tokens": 32}}, output=LABELS
    )
    validated = cli("validate", str(job.spec))
    assert validated.exit_code == 0
    assert "thinking: disabled" not in validated.stdout
    assert "warning: model.max_tokens 64 is small for glm-4.6" in " ".join(validated.stdout.split())
    estimated = cli("estimate", str(job.spec), "--json")
    assert estimated.exit_code == 0
    assert "max_tokens 64 is small" in json.loads(estimated.stdout)["warnings"][0]


def test_a_model_that_always_thinks_is_warned_about_not_switched_off(make_job) -> None:
    job = make_job(sample_rows(3), model={"name": "glm-4.7", "max_tokens": 32}, output=LABELS)
    validated = " ".join(cli("validate", str(job.spec)).stdout.split())
    assert "which always thinks" in validated and "thinking: disabled" not in validated
    text_job = make_job(sample_rows(3), name="text", model={"max_tokens": 2048})  # room enough: no warning
    assert "warning" not in cli("validate", str(text_job.spec)).stdout


def test_network_error_is_retried_and_never_kept_as_an_answer(make_job, sim) -> None:
    sim.configure(faults=("finish_network_error",), fault_attempts=1)  # each prompt's first answer breaks off
    job = make_job(sample_rows(5))

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr[-2000:]
    out = pl.read_parquet(job.output)
    assert set(out.get_column("status")) == {"ok"} and set(out.get_column("stop_reason")) == {"end_turn"}
    assert (out.get_column("attempts") == 2).all()
    assert json.loads(job.summary.read_text())["retries"] == {"network_error": 5}


def test_sensitive_fails_its_row_as_content_filter_with_a_clear_message(make_job, sim) -> None:
    sim.configure(faults=("finish_sensitive",), fault_rate=1.0, fault_match="number 3")
    job = make_job(sample_rows(5))

    result = cli("run", str(job.spec))

    assert result.exit_code == 1, result.stderr[-2000:]
    out = pl.read_parquet(job.output).sort("id")
    assert out.get_column("status").to_list() == ["ok", "ok", "ok", "error", "ok"]
    blocked = out.row(3, named=True)
    assert blocked["error_type"] == "content_filter" and blocked["attempts"] == 1
    assert "blocked" in blocked["error_message"] and "finish_reason sensitive" in blocked["error_message"]


def test_the_estimate_counts_reasoning_where_the_model_thinks(make_job) -> None:
    thinking = make_job(sample_rows(3), name="thinks", model={"name": "glm-4.7", "max_tokens": 2048})
    plain = make_job(sample_rows(3), name="plain", model={"name": "glm-4.6", "max_tokens": 2048})

    def per_request(job) -> float:
        result = cli("estimate", str(job.spec), "--json")
        assert result.exit_code == 0, result.stderr
        return float(json.loads(result.stdout)["output_tokens"]["per_request_expected"])

    assert per_request(plain) == 1024  # half of max_tokens: no reasoning on a text job without thinking
    assert per_request(thinking) > per_request(plain)  # GLM-4.7 always reasons first, billed as output
