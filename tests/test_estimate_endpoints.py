"""An estimate learns only from answers of its own kind: a job pointed at a real endpoint never
calibrates its input tokens, output lengths or wall time on the built-in simulator's answers, and a
simulated job never on a real endpoint's (here the loopback simulator stands in for a real endpoint:
the runner sees a URL, books real spend and keys nothing as simulated)."""

from __future__ import annotations

import json

from tests.conftest import cli, sample_rows


def estimate(spec: str, endpoint: str) -> dict:
    result = cli("estimate", spec, "--json", "--fresh", "--set", f"model.endpoint={endpoint}")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_a_real_endpoint_estimate_never_calibrates_on_simulated_answers(make_job, sim) -> None:
    job = make_job(sample_rows(30), model={"endpoint": "simulator"})
    assert cli("run", str(job.spec)).exit_code == 0

    simulated = estimate(str(job.spec), "simulator")
    real = estimate(str(job.spec), sim.url)

    assert simulated["input_tokens"]["calibration"]["basis"] == "measured on 30 answers of this job"
    assert real["input_tokens"]["calibration"] == {"ratio": 1.0, "samples": 0, "basis": "uncalibrated defaults"}
    assert simulated["output_tokens"]["basis"].startswith("mean of 30 measured answers")
    assert real["output_tokens"]["basis"].startswith("assumed") and real["wall_time_s"]["latency_basis"] == "assumed"


def test_a_simulated_estimate_never_calibrates_on_a_real_endpoints_answers(make_job, sim) -> None:
    job = make_job(sample_rows(30))  # sent to the loopback URL: real, as far as the runner knows
    assert cli("run", str(job.spec)).exit_code == 0

    real = estimate(str(job.spec), sim.url)
    simulated = estimate(str(job.spec), "simulator")

    assert real["input_tokens"]["calibration"]["samples"] == 30
    assert simulated["input_tokens"]["calibration"]["samples"] == 0
