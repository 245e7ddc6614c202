"""`glm-batch report` for every job: the run's figures for free-text jobs too, quality where there is gold.

These call what the `report` command calls (runner.observe.report and report_html) on real runs
against the simulator; tests/test_report_browser.py opens the pages in a browser.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

from rich.console import Console

import runner
from runner.observe.report import REPAIRED_MEANS, Report, load_report, print_report
from runner.observe.report_html import html_page
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, sample_rows

MakeJob = Callable[..., JobFiles]

REVIEWS = [
    {"id": "1", "text": "Great phone, I love it", "gold": "positive"},
    {"id": "2", "text": "Terrible battery, broke in a week", "gold": "negative"},
    {"id": "3", "text": "The best purchase this year", "gold": "positive"},
    {"id": "4", "text": "Awful support and a bad screen", "gold": "negative"},
    {"id": "5", "text": "Not what I hoped for", "gold": "positive"},  # the simulator's lexicon says negative
]
SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]}},
    "required": ["sentiment"],
}


def report_of(spec: object, **settings: object) -> Report:
    """What `glm-batch report JOB` shows: the job's output read with its spec."""
    job = runner.load_job(str(spec), set=settings or None)
    return load_report(job.output_path, job=job)


def printed(found: Report) -> str:
    console = Console(width=100, record=True, file=io.StringIO())
    print_report(found, console)
    return " ".join(console.export_text().split())


def test_a_free_text_job_gets_a_report_of_its_run(make_job: MakeJob) -> None:
    rows = [*sample_rows(12), {"id": "dup", "text": "review number 3: the product was fine"}]
    job = make_job(rows)  # a summarising job: no labels, no schema
    assert cli("run", str(job.spec)).exit_code == 0

    found = report_of(job.spec)

    assert found.quality is None and found.examples is None
    run = found.run
    assert run["rows"] == 13 and run["by_status"] == {"ok": 13}
    assert run["rows_reused"] == 1 and run["rows_sent"] == 12  # the duplicate shared row 3's request
    assert run["model"] == "glm-4.6" and run["run_id"] == json.loads(job.summary.read_text())["run_id"]
    assert run["tokens"]["input"] > 0 and run["cost"] is not None and run["cost"] > 0
    assert len(run["timeline"]["throughput"]) == 60 and sum(run["timeline"]["concurrency"]) > 0
    assert sum(run["latency"]["counts"]) == 12 and run["latency"]["p50"] is not None
    assert sum(t["requests"] for t in run["tiers"].values()) == 12
    text = printed(found)
    assert "model glm-4.6" in text and "13 rows: 13 ok" in text and "no gold labels" not in text
    page = html_page(found)
    for section in ('id="header"', 'id="throughput"', 'id="concurrency"', 'id="latency"', 'id="errors"'):
        assert section in page
    assert 'id="tiers"' in page and 'id="attempts"' in page and "<script" not in page


def test_rows_that_failed_are_counted_by_error_type(make_job: MakeJob) -> None:
    rows = [*sample_rows(3), {"id": "blank", "text": ""}]
    # an empty CSV cell reads as null: render it as "" (which has no first letter)
    job = make_job(rows, prompt={"template": "First letter: {{ text[0] }}"}, input={"nulls": "empty"})
    assert cli("run", str(job.spec)).exit_code == 1

    found = report_of(job.spec)

    assert found.run["errors"] == {"render_error": 1}
    assert "errors: render_error 1" in printed(found)
    assert 'id="errors"' in html_page(found) and "render_error" in html_page(found)


def test_a_schema_job_with_gold_fields_reports_its_per_field_rates_not_no_gold(make_job: MakeJob) -> None:
    job = make_job(
        REVIEWS, output={"schema": SCHEMA, "keep_columns": ["text"]}, eval={"gold_fields": {"sentiment": "gold"}}
    )
    assert cli("run", str(job.spec)).exit_code == 0

    found = report_of(job.spec)

    text = printed(found)
    assert "sentiment: exact match 0.8000 on 5 rows with gold" in text
    assert "no gold labels" not in text
    assert found.examples is not None and found.examples["total"] == 1
    page = html_page(found)
    assert 'id="fields"' in page and "Not what I hoped for" in page  # the wrong answer, with its text


def test_the_page_says_what_repaired_means(make_job: MakeJob, sim: SimulatorThread) -> None:
    sim.configure(invalid_rate=1.0)  # every first answer breaks the schema; the repair turn fixes it
    job = make_job(REVIEWS, output={"labels": ["positive", "negative"]}, eval={"gold_column": "gold"})
    assert cli("run", str(job.spec)).exit_code == 0

    page = html_page(report_of(job.spec))

    assert REPAIRED_MEANS in page and "Of the 5 rows repaired, 5 ended valid" in page


def test_report_job_and_report_output_agree_on_the_vote_of_a_sampled_run(make_job: MakeJob) -> None:
    job = make_job(
        REVIEWS, output={"labels": ["positive", "negative"]}, model={"temperature": 0.7}, eval={"gold_column": "gold"}
    )
    # The samples were raised on the command line: the spec alone says 1.
    assert cli("run", str(job.spec), "--set", "output.samples=3").exit_code == 0

    from_job, from_output = report_of(job.spec), load_report(job.output)

    assert from_job.quality is not None and from_output.quality is not None
    assert from_job.quality.voting == from_output.quality.voting
    assert from_job.quality.voting is not None and from_job.quality.voting.samples_per_row == 3
    assert 'id="voting"' in html_page(from_job) and 'id="voting"' in html_page(from_output)


def test_an_output_alone_shows_the_per_field_rates_its_run_computed(make_job: MakeJob) -> None:
    job = make_job(REVIEWS, output={"schema": SCHEMA, "keep_columns": []}, eval={"gold_fields": {"sentiment": "gold"}})
    assert cli("run", str(job.spec)).exit_code == 0

    text = printed(load_report(job.output))

    assert "sentiment: exact match 0.8000 on 5 rows with gold" in text and "no gold labels" not in text
