"""Smaller things a newcomer tripped on (issue 21, item 9), each pinned by a test."""

from __future__ import annotations

from typer.testing import CliRunner

from runner.cli import app
from runner.job import catalog


def test_models_shows_whether_each_model_takes_the_batch_api() -> None:
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "120"})

    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if " model " in f" {line} ")
    assert " batch " in header
    for name, info in catalog.models().items():
        line = next(line for line in result.stdout.splitlines() if line.split()[:1] == [name])
        assert line.split()[4] == ("yes" if info.batch.eligible else "no"), line
    assert {info.batch.eligible for info in catalog.models().values()} == {True, False}


def test_the_html_says_when_the_last_run_sent_nothing(make_job) -> None:
    from runner.observe.report import load_report
    from runner.observe.report_html import html_page
    from tests.conftest import cli, sample_rows

    job = make_job(sample_rows(5))
    assert cli("run", str(job.spec)).exit_code == 0
    assert 'id="idle-run"' not in html_page(load_report(job.output))

    assert cli("run", str(job.spec)).exit_code == 0  # nothing left to send

    page = html_page(load_report(job.output))
    assert 'id="idle-run"' in page and "sent nothing: every row was answered before" in page
    assert 'id="throughput"' in page  # the run that sent is still drawn, and named as such


def test_the_html_says_why_there_is_no_timeline(make_job) -> None:
    from runner.observe.report import load_report
    from runner.observe.report_html import html_page
    from tests.conftest import cli, sample_rows

    rows = sample_rows(3)
    for row in rows:
        row["text"] = ""  # every row skipped: nothing is sent
    job = make_job(rows, input={"nulls": "skip"})
    assert cli("run", str(job.spec)).exit_code == 0

    page = html_page(load_report(job.output))
    assert 'id="no-timeline"' in page and "nothing was sent for it" in page
