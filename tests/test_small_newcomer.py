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


def test_usage_shows_simulated_runs_apart_and_labelled(tmp_path, make_job) -> None:
    from tests.conftest import cli, sample_rows

    real = make_job(sample_rows(3), name="real")  # the loopback simulator by URL: booked as real
    simulated = make_job(sample_rows(4), name="pretend", model={"endpoint": "simulator"})
    assert cli("run", str(real.spec)).exit_code == 0
    assert cli("run", str(simulated.spec)).exit_code == 0

    result = CliRunner().invoke(app, ["usage"], env={"COLUMNS": "120"})

    assert result.exit_code == 0, result.output
    real_part, _, simulated_part = result.stdout.partition("simulated runs (the built-in simulator")
    assert " real " in real_part and "pretend" not in real_part
    assert "make-believe spend, never billed" in simulated_part and "pretend" in simulated_part
    assert " real " not in simulated_part


def test_usage_json_has_the_simulated_runs_the_text_shows_marked_and_grouped_by(make_job) -> None:
    import json

    from tests.conftest import cli, sample_rows

    real = make_job(sample_rows(3), name="real")  # the loopback simulator by URL: booked as real
    pretend = make_job(sample_rows(4), name="pretend", model={"endpoint": "simulator"})
    assert cli("run", str(pretend.spec)).exit_code == 0

    only_simulated = json.loads(cli("usage", "--json").stdout)  # was [] while the text showed a table
    assert [(r["job"], r["requests_ok"], r["simulated"]) for r in only_simulated] == [("pretend", 4, True)]

    assert cli("run", str(real.spec)).exit_code == 0
    rows = json.loads(cli("usage", "--json").stdout)
    assert [(r["job"], r["simulated"]) for r in rows] == [("real", False), ("pretend", True)]  # real first

    by_model = json.loads(cli("usage", "--json", "--by", "model").stdout)  # the table's totals, exact
    assert [(r["model"], r["ok"], r["runs"], r["simulated"]) for r in by_model] == [
        ("glm-4.6", 3, 1, False),
        ("glm-4.6", 4, 1, True),
    ]
    assert "job" not in by_model[0] and "day" not in by_model[0]


def test_a_pilot_counts_only_rows_answered_before_as_answered_before(make_job) -> None:
    """A pilot sends its sample of rows; the others are left out, not "answered before" (the panel
    read 295 answered before when 31 rows had answers)."""
    import asyncio
    import io

    from runner.engine import execute
    from runner.job.resolve import load_job
    from runner.observe.progress import make_reporter
    from runner.runs import RunOptions
    from tests.conftest import API_KEY, cli, sample_rows

    files = make_job(sample_rows(40))
    assert cli("run", str(files.spec), "--limit", "6").exit_code == 0  # 6 rows answered before
    job = load_job(files.spec)
    options = RunOptions(pilot_rows=10)

    report = asyncio.run(
        execute(job, api_key=API_KEY, options=options, reporter=make_reporter("json", stream=io.StringIO()))
    )

    assert 0 < report.summary.answered_ok <= 10
    assert report.summary.rows_settled_before == 6  # the rows with answers, not the 30 left out


def test_a_missing_input_is_named_as_the_spec_wrote_it(tmp_path, monkeypatch) -> None:
    from tests.conftest import cli

    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "x.yaml").write_text(
        "version: 1\ninput: {paths: [data/nope.csv]}\nprompt: {template: '{{ text }}'}\n"
        "model: {name: glm-4.6, endpoint: simulator, max_tokens: 8}\noutput: {path: out/x.parquet}\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)

    result = cli("validate", "jobs/x.yaml")

    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "glm-batch: error: jobs/x.yaml: input.paths: data/nope.csv does not exist "
        "(looked for jobs/data/nope.csv: relative paths resolve against the spec's folder)"
    )


def test_the_end_table_names_both_rates_the_panel_and_the_summary_give(make_job, monkeypatch) -> None:
    """The panel showed 197 req/s and the summary 60 for one run: the rate while answers came, and the
    rate over the whole run with start-up and the output included. Both are said, and named."""
    import io
    import json

    import runner
    from runner.observe.progress import make_reporter
    from tests.conftest import sample_rows

    job = make_job(sample_rows(30))
    screen = io.StringIO()
    monkeypatch.setenv("COLUMNS", "200")  # the end table on one line a figure

    assert runner.run_job(str(job.spec), reporter=make_reporter("rich", stream=screen)).ok

    summary = json.loads(job.summary.read_text())
    assert summary["requests_per_s_answering"] > summary["requests_per_s"] > 0
    text = " ".join(screen.getvalue().split())
    assert f"{summary['requests_per_s']} req/s over the whole run" in text
    assert f"{summary['requests_per_s_answering']} while answers came" in text


def test_a_stopped_fresh_run_says_what_resuming_keeps(make_job) -> None:
    from tests.conftest import cli, sample_rows

    job = make_job(sample_rows(30))
    assert cli("run", str(job.spec)).exit_code == 0

    stopped = cli("run", str(job.spec), "--fresh", "--set", "run.max_cost=0.0001")

    assert stopped.exit_code == 4, stopped.stderr
    assert "this was a --fresh run: resuming without --fresh keeps the earlier answers" in stopped.stderr
    again = cli("run", str(job.spec))  # as documented: the rows the fresh run did not reach keep their answers
    assert again.exit_code == 0 and "this was a --fresh run" not in again.stdout + again.stderr
