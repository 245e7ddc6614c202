"""Which models and endpoints may use the Batch API (issue 22, item 1).

Zhipu's eligibility list names the GLM-4 family only; GLM-4.5 and newer go to the Batch API only when
`glm-batch doctor --batch` proved them on the account (runner.job.facts) or the job accepts the risk
(`run.batch.allow_unconfirmed`). api.z.ai has no Batch API. A refusal is one line, exit 2, before
anything is written or sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import polars as pl
import pytest
from typer.testing import CliRunner

from runner.cli import app
from runner.job.facts import record_facts
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, sample_rows

FAST_POLL = {"poll_initial_s": 0.02, "poll_max_s": 0.1}


def assert_refused_before_anything_is_written(result_stderr: str, files: JobFiles, sim: SimulatorThread) -> str:
    lines = result_stderr.strip().splitlines()
    assert len(lines) == 1, result_stderr
    assert not files.output.parent.exists()  # no output, no state directory
    assert sim.stats()["files"] == 0 and sim.stats()["requests"] == 0
    return lines[0]


@pytest.mark.parametrize("mode", ["batch", "hybrid"])
def test_a_model_off_zhipus_list_is_refused_with_the_ways_out(
    mode: str, make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    run = {"mode": mode, "deadline": "1h"} if mode == "hybrid" else {"mode": mode}
    files = make_job(rows=sample_rows(3), model={"name": "glm-4.7"}, run=run)
    result = cli("run", str(files.spec))
    assert result.exit_code == 2
    line = assert_refused_before_anything_is_written(result.stderr, files, sim)
    assert "glm-4.7 is not on Zhipu's Batch API eligibility list" in line
    assert "glm-4-air-250414" in line and "run.batch.allow_unconfirmed: true" in line and "doctor" in line


def test_allow_unconfirmed_sends_it_and_says_it_may_fail_at_validation(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    files = make_job(
        rows=sample_rows(4),
        model={"name": "glm-4.7"},
        run={"mode": "batch", "batch": {**FAST_POLL, "allow_unconfirmed": True}},
    )
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    warned = [e for e in events if e.get("event") == "batch_unconfirmed"]
    assert len(warned) == 1 and "may fail at validation" in warned[0]["warning"]
    assert (pl.read_parquet(files.output).get_column("api") == "batch").all()


def test_a_model_doctor_proved_on_the_account_goes_to_the_batch_api(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    files = make_job(rows=sample_rows(4), model={"name": "glm-4.7"}, run={"mode": "batch", "batch": FAST_POLL})
    assert cli("run", str(files.spec)).exit_code == 2
    record_facts(sim.url, "glm-4.7", source="doctor", batch_eligible=True)
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr
    assert sim.stats()["billed"]["batch"] == 4


@pytest.mark.parametrize("mode", ["batch", "hybrid"])
def test_zai_has_no_batch_api_so_batch_and_hybrid_are_refused_there(
    mode: str, make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    run = {"mode": mode, "deadline": "1h"} if mode == "hybrid" else {"mode": mode}
    files = make_job(rows=sample_rows(3), model={"name": "glm-4-air-250414", "endpoint": "zai"}, run=run)
    result = cli("run", str(files.spec))
    assert result.exit_code == 2
    line = assert_refused_before_anything_is_written(result.stderr, files, sim)
    assert "endpoint zai (api.z.ai) has no Batch API" in line and "model.endpoint: zhipu" in line


def test_an_estimate_on_zai_offers_no_batch_price(make_job: Callable[..., JobFiles]) -> None:
    zai = make_job(rows=sample_rows(5), name="zai", model={"endpoint": "zai"})
    zhipu = make_job(rows=sample_rows(5), name="zhipu", model={"name": "glm-4-plus", "endpoint": "zhipu"})
    on_zai = json.loads(cli("estimate", str(zai.spec), "--json").stdout)
    on_zhipu = json.loads(cli("estimate", str(zhipu.spec), "--json").stdout)
    assert on_zai["batch_api_expected"] is None
    assert on_zai["modes"]["batch"] == on_zai["modes"]["hybrid"]
    assert on_zai["modes"]["batch"]["eligible"] is False and "no Batch API" in on_zai["modes"]["batch"]["why"]
    assert on_zhipu["modes"]["batch"]["cost"] == pytest.approx(on_zhipu["modes"]["online"]["cost"] / 2, abs=1e-6)
    table = cli("estimate", str(zai.spec)).stdout
    assert "batch mode" in table and "no Batch API" in table


def test_an_estimate_says_why_batch_is_not_available_once(make_job: Callable[..., JobFiles]) -> None:
    """The hybrid row is refused for the batch row's reason: the long reason is printed once."""
    files = make_job(rows=sample_rows(5), model={"name": "glm-4.5-air", "endpoint": "zhipu"})
    result = CliRunner().invoke(app, ["estimate", str(files.spec)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.stdout.splitlines() if "mode" in line
    }
    assert rows["batch mode"].startswith("not available: glm-4.5-air is not on Zhipu's Batch API eligibility list")
    assert rows["hybrid mode"] == "not available (see batch)"
    assert result.stdout.count("eligibility list") == 1


def test_status_and_report_still_read_a_batch_job_the_rule_now_refuses(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """A batch job a run finished before its model was refused for batch (here: allowed at the time):
    status and report still read it; only sending is refused."""
    files = make_job(
        rows=sample_rows(3),
        model={"name": "glm-4.7"},
        run={"mode": "batch", "batch": {**FAST_POLL, "allow_unconfirmed": True}},
    )
    assert cli("run", str(files.spec)).exit_code == 0
    spec = files.spec.read_text(encoding="utf-8").replace("allow_unconfirmed: true", "allow_unconfirmed: false")
    files.spec.write_text(spec, encoding="utf-8")
    assert cli("run", str(files.spec)).exit_code == 2
    status = cli("status", str(files.spec))
    assert status.exit_code == 0 and "3" in status.stdout, status.stderr
    assert cli("report", str(files.spec)).exit_code == 0
