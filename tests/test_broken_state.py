"""Full disks and broken state: a run stops cleanly, keeps what it has, explains what it cannot fix,
rebuilds what is only a cache, and never pays twice for an answer it still has a copy of."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest

from runner.job.resolve import load_job
from runner.simulator.simulator import SimulatorThread
from tests.conftest import CliResult, JobFiles, cli, sample_rows, write_csv


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (root only; skipped elsewhere, never in CI)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs in CI: {done.stderr.decode().strip()}")
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def finished_job(make_job: Callable[..., JobFiles], sim: SimulatorThread) -> Callable[[int], JobFiles]:
    """Makes a job of `n` sample rows and runs it to the end; the simulator then counts from zero."""

    def make(n: int) -> JobFiles:
        files = make_job(rows=sample_rows(n))
        assert cli("run", str(files.spec)).exit_code == 0
        sim.reset_stats()
        return files

    return make


@pytest.fixture
def all_answers_lost(finished_job: Callable[[int], JobFiles]) -> Callable[[int], JobFiles]:
    """Makes a finished job of `n` rows whose answers exist nowhere: every answer part cut in half, as
    a torn write would leave it, and the output deleted."""

    def make(n: int) -> JobFiles:
        files = finished_job(n)
        for part in (load_job(files.spec).state_dir / "results").glob("*.parquet"):
            data = part.read_bytes()
            part.write_bytes(data[: len(data) // 2])
        files.output.unlink()
        return files

    return make


def test_a_full_disk_stops_the_run_keeps_every_journalled_answer_and_resumes_in_place(
    make_job: Callable[..., JobFiles], tmp_path: Path, sim: SimulatorThread
) -> None:
    """ENOSPC mid-run: exit 5 with one line naming the full path, no traceback; once space is freed the
    same command finishes, and only answers that never reached the disk are asked for again."""
    rows = [{"id": f"r{i:05d}", "text": f"review {i} " + "long words here " * 30} for i in range(400)]
    with small_disk(tmp_path / "disk", "160k") as disk:
        files = make_job(rows=rows, output={"path": "out/job.parquet", "state_dir": str(disk / "state")},
                         run={"checkpoint_seconds": 30, "checkpoint_rows": 100000, "concurrency": 4})  # fmt: skip
        first = cli("run", str(files.spec))
        assert first.exit_code == 5, first.stderr
        last = first.stderr.strip().splitlines()[-1]
        assert "no space left" in last and str(disk) in last and "resume with: glm-batch run" in last
        assert "Traceback" not in first.stderr
        answered_before = sim.stats()["distinct_prompts_answered"]
        assert 0 < answered_before < 400
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)

        kept_by_the_first = json.loads(files.summary.read_text())["answered_ok"]

        second = cli("run", str(files.spec))
        assert second.exit_code == 0, second.stderr
        out = pl.read_parquet(files.output)
        assert out.height == 400 and (out.get_column("status") == "ok").all()
        # The first run's summary counted only the answers it saved: the second found exactly those.
        assert json.loads(files.summary.read_text())["rows_settled_before"] == kept_by_the_first
        # Paid twice at most: the requests in flight when the disk filled, and the one that failed to journal.
        assert sim.stats()["prompts_answered_twice"] <= 4 + 1


def test_a_lock_path_that_is_a_directory_is_explained(make_job: Callable[..., JobFiles]) -> None:
    """The lock must be a file: one line saying so, exit 2, nothing sent."""
    files = make_job(rows=sample_rows(3))
    lock = load_job(files.spec).state_dir / "lock"
    lock.mkdir(parents=True)
    result = cli("run", str(files.spec))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"glm-batch: error: {lock}: cannot take the job lock")
    assert "Traceback" not in result.stderr


def test_a_state_directory_that_is_a_file_is_explained(make_job: Callable[..., JobFiles], tmp_path: Path) -> None:
    """The state directory must be a directory this user can write."""
    (tmp_path / "state-file").write_text("not a directory")
    files = make_job(rows=sample_rows(3), output={"path": "out/job.parquet", "state_dir": "state-file"})
    result = cli("run", str(files.spec))
    assert result.exit_code == 2
    assert "state-file is a file, not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_truncated_row_map_is_rebuilt_as_the_cache_it_is(
    finished_job: Callable[[int], JobFiles], sim: SimulatorThread
) -> None:
    """The row map is a cache of the input: a truncated file is dropped and rebuilt, nothing re-sent."""
    files = finished_job(30)
    rows_file = next((load_job(files.spec).state_dir / "rows").glob("rows-*.parquet"))
    rows_file.write_bytes(rows_file.read_bytes()[:100])
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr
    assert "row_map_rebuilt" in result.stderr
    assert sim.stats()["requests"] == 0
    assert pl.read_parquet(files.output).height == 30


def test_answers_lost_with_a_torn_part_and_no_other_copy_are_not_paid_again_without_asking(
    all_answers_lost: Callable[[int], JobFiles], sim: SimulatorThread
) -> None:
    """With the output gone too, 11 answers (one more than may be re-sent unasked) exist nowhere: the run
    says so and sends nothing (exit 2) until --resend-lost; then it sends exactly those."""
    files = all_answers_lost(11)

    refused = cli("run", str(files.spec))
    assert refused.exit_code == 2
    assert "11 requests of the last run have no answer left" in refused.stderr
    assert "--resend-lost" in refused.stderr
    assert sim.stats()["requests"] == 0
    assert cli("run", str(files.spec)).exit_code == 2  # still asks: the parts stay set aside

    sent = cli("run", str(files.spec), "--resend-lost")
    assert sent.exit_code == 0
    assert sim.stats()["requests"] == 11
    assert cli("run", str(files.spec)).exit_code == 0  # nothing lost any more: no question


def test_a_small_loss_is_resent_without_asking(
    all_answers_lost: Callable[[int], JobFiles], sim: SimulatorThread
) -> None:
    """Up to 10 lost answers (or 1% of the rows) are sent again without a question."""
    files = all_answers_lost(10)
    result = cli("run", str(files.spec))
    assert result.exit_code == 0
    assert sim.stats()["requests"] == 10


def test_estimate_pilot_with_a_bad_key_fails_like_a_run(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """A pilot that the endpoint refuses (bad key) exits 3 with the reason, not 0 with assumptions."""
    sim.configure(api_keys=("the-right-key",))
    files = make_job(rows=sample_rows(20))
    result = cli("estimate", str(files.spec), "--pilot", "5")
    assert result.exit_code == 3
    line = result.stderr.strip().splitlines()[-1]
    assert "API key is missing, wrong or expired" in line


def test_an_abort_says_what_the_code_means_and_what_to_do(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """Zhipu's 1113 arrives as a Chinese message; the user reads what it means and how to go on."""
    sim.configure(fault_rate=1.0, faults=("429_1113",))
    files = make_job(rows=sample_rows(5))
    result = cli("run", str(files.spec), "--set", "run.concurrency=2")
    assert result.exit_code == 3
    last = result.stderr.strip().splitlines()[-1]
    assert "1113" in last and "out of balance; top up" in last
    assert f"resume with: glm-batch run {files.spec} --set run.concurrency=2" in last


def test_a_stopped_run_leaves_the_same_things_behind(make_job: Callable[..., JobFiles], sim: SimulatorThread) -> None:
    """Whatever stopped it (here the budget), a run leaves its summary with its exit code and reason,
    its record in the manifest, and no output file."""
    files = make_job(rows=sample_rows(50), run={"max_cost": 0.0001, "concurrency": 2})
    result = cli("run", str(files.spec))
    assert result.exit_code == 4
    summary = json.loads(files.summary.read_text())
    assert summary["exit_code"] == 4 and summary["stopped"] == "budget" and summary["output"] is None
    manifest = json.loads((load_job(files.spec).state_dir / "manifest.json").read_text())
    assert manifest["runs"][-1]["exit_code"] == 4
    assert not files.output.exists()


def test_the_resume_line_runs_the_same_job_on_from_where_it_stopped(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """The last line names the exact command, --set and --limit included; an earlier output stays as it
    was, and running that command goes on from there: only rows not yet answered are sent."""
    files = make_job(rows=sample_rows(10))
    assert cli("run", str(files.spec)).exit_code == 0
    earlier = files.output.read_bytes()
    sim.reset_stats()
    write_csv(files.input, sample_rows(40))  # 30 new rows

    def resume_words(result: CliResult) -> list[str]:
        assert result.exit_code == 4, result.stderr
        return shlex.split(result.stderr.strip().splitlines()[-1].partition(" with: ")[2])

    command = resume_words(cli("run", str(files.spec), "--set", "run.max_cost=0.004"))
    assert command == ["glm-batch", "run", str(files.spec), "--set", "run.max_cost=0.004"]
    assert files.output.read_bytes() == earlier
    assert 0 < sim.stats()["ok"] < 30  # it stopped part of the way
    limited = resume_words(cli("run", str(files.spec), "--limit", "30", "--set", "run.max_cost=0.0001"))
    assert limited == ["glm-batch", "run", str(files.spec), "--limit", "30", "--set", "run.max_cost=0.0001"]

    for _ in range(20):  # each run of the command spends its budget on rows not yet answered
        again = cli(*command[1:])
        if again.exit_code != 4:
            break
    assert again.exit_code == 0, again.stderr
    assert pl.read_parquet(files.output).get_column("id").to_list() == [r["id"] for r in sample_rows(40)]
    assert sim.stats()["distinct_prompts_billed"] == 30 and sim.stats()["prompts_billed_twice"] == 0
