"""Acceptance runs: a 10,000-row job through 5% faults, and the API key kept out of everything written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl

from runner.simulator.answers import answer_for
from runner.simulator.config import RETRYABLE_FAULTS
from runner.simulator.simulator import SimulatorThread
from tests.conftest import API_KEY, sample_rows


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m runner` as a real subprocess, the way cron would."""
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=300,
    )


def test_ten_thousand_rows_through_five_percent_faults_all_end_ok_and_none_is_paid_twice(
    make_job, sim: SimulatorThread
) -> None:
    sim.configure(fault_rate=0.05, faults=RETRYABLE_FAULTS, seed=7)
    rows = sample_rows(10_000)
    job = make_job(rows, run={"concurrency": 32, "max_attempts": 8})

    result = run_cli("run", str(job.spec), "--log-format", "json")

    assert result.returncode == 0, result.stderr[-2000:]
    out = pl.read_parquet(job.output)
    assert out.height == 10_000
    assert out.get_column("status").value_counts().to_dicts() == [{"status": "ok", "count": 10_000}]
    assert out.get_column("response_text").to_list() == [answer_for(f"Be brief.\nSummarise: {r['text']}") for r in rows]
    stats = sim.stats()
    assert stats["prompts_answered_twice"] == 0
    assert stats["distinct_prompts_answered"] == 10_000
    faults = sum(n for k, n in stats["outcomes"].items() if k != "ok")
    assert faults > 300  # the faults really happened (about 5% of ~10,500 requests)
    assert (out.get_column("attempts") > 1).sum() > 300


def test_the_api_key_never_appears_in_output_files_or_logs(make_job, sim: SimulatorThread, tmp_path: Path) -> None:
    # Faults make the run write error messages and retry logs too; the SDK's own debug log is on.
    sim.configure(faults=("429_1302",), fault_attempts=1)
    job = make_job(sample_rows(20))
    failing = make_job(sample_rows(3, start=100), name="failing", run={"max_attempts": 1})

    ok = run_cli("run", str(job.spec), env={"ANTHROPIC_LOG": "debug"})
    bad = run_cli("run", str(failing.spec), env={"ANTHROPIC_LOG": "debug"})
    sim.configure(api_keys=("another-key",))
    refused = run_cli("run", str(job.spec), "--fresh", env={"ANTHROPIC_LOG": "debug"})

    assert (ok.returncode, bad.returncode, refused.returncode) == (0, 1, 3)
    secret = API_KEY.encode()
    for proc in (ok, bad, refused):
        assert API_KEY not in proc.stdout and API_KEY not in proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in written) and any(p.name == "manifest.json" for p in written)
    for path in written:
        assert secret not in path.read_bytes(), path
