"""A hostile world (issue 25, classes 6 and 7): no traceback ever, and broken output streams that never
change a run's outcome.

Class 6: every command has one exception boundary. An error raised on purpose is one line and its exit
code (also from inside a task group); anything else is one line naming what failed and a crash log
with the traceback, exit 70. The named cases (an unknown Jinja filter, format specs in output.path,
a column named twice, a malformed URL, Ray missing, a busy port...) are each refused with one line.

Class 7: the real process (`python -m runner`, endpoint: simulator, offline) run as cron might run it:
stderr closed, both streams on a full device, stdout into `head -n 1`, an ASCII-only encoding or the
C locale with a non-ASCII path. A successful run exits 0 and its summary says 0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
import pytest
import typer
import yaml

from runner.cli import _guarded
from runner.cli.boundary import CRASH_EXIT
from runner.errors import UsageError
from tests.conftest import cli, sample_rows, write_csv
from tests.test_bad_input import assert_refused

ROOT = Path(__file__).resolve().parent.parent


def assert_refused_by_run(result, *fragments: str) -> None:
    """As assert_refused, for `run`: its JSON progress lines (a `start` may precede a refusal found while
    planning) aside, one error line, exit 2."""
    lines = [line for line in result.stderr.splitlines() if not line.startswith('{"ts"')]
    assert_refused(type(result)(result.exit_code, result.stdout, "\n".join(lines)), *fragments)


# --- class 6: one exception boundary -----------------------------------------------------------------


def test_an_unexpected_error_is_one_line_and_a_crash_log_with_exit_70(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))

    def broken() -> None:
        raise KeyError("a defect of ours")

    with pytest.raises(typer.Exit) as exited:
        _guarded(broken)

    assert exited.value.exit_code == CRASH_EXIT == 70
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "KeyError" in err and "a defect of ours" in err
    logs = list((tmp_path / "state" / "glm-batch" / "crashes").glob("crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in err
    assert "Traceback" in logs[0].read_text(encoding="utf-8")


def test_an_error_raised_on_purpose_inside_a_task_group_keeps_its_line_and_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def grouped() -> None:
        raise ExceptionGroup("tasks", [ExceptionGroup("inner", [UsageError("x.yaml: prompt: bad")])])

    with pytest.raises(typer.Exit) as exited:
        _guarded(grouped)

    assert exited.value.exit_code == 2
    assert capsys.readouterr().err.strip() == "glm-batch: error: x.yaml: prompt: bad"


def test_the_readme_documents_the_crash_exit_code() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"| {CRASH_EXIT} |" in readme


REFUSED = {
    "unknown filter in the template": ({"prompt": {"template": "{{ text | nosuch }}"}}, ["prompt.template", "nosuch"]),
    "unknown filter in a message turn": (
        {
            "prompt": {
                "template": None,
                "messages": [
                    {"role": "user", "content": "Say yes."},
                    {"role": "assistant", "content": "{{ 'yes' | shout }}"},
                    {"role": "user", "content": "{{ text }}"},
                ],
            }
        },
        ["prompt.messages.1.content", "shout"],
    ),
    "unknown test": ({"prompt": {"template": "{% if text is weird %}x{% endif %}"}}, ["weird"]),
    "format spec in output.path": ({"output": {"path": "out/{name:d}.parquet"}}, ["output.path", "{name:d}"]),
    "conversion in output.path": ({"output": {"path": "out/{run_date!x}.parquet"}}, ["output.path", "{run_date!x}"]),
    "huge width in output.path": ({"output": {"path": "out/{name:>5000}.parquet"}}, ["output.path", "{name:>5000}"]),
    "keep_columns naming a column twice": ({"output": {"keep_columns": ["text", "text"]}}, ["keep_columns", "twice"]),
    "input.columns naming a column twice": ({"input": {"columns": ["text", "text"]}}, ["input.columns", "twice"]),
    "an endpoint URL that does not parse": ({"model": {"endpoint": "http://[::1"}}, ["model.endpoint", "[::1"]),
    "an endpoint URL with no host": ({"model": {"endpoint": "http://"}}, ["model.endpoint", "no host"]),
    "an endpoint URL with a bad port": ({"model": {"endpoint": "http://localhost:99999"}}, ["model.endpoint"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_hostile_spec_is_one_line_and_exit_2_in_validate_and_run(make_job, sim, case: str) -> None:
    change, fragments = REFUSED[case]
    job = make_job(**change)

    assert_refused(cli("validate", str(job.spec)), str(job.spec), *fragments)
    assert_refused_by_run(cli("run", str(job.spec)), str(job.spec), *fragments)
    assert sim.stats()["requests"] == 0


def test_ray_as_the_engine_without_ray_installed_is_refused(make_job, sim, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # how Python spells "this module cannot be imported"
    job = make_job(run={"engine": "ray"})

    assert_refused(cli("run", str(job.spec)), "run.engine", "not installed")
    assert sim.stats()["requests"] == 0


def test_a_template_failing_on_every_row_stops_an_online_run_with_exit_2(make_job, sim) -> None:
    job = make_job(prompt={"template": "{{ text.no_such_attribute.deeper }}"})

    assert_refused_by_run(cli("run", str(job.spec)), "the template fails on each of the first")
    assert sim.stats()["requests"] == 0


def test_the_python_api_raises_that_refusal_as_a_usage_error(make_job, sim) -> None:
    import runner

    job = make_job(prompt={"template": "{{ text.no_such_attribute.deeper }}"})

    with pytest.raises(UsageError, match="the template fails on each of the first"):
        runner.run_job(job.spec)
    assert sim.stats()["requests"] == 0


def test_a_column_the_job_never_reads_may_have_other_types_in_other_files(make_job, tmp_path: Path, sim) -> None:
    job = make_job(input={"paths": ["data/*.jsonl"]})
    (tmp_path / "data" / "a.jsonl").write_text(
        '{"id": "a", "text": "one", "extra": 1}\n{"id": "b", "text": "two", "extra": 2}\n', encoding="utf-8"
    )
    (tmp_path / "data" / "b.jsonl").write_text('{"id": "c", "text": "three", "extra": "x"}\n', encoding="utf-8")

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    assert pl.read_parquet(job.output).get_column("id").sort().to_list() == ["a", "b", "c"]


def test_simulate_on_a_busy_port_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        assert_refused(cli("simulate", "--port", str(port)), f"--port {port}", "choose another port")


def test_simulate_on_a_port_out_of_range_is_refused() -> None:
    result = cli("simulate", "--port", "70000")

    assert result.exit_code == 2 and "Traceback" not in result.stderr


def test_a_crash_log_goes_under_the_temp_folder_when_the_state_folder_cannot_take_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "not-a-folder").write_text("a file where the state folder should be")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "not-a-folder"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))

    def broken() -> None:
        raise KeyError("a defect of ours")

    with pytest.raises(typer.Exit) as exited:
        _guarded(broken)

    assert exited.value.exit_code == 70
    logs = list((tmp_path / "tmp" / "glm-batch-crashes").glob("crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in capsys.readouterr().err


# --- class 7: broken cron environments ----------------------------------------------------------------


def _offline_job(folder: Path) -> Path:
    """A 3-row job on the in-process simulator, in `folder` (whose name is not ASCII)."""
    write_csv(folder / "data" / "in.csv", sample_rows(3))
    spec = {
        "version": 1,
        "name": "cron",
        "input": {"paths": ["data/in.csv"], "id_column": "id"},
        "prompt": {"template": "Summarise: {{ text }}"},
        "model": {"name": "glm-4.6", "endpoint": "simulator", "max_tokens": 32},
        "output": {"path": "out/{name}.parquet"},
    }
    path = folder / "cron.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def _outcome(spec: Path, returncode: int) -> tuple[int, int, list[str]]:
    """The process's exit code, the one its summary records, and each row's status."""
    output = spec.parent / "out" / "cron.parquet"
    summary = json.loads(output.with_suffix(".summary.json").read_text(encoding="utf-8"))
    return returncode, summary["exit_code"], pl.read_parquet(output).get_column("status").to_list()


RUN = [sys.executable, "-m", "runner", "run"]

# Each: how the shell starts the run, and what it adds to the environment.
BROKEN = {
    "stderr closed": ('exec "$@" 2>&-', {}),
    "stdout and stderr on a full device": ('exec "$@" >/dev/full 2>/dev/full', {}),
    "an ASCII-only stream encoding": ('exec "$@"', {"PYTHONIOENCODING": "ascii"}),
    "the C locale without UTF-8 mode": ('exec "$@"', {"LC_ALL": "C", "PYTHONUTF8": "0"}),
}


def test_a_broken_output_stream_never_changes_the_outcome(tmp_path: Path) -> None:
    """The real process, as cron might start it; the five environments run side by side."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    base = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_STATE_HOME": str(tmp_path / "state")}
    base.pop("PYTHONUTF8", None)
    running: dict[str, tuple[Path, subprocess.Popen[bytes]]] = {}
    for i, (case, (shell, extra)) in enumerate(sorted(BROKEN.items())):
        spec = _offline_job(tmp_path / f"données été {i}")
        command = ["sh", "-c", shell, "sh", *RUN, str(spec)]
        running[case] = (spec, subprocess.Popen(command, env={**base, **extra}, stdin=subprocess.DEVNULL))
    # `| head -n 1`: both streams into one pipe whose reader goes away after the first line.
    spec = _offline_job(tmp_path / "données été head")
    head = subprocess.Popen(
        [*RUN, str(spec), "--log-format", "text"], env=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert head.stdout is not None
    assert head.stdout.readline()
    head.stdout.close()
    running["stdout piped into head -n 1"] = (spec, head)

    outcomes = {case: _outcome(spec, process.wait(timeout=180)) for case, (spec, process) in running.items()}

    assert outcomes == dict.fromkeys(running, (0, 0, ["ok"] * 3))
