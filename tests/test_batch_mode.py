"""Batch mode: Zhipu's Batch API through the same engine, over real sockets against the simulator.

Every test checks the money side with the simulator's billing ledger: no prompt is ever billed twice,
across both APIs, whatever happens to the batches or to our process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from runner.simulator.answers import answer_for
from runner.simulator.simulator import SimulatorThread
from tests.conftest import API_KEY, JobFiles, cli, eventually, sample_rows

FAST_POLL = {"poll_initial_s": 0.02, "poll_max_s": 0.1}
# The child process imports this checkout (not whichever one the interpreter has installed).
CHILD_ENV = {"ZHIPUAI_API_KEY": API_KEY, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent.parent)}
BATCH_MODEL = {"name": "glm-4-air-250414"}  # on Zhipu's Batch API list (GLM-4.5 and newer are not)


def expected(rows: list[dict[str, str]]) -> list[str]:
    """Each row's own answer, as the simulator gives it for the row's prompt."""
    return [answer_for(f"Be brief.\nSummarise: {r['text']}") for r in rows]


def assert_paid_once(sim: SimulatorThread) -> None:
    """The simulator billed no prompt twice, on either API or across the two."""
    stats = sim.stats()
    assert stats["prompts_billed_twice"] == 0, stats
    assert stats["prompts_billed_on_both_apis"] == 0, stats


def test_a_batch_job_gives_the_online_output_at_half_the_price(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, tmp_path: Path
) -> None:
    """The same job online and in batch mode: the same columns, the same answers, half the cost."""
    rows = sample_rows(60)
    online = make_job(rows=rows, name="online", model=BATCH_MODEL)
    batch = make_job(rows=rows, name="batch", model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL})
    assert cli("run", str(online.spec)).exit_code == 0
    result = cli("run", str(batch.spec))
    assert result.exit_code == 0, result.stderr
    a, b = pl.read_parquet(online.output), pl.read_parquet(batch.output)
    assert a.columns == b.columns
    assert b.get_column("response_text").to_list() == expected(rows)
    assert (b.get_column("api") == "batch").all() and (a.get_column("api") == "online").all()
    assert b.get_column("cost").sum() == pytest.approx(a.get_column("cost").sum() / 2)
    assert sim.stats()["billed"]["batch"] == 60


def test_labels_come_back_the_same_from_batch_and_online(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """A labeling job with broken first answers: batch rounds repair them like online turns do."""
    sim.configure(invalid_rate=0.3)
    rows = [{"id": f"r{i}", "text": t} for i, t in enumerate(["great product", "terrible, broken", "fine"] * 10)]
    spec = {"output": {"path": "out/{name}.parquet", "labels": ["positive", "negative", "neutral"]}}
    online = make_job(rows=rows, name="online", model=BATCH_MODEL, **spec)
    batch = make_job(rows=rows, name="batch", model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL}, **spec)
    assert cli("run", str(online.spec)).exit_code == 0
    assert cli("run", str(batch.spec)).exit_code == 0
    a, b = pl.read_parquet(online.output), pl.read_parquet(batch.output)
    assert b.get_column("label").to_list() == a.get_column("label").to_list()
    assert b.get_column("repairs").sum() == a.get_column("repairs").sum() > 0
    assert (b.get_column("status") == "ok").all()


def test_transient_line_failures_and_an_expired_batch_end_with_every_row_answered_once(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """5,000 rows; 10% of lines fail transiently; the big batch expires half done. Completed lines of
    the expired batch are kept, the rest and the failed lines go in later rounds, and every row ends
    with its own prompt's answer, each paid once."""
    sim.configure(batch_error_rate=0.1, batch_lines_per_s=4000, batch_expire_after_s=0.6)
    rows = sample_rows(5000)
    files = make_job(
        rows=rows,
        model=BATCH_MODEL,
        run={"mode": "batch", "batch": {**FAST_POLL, "max_requests": 4000, "max_rounds": 10}},
    )
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    out = pl.read_parquet(files.output)
    assert (out.get_column("status") == "ok").all()
    assert out.get_column("response_text").to_list() == expected(rows)
    assert sim.stats()["batches"].get("expired", 0) >= 1
    assert_paid_once(sim)


def test_a_line_the_batch_api_refuses_fails_its_row_alone_without_another_round(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """A line the Batch API answers 400/1261 (a prompt it counts over the window) fails its row at
    once, named after the line's code; the other rows of the batch are answered."""
    sim.configure(token_scale=2.0)  # the endpoint counts twice what our estimator does
    rows = [*sample_rows(2), {"id": "long", "text": "word " * 70_000}]  # under 131K estimated, over it counted
    files = make_job(rows=rows, model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL})
    assert cli("run", str(files.spec)).exit_code == 1
    out = pl.read_parquet(files.output)
    assert out.get_column("status").to_list() == ["ok", "ok", "error"]
    assert out.get_column("error_type")[2] == "batch/1261"
    assert out.get_column("attempts")[2] == 1  # refused, not sent in another round
    assert sim.stats()["billed"]["batch"] == 2  # the refused line is not billed


def test_a_model_the_batch_api_does_not_take_is_refused_before_anything_is_uploaded(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    files = make_job(rows=sample_rows(3), model={"name": "glm-5"}, run={"mode": "batch"})
    result = cli("run", str(files.spec))
    assert result.exit_code == 2
    assert "glm-5 is not on Zhipu's Batch API eligibility list" in result.stderr.strip().splitlines()[-1]
    assert sim.stats()["files"] == 0


CRASH = textwrap.dedent(
    """
    import os, sys
    from runner.send.batch import api as batch_api
    stage, call = sys.argv[1], batch_api.BatchAPI.{method}
    seen = [0]
    async def crashing(self, *args, **kwargs):
        seen[0] += 1
        if stage == "before" and seen[0] >= {nth}:
            os._exit(9)
        result = await call(self, *args, **kwargs)
        if stage == "after" and seen[0] >= {nth}:
            os._exit(9)
        return result
    batch_api.BatchAPI.{method} = crashing
    from runner.cli import main
    sys.argv = ["glm-batch", "run", sys.argv[2], "--log-format", "json"]
    main()
    """
)


def crash_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a run in a child process: this tree's code, the test's ledger and facts."""
    return {**CHILD_ENV, "GLM_BATCH_LEDGER": str(tmp_path / "ledger"), "GLM_BATCH_FACTS": str(tmp_path / "facts.json")}


def run_until_a_batch_exists(files: JobFiles, sim: SimulatorThread, tmp_path: Path) -> subprocess.Popen[str]:
    """`glm-batch run` of `files` in a child process, returned once the simulator has created a batch."""
    child = subprocess.Popen(
        [sys.executable, "-m", "runner", "run", str(files.spec), "--log-format", "json"],
        env=crash_env(tmp_path),
        stderr=subprocess.PIPE,
        text=True,
    )
    eventually(lambda: sim.stats()["outcomes"].get("batch_created") or child.poll() is not None, within_s=60)
    assert child.poll() is None, child.communicate()[1][-2000:]
    return child


@pytest.mark.parametrize(
    ("method", "stage", "nth"),
    [
        ("upload", "after", 1),  # uploaded, its file id never recorded
        ("create", "after", 1),  # the batch exists, its id never recorded
        ("retrieve", "after", 2),  # while polling
        ("download", "after", 1),  # results on disk, not yet journalled
    ],
)
def test_a_run_killed_at_any_batch_stage_resumes_without_paying_twice(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, tmp_path: Path, method: str, stage: str, nth: int
) -> None:
    """kill -9 (os._exit) at each step of a batch's life; the next run reattaches, never resubmits."""
    sim.configure(batch_lines_per_s=2000)
    rows = sample_rows(300)
    files = make_job(rows=rows, model=BATCH_MODEL, run={"mode": "batch", "batch": {**FAST_POLL, "max_requests": 120}})
    script = tmp_path / "crash.py"
    script.write_text(CRASH.format(method=method, nth=nth))
    env = crash_env(tmp_path)
    crashed = subprocess.run([sys.executable, str(script), stage, str(files.spec)], env=env, capture_output=True)
    assert crashed.returncode == 9, crashed.stderr.decode()[-2000:]
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)
    assert_paid_once(sim)
    assert sim.stats()["billed"]["batch"] == 300


def test_a_hybrid_job_finishes_by_its_deadline_sending_the_stragglers_online(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """The Batch API would take 10 s; the deadline is 4 s: what is not back is cancelled there and
    sent online, and the run ends on time, each prompt paid once."""
    sim.configure(batch_lines_per_s=20)
    rows = sample_rows(200)
    files = make_job(
        rows=rows,
        model=BATCH_MODEL,
        run={"mode": "hybrid", "deadline": "4s", "concurrency": 8, "batch": {**FAST_POLL, "online_margin_s": 1.5}},
    )
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr[-2000:]
    # On time, judged by what the server saw rather than by a stopwatch a loaded machine would break:
    # the run gave up on the batch at the deadline (cancelled, not completed, far fewer lines done).
    stats = sim.stats()
    assert stats["batches"].get("cancelled", 0) + stats["batches"].get("cancelling", 0) >= 1, stats["batches"]
    assert "completed" not in stats["batches"], stats["batches"]
    assert stats["billed"]["batch"] < 200
    out = pl.read_parquet(files.output)
    assert out.get_column("response_text").to_list() == expected(rows)
    apis = out.get_column("api").value_counts()
    assert set(apis.get_column("api")) == {"batch", "online"}
    summary = json.loads(files.summary.read_text())
    assert summary["answered_ok"] == 200
    assert_paid_once(sim)


def test_status_shows_the_batches_and_cancel_keeps_what_they_finished(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, tmp_path: Path
) -> None:
    """A run dies with its batch running; `status` shows the batch, `cancel` stops it and says what it
    had finished (billed), and the next run collects those and sends only the rest."""
    sim.configure(batch_lines_per_s=100)
    rows = sample_rows(400)
    files = make_job(rows=rows, model=BATCH_MODEL, run={"mode": "batch", "batch": FAST_POLL})
    script = tmp_path / "crash.py"
    script.write_text(CRASH.format(method="create", nth=1))
    env = crash_env(tmp_path)
    assert subprocess.run([sys.executable, str(script), "after", str(files.spec)], env=env).returncode == 9
    eventually(lambda: sim.stats()["billed"]["batch"] > 0)  # the batch has done (and billed) some lines

    status = cli("status", str(files.spec))
    assert status.exit_code == 0
    assert "batch " in status.stdout and "400 lines" in status.stdout

    cancelled = cli("cancel", str(files.spec))
    assert cancelled.exit_code == 0, cancelled.stderr
    assert "lines already billed are kept" in cancelled.stdout
    # The batch whose create the dead run never recorded is found by its tag, recorded and cancelled.
    assert "1 batches asked to cancel" in cancelled.stdout, cancelled.stdout
    assert sim.stats()["batches"] == {"cancelled": 1}
    done_before = sim.stats()["billed"]["batch"]
    assert 0 < done_before < 400

    resumed = cli("run", str(files.spec))
    assert resumed.exit_code == 0, resumed.stderr[-2000:]
    assert pl.read_parquet(files.output).get_column("response_text").to_list() == expected(rows)
    assert_paid_once(sim)
