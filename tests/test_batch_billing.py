"""Batch mode never pays twice for a line the Batch API may have billed, whatever the API's quirks.

Real batches say `completed` before their output file id appears, and result files can arrive cut
short; the simulator produces both (real-wire.md), and its bill is the judge.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import yaml

from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, sample_rows, write_csv
from tests.test_batch_mode import BATCH_MODEL, CRASH, FAST_POLL, assert_paid_once, crash_env, expected


def test_a_completed_batch_whose_output_file_id_lags_is_looked_at_again_not_sent_again(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """`completed` with `output_file_id: ""` for 3 more looks: the run waits for the file, and the
    simulator bills each line once."""
    sim.configure(batch_output_id_lag_polls=3)
    rows = sample_rows(40)
    files = make_job(model=BATCH_MODEL, rows=rows, run={"mode": "batch", "batch": FAST_POLL})
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
    files = make_job(model=BATCH_MODEL, rows=rows, run={"mode": "batch", "batch": FAST_POLL})
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
    files = make_job(model=BATCH_MODEL, rows=rows, run={"mode": "batch", "batch": FAST_POLL})
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


def _job_in(folder: Path, sim: SimulatorThread, rows: list[dict[str, str]]) -> JobFiles:
    """A batch job named `demo` in its own folder (the default name is the spec's file name)."""
    write_csv(folder / "data.csv", rows)
    spec = {
        "version": 1,
        "name": "demo",
        "input": {"paths": ["data.csv"], "id_column": "id"},
        "prompt": {"system": "Be brief.", "template": "Summarise: {{ text }}"},
        "model": {"name": "glm-4-air-250414", "endpoint": sim.url, "max_tokens": 64},
        "run": {"mode": "batch", "batch": FAST_POLL},
        "output": {"path": "out/demo.parquet"},
    }
    path = folder / "demo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    out = folder / "out" / "demo.parquet"
    return JobFiles(path, folder / "data.csv", out, out.with_suffix(".summary.json"))


def test_two_jobs_with_one_name_in_two_folders_each_get_their_own_answers(sim: SimulatorThread, tmp_path: Path) -> None:
    """Job one runs; job two (same name, other folder, other rows) dies after its upload, so the next
    run looks for a batch it may have made: it must not take job one's batch (same name, same chunk)."""
    first_rows, second_rows = sample_rows(30), sample_rows(30, start=500)
    first, second = _job_in(tmp_path / "one", sim, first_rows), _job_in(tmp_path / "two", sim, second_rows)
    assert cli("run", str(first.spec)).exit_code == 0
    assert "batch_list" not in sim.stats()["outcomes"]  # a run that made its batches itself looks none up
    script = tmp_path / "crash.py"
    script.write_text(CRASH.format(method="upload", nth=1))
    env = crash_env(tmp_path)
    crashed = subprocess.run([sys.executable, str(script), "after", str(second.spec)], env=env, capture_output=True)
    assert crashed.returncode == 9, crashed.stderr.decode()[-2000:]
    result = cli("run", str(second.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert pl.read_parquet(first.output).get_column("response_text").to_list() == expected(first_rows)
    assert pl.read_parquet(second.output).get_column("response_text").to_list() == expected(second_rows)
    assert sim.stats()["billed"]["batch"] == 60
    assert_paid_once(sim)


STOP_REFUSED = {"code": "1214", "line": 1, "message": "stop must have at most 1 item", "param": "stop"}


def test_a_batch_refused_at_validation_shows_zhipus_error_and_sends_no_other_batch(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """`failed` with errors.data about the request: its first error in one line, exit 3, no new batch."""
    sim.configure(batch_fail_validation=(STOP_REFUSED, {**STOP_REFUSED, "line": 2}))
    files = make_job(model=BATCH_MODEL, rows=sample_rows(10), run={"mode": "batch", "batch": FAST_POLL})
    result = cli("run", str(files.spec))
    assert result.exit_code == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "line 1: 1214 (stop): stop must have at most 1 item" in last and "resume with" in last
    assert sim.stats()["outcomes"]["batch_created"] == 1
    assert sim.stats()["billed"]["batch"] == 0


def test_a_batch_failed_for_a_transient_reason_is_sent_again_in_the_next_round(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(batch_fail_validation=({"code": "500", "line": None, "message": "Internal Error"},))
    sim.configure(batch_fail_validation_times=1)
    rows = sample_rows(10)
    files = make_job(model=BATCH_MODEL, rows=rows, run={"mode": "batch", "batch": FAST_POLL})
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)
    assert sim.stats()["outcomes"]["batch_created"] == 2


# kill -9 once a create is held at the simulator (sent, not yet landed): its answer is lost, the batch lands later.
KILLED_MID_CREATE = """
import asyncio, json, os, sys, urllib.request
from runner.send.batch import api
from tests.conftest import until
create, stats = api.BatchAPI.create, sys.argv[2] + "/_sim/stats"
def held():
    with urllib.request.urlopen(stats) as answer:
        return json.load(answer)["outcomes"].get("batch_create_late", 0) > 0
async def dying(self, *args, **kwargs):
    asyncio.ensure_future(create(self, *args, **kwargs))
    await until(lambda: asyncio.to_thread(held))
    os._exit(9)
api.BatchAPI.create = dying
from runner.cli import main
sys.argv = ["glm-batch", "run", sys.argv[1], "--log-format", "json"]
main()
"""


def test_a_create_that_lands_after_the_resumed_run_made_its_own_is_cancelled_and_no_line_is_paid_twice(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, tmp_path: Path
) -> None:
    """The double-create window: a run dies while its create is on the wire; the resumed run looks,
    finds nothing (the batch has not landed yet) and creates one; then the first lands. One chunk, two
    batches: the run keeps the one further along and cancels the other while it validates (free)."""
    sim.configure(batch_create_lands_after_s=3.0, batch_validating_s=1.0, batch_lines_per_s=100)
    rows = sample_rows(300)
    files = make_job(rows=rows, model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL})
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_CREATE)
    env = crash_env(tmp_path)
    killed = subprocess.run([sys.executable, str(script), str(files.spec), sim.url], env=env, capture_output=True)
    assert killed.returncode == 9, killed.stderr.decode()[-2000:]
    assert "batch_created" not in sim.stats()["outcomes"]  # still on its way

    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)
    stats = sim.stats()
    assert stats["outcomes"]["batch_created"] == 2 and stats["outcomes"]["batch_cancel"] == 1
    assert stats["billed"]["batch"] == len(rows)  # each line billed exactly once
    assert_paid_once(sim)
    said = [line for line in result.stderr.splitlines() if '"batch_duplicate"' in line]
    assert len(said) == 1 and "before any line ran" in said[0]
