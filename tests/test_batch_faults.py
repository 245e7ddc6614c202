"""A Batch API that fails, forgets a batch, or is left while it runs: bounded, said in one line, never a
traceback, and nothing paid twice."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

from runner.job.resolve import load_job
from runner.send.batch.book import BatchBook
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, eventually, sample_rows
from tests.test_batch_mode import (
    BATCH_MODEL,
    FAST_POLL,
    assert_paid_once,
    expected,
    run_until_a_batch_exists,
)


def test_a_batch_api_that_keeps_failing_while_polling_ends_the_run_with_exit_3_and_the_resume_line(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(batch_retrieve_status=503)
    files = make_job(model=BATCH_MODEL, rows=sample_rows(10), run={"mode": "batch", "batch": FAST_POLL})
    result = cli("run", str(files.spec))
    assert result.exit_code == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "the Batch API kept failing" in last and "503" in last and "resume with: glm-batch run" in last
    assert "Traceback" not in result.stderr

    sim.configure(batch_retrieve_status=None)  # the API is back: the next run collects the same batch
    again = cli("run", str(files.spec))
    assert again.exit_code == 0, again.stderr[-2000:]
    assert sim.stats()["outcomes"]["batch_created"] == 1 and sim.stats()["billed"]["batch"] == 10


def test_a_result_file_that_stays_404_ends_the_run_and_then_fails_its_lines_without_paying_again(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """The first run stops with exit 3 (the file may still come); when it is still 404 on the next run
    the job is not stuck: the lines the batch billed fail as batch_result_missing, nothing is re-sent."""
    sim.configure(batch_download_status=404)
    files = make_job(model=BATCH_MODEL, rows=sample_rows(10), run={"mode": "batch", "batch": FAST_POLL})
    first = cli("run", str(files.spec))
    assert first.exit_code == 3, first.stderr[-2000:]
    assert "could not be downloaded" in first.stderr.strip().splitlines()[-1]
    second = cli("run", str(files.spec))
    assert second.exit_code == 1, second.stderr[-2000:]
    out = pl.read_parquet(files.output)
    assert set(out.get_column("error_type")) == {"batch_result_missing"}
    assert sim.stats()["outcomes"]["batch_created"] == 1 and sim.stats()["billed"]["batch"] == 10


def test_a_batch_the_api_forgets_before_any_line_completed_is_sent_again(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """404 on a batch last seen validating: nothing says a line was billed, so a new batch sends them."""
    sim.configure(batch_validating_s=0.3, batch_forget_after_looks=1)  # the first batch only
    rows = sample_rows(10)
    files = make_job(model=BATCH_MODEL, rows=rows, run={"mode": "batch", "batch": FAST_POLL})
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert sim.stats()["outcomes"]["batch_forgotten"] == 1
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)
    assert sim.stats()["outcomes"]["batch_created"] == 2
    assert_paid_once(sim)


def test_a_batch_the_api_forgets_after_lines_completed_fails_its_rows_and_status_says_lost(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """404 on a batch whose last look counted completed lines: they were billed, which ones is unknown,
    so none is sent again; its rows fail as batch_lost and `status` lists the batch as lost."""
    sim.configure(batch_lines_per_s=200, batch_forget_after_looks=4)
    files = make_job(model=BATCH_MODEL, rows=sample_rows(400), run={"mode": "batch", "batch": FAST_POLL})
    result = cli("run", str(files.spec))
    assert result.exit_code == 1, result.stderr[-2000:]
    out = pl.read_parquet(files.output)
    assert set(out.get_column("error_type")) == {"batch_lost"}
    assert sim.stats()["outcomes"]["batch_created"] == 1
    assert 0 < sim.stats()["billed"]["batch"] < 400
    status = cli("status", str(files.spec))
    assert "lost, unknown to the Batch API (404)" in status.stdout


def test_ctrl_c_while_polling_ends_within_a_second_and_says_the_batch_runs_on_at_zhipu(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.configure(batch_lines_per_s=1)
    files = make_job(
        model=BATCH_MODEL,
        rows=sample_rows(100),
        run={"mode": "batch", "batch": {"poll_initial_s": 60, "poll_max_s": 120}},
    )
    child = run_until_a_batch_exists(files, sim, tmp_path)
    book = load_job(files.spec).state_dir / "batches"
    eventually(lambda: any(c.counts for c in BatchBook(book).chunks.values()))  # its first look: the wait is next
    os.kill(child.pid, signal.SIGINT)
    sent = time.monotonic()
    _, err = child.communicate(timeout=60)
    took = time.monotonic() - sent
    assert child.returncode == 130, err[-2000:]
    assert took < 5, took  # the poll interval is 60 s: the run did not wait it out
    last = err.strip().splitlines()[-1]
    assert "keep running (and billing) at Zhipu" in last and f"glm-batch cancel {files.spec}" in last


def test_a_full_queue_at_create_waits_for_room_and_submits_the_rest_as_batches_drain(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """A 400-request queue cap and 100-line files: creates past the cap get 429; they wait while the
    batches made drain, then go in. Every row answered once; the wait is in the summary."""
    sim.configure(batch_queue_cap=400, batch_lines_per_s=300)
    rows = sample_rows(1000)
    files = make_job(model=BATCH_MODEL, rows=rows, run={"mode": "batch", "batch": {**FAST_POLL, "max_requests": 100}})
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)
    assert sim.stats()["outcomes"]["batch_queue_full"] > 0
    assert sim.stats()["billed"]["batch"] == 1000
    queue = json.loads(files.summary.read_text())["batch_queue"]
    assert queue["refused"] > 0 and queue["waited_s"] > 0


def test_a_hybrid_deadline_holds_when_the_poll_interval_is_long_and_a_cancelled_batch_never_stops(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """The first look would come after 30 s and the cancelled batch stays `cancelling` for good: the
    deadline is a timer of its own, so the run cancels on time, stops waiting half a margin before the
    deadline, and ends. The stuck batch's lines may be billed: they are not sent online (paid once)."""
    sim.configure(batch_lines_per_s=20, batch_cancelling_s=10_000)
    rows = sample_rows(200)
    # Cancelled at 3 s, given up at 4 s (test_batch_mode's hybrid job shows a batch made well before 2.5 s).
    run = {"mode": "hybrid", "deadline": "5s", "batch": {"poll_initial_s": 30, "poll_max_s": 60, "online_margin_s": 2}}
    files = make_job(rows=rows, model=BATCH_MODEL, run=run)
    result = cli("run", str(files.spec))
    summary = json.loads(files.summary.read_text())
    assert summary["elapsed_s"] < 5 + 3, summary["elapsed_s"]  # the deadline, plus the (empty) online tail
    assert sim.stats()["outcomes"]["batch_cancel"] == 1
    assert result.exit_code == 1, result.stderr[-2000:]
    out = pl.read_parquet(files.output)
    assert set(out.get_column("error_type")) == {"batch_not_back"}
    assert "was still cancelling at the deadline" in out.get_column("error_message")[0]
    assert sim.stats()["billed"]["online"] == 0
    assert_paid_once(sim)
