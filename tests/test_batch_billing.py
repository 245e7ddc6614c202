"""Batch mode never pays twice for a line the Batch API may have billed, whatever the API's quirks.

Real batches say `completed` before their output file id appears, and result files can arrive cut
short; the simulator produces both (real-wire.md), and its bill is the judge.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from runner.testing.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, sample_rows
from tests.test_batch_mode import FAST_POLL, assert_paid_once, expected


def test_a_completed_batch_whose_output_file_id_lags_is_looked_at_again_not_sent_again(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """`completed` with `output_file_id: ""` for 3 more looks: the run waits for the file, and the
    simulator bills each line once."""
    sim.configure(batch_output_id_lag_polls=3)
    rows = sample_rows(40)
    files = make_job(rows=rows, run={"mode": "batch", "batch": FAST_POLL})
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)
    assert sim.stats()["billed"]["batch"] == len(rows)
    assert_paid_once(sim)


def test_a_result_file_cut_short_is_downloaded_again_before_any_line_is_sent_again(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """The first download of the output file holds 60% of it (a torn last line): the counts say more
    lines completed, so it is downloaded again, and every answer comes from the one batch."""
    sim.configure(batch_result_short_downloads=1)
    rows = sample_rows(50)
    files = make_job(rows=rows, run={"mode": "batch", "batch": FAST_POLL})
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)
    assert sim.stats()["billed"]["batch"] == len(rows)
    assert sim.stats()["batches"] == {"completed": 1}


def test_lines_a_short_result_file_never_gives_fail_their_rows_rather_than_being_paid_again(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """Every download is cut short: the lines the batch says it completed but no file holds fail as
    `batch_result_missing` (billed, not sent again); the rest are answered; nothing is billed twice."""
    sim.configure(batch_result_short_downloads=100)
    rows = sample_rows(50)
    files = make_job(rows=rows, run={"mode": "batch", "batch": FAST_POLL})
    cli("run", str(files.spec))
    out = pl.read_parquet(files.output)
    missing = out.filter(pl.col("status") == "error")
    assert 0 < missing.height < len(rows)
    assert set(missing.get_column("error_type")) == {"batch_result_missing"}
    assert "--retry-failed" in missing.get_column("error_message")[0]
    assert out.filter(pl.col("status") == "ok").height + missing.height == len(rows)
    assert sim.stats()["billed"]["batch"] == len(rows)
    assert sim.stats()["batches"] == {"completed": 1}
    again = cli("run", str(files.spec))  # the next run does not send them either
    assert again.exit_code in (0, 1), again.stderr[-2000:]
    assert sim.stats()["billed"]["batch"] == len(rows)
