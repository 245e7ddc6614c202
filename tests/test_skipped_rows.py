"""`input.nulls: skip` is a decision, not a failure: the rows it skips get status `skipped`, the run
exits 0 and never advises --retry-failed, and the summary table, `status`, the text report and the HTML
page count them apart and agree. A cron job built this way succeeds every day."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from runner.observe.report import load_report
from runner.observe.report_html import html_page
from tests.conftest import cli, sample_rows
from tests.test_report_run import printed


def rows_with_nulls(n: int, nulls: set[int]) -> list[dict[str, str]]:
    rows = sample_rows(n)
    for i in nulls:
        rows[i]["text"] = ""  # an empty CSV cell reads as null
    return rows


def test_skipped_rows_exit_0_and_are_counted_apart_everywhere(make_job, sim) -> None:
    job = make_job(rows_with_nulls(6, {1, 4}), input={"nulls": "skip"})

    first = cli("run", str(job.spec))

    assert first.exit_code == 0, first.stderr
    assert "--retry-failed" not in first.stdout + first.stderr
    assert "2 rows skipped for a null in a prompt column (input.nulls: skip" in first.stdout
    assert sim.stats()["requests"] == 4
    statuses = pl.read_parquet(job.output).get_column("status").to_list()
    assert statuses == ["ok", "skipped", "ok", "ok", "skipped", "ok"]
    summary = json.loads(job.summary.read_text())
    assert summary["rows_skipped"] == 2 and summary["answered_error"] == 0 and summary["errors"] == {}
    assert "2 skipped (input.nulls: skip), 0 pending" in cli("status", str(job.spec)).stdout
    found = load_report(job.output)
    assert found.run["by_status"] == {"ok": 4, "skipped": 2} and found.run["errors"] == {}
    assert "6 rows: 4 ok, 2 skipped" in printed(found)
    assert "6: 4 ok, 2 skipped" in html_page(found)

    again = cli("run", str(job.spec))  # the next day's cron run: nothing to send, still a success

    assert again.exit_code == 0, again.stderr
    assert "--retry-failed" not in again.stdout + again.stderr
    assert sim.stats()["requests"] == 4


def test_a_real_failure_beside_skipped_rows_still_fails_and_says_both(make_job, tmp_path: Path) -> None:
    rows = [*rows_with_nulls(3, {0}), {"id": "huge", "text": "word " * 180_000}]  # over the context window
    job = make_job(rows, input={"nulls": "skip"})

    result = cli("run", str(job.spec))

    assert result.exit_code == 1
    assert "finished; 1 rows failed" in result.stderr and "--retry-failed; 1 rows skipped" in result.stderr
