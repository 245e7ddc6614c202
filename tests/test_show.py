"""`glm-batch show OUTPUT_OR_JOB`: an output's rows on the command line, filtered and chosen, as a table
that fits the terminal or as JSON; bad columns and missing outputs are one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from runner.cli import app
from tests.conftest import cli, sample_rows


@pytest.fixture
def finished(make_job):
    """A finished job whose second row failed (its prompt is over the model's context window)."""
    rows = sample_rows(25)
    rows[1]["text"] = "word " * 180_000
    job = make_job(rows)
    assert cli("run", str(job.spec)).exit_code == 1
    return job


def test_show_filters_chooses_columns_and_prints_json(finished) -> None:
    result = cli("show", str(finished.output), "--where", "status=error", "--columns", "id,error_type", "--json")

    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == [{"id": "r000001", "error_type": "over_context"}]
    ok = json.loads(cli("show", str(finished.spec), "--where", "status!=error", "-n", "3", "--json").stdout)
    assert [row["id"] for row in ok] == ["r000000", "r000002", "r000003"]
    assert set(ok[0]) == {"id", "text", "response_text", "status", "error_type"}  # the default columns
    both = cli("show", str(finished.spec), "--where", "status!=error", "--where", "id!=r000000", "-n", "1", "--json")
    assert [row["id"] for row in json.loads(both.stdout)] == ["r000002"]  # repeated --where: every one holds


@pytest.mark.parametrize("width", [40, 60, 80, 200])
def test_the_table_fits_the_terminal(finished, width: int) -> None:
    result = CliRunner().invoke(app, ["show", str(finished.spec), "-n", "5"], env={"COLUMNS": str(width)})

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]
    assert sum("r00000" in line for line in lines) == 5
    assert "5 of 25 rows of " in result.stdout


def test_show_refuses_what_it_cannot_show_in_one_line(finished, tmp_path) -> None:
    for args, fragment in [
        (["--columns", "id,nope"], "--columns id,nope: no column 'nope'; the output has: id, text,"),
        (["--where", "nope=1"], "--where 'nope=1': no column 'nope'"),
        (["--where", "status"], "expected COLUMN=VALUE or COLUMN!=VALUE"),
    ]:
        result = cli("show", str(finished.output), *args)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
        assert fragment in result.stderr
    missing = cli("show", str(tmp_path / "nothing.parquet"))
    assert missing.exit_code == 2 and "no such output file" in missing.stderr
