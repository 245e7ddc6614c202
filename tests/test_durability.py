"""Durable, resumable, cron-safe runs: never lose a paid answer, never pay twice."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from runner.records import Result, result_to_json
from runner.simulator.answers import answer_for
from runner.simulator.simulator import SimulatorThread
from runner.state.store import Store
from tests.conftest import cli, eventually, sample_rows, write_csv


def expected(rows: list[dict[str, str]], template: str = "Summarise: {text}") -> list[str]:
    return [answer_for("Be brief.\n" + template.format(**r)) for r in rows]


def start_run(spec: Path, *extra: str) -> subprocess.Popen[str]:
    """Start `glm-batch run` as a real process and wait until it has started sending."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "run", str(spec), "--log-format", "json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if '"event": "start"' in line:
            return proc
    raise AssertionError(f"run never started: {proc.wait()}")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigkill_at_random_moments_loses_nothing_and_pays_at_most_for_what_was_in_flight(
    make_job, sim: SimulatorThread
) -> None:
    sim.configure(latency_s=0.02, latency_jitter_s=0.02)
    rows = sample_rows(1500)
    concurrency = 8
    job = make_job(rows, run={"concurrency": concurrency, "checkpoint_seconds": 5.0})
    rng = random.Random(2026)

    kills = 0
    for _ in range(4):
        proc = start_run(job.spec)
        time.sleep(rng.uniform(0.2, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    answered_before_last_run = sim.stats()["distinct_prompts_answered"]
    code, err = finish(start_run(job.spec))

    assert code == 0, err
    assert 0 < answered_before_last_run < 1500  # the kills really landed in the middle of the work
    out = pl.read_parquet(job.output)
    assert out.get_column("id").to_list() == [r["id"] for r in rows]
    assert out.get_column("response_text").to_list() == expected(rows)
    stats = sim.stats()
    assert stats["distinct_prompts_answered"] == 1500
    # Answers that reached us were journalled at once; only requests in flight at a kill were paid twice.
    assert stats["ok"] <= 1500 + kills * concurrency


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_dispatch_keeps_what_arrived_and_the_run_resumes(
    make_job, sim: SimulatorThread, signum: int, code: int
) -> None:
    sim.configure(latency_s=0.05)
    rows = sample_rows(400)
    job = make_job(rows, run={"concurrency": 4})

    proc = start_run(job.spec)
    eventually(lambda: sim.stats()["ok"] > 0)  # answers come back, and more are on their way
    proc.send_signal(signum)
    first_code, err = finish(proc)

    assert first_code == code
    assert "resume with: glm-batch run" in err
    answered_before = sim.stats()["ok"]
    assert 0 < answered_before < 400

    sim.configure(latency_s=0.0)  # the stop is the subject; the resume need not wait a round trip a row
    assert cli("run", str(job.spec)).exit_code == 0
    assert pl.read_parquet(job.output).get_column("response_text").to_list() == expected(rows)
    # The grace period let in-flight requests finish, so nothing was paid for twice: the server bills a
    # request whose client hung up, so a stop that cut them off would show here.
    stats = sim.stats()
    assert stats["ok"] == 400 and stats["prompts_answered_twice"] == 0
    assert stats["prompts_billed_twice"] == 0


def test_a_second_signal_stops_at_once_and_state_stays_durable(make_job, sim: SimulatorThread) -> None:
    """The first signal gives requests in flight a minute of grace; the second one ends it now."""
    sim.configure(latency_s=60.0)  # requests that would hold the whole grace period
    job = make_job(sample_rows(20), run={"concurrency": 4, "grace_s": 60})

    proc = start_run(job.spec)
    eventually(lambda: sim.stats()["max_in_flight"] == 4)
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    assert any('"event": "interrupted"' in line for line in proc.stderr)  # the grace period has begun
    proc.send_signal(signal.SIGTERM)
    try:
        code, err = proc.wait(timeout=30), proc.stderr.read()
    finally:
        proc.kill()

    assert code == 143
    assert "Traceback" not in err
    sim.configure(latency_s=0.0)
    assert cli("run", str(job.spec)).exit_code == 0
    assert pl.read_parquet(job.output).height == 20


def test_answers_are_folded_into_part_files_every_checkpoint_seconds_while_the_run_goes_on(
    make_job, sim: SimulatorThread
) -> None:
    """Time alone (not a count of rows, set out of reach here) folds the journal into Parquet parts."""
    from runner.job.resolve import load_job

    sim.configure(latency_s=0.05)
    job = make_job(sample_rows(400), run={"concurrency": 2, "checkpoint_seconds": 0.3, "checkpoint_rows": 100_000})
    loaded = load_job(job.spec)
    proc = start_run(job.spec)
    try:
        eventually(lambda: list((loaded.state_dir / "results").glob("*.parquet")))
        assert sim.stats()["ok"] < 400  # folded while sending, not only when the run ends
    finally:
        proc.send_signal(signal.SIGTERM)
        finish(proc)
    unset = make_job(sample_rows(1), name="defaults", run={"checkpoint_seconds": None})
    unset.spec.write_text(unset.spec.read_text().replace("  checkpoint_seconds: null\n", ""))
    assert load_job(unset.spec).spec.run.checkpoint_seconds == 2.0  # the default


def test_rerunning_a_finished_job_sends_nothing(make_job, sim: SimulatorThread) -> None:
    job = make_job(sample_rows(30))
    assert cli("run", str(job.spec)).exit_code == 0
    first = pl.read_parquet(job.output)
    sim.reset_stats()

    result = cli("run", str(job.spec))

    assert result.exit_code == 0
    assert sim.stats()["requests"] == 0
    again = pl.read_parquet(job.output)
    assert again.get_column("response_text").to_list() == first.get_column("response_text").to_list()
    assert json.loads(job.summary.read_text())["rows_settled_before"] == 30


def test_a_template_change_resends_only_the_rows_whose_request_changed(make_job, sim: SimulatorThread) -> None:
    rows = [{"id": f"r{i}", "text": f"text {i}", "lang": "de" if i % 4 == 0 else "en"} for i in range(20)]
    job = make_job(rows)
    assert cli("run", str(job.spec)).exit_code == 0
    sim.reset_stats()

    new = "{% if lang == 'de' %}Fasse zusammen{% else %}Summarise{% endif %}: {{ text }}"
    result = cli("run", str(job.spec), "--set", f"prompt.template={new}")

    assert result.exit_code == 0
    assert sim.stats()["requests"] == 5  # the German rows only
    out = pl.read_parquet(job.output)
    want = [
        answer_for(f"Be brief.\n{'Fasse zusammen' if r['lang'] == 'de' else 'Summarise'}: {r['text']}") for r in rows
    ]
    assert out.get_column("response_text").to_list() == want


def test_rows_appended_to_the_input_are_the_only_ones_sent(make_job, sim: SimulatorThread) -> None:
    rows = sample_rows(20)
    job = make_job(rows)
    assert cli("run", str(job.spec)).exit_code == 0
    sim.reset_stats()

    grown = rows + sample_rows(5, start=20)
    write_csv(job.input, grown)
    assert cli("run", str(job.spec)).exit_code == 0

    assert sim.stats()["requests"] == 5
    out = pl.read_parquet(job.output)
    assert out.get_column("id").to_list() == [r["id"] for r in grown]
    assert out.get_column("response_text").to_list() == expected(grown)


def test_a_daily_output_path_still_reuses_yesterdays_answers(make_job, sim: SimulatorThread) -> None:
    job = make_job(sample_rows(10), output={"path": "out/{run_date}/{name}.parquet"})
    assert cli("run", str(job.spec)).exit_code == 0
    sim.reset_stats()

    # Tomorrow's run writes a new file but finds the same state directory.
    import datetime as dt

    from runner.job.resolve import load_job

    today = load_job(job.spec)
    tomorrow = load_job(job.spec, today=dt.date.today() + dt.timedelta(days=1))
    assert today.output_path != tomorrow.output_path
    assert today.state_dir == tomorrow.state_dir


def test_fresh_sends_everything_again(make_job, sim: SimulatorThread) -> None:
    job = make_job(sample_rows(10))
    assert cli("run", str(job.spec)).exit_code == 0
    sim.reset_stats()

    assert cli("run", str(job.spec), "--fresh").exit_code == 0
    assert sim.stats()["requests"] == 10


def test_transient_failures_are_resent_but_permanent_ones_only_when_asked(make_job, sim: SimulatorThread) -> None:
    rows = sample_rows(6)
    job = make_job(rows, run={"max_attempts": 1})
    sim.configure(faults=("500",), fault_attempts=1)
    assert cli("run", str(job.spec)).exit_code == 1  # every row failed its only attempt, retryably

    sim.reset_stats()
    sim.configure(faults=("400_1261",), fault_attempts=1)
    assert cli("run", str(job.spec)).exit_code == 1  # resent; now each fails for good
    assert sim.stats()["requests"] == 6

    sim.reset_stats()
    assert cli("run", str(job.spec)).exit_code == 1
    assert sim.stats()["requests"] == 0  # permanent failures are not resent by default

    sim.configure(fault_attempts=0)  # the endpoint no longer rejects them
    assert cli("run", str(job.spec), "--retry-failed").exit_code == 0
    assert sim.stats()["requests"] == 6
    assert set(pl.read_parquet(job.output).get_column("status")) == {"ok"}


def test_a_second_run_of_the_same_job_is_refused_while_the_first_holds_the_lock(make_job, sim) -> None:
    job = make_job(sample_rows(5))
    from runner.job.resolve import load_job

    holder = Store(load_job(job.spec).state_dir, run_id="other")
    holder.open()
    try:
        result = cli("run", str(job.spec))
    finally:
        holder.close()

    assert result.exit_code == 75
    assert f"pid {os.getpid()}" in result.stderr
    assert "in progress" in result.stderr
    assert sim.stats()["requests"] == 0


def test_a_lock_left_by_a_dead_process_is_taken_over(make_job, sim) -> None:
    job = make_job(sample_rows(5))
    from runner.job.resolve import load_job

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    state = load_job(job.spec).state_dir
    state.mkdir(parents=True)
    (state / "lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))

    result = cli("run", str(job.spec))

    assert result.exit_code == 0
    assert "stale_lock_taken_over" in result.stderr


def test_a_torn_part_file_is_set_aside_and_its_answers_taken_back_from_the_output(
    make_job, sim: SimulatorThread
) -> None:
    """A torn part is never read as whole; the finished output still holds every answer, so nothing is
    paid again (see test_broken_state.py for a torn part with no other copy)."""
    rows = sample_rows(12)
    job = make_job(rows)
    assert cli("run", str(job.spec)).exit_code == 0
    from runner.job.resolve import load_job

    parts = sorted((load_job(job.spec).state_dir / "results").glob("*.parquet"))
    assert len(parts) == 1
    data = parts[0].read_bytes()
    parts[0].write_bytes(data[: len(data) // 2])  # a torn write: the first half only
    sim.reset_stats()

    result = cli("run", str(job.spec))

    assert result.exit_code == 0
    assert "corrupt_parts_quarantined" in result.stderr
    assert "answers_salvaged" in result.stderr
    assert sim.stats()["requests"] == 0
    assert pl.read_parquet(job.output).get_column("response_text").to_list() == expected(rows)


def test_an_answer_with_a_lone_surrogate_is_kept_with_it_replaced_not_a_crash(tmp_path: Path) -> None:
    """A hostile body may decode to a lone surrogate ("\\ud800"), which is not UTF-8: the answer is
    journalled and written with U+FFFD in its place, and a surrogate pair stays its character."""
    import datetime as dt

    state = tmp_path / "state"
    store = Store(state, run_id="r")
    store.open()
    try:
        answer = Result(
            key="k",
            status="ok",
            attempts=1,
            latency_ms=1.0,
            finished_at=dt.datetime.now(dt.UTC),
            response_text="bad \ud800 here, \ud83d\ude00 kept",
            error_message="\udfff",
        )
        store.add(answer)
        journal = b"".join(p.read_bytes() for p in state.rglob("journal-*.jsonl"))
        store.flush()
    finally:
        store.close()
    assert "bad \ufffd here, \U0001f600 kept".encode() in journal
    (part,) = [pl.read_parquet(p) for p in state.rglob("part-*.parquet")]
    assert part.get_column("response_text").to_list() == ["bad \ufffd here, \U0001f600 kept"]
    assert part.get_column("error_message").to_list() == ["\ufffd"]


def test_a_journal_left_by_a_killed_run_is_recovered_without_its_torn_last_line(tmp_path: Path) -> None:
    import datetime as dt

    state = tmp_path / "state"
    state.mkdir()
    done = [
        Result(key=f"k{i}", status="ok", attempts=1, latency_ms=1.0, finished_at=dt.datetime.now(dt.UTC))
        for i in range(2)
    ]
    lines = [result_to_json(r) for r in done]
    (state / "journal-dead.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:25], encoding="utf-8")

    store = Store(state, run_id="next")
    store.open()
    try:
        assert store.recovered == 2
        settled = store.settled_keys(retry_failed=False)
        assert settled.contains(pl.Series(["k0", "k1", "k2"])).to_list() == [True, True, False]
    finally:
        store.close()
    assert not (state / "journal-dead.jsonl").exists()


def test_status_reports_answered_failed_and_pending(make_job, sim: SimulatorThread) -> None:
    rows = sample_rows(6) + [{"id": f"bad{i}", "text": f"BAD row {i}"} for i in range(2)]
    job = make_job(rows, run={"max_attempts": 1})
    assert "never run" in cli("status", str(job.spec)).stdout

    sim.configure(faults=("400_1261",), fault_attempts=99, fault_match="BAD")
    assert cli("run", str(job.spec)).exit_code == 1

    out = cli("status", str(job.spec)).stdout
    assert "6 rows answered ok, 2 failed, 0 pending" in out
    assert "exit 1" in out


def test_status_counts_the_rows_a_stopped_run_never_reached_as_pending(make_job, sim: SimulatorThread) -> None:
    job = make_job(sample_rows(300), model={"prices": {"input": 2000.0, "output": 8000.0}}, run={"max_cost": 5.0})
    assert cli("run", str(job.spec)).exit_code == 4  # the budget stops it part of the way
    ok = sim.stats()["ok"]

    out = cli("status", str(job.spec)).stdout

    assert f"{ok} rows answered ok, 0 failed, {300 - ok} pending" in out


def test_unattended_runs_log_json_lines(make_job) -> None:
    job = make_job(sample_rows(5))

    result = cli("run", str(job.spec))

    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    assert events[-1]["exit_code"] == 0 and events[-1]["answered_ok"] == 5
    manifest = json.loads(next(job.output.parent.glob(".glm-batch/*/manifest.json")).read_text())
    last = manifest["runs"][-1]
    assert last["spec_hash"] and last["inputs"][0]["bytes"] > 0 and last["exit_code"] == 0
    assert last["inputs"][0]["path"] == str(job.input)
    assert last["answered_ok"] == 5 and last["rows_total"] == 5  # counts
    assert last["tokens"]["input"] > 0 and last["tokens"]["output"] > 0
    assert last["elapsed_s"] > 0  # duration


def test_progress_lines_come_every_ten_seconds_with_the_retries_summarised(make_job, sim: SimulatorThread) -> None:
    """Progress records at the reporter's interval (10 s unless asked: here 0.05 s, so the test is short)
    carry the retries so far by cause."""
    import io

    import runner
    from runner.observe.progress import make_reporter

    assert make_reporter("json", stream=io.StringIO()).interval_s == 10.0
    sim.configure(faults=("429_1302",), fault_attempts=1, latency_s=0.05)
    job = make_job(sample_rows(12), run={"concurrency": 2})
    stream = io.StringIO()
    assert runner.run_job(str(job.spec), reporter=make_reporter("json", stream=stream, interval_s=0.05)).ok
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    progress = [e["retries"] for e in events if e["event"] == "progress"]
    assert events[-1]["retries"] == {"429/1302": 12}  # each request was refused once
    assert len(progress) >= 2 and any(progress)
    assert all(set(p) <= {"429/1302"} for p in progress)  # by cause, not one line per retry


def test_an_unchanged_rerun_leaves_the_output_alone_and_rebuilds_a_missing_one(make_job, sim) -> None:
    rows = sample_rows(15)
    job = make_job(rows)
    assert cli("run", str(job.spec)).exit_code == 0
    stamp = job.output.stat().st_mtime_ns

    assert cli("run", str(job.spec)).exit_code == 0
    assert job.output.stat().st_mtime_ns == stamp  # nothing changed, nothing rewritten

    job.output.unlink()
    assert cli("run", str(job.spec)).exit_code == 0
    assert pl.read_parquet(job.output).get_column("response_text").to_list() == expected(rows)
    assert sim.stats()["requests"] == 15  # and still nothing was sent again


def test_status_names_a_running_job_without_touching_its_lock(make_job, sim) -> None:
    job = make_job(sample_rows(3))
    from runner.job.resolve import load_job

    holder = Store(load_job(job.spec).state_dir, run_id="other")
    holder.open()
    try:
        record = holder.lock.path.read_bytes()
        out = cli("status", str(job.spec)).stdout
        assert f"a run is in progress: pid {os.getpid()}" in out
        assert holder.lock.path.read_bytes() == record
    finally:
        holder.close()
    assert "in progress" not in cli("status", str(job.spec)).stdout
