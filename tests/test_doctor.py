"""`glm-batch doctor`: the first-real-run probe, against the simulator over real sockets.

What doctor finds is stored (runner.job.facts) and changes what the next run does: its concurrency
default and whether its model may go to the Batch API.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from runner.job.facts import load_facts
from runner.job.resolve import load_job
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli, sample_rows

FAST_POLL = {"poll_initial_s": 0.02, "poll_max_s": 0.1}


def doctor(*args: str) -> tuple[int, dict[str, Any]]:
    result = cli("doctor", *args, "--json", "--batch-wait", "20")
    assert result.stdout.strip(), result.stderr
    return result.exit_code, json.loads(result.stdout)


def checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def test_doctor_measures_the_account_and_the_next_run_starts_from_it(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """Concurrency capped at 3 by the endpoint: doctor's ramp stops at the first 1302 and records 3,
    which becomes the default of a job that names none (the catalogue says 5 for glm-4.6); its 2-line
    batch passes validation, so a batch job on glm-4.6, refused before, now runs."""
    sim.configure(concurrency_cap=3, latency_s=0.05)
    files = make_job(rows=sample_rows(6), run={"concurrency": None, "mode": "batch", "batch": FAST_POLL})
    assert cli("run", str(files.spec)).exit_code == 2  # glm-4.6 is not on Zhipu's Batch API list
    assert load_job(files.spec, ["run.mode=online"]).concurrency == 5  # the catalogue's default

    code, report = doctor(str(files.spec), "--batch")

    assert code == 0
    found = checks(report)
    assert [found[n]["ok"] for n in ("key", "balance", "model")] == [True, True, True]
    assert "1302" in found["concurrency"]["detail"] and report["facts"]["concurrency"] == 3
    assert found["batch glm-4.6"]["ok"] is True and found["batch glm-4-flash (control)"]["ok"] is True
    assert {b["model"] for b in report["batches"]} == {"glm-4.6", "glm-4-flash"}
    assert report["batches"][0]["shape"]["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    assert report["cost"]["spent"] <= report["cost"]["worst_case"]
    assert sim.stats()["files"] == 0  # inputs and results deleted: an account holds at most 1,000 files
    stored = load_facts(sim.url, "glm-4.6")
    assert (stored.source, stored.concurrency, stored.batch_eligible) == ("doctor", 3, True)

    assert load_job(files.spec, ["run.mode=online"]).concurrency == 3
    sim.configure(concurrency_cap=None, latency_s=0.0)
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr
    assert sim.stats()["billed"]["batch"] == 2 + 2 + 6  # doctor's 2 lines and the control's, then the job's 6


def test_a_batch_the_api_refuses_is_recorded_and_the_run_says_doctor_found_it(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(batch_refuse_ineligible=True)  # the Batch API takes only the models on Zhipu's list
    files = make_job(rows=sample_rows(3), model={"name": "glm-4.7"}, run={"mode": "batch"})

    code, report = doctor(str(files.spec), "--batch")

    assert code == 0
    found = checks(report)
    assert found["batch glm-4.7"]["ok"] is False and "refused at create" in found["batch glm-4.7"]["result"]
    assert found["batch glm-4-flash (control)"]["ok"] is True
    assert load_facts(sim.url, "glm-4.7").batch_eligible is False
    assert load_facts(sim.url, "glm-4-flash").batch_eligible is True
    assert sim.stats()["files"] == 0  # the refused batch's input too
    result = cli("run", str(files.spec))
    assert result.exit_code == 2 and "doctor --batch found it refused" in result.stderr


def test_an_account_out_of_balance_stops_the_probes_at_once_and_names_1113(sim: SimulatorThread) -> None:
    sim.configure(fault_rate=1.0, faults=("429_1113",))

    code, report = doctor("--endpoint", sim.url, "--model", "glm-4.6")

    assert code == 3
    found = checks(report)
    assert found["balance"]["ok"] is False and "1113" in found["balance"]["result"]
    assert report["cost"]["requests"] == 1  # nothing more is sent to an account that cannot pay
    stored = load_facts(sim.url, "glm-4.6")  # only what the refusal showed: its shape
    assert (stored.error_shape, stored.concurrency, stored.forced_tool_choice) == ("anthropic", None, None)


def test_doctor_on_the_built_in_simulator_prints_its_table_offline_in_seconds(tmp_path: Any) -> None:
    import anthropic  # noqa: F401  (loading the SDK is the interpreter's start-up, not doctor's work)

    started = time.monotonic()
    result = cli("doctor", "--endpoint", "simulator", "--model", "glm-4.6", "--batch")
    took = time.monotonic() - started
    assert result.exit_code == 0, result.stderr
    for line in ("forced tool choice", "two stop sequences", "error shape", "concurrency", "batch glm-4.6"):
        assert line in result.stdout
    assert "worst case" in result.stdout and "spent:" in result.stdout
    assert took < 10, took  # the promise: seconds, offline (measured about 2 s)


def test_doctor_needs_a_job_or_a_model(sim: SimulatorThread) -> None:
    result = cli("doctor")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--model" in result.stderr


def test_a_route_that_refuses_forced_tools_and_two_stop_words_in_the_native_shape_is_seen_and_remembered(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """The Anthropic route's unknowns (real-wire.md), the strict way: doctor names each, stores it, and
    the next labeling run starts in tool_choice auto without a refused request."""
    sim.configure(forced_tool_choice="refuse", error_shape="native", anthropic_max_stop_sequences=1)
    labels = {"path": "out/{name}.parquet", "labels": ["positive", "negative"]}
    files = make_job(rows=sample_rows(4), output=labels)

    code, report = doctor(str(files.spec))

    assert code == 0
    found = checks(report)
    assert found["forced tool choice"]["ok"] is False and "tool_choice auto" in found["forced tool choice"]["detail"]
    assert found["two stop sequences"]["ok"] is False
    assert found["error shape"]["result"] == "native"
    stored = load_facts(sim.url, "glm-4.6")
    assert (stored.forced_tool_choice, stored.stop_sequences_max, stored.error_shape) == (False, 1, "native")

    refused = sim.stats()["outcomes"].get("400_1214", 0)  # doctor's two probes
    result = cli("run", str(files.spec))
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "tool_choice_auto" and "doctor" in e.get("learned", "") for e in events)
    assert sim.stats()["outcomes"].get("400_1214", 0) == refused  # not one refused request in the run


def test_a_route_that_accepts_them_is_recorded_as_accepting(sim: SimulatorThread) -> None:
    sim.configure(forced_tool_choice="accept", error_shape="anthropic", anthropic_max_stop_sequences=None)

    code, report = doctor("--endpoint", sim.url, "--model", "glm-4.6")

    assert code == 0
    found = checks(report)
    assert [found[n]["ok"] for n in ("forced tool choice", "two stop sequences")] == [True, True]
    stored = load_facts(sim.url, "glm-4.6")
    assert (stored.forced_tool_choice, stored.stop_sequences_max, stored.error_shape) == (True, 2, "anthropic")


def test_a_batch_still_validating_at_the_limit_is_shown_waiting_cancelled_and_left_unknown(
    sim: SimulatorThread,
) -> None:
    sim.configure(batch_validating_s=30)
    result = cli("doctor", "--endpoint", sim.url, "--model", "glm-4.6", "--batch", "--batch-wait", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert "batch glm-4.6: validating, 0 s of at most 1 s" in result.stderr  # the visible timer
    found = checks(json.loads(result.stdout))
    assert found["batch glm-4.6"]["ok"] is None and "cancelled" in found["batch glm-4.6"]["result"]
    assert load_facts(sim.url, "glm-4.6").batch_eligible is None  # not known: nothing stored
    assert sim.stats()["batches"].get("validating", 0) == 0  # doctor left no batch running
