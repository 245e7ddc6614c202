"""Re-running an unchanged finished job reads no request key, and trusts that only while nothing changed."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from runner.job.resolve import load_job
from runner.runs import fingerprint
from runner.simulator.answers import answer_for
from runner.simulator.simulator import SimulatorThread
from runner.state.rowmap import RowMap, file_identities
from runner.state.settled import SettledKeys
from tests.conftest import JobFiles, cli, sample_rows, write_csv


def state_of(job: JobFiles) -> Path:
    return load_job(job.spec).state_dir


def unreadable_keys(state: Path, retry_failed: bool = False) -> SettledKeys:
    """Settled keys that fail the test if anyone reads them, with the basis a run would give them."""

    def load() -> pl.Series:
        raise AssertionError("the settled keys were read")

    parts = sorted((state / "results").glob("*.parquet"))
    return SettledKeys(load, {"parts": file_identities(parts), "retry_failed": retry_failed})


def test_a_finished_all_ok_job_is_current_without_reading_a_key(make_job) -> None:
    job = make_job(sample_rows(12))
    assert cli("run", str(job.spec)).exit_code == 0
    state = state_of(job)

    rows = RowMap(state / "rows")
    assert rows.is_current(fingerprint(load_job(job.spec)), unreadable_keys(state))
    assert rows.is_current(fingerprint(load_job(job.spec)), unreadable_keys(state, retry_failed=True))


def test_the_cover_record_is_not_trusted_once_an_answer_file_changed(make_job, sim: SimulatorThread) -> None:
    rows = sample_rows(12)
    job = make_job(rows)
    assert cli("run", str(job.spec)).exit_code == 0
    state = state_of(job)
    for part in (state / "results").glob("*.parquet"):
        part.unlink()  # every answer gone: the record now lists files that are not there
    job.output.unlink()  # and no copy to take them back from (runner.output.salvage)
    map_ = RowMap(state / "rows")
    job_now = load_job(job.spec)
    assert not map_.is_current(fingerprint(job_now), SettledKeys(pl.Series("request_key", [], pl.String), {
        "parts": [], "retry_failed": False}))  # fmt: skip

    sim.reset_stats()
    assert cli("run", str(job.spec)).exit_code == 0

    assert sim.stats()["requests"] == 12  # asked again, not taken as answered
    out = pl.read_parquet(job.output)
    assert out.get_column("response_text").to_list() == [answer_for(f"Be brief.\nSummarise: {r['text']}") for r in rows]


def test_a_covered_job_still_rewrites_its_output_when_the_input_or_the_spec_changes(make_job, sim) -> None:
    rows = sample_rows(10)
    job = make_job(rows)
    assert cli("run", str(job.spec)).exit_code == 0
    assert cli("run", str(job.spec)).exit_code == 0  # unchanged: covered, output left alone
    assert json.loads((state_of(job) / "rows" / "covered.json").read_text())["retry_failed"] == [False, True]

    changed = [{**r, "text": r["text"] + " (edited)"} if i < 3 else r for i, r in enumerate(rows)]
    write_csv(job.input, changed)
    sim.reset_stats()
    assert cli("run", str(job.spec)).exit_code == 0
    assert sim.stats()["requests"] == 3
    want = [answer_for(f"Be brief.\nSummarise: {r['text']}") for r in changed]
    assert pl.read_parquet(job.output).get_column("response_text").to_list() == want

    sim.reset_stats()
    assert cli("run", str(job.spec), "--set", "prompt.template=Shorten: {{ text }}").exit_code == 0
    assert sim.stats()["requests"] == 10
    want = [answer_for(f"Be brief.\nShorten: {r['text']}") for r in changed]
    assert pl.read_parquet(job.output).get_column("response_text").to_list() == want


def test_permanent_failures_cover_a_plain_rerun_but_not_a_retry_failed_one(make_job, sim) -> None:
    job = make_job(sample_rows(4), run={"max_attempts": 1})
    sim.configure(faults=("400_1261",), fault_attempts=1)
    assert cli("run", str(job.spec)).exit_code == 1  # each row fails for good
    sim.reset_stats()
    assert cli("run", str(job.spec)).exit_code == 1  # nothing to send: seen settled, and recorded
    assert sim.stats()["requests"] == 0
    state = state_of(job)
    assert json.loads((state / "rows" / "covered.json").read_text())["retry_failed"] == [False]

    rows = RowMap(state / "rows")
    assert rows.is_current(fingerprint(load_job(job.spec)), unreadable_keys(state))
    sim.configure(fault_attempts=0)
    assert cli("run", str(job.spec), "--retry-failed").exit_code == 0
    assert sim.stats()["requests"] == 4
