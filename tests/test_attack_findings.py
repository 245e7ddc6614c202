"""Defects found by attacking the CLI as the independent checkers do; each test failed before its fix.

Every test states the behaviour the README promises (or common sense demands: one clear line, exit 2,
nothing sent, nothing lost) and checks it with the real CLI against the real simulator. A new finding
arrives as a strict xfail test and loses the marker when its fix lands.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from runner.job.resolve import load_job
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, sample_rows, sigterm_once_started, write_csv
from tests.test_rescue import IN_FLIGHT, long_rows, state_dir_of, stopped_dated_run, when_answered
from tests.test_rescue import chattr as chattr  # the fixture, for the tests here

FAST_POLL = {"poll_initial_s": 0.02, "poll_max_s": 0.1}


@pytest.mark.parametrize(
    ("column", "spec"),
    [
        ("request_key", {"input": {"id_column": "request_key"}, "output": {"keep_columns": []}}),
        ("status", {"output": {"keep_columns": ["text", "status"]}}),
        ("response_text", {"output": {"keep_columns": ["text", "response_text"]}}),
    ],
)
def test_an_input_column_named_like_an_output_column_is_refused_before_anything_is_sent(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, column: str, spec: dict[str, object]
) -> None:
    rows = [{**row, column: f"c{i}"} for i, row in enumerate(sample_rows(3))]
    files = make_job(rows=rows, **spec)
    result = cli("run", str(files.spec))
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert sim.stats()["requests"] == 0


@pytest.mark.parametrize("command", ["validate", "status", "estimate", "run"])
def test_a_spec_file_that_is_not_text_is_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_bytes(bytes(range(128, 256)) * 8)
    result = cli(command, str(spec))
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr


def test_a_batch_file_the_api_refuses_stops_the_run_with_one_line(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(batch_max_lines=5)  # the account's limit is lower than run.batch.max_requests
    files = make_job(
        rows=sample_rows(20), model={"name": "glm-4-air-250414"}, run={"mode": "batch", "batch": FAST_POLL}
    )
    result = cli("run", str(files.spec))
    assert result.exit_code in (2, 3), result.stderr
    assert "Traceback" not in result.stderr
    assert "glm-batch run" in result.stderr.strip().splitlines()[-1]  # says how to go on
    assert "run.batch.max_requests" in result.stderr  # and what to change


def test_answers_the_output_still_holds_are_taken_back_after_an_earlier_salvage(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    files = make_job(rows=sample_rows(20))
    assert cli("run", str(files.spec)).exit_code == 0
    results = load_job(files.spec).state_dir / "results"
    for part in results.glob("*.parquet"):  # a torn part: set aside and salvaged from the output
        part.write_bytes(part.read_bytes()[:100])
    assert cli("run", str(files.spec)).exit_code == 0
    for part in results.glob("*.parquet"):  # then the answer files go missing again; the output is intact
        part.unlink()
    sim.reset_stats()
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr  # today: exit 2, "no answer left in any copy"
    assert sim.stats()["requests"] == 0


@pytest.mark.parametrize("lost", ["answer files", "state folder"])
def test_a_lost_state_is_taken_back_from_the_output_before_anything_is_paid_again(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, lost: str
) -> None:
    files = make_job(rows=sample_rows(20))
    assert cli("run", str(files.spec)).exit_code == 0
    state = load_job(files.spec).state_dir
    if lost == "answer files":
        for part in (state / "results").glob("*.parquet"):
            part.unlink()
    else:
        shutil.rmtree(state)
    before = pl.read_parquet(files.output).sort("id")
    sim.reset_stats()
    result = cli("run", str(files.spec), "--log-format", "json")
    assert result.exit_code == 0, result.stderr
    assert '"answers_salvaged"' in result.stderr
    assert sim.stats()["requests"] == 0
    after = pl.read_parquet(files.output).sort("id")
    assert after.get_column("response_text").to_list() == before.get_column("response_text").to_list()
    sim.reset_stats()  # --fresh still pays for every row, as asked
    assert cli("run", str(files.spec), "--fresh").exit_code == 0
    assert sim.stats()["requests"] == 20


def test_a_key_given_twice_in_the_spec_is_refused_naming_its_line(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("version: 1\nname: a\nrun: {concurrency: 4}\nrun: {concurrency: 64}\n", encoding="utf-8")
    result = cli("validate", str(spec))
    assert result.exit_code == 2, result.stderr
    assert "line 4" in result.stderr and "'run' is given twice" in result.stderr


def test_an_output_inside_its_own_state_directory_is_refused(make_job: Callable[..., JobFiles]) -> None:
    files = make_job(output={"path": "st/results/out.parquet", "state_dir": "st"})
    result = cli("validate", str(files.spec))
    assert result.exit_code == 2, result.stderr
    assert "output.path" in result.stderr


def test_sigterm_while_a_run_is_starting_leaves_the_summary_and_the_resume_line(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    files = make_job(rows=sample_rows(20))
    code, stderr = sigterm_once_started(files.spec, load_job(files.spec).state_dir)
    assert code == 143, stderr
    assert "resume with: glm-batch run" in stderr.strip().splitlines()[-1]
    assert files.summary.exists()


SCHEMA_OF = {
    "status": {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]},
    "text": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
}


def test_a_schema_field_named_like_an_output_column_is_refused_before_anything_is_sent(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    files = make_job(rows=sample_rows(3), output={"schema": SCHEMA_OF["status"]})
    result = cli("run", str(files.spec))
    assert result.exit_code == 2, result.stderr
    assert sim.stats()["requests"] == 0


def test_a_schema_field_named_like_a_prompt_column_holds_the_answer_and_keeping_both_is_refused(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """The documented rule: the default keeps the prompt's columns less those named like an answer field
    (that column is the answer); asking to keep such a column as well is one line, exit 2, nothing sent."""
    rows = sample_rows(3)
    files = make_job(rows=rows, output={"schema": SCHEMA_OF["text"], "keep_columns": None})
    assert load_job(files.spec).keep_columns == ()
    sim.reset_stats()
    both = make_job(rows=rows, name="both", output={"schema": SCHEMA_OF["text"], "keep_columns": ["text"]})
    result = cli("run", str(both.spec))
    assert result.exit_code == 2, result.stderr
    assert "'text' is both a kept input column and an answer field" in result.stderr
    assert sim.stats()["requests"] == 0


def test_what_glm_batch_keeps_for_a_job_or_itself_is_never_replaced_by_a_named_file_even_with_force(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, tmp_path: Path
) -> None:
    """`schema -o` and another job's `report --html` never write over a rescue journal (paid answers the
    next run takes back), a job's summary, the usage ledger or the facts file, --force or not, through a
    symlink or not: one line, exit 2, the file unchanged, and no answer paid twice."""
    sim.configure(latency_s=0.02)
    files = make_job(
        rows=long_rows(200), run={"concurrency": IN_FLIGHT, "checkpoint_seconds": 60, "checkpoint_rows": 100_000}
    )
    watcher = when_answered(sim, 40, lambda: shutil.rmtree(state_dir_of(files)))
    stopped = cli("run", str(files.spec))
    watcher.join()
    assert stopped.exit_code == 74, stopped.stderr
    (rescue,) = files.output.parent.glob("job.rescue-*.jsonl")
    sim.configure(latency_s=0)
    paid_for_job = sim.stats()["ok"]
    other = make_job(rows=sample_rows(3), name="other")
    assert cli("run", str(other.spec)).exit_code == 0
    assert cli("doctor", "--endpoint", sim.url, "--model", "glm-4.6").exit_code == 0
    paid_elsewhere = sim.stats()["ok"] - paid_for_job
    kept = [rescue, other.summary, *sorted((tmp_path / "ledger").rglob("*.parquet")), tmp_path / "facts.json"]
    assert len(kept) >= 4 and all(p.is_file() for p in kept), kept
    (tmp_path / "link.json").symlink_to(rescue)
    before = {p: p.read_bytes() for p in kept}
    for target in [*kept, tmp_path / "link.json"]:
        for args in (["schema", "-o", str(target)], ["report", str(other.spec), "--html", str(target)]):
            refused = cli(*args, "--force")
            assert refused.exit_code == 2, (args, refused.stdout, refused.stderr)
            assert "never writes over it" in refused.stderr and "Traceback" not in refused.stderr
    assert {p: p.read_bytes() for p in kept} == before
    resumed = cli("run", str(files.spec))
    assert resumed.exit_code == 0, resumed.stderr
    out = pl.read_parquet(files.output)
    assert out.height == 200 and (out.get_column("status") == "ok").all()
    assert sim.stats()["ok"] - paid_elsewhere <= 200 + IN_FLIGHT, "the rescued answers were kept, not paid again"


def test_a_job_whose_files_are_read_only_can_still_be_reported_dry_run_and_shown(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, chattr: Callable[[str, Path], None]
) -> None:
    """A finished job on a disk this user may only read (an archive, a colleague's job): the commands that
    only read it (report, run --dry-run, status, show) work; a run is refused in one line, nothing sent."""
    files = make_job(rows=sample_rows(5))
    assert cli("run", str(files.spec)).exit_code == 0
    write_csv(files.input, sample_rows(6))  # a new row since
    chattr("+i", files.output.parent)
    chattr("+i", files.input.parent)
    paid = sim.stats()["ok"]
    report = cli("report", str(files.spec))
    assert report.exit_code == 0 and "5 rows" in report.stdout, report.stderr
    dry = cli("run", str(files.spec), "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "would send 1 requests for 6 rows (5 already answered)" in dry.stdout
    assert cli("status", str(files.spec)).exit_code == 0
    assert cli("show", str(files.spec)).exit_code == 0
    refused = cli("run", str(files.spec))
    assert refused.exit_code == 2 and "cannot write in" in refused.stderr and "Traceback" not in refused.stderr
    assert sim.stats()["ok"] == paid, "nothing was sent"


@pytest.mark.parametrize("command", ["run", "estimate", "validate"])
@pytest.mark.parametrize(
    ("name", "head", "line"),
    [
        ("in.csv", b"id,text\nr1,fine\n", b"r2,caf\xe9 au lait\n"),
        ("in.jsonl", b'{"id": "r1", "text": "fine"}\n', b'{"id": "r2", "text": "caf\xe9"}\n'),
    ],
)
def test_an_input_that_is_not_utf8_is_one_line_naming_its_line_and_how_to_fix_it(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, command: str, name: str, head: bytes, line: bytes
) -> None:
    """A Latin-1 export (a byte that is not UTF-8 on a later line): exit 2, nothing sent, and the line
    says which file, which line and byte, and to save it as UTF-8."""
    files = make_job()
    data = files.input.with_name(name)
    data.write_bytes(head + line)
    spec = files.spec.read_text().replace(f"data/{files.input.name}", f"data/{name}")
    files.spec.write_text(spec)
    refused = cli(command, str(files.spec))
    assert refused.exit_code == 2 and "Traceback" not in refused.stderr, refused.stderr
    (message,) = refused.stderr.strip().splitlines()
    lineno = 3 if name == "in.csv" else 2
    assert f"{data.name}, line {lineno}: not UTF-8 text (byte 0xe9)" in message and "save it as UTF-8" in message
    assert sim.stats()["requests"] == 0


def test_a_cron_job_stopped_with_a_rescue_on_one_day_takes_it_back_the_next_day_never_paying_twice(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """`{run_date}` in output.path: the state folder breaks mid-run and the answers held go to a rescue
    journal beside that day's output; the next run, on a later day (its output in another folder), reads
    it first, so nothing it holds is paid again."""
    files, job, _ = stopped_dated_run(make_job, sim)
    assert list(job.output_path.parent.glob("job.rescue-*.jsonl"))
    yesterday = job.output_path.parent.with_name("2000-01-01")
    job.output_path.parent.rename(yesterday)  # that run was on another day than the next one
    paid = sim.stats()["ok"]
    assert paid > 40

    today = cli("run", str(files.spec))
    assert today.exit_code == 0, today.stderr
    out = pl.read_parquet(job.output_path)
    assert out.height == 200 and (out.get_column("status") == "ok").all()
    assert sim.stats()["ok"] <= 200 + IN_FLIGHT, f"{sim.stats()['ok']} answers paid for 200 rows"
    assert not list(yesterday.glob("job.rescue-*.jsonl")), "read, kept and deleted"


def test_a_cron_job_whose_state_folder_was_lost_takes_its_answers_back_from_an_earlier_days_output(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """`{run_date}` in output.path, the state folder lost between two days: the next day's run takes the
    answers back from the earlier day's output before anything is paid again, and pays for new rows only."""
    files = make_job(rows=sample_rows(30), output={"path": "out/{run_date}/job.parquet"})
    job = load_job(files.spec)
    assert cli("run", str(files.spec)).exit_code == 0
    job.output_path.parent.rename(job.output_path.parent.with_name("2000-01-01"))  # written on an earlier day
    shutil.rmtree(job.state_dir)
    write_csv(files.input, sample_rows(32))  # and two rows arrived since
    paid = sim.stats()["ok"]

    today = cli("run", str(files.spec))
    assert today.exit_code == 0, today.stderr
    assert "answers_salvaged" in today.stderr
    assert sim.stats()["ok"] - paid == 2, "only the new rows are paid for"
    out = pl.read_parquet(job.output_path)
    assert out.height == 32 and (out.get_column("status") == "ok").all()


def test_the_estimate_says_which_prompts_the_run_will_refuse_as_over_the_context_window(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """A job calibrated by its answers (the simulator counts fewer tokens than the local estimator) gets a
    prompt near the context window: the estimate leaves out exactly the requests the run then fails as
    over_context, and prices exactly the ones it sends."""
    files = make_job(rows=sample_rows(30))
    assert cli("run", str(files.spec)).exit_code == 0
    write_csv(files.input, [*sample_rows(30), {"id": "big", "text": "word " * 200_000}])
    estimate = cli("estimate", str(files.spec), "--json")
    assert estimate.exit_code == 0, estimate.stderr
    said = json.loads(estimate.stdout)
    assert said["input_tokens"]["calibration"]["samples"] >= 20  # calibrated by this job's answers
    sent_before = sim.stats()["requests"]

    run = cli("run", str(files.spec))
    assert run.exit_code == 1, run.stderr
    out = pl.read_parquet(files.output)
    refused = out.filter(pl.col("error_type") == "over_context").height
    assert refused == 1, "the big row is past the window by the run's rule"
    assert said["over_context"]["requests"] == refused
    assert said["requests_answerable"] == sim.stats()["requests"] - sent_before == 0
