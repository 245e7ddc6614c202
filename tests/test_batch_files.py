"""Zhipu's 1,000-file cap: a batch job leaves no file behind at Zhipu (unless told to keep them),
deletes an input a create refused, and `glm-batch cancel` holds against a live run."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import polars as pl

from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, sample_rows
from tests.test_batch_mode import (
    BATCH_MODEL,
    FAST_POLL,
    assert_paid_once,
    expected,
    run_until_a_batch_exists,
)


def test_a_batch_job_under_a_file_cap_and_a_queue_cap_answers_every_row_and_leaves_no_file_behind(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """An 8-file cap and a 300-request queue for 1,500 rows in files of 100 (15 batches): result files are
    deleted as their answers are journalled, creates wait for queue room; every row answered, paid once."""
    sim.configure(batch_file_cap=8, batch_queue_cap=300, batch_lines_per_s=300)
    rows = sample_rows(1500)
    files = make_job(rows=rows, model=BATCH_MODEL, run={"mode": "batch", "batch": {**FAST_POLL, "max_requests": 100}})
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)
    assert sim.stats()["files"] == 0
    assert sim.stats()["outcomes"]["batch_queue_full"] > 0
    assert_paid_once(sim)


def test_keep_files_keeps_the_result_files_and_cancel_purge_deletes_them(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    rows = sample_rows(300)
    batch = {**FAST_POLL, "max_requests": 100, "keep_files": True}
    files = make_job(rows=rows, model=BATCH_MODEL, run={"mode": "batch", "batch": batch})
    assert cli("run", str(files.spec)).exit_code == 0
    assert sim.stats()["files"] == 3  # the three output files (inputs go with their completed batches)
    purged = cli("cancel", str(files.spec), "--purge")
    assert purged.exit_code == 0, purged.stderr
    assert "3 files deleted" in purged.stdout
    assert sim.stats()["files"] == 0


def test_an_input_file_a_create_refused_is_deleted_and_uploaded_again_next_time(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(batch_create_status=400)
    rows = sample_rows(20)
    files = make_job(rows=rows, model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL})
    assert cli("run", str(files.spec)).exit_code == 3
    assert sim.stats()["files"] == 0
    sim.configure(batch_create_status=None)
    again = cli("run", str(files.spec))
    assert again.exit_code == 0, again.stderr[-2000:]
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)


def test_cancel_while_a_run_is_active_is_refused_until_the_run_stops(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, tmp_path: Path
) -> None:
    """A live run would send the cancelled lines again at once: cancel says to stop it first, and
    cancels nothing; once the run is stopped, cancel works."""
    sim.configure(batch_lines_per_s=5)
    files = make_job(rows=sample_rows(100), model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL})
    child = run_until_a_batch_exists(files, sim, tmp_path)
    refused = cli("cancel", str(files.spec))
    assert refused.exit_code == 75, refused.stderr
    assert "stop it first" in refused.stderr
    assert "batch_cancel" not in sim.stats()["outcomes"]
    os.kill(child.pid, signal.SIGINT)
    child.communicate(timeout=60)
    cancelled = cli("cancel", str(files.spec))
    assert cancelled.exit_code == 0, cancelled.stderr
    assert sim.stats()["outcomes"]["batch_cancel"] == 1
