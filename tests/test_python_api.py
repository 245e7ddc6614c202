"""The Python API as a notebook meets it: the blocking calls refuse a running event loop and name the
async ones, an async estimate exists, `dir(runner)` shows the API, and progress goes to the `glm_batch`
logger (silent unless logging is configured), never as JSON lines on stderr."""

from __future__ import annotations

import asyncio
import logging

import pytest

import runner
from tests.conftest import sample_rows


def test_blocking_calls_inside_a_running_loop_point_to_the_async_ones(make_job, sim) -> None:
    job = make_job(sample_rows(3))

    async def notebook_cell() -> None:
        with pytest.raises(RuntimeError, match=r"inside a running event loop .*await runner\.arun_job\(\.\.\.\)"):
            runner.run_job(str(job.spec))
        with pytest.raises(RuntimeError, match=r"await runner\.aestimate_job\(\.\.\.\)"):
            runner.estimate_job(str(job.spec))
        report = await runner.aestimate_job(str(job.spec))
        assert report["requests_to_send"] == 3
        assert (await runner.arun_job(str(job.spec))).ok

    asyncio.run(notebook_cell())
    assert sim.stats()["requests"] == 3  # only arun_job sent


def test_dir_and_all_list_the_api() -> None:
    api = {"RunResult", "aestimate_job", "arun_job", "estimate_job", "load_job", "run_job"}
    assert api <= set(runner.__all__) and api <= set(dir(runner))
    assert callable(runner.aestimate_job)


def test_the_api_is_quiet_by_default_and_logs_through_logging(
    make_job, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    job = make_job(sample_rows(4))

    assert runner.run_job(str(job.spec)).ok
    runner.estimate_job(str(job.spec))

    out, err = capfd.readouterr()
    assert out == "" and err == ""
    with caplog.at_level(logging.INFO, logger="glm_batch"):
        result = runner.run_job(str(job.spec), fresh=True)
    ends = [r for r in caplog.records if r.name == "glm_batch" and r.glm_batch["event"] == "end"]
    assert len(ends) == 1 and ends[0].glm_batch["message"] == result.message


def test_a_stopped_run_returns_its_exit_code_rather_than_raising(make_job, sim) -> None:
    """README (Python API): the same rules as the command line; a stop is a result, not an exception."""
    budget = make_job(sample_rows(50), name="budget", run={"max_cost": 0.004})
    stopped = runner.run_job(str(budget.spec))
    assert isinstance(stopped, runner.RunResult)
    assert (stopped.exit_code, stopped.ok, stopped.summary.stopped) == (4, False, "budget")

    sim.configure(faults=("429_1113",), fault_rate=1.0)
    aborted = runner.run_job(str(make_job(sample_rows(5), name="broke").spec))
    assert aborted.exit_code == 3 and "top up" in aborted.message


def test_estimate_job_is_the_report_estimate_json_prints(make_job, sim) -> None:
    import json

    from tests.conftest import cli

    job = make_job(sample_rows(8))
    printed = json.loads(cli("estimate", str(job.spec), "--json").stdout)
    assert runner.estimate_job(str(job.spec)) == printed
