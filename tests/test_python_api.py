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
