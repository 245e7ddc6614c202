"""Answers are counted only once they are on disk, and parts are written beside the sending, not in its way.

The answers of one turn of the event loop share one journal write (a group commit) and are counted after
it; a part is written in a worker thread while its answers' journal waits under a name of its own until
the part is durable. At no instant may an answer that was counted, or journalled, be missing from disk.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl

from runner.records import KEY, Result, read_journal
from runner.simulator.simulator import SimulatorThread
from runner.state.store import Store
from tests.conftest import eventually, sample_rows


def answer(key: str) -> Result:
    return Result(key=key, status="ok", attempts=1, latency_ms=1.0, finished_at=dt.datetime.now(dt.UTC))


def keys_on_disk(state: Path) -> set[str]:
    """Every key a killed run would leave to the next: in journals (set aside or not) and whole parts."""
    keys = {r.key for journal in state.glob("journal-*.jsonl") for r in read_journal(journal)}
    for part in (state / "results").glob("*.parquet"):
        keys |= set(pl.read_parquet(part, columns=[KEY]).get_column(KEY))
    return keys


def test_answers_journalled_while_a_part_is_written_in_the_background_are_never_off_disk(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = Store(state, run_id="r")
    store.open()
    try:
        store.add_many([answer(f"a{i}") for i in range(3)])
        store.flush_soon()  # the part of a0-a2 is being written in a thread
        assert keys_on_disk(state) >= {"a0", "a1", "a2"}  # their journal set aside, not emptied

        store.add_many([answer("b0"), answer("b1")])  # arrive meanwhile: a fresh journal
        everything = {"a0", "a1", "a2", "b0", "b1"}
        assert keys_on_disk(state) >= everything

        eventually(lambda: (state / "results" / "part-r-000000.parquet").exists())  # the first part is whole
        assert keys_on_disk(state) >= everything

        store.flush_soon()  # the first part is durable: its journal goes; b0-b1 are written next
        assert keys_on_disk(state) >= everything
        store.flush()
        assert keys_on_disk(state) >= everything
    finally:
        store.close()

    parts = sorted((state / "results").glob("*.parquet"))
    assert [set(pl.read_parquet(p).get_column(KEY)) for p in parts] == [{"a0", "a1", "a2"}, {"b0", "b1"}]
    assert not list(state.glob("journal-*"))  # a finished run leaves no journal behind


RUN = """
import sys
from runner.api import run_job
from runner.observe.progress import make_reporter
run_job(sys.argv[1], reporter=make_reporter("json", stream=sys.stderr, interval_s=0.02))
"""


def test_every_answer_counted_before_a_kill_9_is_on_disk(make_job, sim: SimulatorThread) -> None:
    """A run writing parts every 40 answers is killed while it sends: whatever its progress line last
    counted as answered is on disk for the next run, whichever instant of a group commit or of a part
    being written the kill landed in."""
    sim.configure(latency_s=0.01, latency_jitter_s=0.01)
    job = make_job(
        sample_rows(3000),
        run={"concurrency": 16, "checkpoint_rows": 40, "checkpoint_seconds": 0.05, "max_attempts": 4},
    )
    state = job.spec.parent / "out" / ".glm-batch" / "job"
    for wanted in (150, 700):
        proc = subprocess.Popen(
            [sys.executable, "-c", RUN, str(job.spec)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "ZHIPUAI_API_KEY": "test-key"},
        )
        assert proc.stderr is not None
        counted = 0
        for line in proc.stderr:
            if '"event": "progress"' in line:
                progress = json.loads(line)
                counted = progress["ok"] + progress["settled_before"]  # this run's and earlier runs' answers
                if counted >= wanted:
                    break
        proc.send_signal(signal.SIGKILL)

        assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
        assert counted >= wanted
        assert len(keys_on_disk(state)) >= counted
