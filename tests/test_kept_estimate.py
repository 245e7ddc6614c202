"""A run compares its cost only with an estimate made for the same model, endpoint and requests, and
takes the estimate's figure for its own mode (online or batch): through the CLI, on the simulator."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, sample_rows

FAST_POLL = {"poll_initial_s": 0.02, "poll_max_s": 0.1}


def estimate_then_run(job: JobFiles, estimate_sets: list[str], run_sets: list[str]) -> dict[str, Any]:
    """`estimate --fresh` with one set of overrides, then a full run (`--fresh`) with another: the run's
    cost section."""
    sets = [a for s in estimate_sets for a in ("--set", s)]
    assert cli("estimate", str(job.spec), "--json", "--fresh", *sets).exit_code == 0
    result = cli("run", str(job.spec), "--fresh", *[a for s in run_sets for a in ("--set", s)])
    assert result.exit_code == 0, result.stderr
    cost: dict[str, Any] = json.loads(job.summary.read_text())["cost"]
    return cost


def test_an_estimate_for_another_model_is_not_compared(make_job: Callable[..., JobFiles], sim: SimulatorThread) -> None:
    job = make_job(sample_rows(12), model={"name": "glm-4-air-250414"})

    cost = estimate_then_run(job, ["model.name=glm-4.5-air"], [])

    assert cost["estimate"]["estimated"] is None and cost["estimate"]["error_pct"] is None
    assert cost["estimate"]["no_match"].endswith("differs in model")
    assert "glm-4.5-air" in cost["estimate"]["no_match"]


def test_an_estimate_for_another_prompt_is_not_compared(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    job = make_job(sample_rows(12))

    cost = estimate_then_run(job, ["prompt.system=Answer at length, with examples."], [])

    assert cost["estimate"]["estimated"] is None
    assert "prompt or settings" in cost["estimate"]["no_match"]


def test_an_estimate_for_the_same_job_is_compared(make_job: Callable[..., JobFiles], sim: SimulatorThread) -> None:
    job = make_job(sample_rows(12), model={"name": "glm-4-air-250414"})

    cost = estimate_then_run(job, ["run.concurrency=2"], [])  # how requests go out: still the same requests

    assert cost["estimate"]["mode"] == "online" and "no_match" not in cost["estimate"]
    assert cost["estimate"]["spent"] == cost["spent"] > 0
    assert cost["estimate"]["estimated"] > 0 and isinstance(cost["estimate"]["error_pct"], float)


def test_a_batch_run_is_compared_with_the_estimates_batch_figure(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    job = make_job(sample_rows(12), model={"name": "glm-4-air-250414"}, run={"batch": FAST_POLL})
    report = json.loads(cli("estimate", str(job.spec), "--json").stdout)  # made for the job's mode: online

    assert cli("run", str(job.spec), "--set", "run.mode=batch").exit_code == 0

    estimate = json.loads(job.summary.read_text())["cost"]["estimate"]
    assert estimate["mode"] == "batch"
    assert report["modes"]["batch"]["cost"] == pytest.approx(report["cost"]["expected"] / 2, abs=1e-6)
    assert estimate["estimated"] == pytest.approx(report["modes"]["batch"]["cost"], abs=1e-6)  # all 12 answered


def test_an_estimate_kept_without_saying_what_it_priced_is_not_compared(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    job = make_job(sample_rows(6))
    assert cli("estimate", str(job.spec), "--json").exit_code == 0
    kept = next(job.spec.parent.rglob("estimate.json"))
    report = json.loads(kept.read_text())
    del report["made_for"]  # as an earlier version kept it
    kept.write_text(json.dumps(report))

    assert cli("run", str(job.spec)).exit_code == 0

    estimate = json.loads(job.summary.read_text())["cost"]["estimate"]
    assert estimate["estimated"] is None and "older version" in estimate["no_match"]
