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
