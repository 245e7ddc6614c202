"""The seams: a Job crosses process boundaries, executors are interchangeable, the Python API runs jobs,
an exception nobody classified is never a permanent failure, and an output's cost adds up to what was paid."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator

import polars as pl
import pytest
from aiohttp import web

import runner
from runner.engine import execute
from runner.job.prompts import RequestBuilder
from runner.job.resolve import load_job
from runner.local import LocalSender
from runner.observe.progress import make_reporter
from runner.runs import RunOptions
from runner.send.fake import FakeExecutor
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, messages_endpoint, sample_rows


def test_a_job_pickles_and_renders_the_same_requests_on_the_other_side(make_job: Callable[..., JobFiles]) -> None:
    """A resolved Job (templates, answer shape, catalogue entry) survives pickle, and a builder made
    from the copy gives every row the same request key: a worker can plan what the driver planned."""
    job = load_job(make_job(output={"path": "out/job.parquet", "labels": ["a", "b"]}).spec)
    copy = pickle.loads(pickle.dumps(job))
    row = {"text": "fine", "_row": 0, "_id": "r0"}
    assert copy == job
    assert RequestBuilder(copy).build(row) == RequestBuilder(job).build(row)
    assert pickle.loads(pickle.dumps(RequestBuilder(job))).build(row).key == RequestBuilder(job).build(row).key


def test_importing_runner_loads_neither_the_sdk_nor_the_simulator() -> None:
    """`import runner` (and loading a job) is cheap and side-effect free: no SDK, no simulator, no
    environment changes; they load when a run needs them."""
    code = (  # polars sets its own allocator variable when it loads: load it first
        "import os, sys, polars; env = dict(os.environ); import runner; from runner.api import load_job; "
        "print(sorted(m for m in ('anthropic', 'runner.simulator.simulator', 'runner.engine') if m in sys.modules));"
        "print(env == dict(os.environ))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "True"


def test_the_python_api_runs_a_job_and_returns_its_summary_and_output(make_job: Callable[..., JobFiles]) -> None:
    """runner.run_job takes a spec path and --set-style overrides, and returns how the run ended."""
    job = make_job(rows=sample_rows(12))
    result = runner.run_job(job.spec, set={"run.concurrency": 2}, reporter=make_reporter("json"))
    assert result.ok and result.exit_code == 0
    assert result.output == job.output
    assert pl.read_parquet(job.output).height == 12
    assert result.summary.answered_ok == 12
    again = runner.run_job(job.spec, set={"run.concurrency": 2})
    assert again.ok and again.summary.requests_queued == 0  # nothing is sent twice


async def test_the_async_api_runs_inside_a_running_loop(make_job: Callable[..., JobFiles]) -> None:
    """A notebook already runs an event loop: arun_job is awaited there."""
    job = make_job(rows=sample_rows(5))
    result = await runner.arun_job(job.spec)
    assert result.ok and pl.read_parquet(job.output).height == 5


async def test_the_engine_runs_with_any_executor_behind_the_protocol(make_job: Callable[..., JobFiles]) -> None:
    """The in-process fake executor stands in for the online one: planning, state and output are the
    same, and a second run with the real executor sends nothing (answers are keyed, not owned)."""
    files = make_job(rows=sample_rows(30))
    job = load_job(files.spec)
    fake = FakeExecutor()
    report = await execute(
        job, api_key="k", options=RunOptions(), reporter=make_reporter("json"), sender=LocalSender(fake)
    )
    assert report.exit_code == 0 and fake.sent == 30
    out = pl.read_parquet(files.output)
    assert out.get_column("response_text").str.starts_with("answer ").all()
    assert out.get_column("request_key").n_unique() == 30
    again = await execute(job, api_key="k", options=RunOptions(), reporter=make_reporter("json"))
    assert again.summary.requests_queued == 0


@pytest.fixture
def html_gateway() -> Iterator[str]:
    """An endpoint whose gateway answers every request with status 200 and an HTML page as JSON."""
    calls: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(1)
        return web.Response(
            status=200, text="<html><body>502 Bad Gateway</body></html>", content_type="application/json"
        )

    with messages_endpoint(handler) as url:
        yield url


def test_an_unparseable_200_is_retried_and_stays_retryable_for_the_next_run(
    make_job: Callable[..., JobFiles], html_gateway: str, sim: SimulatorThread
) -> None:
    """A 200 whose body is not JSON is nobody's classified fault: it is retried up to max_attempts,
    recorded as retryable, and the next run (here against a healthy endpoint) sends it again."""
    files = make_job(rows=sample_rows(3), model={"endpoint": html_gateway}, run={"max_attempts": 3})
    first = cli("run", str(files.spec))
    assert first.exit_code == 1
    events = [json.loads(line) for line in first.stderr.splitlines() if line.startswith("{")]
    end = next(e for e in events if e["event"] == "end")
    assert end["answered_error"] == 3 and end["retries"]  # each was tried 3 times
    second = cli("run", str(files.spec), "--set", f"model.endpoint={sim.url}")
    # The endpoint is part of a request's identity, so here the healthy endpoint gets all 3 anew;
    # what matters is that nothing was settled as failed for good.
    assert second.exit_code == 0
    third = cli("run", str(files.spec))  # back on the broken gateway: still retryable, so sent again
    assert third.exit_code == 1
    events = [json.loads(line) for line in third.stderr.splitlines() if line.startswith("{")]
    assert next(e for e in events if e["event"] == "end")["requests_queued"] == 3


def test_the_cost_column_adds_up_to_what_was_paid(make_job: Callable[..., JobFiles], sim: SimulatorThread) -> None:
    """Rows with identical prompts share one request: only the first carries its cost, the others are
    0 and name the row they reused, so sum(cost) is the spend (and the simulator billed each once)."""
    rows = [{"id": f"r{i}", "text": f"text {i % 4}"} for i in range(24)]  # 4 distinct prompts
    files = make_job(rows=rows)
    assert cli("run", str(files.spec)).exit_code == 0
    out = pl.read_parquet(files.output)
    summary = json.loads(files.summary.read_text())
    assert summary["requests_queued"] == 4
    assert out.get_column("cost").sum() == pytest.approx(summary["cost"]["spent"])
    payers = out.filter(pl.col("reused_from").is_null())
    assert payers.height == 4 and payers.get_column("id").to_list() == ["r0", "r1", "r2", "r3"]
    reused = out.filter(pl.col("reused_from").is_not_null())
    assert reused.get_column("cost").sum() == 0
    assert reused.filter(pl.col("id") == "r5").get_column("reused_from").item() == "r1"
    assert sim.stats()["distinct_prompts_answered"] == 4 and sim.stats()["prompts_answered_twice"] == 0


def test_the_output_column_rule_knows_every_name_the_assembly_uses() -> None:
    """runner.columns spells the row map's and the stored answers' column names out (it cannot
    import the modules that own them without a cycle); they must not drift apart."""
    from runner.columns import OUTPUT_COLUMNS, WORKING_COLUMNS
    from runner.job.inputs import ID, ROW
    from runner.job.prompts import SAMPLE
    from runner.records import KEY, RESULT_SCHEMA

    stored_only = set(RESULT_SCHEMA) - set(OUTPUT_COLUMNS)
    assert {ROW, ID, SAMPLE, KEY, *stored_only} <= set(WORKING_COLUMNS)
