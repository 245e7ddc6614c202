"""A state folder that stops taking writes mid-run never loses a paid answer.

Whatever breaks it (a disk that fills, at any size; a folder made immutable; a folder deleted), the run
stops dispatching, writes the answers it holds to a rescue journal beside the output (or under the temp
folder), ends with its documented exit code and the command that resumes, and the next run reads that
journal first. The measure is money: over all runs the simulator answers each row once, plus at most
the requests that were in flight when the state broke.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest

from runner.job.resolve import Job, load_job
from runner.simulator.simulator import SimulatorThread
from tests.conftest import CliResult, JobFiles, cli
from tests.test_broken_state import small_disk

ROWS = 120
IN_FLIGHT = 4  # run.concurrency in these jobs: at most this many requests can be paid twice


def long_rows(n: int = ROWS) -> list[dict[str, str]]:
    return [{"id": f"r{i:05d}", "text": f"review {i} " + "long words here " * 10} for i in range(n)]


def assert_paid_once_and_complete(files: JobFiles, sim: SimulatorThread, rows: int = ROWS) -> None:
    """Every row is in the output, answered; the simulator answered each at most once more than needed
    only for what was in flight."""
    out = pl.read_parquet(files.output)
    assert out.height == rows and (out.get_column("status") == "ok").all()
    answered = sim.stats()["ok"]
    assert rows <= answered <= rows + IN_FLIGHT, f"{answered} answers paid for {rows} rows"


def assert_one_clean_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert "resume with: glm-batch run" in last, last
    return last


@pytest.mark.parametrize("size", ["8k", "20k", "40k", "64k", "160k", "64m"])
def test_a_state_disk_of_any_size_never_pays_twice(
    size: str, make_job: Callable[..., JobFiles], tmp_path: Path, sim: SimulatorThread
) -> None:
    """The state on a tmpfs from tiny to enough: the first run finishes or stops with exit 5 naming the
    rescue journal; once the disk has room the same command finishes and nothing is paid twice."""
    with small_disk(tmp_path / "disk", size) as disk:
        files = make_job(rows=long_rows(), output={"path": "out/job.parquet", "state_dir": str(disk / "state")})
        first = cli("run", str(files.spec))
        assert first.exit_code in (0, 5), first.stderr
        if first.exit_code == 5:
            last = assert_one_clean_line(first.stderr)
            assert "no space left" in last
            # Answers paid and not yet durable when the disk filled are rescued beside the output, and the
            # line says where; when every paid answer was durable (the disk filled writing the row map or
            # the output, which timing decides), there is nothing to rescue. None is ever dropped.
            assert "could be written neither" not in last
            rescued = list(files.output.parent.glob("job.rescue-*.jsonl"))
            if "answers it held are in" in last:
                assert rescued and str(rescued[0]) in last
            else:
                assert not rescued, last
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        second = cli("run", str(files.spec))
        assert second.exit_code == 0, second.stderr
        assert not list(files.output.parent.glob("job.rescue-*.jsonl")), "the rescue journal is retired"
        assert_paid_once_and_complete(files, sim)


def test_with_the_output_on_the_full_disk_too_the_rescue_goes_under_the_temp_folder(
    make_job: Callable[..., JobFiles], tmp_path: Path, sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with small_disk(tmp_path / "disk", "40k") as disk:
        files = make_job(rows=long_rows(), output={"path": str(disk / "out" / "job.parquet")})
        first = cli("run", str(files.spec))
        assert first.exit_code == 5, first.stderr
        last = assert_one_clean_line(first.stderr)
        assert "could be written neither" not in last
        rescued = list((temp / "glm-batch-rescue").glob("*/job.rescue-*.jsonl"))
        # Timing decides whether the disk fills while answers are held (then they go under the temp
        # folder, and the line says where) or after the last one was durable (nothing to rescue).
        if "answers it held are in" in last:
            assert rescued and str(rescued[0]) in last
        else:
            assert not rescued, last
        assert not list((disk / "out").glob("job.rescue-*.jsonl")), "the full disk holds no rescue"
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        second = cli("run", str(files.spec))
        assert second.exit_code == 0, second.stderr
        assert not list((temp / "glm-batch-rescue").glob("*/job.rescue-*.jsonl"))
        files.output = disk / "out" / "job.parquet"
        assert_paid_once_and_complete(files, sim)


def when_answered(sim: SimulatorThread, answers: int, act: Callable[[], None]) -> threading.Thread:
    """A thread that does `act` once the simulator has answered `answers` requests (the run is mid-way)."""

    def watch() -> None:
        while sim.stats()["ok"] < answers:
            threading.Event().wait(0.005)
        act()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def slow_job(make_job: Callable[..., JobFiles], sim: SimulatorThread) -> Callable[..., JobFiles]:
    """A job of 200 rows that takes about a second, so the state can be broken while it sends."""

    def make(**run: object) -> JobFiles:
        sim.configure(latency_s=0.02)
        return make_job(rows=long_rows(200), run={"concurrency": IN_FLIGHT, **run})

    return make


@pytest.fixture
def chattr() -> Iterator[Callable[[str, Path], None]]:
    """chattr, undone at the end (an immutable folder cannot even be removed by root)."""
    touched: list[Path] = []

    def run(flag: str, path: Path) -> None:
        done = subprocess.run(["chattr", "-R", flag, str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"chattr is not permitted here: {done.stderr.decode().strip()}")
        touched.append(path)

    yield run
    for path in touched:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=False, capture_output=True)


def state_dir_of(files: JobFiles) -> Path:
    return files.output.parent / ".glm-batch" / "job"


def test_a_state_folder_made_immutable_mid_run(
    slow_job: Callable[..., JobFiles], sim: SimulatorThread, chattr: Callable[[str, Path], None]
) -> None:
    """chattr +i on the state mid-run: exit 74 with the resume command; the answers held are rescued."""
    files = slow_job()
    state = state_dir_of(files)
    # Probe first: a skip inside the watcher thread would not reach pytest.
    state.mkdir(parents=True)
    chattr("+i", state)
    subprocess.run(["chattr", "-R", "-i", str(state)], check=True)
    watcher = when_answered(sim, 40, lambda: subprocess.run(["chattr", "-R", "+i", str(state)], check=True))
    first = cli("run", str(files.spec))
    watcher.join()
    assert first.exit_code == 74, first.stderr
    last = assert_one_clean_line(first.stderr)
    assert "stopped taking writes" in last and ".rescue-" in last
    assert json.loads(files.summary.read_text())["exit_code"] == 74
    paid = sim.stats()["ok"]
    assert paid < 200, "dispatch stopped"
    still = cli("run", str(files.spec))  # not fixed yet: one line, nothing sent
    assert still.exit_code in (2, 74) and "Traceback" not in still.stderr, still.stderr
    assert sim.stats()["ok"] == paid
    subprocess.run(["chattr", "-R", "-i", str(state)], check=True)
    second = cli("run", str(files.spec))
    assert second.exit_code == 0, second.stderr
    assert_paid_once_and_complete(files, sim, 200)


def test_a_state_folder_deleted_mid_run(slow_job: Callable[..., JobFiles], sim: SimulatorThread) -> None:
    """The state folder removed mid-run: what the run held (here every answer: no part written yet) is
    rescued, nothing is paid again. Parts written before the deletion go with the folder."""
    files = slow_job(checkpoint_seconds=60, checkpoint_rows=100_000)
    state = state_dir_of(files)
    watcher = when_answered(sim, 40, lambda: shutil.rmtree(state))
    first = cli("run", str(files.spec))
    watcher.join()
    assert first.exit_code == 74, first.stderr
    last = assert_one_clean_line(first.stderr)
    assert ".rescue-" in last
    assert sim.stats()["ok"] < 200, "dispatch stopped"
    second = cli("run", str(files.spec))
    assert second.exit_code == 0, second.stderr
    assert_paid_once_and_complete(files, sim, 200)


def test_a_part_torn_inside_is_set_aside_not_a_crash(make_job: Callable[..., JobFiles], sim: SimulatorThread) -> None:
    """A part whose footer reads but whose data does not: set aside with a warning, and its answers taken
    back from the output, which still holds them: nothing is paid again."""
    files = make_job(rows=long_rows(30))
    assert cli("run", str(files.spec)).exit_code == 0
    sim.reset_stats()
    parts = sorted((state_dir_of(files) / "results").glob("*.parquet"))
    part = parts[0]
    data = bytearray(part.read_bytes())
    for i in range(8, len(data) // 2):  # the data pages, not the footer
        data[i] = 0xFF
    part.write_bytes(bytes(data))
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "corrupt_parts_quarantined" in result.stderr and "answers_salvaged" in result.stderr
    assert sim.stats()["ok"] == 0
    assert pl.read_parquet(files.output).height == 30


def stopped_dated_run(make_job: Callable[..., JobFiles], sim: SimulatorThread) -> tuple[JobFiles, Job, CliResult]:
    """A 200-row job with `{run_date}` in output.path whose state folder is deleted once 40 answers are in:
    the run stops (exit 74) with the answers it held in a rescue journal beside that day's output."""
    sim.configure(latency_s=0.02)
    files = make_job(
        rows=long_rows(200),
        run={"concurrency": IN_FLIGHT, "checkpoint_seconds": 60, "checkpoint_rows": 100_000},
        output={"path": "out/{run_date}/job.parquet"},
    )
    job = load_job(files.spec)
    watcher = when_answered(sim, 40, lambda: shutil.rmtree(job.state_dir))
    stopped = cli("run", str(files.spec))
    watcher.join()
    assert stopped.exit_code == 74, stopped.stderr
    return files, job, stopped


def test_a_rescue_beside_a_dated_output_is_read_by_that_days_next_run(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """With `{run_date}` in output.path the state sits above the dated folder and the rescue journal
    beside that day's output, where the next run looks for it: nothing is paid twice."""
    files, job, first = stopped_dated_run(make_job, sim)
    assert job.state_dir.parent != job.output_path.parent  # the state is shared by every day's output
    journal = next(job.output_path.parent.glob("job.rescue-*.jsonl"))
    assert str(journal) in assert_one_clean_line(first.stderr)

    second = cli("run", str(files.spec))
    assert second.exit_code == 0, second.stderr
    assert not journal.exists()  # read, kept, deleted
    assert_paid_once_and_complete(JobFiles(files.spec, files.input, job.output_path, files.summary), sim, 200)
