"""Spending first, bookkeeping after: a ledger that cannot be written never turns a paid run into a crash.

The run checks the ledger before its first request and goes on with a warning if it cannot write it
(a cron job must still run); the spend it could not book waits in the job's state folder and the next
run books it; `usage` skips, and names, a ledger file that does not read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from runner.job.resolve import load_job
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, sample_rows
from tests.test_rescue import chattr as chattr  # the fixture, for the tests here
from tests.test_rescue import when_answered


def ledger_files(ledger: Path) -> list[Path]:
    return sorted(ledger.glob("*.parquet"))


@pytest.mark.parametrize("broken", ["a file", "an immutable folder"])
def test_a_ledger_that_cannot_be_written_is_a_warning_and_the_spend_is_booked_next_run(
    broken: str,
    make_job: Callable[..., JobFiles],
    sim: SimulatorThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chattr: Callable[[str, Path], None],
) -> None:
    bad = tmp_path / "bad-ledger"
    if broken == "a file":
        bad.write_text("not a folder")
    else:
        bad.mkdir()
        chattr("+i", bad)
    monkeypatch.setenv("GLM_BATCH_LEDGER", str(bad))
    files = make_job(rows=sample_rows(20))

    first = cli("run", str(files.spec))
    assert first.exit_code == 0, first.stderr
    assert "Traceback" not in first.stderr
    events = [json.loads(line)["event"] for line in first.stderr.splitlines() if line.startswith("{")]
    assert events.index("ledger_unwritable") < events.index("end")  # said before sending, not after paying
    assert "ledger_not_written" in events
    assert pl.read_parquet(files.output).height == 20
    assert sim.stats()["ok"] == 20
    booked = json.loads(files.summary.read_text())["ledger"]
    assert booked["written"] is False and str(bad) in booked["warning"]
    pending = Path(booked["pending"])
    assert pending.exists()

    good = tmp_path / "good-ledger"
    monkeypatch.setenv("GLM_BATCH_LEDGER", str(good))
    second = cli("run", str(files.spec))
    assert second.exit_code == 0, second.stderr
    assert sim.stats()["ok"] == 20  # nothing sent again
    assert json.loads(files.summary.read_text())["ledger"]["pending_booked"] == 1
    assert not pending.exists()
    spent = pl.read_parquet(ledger_files(good))
    assert int(spent.get_column("requests_ok").sum()) == 20


def test_a_ledger_that_breaks_during_the_run_keeps_the_spend_pending(
    make_job: Callable[..., JobFiles],
    sim: SimulatorThread,
    tmp_path: Path,
    chattr: Callable[[str, Path], None],
) -> None:
    """The ledger passes the check at the start and refuses the append at the end: the run still ends
    well, with the warning in its summary and its rows pending."""
    ledger = Path(os.environ["GLM_BATCH_LEDGER"])
    ledger.mkdir(parents=True)
    chattr("+i", ledger)  # probe: permitted here
    chattr("-i", ledger)
    sim.configure(latency_s=0.01)
    files = make_job(rows=sample_rows(60), run={"concurrency": 2})
    watcher = when_answered(sim, 10, lambda: chattr("+i", ledger))
    result = cli("run", str(files.spec))
    watcher.join()
    assert result.exit_code == 0, result.stderr
    assert "ledger_not_written" in result.stderr and "ledger_unwritable" not in result.stderr
    booked = json.loads(files.summary.read_text())["ledger"]
    assert booked["written"] is False and Path(booked["pending"]).exists()
    assert load_job(files.spec).state_dir in Path(booked["pending"]).parents


def test_usage_skips_and_names_a_torn_ledger_file(make_job: Callable[..., JobFiles], sim: SimulatorThread) -> None:
    files = make_job(rows=sample_rows(5))
    assert cli("run", str(files.spec)).exit_code == 0
    ledger = Path(os.environ["GLM_BATCH_LEDGER"])
    whole = ledger_files(ledger)[0]
    torn = ledger / "zz-torn.parquet"
    torn.write_bytes(whole.read_bytes()[:40])
    result = cli("usage", "--json")
    assert result.exit_code == 0, result.stderr
    assert f"skipped {torn}" in result.stderr and "Traceback" not in result.stderr
    rows = json.loads(result.stdout)
    assert sum(r["requests_ok"] for r in rows) == 5
