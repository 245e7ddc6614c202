"""Start-up: what each command loads. `--help`, `validate`, `status` and `estimate` send nothing, so they
never import the SDK, an HTTP client, the retry layer or the engine; a run starts importing the SDK early
only when it will send through it. (How long they take is measured in bench/commands.py and
bench/startup.py, as ratios to the interpreter and to importing the SDK; tests pin what is imported.)"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runner.api import will_send_online
from runner.cli import COMMANDS, app, app_for
from runner.job.resolve import load_job
from tests.conftest import JobFiles, cli, sample_rows, write_csv

# What sending needs and a command that sends nothing must not pay for. (tenacity stays: runner.send.retries
# imports it at the top, since a retry policy is built for every request.)
SENDING = (
    "anthropic",
    "aiohttp",
    "httpx2",
    "aiolimiter",
    "runner.engine",
    "runner.send.client",
    "runner.send.online",
    "runner.simulator.simulator",
)


def loaded(*args: str, watch: tuple[str, ...] = SENDING) -> list[str]:
    """Run `glm-batch ARGS` in a fresh interpreter; the modules of `watch` it had imported when it ended."""
    code = (
        "import json, sys\n"
        "from runner.cli import main\n"
        f"sys.argv = ['glm-batch', *{list(args)!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        f"print(json.dumps([code, sorted(m for m in {watch!r} if m in sys.modules)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    exit_code, modules = json.loads(done.stdout.splitlines()[-1])
    assert exit_code in (0, None), done.stderr
    return list(modules)


def test_help_loads_no_job_machinery() -> None:
    """`--help` needs the command line and its help text: no spec models, templates, input reader or SDK.
    (A command's own --help parses its options, for which typer loads pydantic; the rest stays out.)"""
    heavy = (*SENDING, "polars", "jinja2", "yaml", "runner.job.resolve", "runner.plan")
    assert loaded("--help", watch=(*heavy, "pydantic")) == []
    assert loaded("run", "--help", watch=heavy) == []


def test_validate_loads_nothing_that_sends(make_job: Callable[..., JobFiles]) -> None:
    """`validate` reads the spec and the input and renders rows: nothing of the SDK, its HTTP clients or
    the engine, and not the planner either (its event loop, retry layer and accounting): the run's
    RequestBuilder renders the rows it prints."""
    job = make_job()
    assert loaded("validate", str(job.spec), watch=(*SENDING, "asyncio", "tenacity", "runner.plan")) == []


def test_status_loads_nothing_that_sends_or_plans(make_job: Callable[..., JobFiles]) -> None:
    """`status` reads the job's state (a real run's, here): it neither sends nor renders, so not even the
    event loop or the planner are imported. After a finished run its counts come from small JSON
    records, so it reads no Parquet (no polars), parses no template (no jinja2) and draws nothing
    (no rich)."""
    job = make_job()
    assert cli("run", str(job.spec)).exit_code == 0
    watch = (*SENDING, "tenacity", "asyncio", "runner.plan", "polars", "jinja2", "rich")
    assert loaded("status", str(job.spec), watch=watch) == []


def test_whether_a_run_will_send_is_decided_without_polars(make_job: Callable[..., JobFiles]) -> None:
    """The SDK's background import starts once a run knows it will send; for a job that ran before, that
    is the row map's fingerprint (JSON), so nothing heavy is imported ahead of the SDK's thread."""
    job = make_job()
    assert cli("run", str(job.spec)).exit_code == 0
    code = (
        "import sys\n"
        "from runner.api import load_job, will_send_online\n"
        f"print(will_send_online(load_job({str(job.spec)!r}), fresh=False), 'polars' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("args", [["validate", "--help"], ["run", "--help"], ["status", "--bogus"], ["vaildate"]])
def test_the_app_built_for_one_command_answers_as_the_whole_app(args: list[str]) -> None:
    """`glm-batch COMMAND` runs an app holding that command alone (typer inspects every registered
    command before running one); its help and its errors are the whole app's."""
    runner = CliRunner()
    whole = runner.invoke(app, args, prog_name="glm-batch")
    alone = runner.invoke(app_for(args), args, prog_name="glm-batch")
    assert (alone.exit_code, alone.output) == (whole.exit_code, whole.output)
    assert (app_for(args) is app) == (args[0] not in COMMANDS)


def test_estimate_without_a_pilot_loads_nothing_that_sends(make_job: Callable[..., JobFiles]) -> None:
    """`estimate` counts tokens locally unless --exact or --pilot asks for the endpoint."""
    job = make_job()
    assert loaded("estimate", str(job.spec)) == []


def test_a_finished_job_run_again_never_imports_the_sdk(make_job: Callable[..., JobFiles]) -> None:
    """Nothing changed since a run that answered every row: the re-run writes the output and never loads
    the SDK, not even in the background."""
    job = make_job()
    assert cli("run", str(job.spec)).exit_code == 0
    assert "anthropic" not in loaded("run", str(job.spec), "--log-format", "json", watch=("anthropic",))


def test_a_local_run_never_loads_the_distributed_package(make_job: Callable[..., JobFiles]) -> None:
    """The caller chooses the sender (runner.senders): a run on the local engine sends every row without
    importing runner.distributed (nor Ray)."""
    job = make_job()
    watch = ("runner.distributed", "runner.distributed.sender", "ray", "runner.send.client")
    assert loaded("run", str(job.spec), "--log-format", "json", watch=watch) == ["runner.send.client"]


@pytest.mark.parametrize(
    ("change", "sends"),
    [
        ("nothing", False),
        ("--fresh", True),
        ("new input rows", True),
        ("the prompt", True),
        ("batch mode", False),
    ],
)
def test_a_run_imports_the_sdk_early_only_when_it_will_send(
    make_job: Callable[..., JobFiles], tmp_path: Path, change: str, sends: bool
) -> None:
    """The SDK is imported in the background, while the input is checked and the first rows render, by a
    run that will send online: a new job, --fresh, or a job whose input or spec changed since its last
    run. A re-run of an unchanged job may have nothing to send and must not pay for it; batch mode and
    Ray workers do not send through this process's SDK."""
    files = make_job()
    assert will_send_online(load_job(files.spec), fresh=False)  # never run: everything is to send
    assert cli("run", str(files.spec)).exit_code == 0
    overrides: list[str] = []
    if change == "new input rows":
        write_csv(files.input, sample_rows(25))
    elif change == "the prompt":
        overrides = ["prompt.template=Summarise briefly: {{ text }}"]
    elif change == "batch mode":
        overrides = ["run.mode=batch", "model.name=glm-4-air-250414"]
    job = load_job(files.spec, overrides)
    assert will_send_online(job, fresh=change == "--fresh") is sends
