"""The Ray engine (`run.engine: ray`): the local engine's answers, keys and files, sent from Ray actors
under one cluster-wide limit, and nothing paid twice across engines, re-runs or a killed actor.

Ray starts once for the module on 2 CPUs (10-40 s); each test runs the real CLI against the simulator,
whose `concurrency_cap` refuses (429/1302, counted as `429_1302_cap`) any request above the limit, so a
refusal is the cluster going over it. Rates are checked on the simulator's own clock. Skipped where ray
is not installed, except in CI.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import ray

import runner
from runner.job.resolve import load_job
from runner.simulator.answers import answer_for
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, eventually, sample_rows, sigterm_once_started
from tests.test_startup import loaded

# Ray Data warns about its own deprecated settings when it makes its context; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")

ROWS = 20_000
LIMIT = 8


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    """One local Ray instance for the module, on 2 CPUs."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def expected(rows: list[dict[str, str]]) -> list[str]:
    """What the simulator answers each row of the default test template: derived from its own prompt."""
    return [answer_for(f"Be brief.\nSummarise: {r['text']}") for r in rows]


def ray_job(make_job: Callable[..., JobFiles], rows: list[dict[str, str]], **run: Any) -> JobFiles:
    """A job on the Ray engine with a fixed limit of LIMIT."""
    return make_job(rows, run={"engine": "ray", "concurrency": LIMIT, **run})


def kill_a_sender_midway(state_dir: Path, after_answers: int, killed: list[int], done: threading.Event) -> None:
    """SIGKILL the first sending actor whose journal holds `after_answers` answers (a crash, not a stop).

    Actors name their journals `journal-<run>-<actor>-<pid>.jsonl`, so the pid is the one that sends; a
    block's answers stay in its journal until the block ends (checkpoint_rows is above the block size)."""

    def a_full_journal() -> Path | None:
        journals = state_dir.glob("journal-*-*-*.jsonl")
        return next((j for j in journals if len(j.read_bytes().splitlines()) >= after_answers), None)

    journal = eventually(lambda: done.is_set() or a_full_journal(), within_s=600, every_s=0.05)
    if isinstance(journal, Path):  # else the run ended first (and the test says it tested nothing)
        pid = int(journal.stem.rsplit("-", 1)[1])
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


def test_twenty_thousand_rows_under_one_cluster_limit_with_an_actor_killed(
    make_job, sim: SimulatorThread, tmp_path: Path
) -> None:
    """20,000 rows over 2-4 actors, one of them SIGKILLed mid-block: Ray restarts it and retries the
    block, which sends only what no actor journalled. Each row has its own prompt's answer, in input
    order; the account never had more than the limit in flight (the simulator refuses above its cap, so
    a refusal is the breach); no prompt is billed twice beyond the LIMIT in flight at the kill. A second
    run, on Ray and then on the local engine, sends nothing."""
    sim.configure(concurrency_cap=LIMIT, latency_s=0.0)
    rows = sample_rows(ROWS)
    job = ray_job(make_job, rows, checkpoint_rows=100_000)
    killed: list[int] = []
    done = threading.Event()
    state_dir = tmp_path / "out" / ".glm-batch" / "job"
    killer = threading.Thread(target=kill_a_sender_midway, args=(state_dir, 200, killed, done))
    killer.start()

    try:
        result = cli("run", str(job.spec))
    finally:
        done.set()
        killer.join()

    assert result.exit_code == 0, result.stderr
    assert killed, "no actor was killed: the test did not test anything"
    out = pl.read_parquet(job.output)
    assert out.get_column("id").to_list() == [r["id"] for r in rows]
    assert out.get_column("response_text").to_list() == expected(rows)
    stats = sim.stats()
    assert stats["outcomes"].get("429_1302_cap", 0) == 0  # never a request over the cap
    assert stats["max_in_flight"] <= LIMIT
    assert stats["prompts_billed_twice"] <= LIMIT
    assert stats["billed"]["online"] <= ROWS + LIMIT
    summary = json.loads(job.summary.read_text())
    assert summary["answered_ok"] == ROWS
    assert summary["engine"]["name"] == "ray"
    assert summary["engine"]["actors"] >= 2  # distinct sending actors (a restarted one counts anew)
    assert summary["engine"]["limiter"]["peak_granted"] <= LIMIT
    assert summary["cpu_while_answering"]["ms_per_answer"] > 0  # the driver's, metered as on the local engine

    sim.reset_stats()
    assert cli("run", str(job.spec)).exit_code == 0  # a second run on Ray sends nothing
    assert sim.stats()["billed"]["online"] == 0
    assert cli("run", str(job.spec), "--set", "run.engine=local").exit_code == 0  # nor on the local engine
    assert sim.stats()["billed"]["online"] == 0


def test_local_first_then_ray_sends_nothing(make_job, sim: SimulatorThread) -> None:
    """Answers the local engine got serve the Ray engine: same request keys, same positions."""
    rows = sample_rows(300)
    job = make_job(rows)
    assert cli("run", str(job.spec)).exit_code == 0
    local = pl.read_parquet(job.output)
    sim.reset_stats()

    result = cli("run", str(job.spec), "--set", "run.engine=ray")

    assert result.exit_code == 0, result.stderr
    assert sim.stats()["billed"]["online"] == 0
    on_ray = pl.read_parquet(job.output)
    assert on_ray.select("id", "request_key", "response_text").equals(
        local.select("id", "request_key", "response_text")
    )


def test_a_ray_run_reads_its_input_as_the_local_engine_does(make_job, sim: SimulatorThread, tmp_path: Path) -> None:
    """Two input files whose id column is a number in one and text in the other, which the local engine
    reads as text (runner.job.inputs). The Ray engine reads through the local engine's own frame, so it
    reads them alike and answers the same rows under the same ids and keys. (Ray Data's own reader, used
    before, read each file its own way; this test failed on it, at its deprecated `read_parquet(columns=)`.)"""
    rows = sample_rows(60)
    pl.DataFrame({"id": list(range(30)), "text": [r["text"] for r in rows[:30]]}).write_parquet(
        tmp_path / "data" / "a.parquet", mkdir=True
    )
    job = make_job(rows[30:], input={"paths": ["data/a.parquet", "data/job.csv"]}, run={"engine": "ray"})

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    on_ray = pl.read_parquet(job.output)
    assert on_ray.get_column("response_text").to_list() == expected(rows)
    assert cli("run", str(job.spec), "--set", "run.engine=local", "--fresh").exit_code == 0
    local = pl.read_parquet(job.output)
    assert on_ray.select("id", "request_key").equals(local.select("id", "request_key"))


def test_every_actor_hands_its_slots_back_as_its_last_block_ends(make_job, sim: SimulatorThread) -> None:
    """Ray Data ends an actor as soon as it has no block left; one that still held slots kept them from
    the other actors until its lease timed out (the last ~10 s of a capped run, at a reduced rate). Each
    actor hands its pool back before its last block's call returns, so as the run ends the limiter
    holds no slot and has reclaimed none."""
    sim.configure(concurrency_cap=LIMIT, latency_s=0.01)
    job = ray_job(make_job, sample_rows(2_000))

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    limiter = json.loads(job.summary.read_text())["engine"]["limiter"]
    assert limiter["granted"] == 0 and limiter["reclaimed"] == 0, limiter


def test_rows_without_ids_get_the_local_engines_ids(make_job, tmp_path: Path) -> None:
    """Without an id column, both engines derive the same content ids (and so the same output)."""
    rows = sample_rows(50)
    job = make_job(rows, input={"id_column": None}, run={"engine": "ray", "concurrency": 4})
    assert cli("run", str(job.spec)).exit_code == 0
    on_ray = pl.read_parquet(job.output)
    assert cli("run", str(job.spec), "--set", "run.engine=local", "--fresh").exit_code == 0
    local = pl.read_parquet(job.output)
    assert on_ray.get_column("id").to_list() == local.get_column("id").to_list()


def damage_keeping_size_and_mtime(part: Path) -> None:
    """Zero every data page of a Parquet file, leaving its footer (its schema still reads), its size and
    its mtime: a reader of its rows fails, a listing of the answer files sees the file it saw before."""
    seen = part.stat()
    data = part.read_bytes()
    footer = struct.unpack("<i", data[-8:-4])[0]  # the file ends: footer, its length, b"PAR1"
    with part.open("r+b") as f:
        f.seek(4)  # after the leading b"PAR1"
        f.write(bytes(len(data) - 8 - footer - 4))
    os.utime(part, ns=(seen.st_atime_ns, seen.st_mtime_ns))


def test_a_finished_job_run_again_neither_imports_ray_nor_reads_an_answer(make_job, sim: SimulatorThread) -> None:
    """Nothing changed since a Ray run that answered every row: the re-run is as cheap as the local
    engine's. The row map's cover record vouches for every request key, so no answer file is read
    (each is damaged here, with its size and mtime kept, and the run still ends well), Ray is never
    imported (let alone started), and nothing is sent."""
    rows = sample_rows(40)
    job = ray_job(make_job, rows)
    assert cli("run", str(job.spec)).exit_code == 0
    parts = sorted((load_job(job.spec).state_dir / "results").glob("*.parquet"))
    assert parts
    for part in parts:
        damage_keeping_size_and_mtime(part)
    sim.reset_stats()

    assert "ray" not in loaded("run", str(job.spec), watch=("ray",))  # and it exited 0

    assert sim.stats()["requests"] == 0
    assert pl.read_parquet(job.output).get_column("response_text").to_list() == expected(rows)


def test_a_ray_run_reports_its_phases_as_a_local_run_does(
    make_job, sim: SimulatorThread, caplog: pytest.LogCaptureFixture
) -> None:
    """The phases the Python API logs (at DEBUG, through `glm_batch`) cover a Ray run as they cover a local
    one: reading the input, then starting Ray (before which a run has nothing to show), then writing the
    output."""
    job = ray_job(make_job, sample_rows(40))

    with caplog.at_level(logging.DEBUG, logger="glm_batch"):
        assert runner.run_job(str(job.spec)).ok

    records = [r.glm_batch for r in caplog.records if r.name == "glm_batch"]
    phases = [r["phase"] for r in records if r["event"] == "phase"]
    wanted = ["reading input", "starting Ray", "writing output"]
    assert [p for p in phases if p in wanted] == wanted, phases
    assert pl.read_parquet(job.output).get_column("response_text").to_list() == expected(sample_rows(40))


def test_batch_mode_is_refused(make_job) -> None:
    """run.engine: ray with the Batch API is a usage error, in one line."""
    job = make_job(sample_rows(3), model={"name": "glm-4-air-250414"}, run={"engine": "ray", "mode": "batch"})
    result = cli("run", str(job.spec))
    assert result.exit_code == 2
    assert "batch mode runs on the local engine" in result.stderr


def test_sigterm_while_a_ray_run_starts_ends_with_the_summary_and_the_resume_line(
    make_job, sim: SimulatorThread
) -> None:
    """As on the local engine: a SIGTERM in the seconds a Ray run takes to start (its state opened, Ray
    not yet connected) stops it as any stopped run ends, with its summary and resume line."""
    job = ray_job(make_job, sample_rows(200))
    address = ray.get_runtime_context().gcs_address  # this module's Ray
    code, stderr = sigterm_once_started(job.spec, load_job(job.spec).state_dir, RAY_ADDRESS=address)
    assert code == 143, stderr
    assert "resume with: glm-batch run" in stderr.strip().splitlines()[-1]
    assert job.summary.exists()


def test_identical_prompts_in_blocks_on_different_actors_are_sent_once(make_job, sim: SimulatorThread) -> None:
    """2,000 rows asking 500 prompts, each prompt once in every block of 500 rows, so blocks sending at
    the same time on different actors share all their prompts: the block that claims a prompt first at
    the limiter sends it, the others leave it to that block, and each prompt is billed once."""
    sim.configure(concurrency_cap=LIMIT, latency_s=0.01)
    distinct = sample_rows(500)
    rows = [{"id": f"d{i:06d}", "text": distinct[i % 500]["text"]} for i in range(2_000)]
    job = ray_job(make_job, rows)

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    assert pl.read_parquet(job.output).get_column("response_text").to_list() == expected(rows)
    stats = sim.stats()
    assert stats["prompts_billed_twice"] == 0
    assert stats["billed"]["online"] == 500


def test_the_budget_holds_across_actors_and_books_each_answer_once(make_job, sim: SimulatorThread) -> None:
    """run.max_cost on Ray: one budget at the limiter for every actor, so dispatch stops before the cap
    can be passed (exit 4) and a later run goes on, paying only for the rest. The limiter books each
    answer once, at what it cost: its spend is the run's answers' cost. (Before reservations had ids,
    an actor's first requests, reserved before its slots joined, were booked at their worst case by
    the join and at their cost by their answers as well: a budget stopped far short of its cap.)"""
    sim.configure(latency_s=0.01)
    rows = sample_rows(300)
    job = make_job(
        rows,
        model={"prices": {"input": 2000.0, "output": 8000.0}},
        run={"engine": "ray", "concurrency": LIMIT, "max_cost": 5.0},
    )

    result = cli("run", str(job.spec))

    assert result.exit_code == 4, result.stderr
    assert "run.max_cost" in result.stderr
    summary = json.loads(job.summary.read_text())
    limiter = summary["engine"]["limiter"]
    assert 0 < summary["answered_ok"] < 300
    assert summary["cost"]["spent"] <= 5.0
    assert limiter["spent"] == pytest.approx(summary["cost"]["spent"], abs=1e-6)
    assert limiter["orphaned"] == 0.0 and limiter["spent"] + limiter["reserved"] <= 5.0

    # (on the local engine, which reads the same state: no second Ray start-up)
    assert cli("run", str(job.spec), "--set", "run.max_cost=1000", "--set", "run.engine=local").exit_code == 0
    assert sim.stats()["prompts_answered_twice"] == 0
    assert pl.read_parquet(job.output).height == 300


@pytest.fixture
def billed_at(sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, int]]:
    """The simulator's own record of each answer it billed: its clock then, and the tokens billed.
    (With no latency it bills as a request arrives.)"""
    record: list[tuple[float, int]] = []
    bill = sim.bill

    def recording(api: str, key: str, reply: Any) -> None:
        record.append((time.monotonic(), reply.input_tokens + reply.output_tokens))
        bill(api, key, reply)

    monkeypatch.setattr(sim, "bill", recording)
    return record


def most_in_any_window(events: list[tuple[float, int]], window_s: float) -> int:
    """The most weight that events within any `window_s` seconds add up to."""
    events = sorted(events)
    most = total = lo = 0
    for t, weight in events:
        total += weight
        while events[lo][0] < t - window_s:
            total -= events[lo][1]
            lo += 1
        most = max(most, total)
    return most


RATE_ROWS = 160
WINDOW_S = 3.0
JITTER_S = 0.5  # an attempt's start on its actor to its arrival at the simulator, on a loaded machine


def test_requests_and_tokens_per_minute_hold_across_actors(
    make_job, sim: SimulatorThread, billed_at: list[tuple[float, int]]
) -> None:
    """run.requests_per_minute, then run.tokens_per_minute, on Ray: whichever actors send, the simulator
    never saw more than one bucket (a second's worth of the rate) plus the rate over any 3-second window,
    give or take half a second of the rate for the way from an actor to the simulator."""
    sim.configure(latency_s=0.0)
    rpm = 1_200.0  # 20 requests a second
    job = make_job(sample_rows(RATE_ROWS), name="rpm", run={"engine": "ray", "requests_per_minute": rpm})
    assert cli("run", str(job.spec)).exit_code == 0
    per_s = rpm / 60
    assert len(billed_at) == RATE_ROWS
    assert most_in_any_window([(t, 1) for t, _ in billed_at], WINDOW_S) <= per_s * (1 + WINDOW_S + JITTER_S)
    assert json.loads(job.summary.read_text())["engine"]["limiter"]["paced"] == RATE_ROWS

    billed_at.clear()
    tpm = 30_000.0  # 500 tokens a second: about 18 of these requests (~27 tokens each, billed)
    rows = sample_rows(RATE_ROWS, start=RATE_ROWS)
    job = make_job(rows, name="tpm", run={"engine": "ray", "tokens_per_minute": tpm})
    assert cli("run", str(job.spec)).exit_code == 0
    per_s = tpm / 60
    assert len(billed_at) == RATE_ROWS
    assert most_in_any_window(billed_at, WINDOW_S) <= per_s * (1 + WINDOW_S + JITTER_S)
