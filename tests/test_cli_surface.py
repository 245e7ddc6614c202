"""The command line's surface: start-up imports, --version, help, text logs, the schema, init, models,
usage --json, and tables that fit an 80-column terminal."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from rich.console import Console
from typer.testing import CliRunner

from runner import __version__
from runner.cli import app
from runner.cli.scaffold import job_schema, job_schema_text
from runner.cli.tables import _estimate_table, _models_table, _usage_table
from runner.job import catalog
from runner.job.spec import JobSpec
from runner.jsonrecord import from_json
from runner.money import ledger
from runner.observe.progress import LineReporter, RichReporter, text_line
from runner.observe.summary import Summary

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str, width: int = 80) -> Any:
    """Run the real CLI in-process at a given terminal width."""
    return CliRunner().invoke(app, list(args), env={**os.environ, "COLUMNS": str(width)})


def fits(text: str, width: int = 80) -> None:
    """No line wider than `width` and no cell cut short with an ellipsis."""
    lines = text.splitlines()
    assert lines
    assert max(len(line) for line in lines) <= width, text
    assert "…" not in text, text


def render(table: Any) -> str:
    """What a table looks like on an 80-column terminal."""
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_importing_the_cli_loads_no_heavy_library() -> None:
    code = (
        "import sys, runner.cli; "
        "print(sorted(m for m in ('anthropic', 'polars', 'aiohttp', 'jsonschema', 'jinja2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cli_sets_the_allocator_before_polars_loads() -> None:
    code = "import os, sys, runner.cli; print(os.environ['_RJEM_MALLOC_CONF'], 'polars' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0", "False"]


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"glm-batch {__version__}\n"


def test_help_shows_flags_as_flags_and_offers_completion() -> None:
    top = invoke("--help")
    assert top.exit_code == 0
    for name in ("--version", "--install-completion", "schema", "init", "models"):
        assert name in top.stdout
    run_help = invoke("run", "--help")
    assert "<bool>" not in top.stdout + run_help.stdout
    assert "KEY=VALUE" in run_help.stdout
    assert "auto|json|text" in run_help.stdout
    fits(top.stdout)
    fits(run_help.stdout)


def test_text_log_lines_are_event_then_key_value() -> None:
    record = {
        "ts": "2026-11-05T10:00:00+00:00",
        "event": "end",
        "inputs": [{"path": "data/a b.csv", "bytes": 12}],
        "stopped": None,
        "message": "all 20 rows ok",
        "ok": 20,
        "rate": 1.5,
        "fresh": False,
        "job": "demo",
    }
    assert text_line(record) == (
        'end ts=2026-11-05T10:00:00+00:00 inputs=[{"path":"data/a b.csv","bytes":12}] '
        'message="all 20 rows ok" ok=20 rate=1.5 fresh=false job=demo'
    )


def test_line_reporter_text_and_json() -> None:
    text, js = io.StringIO(), io.StringIO()
    LineReporter(text, as_json=False, interval_s=10).event("retrying", reason="429 1302", retries={"429": 2}, x=None)
    LineReporter(js, as_json=True, interval_s=10).event("retrying", reason="429 1302", x=None)
    assert text.getvalue().startswith("retrying ts=")
    assert text.getvalue().rstrip().endswith('reason="429 1302" retries={"429":2}')
    record = json.loads(js.getvalue())
    assert record["event"] == "retrying" and record["x"] is None and record["reason"] == "429 1302"


def test_schema_command_matches_the_model_and_the_committed_file() -> None:
    result = invoke("schema")
    assert result.exit_code == 0
    printed = json.loads(result.stdout)
    assert printed == job_schema()
    assert {k: v for k, v in printed.items() if k != "$schema"} == JobSpec.model_json_schema(by_alias=True)
    committed = (ROOT / "configs" / "job.schema.json").read_text(encoding="utf-8")
    assert committed == job_schema_text(), "regenerate it: glm-batch schema -o configs/job.schema.json"
    for job in ("demo.yaml", "sentiment.yaml"):
        first = (ROOT / "jobs" / job).read_text(encoding="utf-8").splitlines()[0]
        assert first == "# yaml-language-server: $schema=../configs/job.schema.json"


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_init_writes_a_job_that_validates_and_never_overwrites(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    frame = pl.DataFrame(
        {"review_id": ["a1", "a2"], "title": ["Fine", "Bad"], "body": ["It works well.", "Broke."], "stars": [4, 1]}
    )
    (tmp_path / "data").mkdir()
    source = tmp_path / "data" / f"reviews.{kind}"
    frame.write_csv(source) if kind == "csv" else frame.write_parquet(source)

    made = invoke("init", f"data/reviews.{kind}")
    assert made.exit_code == 0, made.output
    job = tmp_path / "jobs" / "reviews.yaml"
    text = job.read_text(encoding="utf-8")
    assert "id_column: review_id" in text and "{{ title }}" in text and "{{ body }}" in text

    checked = invoke("validate", "jobs/reviews.yaml", "--rows", "1")
    assert checked.exit_code == 0, checked.output
    assert "is valid; 2 rows" in checked.stdout

    again = invoke("init", f"data/reviews.{kind}")
    assert again.exit_code == 2
    assert again.stderr.strip().splitlines() == [
        "glm-batch: error: jobs/reviews.yaml already exists; pass --output another.yaml or remove it first"
    ]
    assert job.read_text(encoding="utf-8") == text

    elsewhere = invoke("init", f"data/reviews.{kind}", "--output", "other/x.yaml")
    assert elsewhere.exit_code == 0
    assert invoke("validate", "other/x.yaml").exit_code == 0


def test_init_reads_jsonl_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text('{"id": 1, "question": "Why?"}\n{"id": 2, "question": "How?"}\n')
    made = invoke("init", "in.jsonl", "--output", "q.yaml")
    assert made.exit_code == 0, made.output
    text = (tmp_path / "q.yaml").read_text(encoding="utf-8")
    assert "id_column: id" in text and "{{ question }}" in text and 'paths: ["in.jsonl"]' in text


def test_init_refuses_a_missing_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("init", "nope.csv")
    assert result.exit_code == 2
    assert result.stderr.strip() == "glm-batch: error: nope.csv: no such input file"


def test_models_json_and_table() -> None:
    as_json = invoke("models", "--json")
    assert as_json.exit_code == 0
    listed = json.loads(as_json.stdout)
    assert {"glm-4.6", "glm-4.5-air", "glm-4.5-flash"} <= set(listed)
    assert listed["glm-4.6"]["context"] == catalog.models()["glm-4.6"].context
    assert "confirmed" in listed["glm-4.5-air"]["prices"]["CNY"]

    table = invoke("models")
    assert table.exit_code == 0
    fits(table.stdout)
    for name in listed:
        assert f" {name} " in table.stdout
    fits(render(_models_table({n: m.model_dump() for n, m in catalog.models().items()})))


def _ledger_rows(big: bool) -> pl.DataFrame:
    scale = 1000 if big else 1
    jobs = [("sentiment", "glm-4.5-air", "CNY"), ("nightly-product-reviews", "glm-4.7-flashx", "USD")]
    return pl.DataFrame(
        [
            {
                "day": dt.date(2026, 11, 1 + i),
                "job": job,
                "model": model,
                "endpoint": "zhipu",
                "currency": cur,
                "run_id": f"run-{i}",
                "requests_ok": 2000 * scale,
                "requests_failed": 3 * big,
                "input_tokens": 105_560 * scale,
                "cache_read_input_tokens": 2048 * big,
                "output_tokens": 47_250 * scale,
                "est_input_tokens": 100_000,
                "cost": 0.014892 * scale,
            }
            for i, (job, model, cur) in enumerate(jobs)
        ],
        schema=ledger.LEDGER_SCHEMA,
    )


def test_usage_json_and_table() -> None:
    empty = invoke("usage", "--json")
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []
    ledger.append(_ledger_rows(big=False), "run-1")
    result = invoke("usage", "--json")
    rows = json.loads(result.stdout)
    assert [r["job"] for r in rows] == ["sentiment", "nightly-product-reviews"]
    assert rows[0]["day"] == "2026-11-01" and rows[0]["input_tokens"] == 105_560
    table = invoke("usage")
    assert table.exit_code == 0
    fits(table.stdout)
    assert "105,560" in table.stdout  # exact figures when they fit
    later = invoke("usage", "--json", "--since", "2026-11-02")
    assert [r["job"] for r in json.loads(later.stdout)] == ["nightly-product-reviews"]


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("by", [["job", "model", "day"], ["job", "model", "day", "endpoint"], ["model"]])
def test_usage_table_fits_80_columns(by: list[str], big: bool) -> None:
    fits(render(_usage_table(ledger.summarise(_ledger_rows(big), by), by)))


def _estimate_report() -> dict[str, Any]:
    return {
        "job": "nightly-product-reviews",
        "model": "glm-4.5-air",
        "endpoint": "zhipu",
        "currency": "CNY",
        "rows": 1_000_000,
        "rows_answered_already": 12_345,
        "requests_to_send": 987_655,
        "render_failures": {"rows": 3, "first": "row 17: UndefinedError: 'title' is undefined"},
        "over_context": {"requests": 2, "context_tokens": 128_000},
        "input_tokens": {"expected": 10_556_000, "calibration": {"ratio": 0.7424, "basis": "measured on 20 answers"}},
        "output_tokens": {
            "low": 4_016_000,
            "expected": 4_725_000,
            "high": 5_434_000,
            "ceiling": 23_040_000,
            "basis": "mean of 20 measured answers, 95% interval of the mean",
        },
        "cost": {"low": 13.2, "expected": 15.0, "high": 16.7, "ceiling": 52.0},
        "batch_api_expected": 7.5,
        "tier_mix": {"in<32000,out<200": 900_000, "in<32000": 87_655},
        "wall_time_s": {
            "expected": 61_728,
            "concurrency": 16,
            "latency_s_per_request": 1.0,
            "latency_basis": "measured by the pilot",
        },
        "prices_confirmed": False,
    }


def test_estimate_table_fits_80_columns() -> None:
    text = render(_estimate_table(_estimate_report()))
    fits(text)
    assert "the endpoint refuses them" in text


def test_run_summary_table_fits_80_columns() -> None:
    console = Console(width=80, record=True, file=io.StringIO())
    reporter = RichReporter(io.StringIO(), console=console)
    summary = from_json(
        Summary,
        {
            "job": "nightly-product-reviews",
            "rows_total": 1_000_000,
            "samples_per_row": 3,
            "rows_settled_before": 12_345,
            "answered_ok": 2_950_000,
            "answered_error": 12,
            "tokens": {"input": 123_456_789, "output": 98_765_432},
            "cost": {
                "currency": "CNY",
                "spent": 1234.567891,
                "estimate": {"estimated": 1200.0, "spent": 1234.567891, "error_pct": 2.9},
            },
            "elapsed_s": 61_728.4,
            "requests_per_s": 47.8,
            "latency_ms": {"p50": 1234.0, "p99": 9876.0},
            "retries": {"429 1302 concurrency": 1234, "connection error": 56, "timeout": 7, "500 server error": 3},
            "exit_code": 1,
        },
    )
    reporter.finish(summary, "done")
    text = console.export_text()
    fits(text)
    assert "exit code" in text


def test_status_and_validate_lines_fit_80_columns() -> None:
    checked = invoke("validate", str(ROOT / "jobs" / "demo.yaml"), "--rows", "1")
    assert checked.exit_code == 0
    fits(checked.stdout)


def test_simulate_serves_a_job_with_its_cap_and_faults_until_ctrl_c(make_job) -> None:
    """`glm-batch simulate --port 0 --cap N --fault-rate F`: a standalone simulator a job can run against;
    its cap refuses what is over it (429/1302), its faults are retried, and Ctrl+C stops it cleanly."""
    import signal
    import urllib.request

    from tests.conftest import cli, sample_rows

    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "simulate", "--port", "0", "--cap", "2", "--fault-rate", "0.2",
         "--latency", "0.02", "--seed", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[3]  # "simulator listening on URL (...)"
        # Over the cap a request is refused at once and tried again: attempts enough for a loaded machine.
        job = make_job(sample_rows(30), model={"endpoint": url}, run={"concurrency": 4, "max_attempts": 100})
        ran = cli("run", str(job.spec))
        assert ran.exit_code == 0, json.loads(job.summary.read_text())["errors"]
        with urllib.request.urlopen(f"{url}/_sim/stats", timeout=10) as answer:
            stats = json.loads(answer.read())
        assert stats["max_in_flight"] <= 2 and stats["outcomes"]["429_1302_cap"] > 0
        assert sum(n for outcome, n in stats["outcomes"].items() if outcome not in ("ok", "429_1302_cap")) > 0
        assert stats["distinct_prompts_answered"] == 30
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
