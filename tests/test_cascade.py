"""A cascade job end to end on the simulator: a cheap proxy answers every row, the oracle a calibration
sample and the rows the proxy is unsure of; the output says who answered each row, the summary and
`report` state the guarantee, `estimate` prices it against the oracle alone, and kill -9 at any stage
then a resume pays nothing twice beyond what was in flight and gives the same output."""

from __future__ import annotations

import html
import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from runner.api import load_job
from runner.cascade.record import cascade_lines, read_cascade
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli

DATA = Path(__file__).resolve().parent.parent / "data" / "sentiment" / "amazon.csv"
PROXY, ORACLE = "glm-4.5-flash", "glm-4.6"
SENTIMENT = {
    "input": {"columns": ["text"]},
    "prompt": {"system": "You label sentiment.", "template": "Review: {{ text }}"},
    "output": {"labels": ["positive", "negative"], "keep_columns": [], "max_repairs": 0},
    "eval": {"gold_column": "gold"},
    "run": {"concurrency": 8},
}


def _rows(n: int) -> list[dict[str, Any]]:
    return pl.read_csv(DATA).head(n).to_dicts()


def _cascade(make_job: Callable[..., JobFiles], name: str, **cascade: Any) -> JobFiles:
    settings = {"proxy": PROXY, "target": 0.9, "delta": 0.1, "samples": 3, "seed": 1, **cascade}
    return make_job(_rows(120), name=name, **(SENTIMENT | {"output": SENTIMENT["output"] | {"cascade": settings}}))


def test_the_cascade_agrees_with_the_oracle_on_the_target_share_and_says_who_answered_each_row(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(model_error={PROXY: 0.2})
    reference = make_job(_rows(120), name="oracle_only", **SENTIMENT)
    assert cli("run", str(reference.spec)).exit_code == 0
    job = _cascade(make_job, "cascade")

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(job.output)
    oracle = pl.read_parquet(reference.output)
    assert out.get_column("id").to_list() == oracle.get_column("id").to_list()  # one row per input row, in order
    agreement = (out.get_column("label") == oracle.get_column("label")).mean()
    assert agreement is not None and agreement >= 0.9
    by = out.get_column("answered_by")
    assert set(by.unique().to_list()) == {PROXY, ORACLE}
    # The calibration sample carries the oracle's answer; a kept row carries the proxy's majority.
    assert out.filter(pl.col("in_calibration") & (pl.col("answered_by") != ORACLE)).height == 0
    confidence = out.get_column("proxy_confidence")
    assert confidence.min() is not None and set(confidence.drop_nulls().unique().to_list()) <= {1 / 3, 2 / 3, 1.0}
    summary = json.loads(job.summary.read_text())["cascade"]
    assert summary["guarantee"] == f"agrees with {ORACLE} on >= 90% of rows with probability >= 90%"
    assert summary["rows_kept_from_proxy"] == (by == PROXY).sum() > 0
    assert summary["rows_in_calibration"] == out.get_column("in_calibration").sum()
    assert summary["cost"]["cascade"] < summary["cost"]["oracle_only_expected"]
    # A row's cost is what it cost with both models: the output adds up to what both stages paid.
    assert out.get_column("cost").sum() == pytest.approx(summary["cost"]["proxy"] + summary["cost"]["oracle"])
    assert set(summary["accuracy"]) >= {"proxy", "cascade", "oracle_where_asked"}

    report = cli("report", str(job.spec))
    assert report.exit_code == 0, report.stderr
    assert f"agrees with {ORACLE} on >= 90% of rows with probability >= 90%" in report.stdout
    assert "threshold" in report.stdout and "oracle only" in report.stdout
    # The page says what the terminal says, from the same summary.
    page = job.spec.parent / "report.html"
    assert cli("report", str(job.spec), "--html", str(page)).exit_code == 0
    section = page.read_text(encoding="utf-8").split('<ul id="cascade">')[1].split("</ul>")[0]
    record = read_cascade(job.output)
    assert record is not None and record.guarantee == summary["guarantee"]
    assert [html.unescape(item) for item in re.findall(r"<li>(.*?)</li>", section)] == cascade_lines(record)
    assert all(line in " ".join(report.stdout.split()) for line in cascade_lines(record))
    status = cli("status", str(job.spec))
    assert "proxy stage, last run" in status.stdout and "oracle stage, last run" in status.stdout
    assert f"last cascade: {summary['rows_kept_from_proxy']} of 120 rows kept from {PROXY}" in status.stdout
    # No estimate was kept for this job: none is compared, and neither report nor status says one was.
    assert (
        "cost" in json.loads(job.summary.read_text()) and "estimate" not in json.loads(job.summary.read_text())["cost"]
    )
    assert "estimate:" not in report.stdout and "estimate:" not in status.stdout


def test_estimate_prices_the_cascade_against_the_oracle_alone_before_anything_is_sent(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    job = _cascade(make_job, "priced")

    result = cli("estimate", str(job.spec), "--json")

    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    cascade = report["cascade"]
    only, cost = cascade["oracle_only_cost"], cascade["cost"]
    low, expected, high = (cost[k] for k in ("low", "expected", "high"))
    assert 0 < low < expected < high
    assert cascade["proxy_requests"] == 3 * 120
    # Nothing answered yet: the next run is the whole cascade (the oracle's share: assumed half).
    assert report["rows_answered_already"] == 0
    assert report["requests_to_send"] == 3 * 120 + 60
    assert report["cost"]["expected"] == pytest.approx(expected)
    # Each figure against the oracle alone on the same basis: the high (a useless proxy) against the
    # oracle's own high, not its expected figure.
    assert only["low"] < only["expected"] < only["high"]
    for basis in ("low", "expected", "high"):
        assert cascade["share_of_oracle_only"][basis] == round(cost[basis] / only[basis], 4)
    assert sim.stats()["requests"] == 0
    table = cli("estimate", str(job.spec))
    assert "whole cascade" in table.stdout and "oracle only" in table.stdout
    assert f"{only['low']:.4f} / {only['expected']:.4f} / {only['high']:.4f}" in table.stdout
    dry = cli("run", str(job.spec), "--dry-run")
    assert dry.exit_code == 0 and "dry run: a cascade" in dry.stdout
    assert sim.stats()["requests"] == 0


def test_the_estimate_is_kept_beside_the_cascade_state_and_its_run_is_measured_against_it(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(model_error={PROXY: 0.2})
    job = _cascade(make_job, "kept")
    kept = load_job(job.spec).state_dir / "estimate.json"
    assert cli("run", str(job.spec), "--dry-run").exit_code == 0
    assert not kept.exists()  # a dry run only reads

    estimated = json.loads(cli("estimate", str(job.spec), "--json").stdout)

    report = json.loads(kept.read_text())
    assert report["made_for"]["model"] == ORACLE and report["cost"] == estimated["cost"]
    assert report["cascade"]["share_of_oracle_only"] == estimated["cascade"]["share_of_oracle_only"]
    assert cli("run", str(job.spec)).exit_code == 0
    cost = json.loads(job.summary.read_text())["cost"]
    against = cost["estimate"]
    assert against["estimated"] == estimated["cost"]["expected"] and against["spent"] == cost["spent"] > 0
    assert (against["low"], against["high"]) == (estimated["cost"]["low"], estimated["cost"]["high"])
    assert against["within"] == (against["low"] <= cost["spent"] <= against["high"])
    # report (text and page) and status say it in the same words, from the same summary.
    said = (
        f"estimate: estimated {against['estimated']:.4f} CNY (interval {against['low']:.4f}-{against['high']:.4f}), "
        f"spent {cost['spent']:.4f}, {'within' if against['within'] else 'outside'} the interval"
    )
    assert said in " ".join(cli("report", str(job.spec)).stdout.split())
    page = job.spec.parent / "kept.html"
    assert cli("report", str(job.spec), "--html", str(page)).exit_code == 0
    section = page.read_text(encoding="utf-8").split('<ul id="cascade">')[1].split("</ul>")[0]
    assert said in [html.unescape(item) for item in re.findall(r"<li>(.*?)</li>", section)]
    assert said in cli("status", str(job.spec)).stdout.splitlines()
    # The spec changed since (another target): that estimate priced something else, and the run says so.
    again = cli("run", str(job.spec), "--set", "output.cascade.target=0.95")
    assert again.exit_code == 0, again.stderr
    assert "differs in the prompt or settings" in json.loads(job.summary.read_text())["cost"]["estimate"]["no_match"]
    for shown in (cli("report", str(job.spec)).stdout, cli("status", str(job.spec)).stdout):
        assert "estimate: none to compare with (the kept estimate was made for" in " ".join(shown.split())


def test_the_proxy_is_asked_15_times_a_row_by_default(make_job: Callable[..., JobFiles], sim: SimulatorThread) -> None:
    output = SENTIMENT["output"] | {"cascade": {"proxy": PROXY}}
    job = make_job(_rows(20), name="default_samples", **(SENTIMENT | {"output": output}))

    report = json.loads(cli("estimate", str(job.spec), "--json").stdout)

    assert report["cascade"]["proxy_requests"] == 15 * 20


def test_run_max_cost_caps_the_whole_cascade_and_a_later_run_goes_on(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(model_error={PROXY: 0.2})
    job = _cascade(make_job, "capped")
    text = job.spec.read_text().replace("concurrency: 8", "concurrency: 8\n  max_cost: 0.0005")
    job.spec.write_text(text)

    stopped = cli("run", str(job.spec))

    assert stopped.exit_code == 4, stopped.stderr
    assert "cascade" in stopped.stderr and not job.output.exists()
    resumed = cli("run", str(job.spec), "--set", "run.max_cost=10")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(job.summary.read_text())["cascade"]["rows"] == 120


@pytest.mark.parametrize("id_column", [True, False], ids=["id column", "content ids"])
def test_a_finished_cascade_estimates_nothing_to_send_and_a_rerun_sends_nothing(
    make_job: Callable[..., JobFiles], sim: SimulatorThread, id_column: bool
) -> None:
    sim.configure(model_error={PROXY: 0.2})
    job = _cascade(make_job, "finished")
    if not id_column:  # rows named by a hash of what the job reads
        pl.read_csv(job.input).drop("id").write_csv(job.input)
        job.spec.write_text(job.spec.read_text().replace("  id_column: id\n", ""))
    assert cli("run", str(job.spec)).exit_code == 0
    sent = sim.stats()["requests"]

    result = cli("estimate", str(job.spec), "--json")
    dry = cli("run", str(job.spec), "--dry-run")

    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rows_answered_already"] == 120 and report["requests_to_send"] == 0
    assert report["cost"] == {"low": 0, "expected": 0, "high": 0, "ceiling": 0}
    assert report["cascade"]["next_run"]["oracle_requests"] == {"low": 0, "expected": 0, "high": 0}
    assert dry.exit_code == 0, dry.stderr
    assert f"{PROXY} would send 0 requests and {ORACLE} 0 for 120 rows (120 already answered)" in dry.stdout
    assert "expected 0.0000 CNY (0.0000 to 0.0000)" in dry.stdout
    assert sim.stats()["requests"] == sent
    again = cli("run", str(job.spec))
    assert again.exit_code == 0, again.stderr
    assert sim.stats()["requests"] == sent  # as estimated


def test_a_cascade_stopped_by_max_cost_estimates_only_what_remains(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(model_error={PROXY: 0.2})
    job = _cascade(make_job, "half")  # the cap stops it in its calibration rounds, some rows answered
    job.spec.write_text(job.spec.read_text().replace("concurrency: 8", "concurrency: 8\n  max_cost: 0.008"))
    assert cli("run", str(job.spec)).exit_code == 4
    before = sim.stats()["requests"]

    result = cli("estimate", str(job.spec), "--json")

    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    run = report["cascade"]["next_run"]
    asks = run["oracle_requests"]
    assert run["proxy_requests"] == 0  # the free proxy finished its pass before the cap
    answered = report["rows_answered_already"]
    assert 0 < answered < 120
    assert asks["high"] == 120 - answered  # at worst the oracle answers every row it has not answered
    assert 0 < report["cost"]["expected"] < report["cascade"]["cost"]["expected"]
    resumed = cli("run", str(job.spec), "--set", "run.max_cost=10")
    assert resumed.exit_code == 0, resumed.stderr
    assert asks["low"] <= sim.stats()["requests"] - before <= asks["high"]


def test_a_cascade_is_refused_without_labels_or_with_samples_of_its_own(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    free_text = make_job(name="free", output={"cascade": {"proxy": PROXY}})
    result = cli("run", str(free_text.spec))
    assert result.exit_code == 2 and "output.labels or output.schema" in result.stderr
    sampled = make_job(
        name="sampled",
        model={"temperature": 0.7},
        output={"labels": ["a", "b"], "samples": 3, "cascade": {"proxy": PROXY}},
    )
    result = cli("run", str(sampled.spec))
    assert result.exit_code == 2 and "output.cascade.samples" in result.stderr
    schema = {"type": "object", "properties": {"confidence": {"type": "number"}}}
    clash = make_job(name="clash", output={"schema": schema, "cascade": {"proxy": PROXY, "confidence": "stated"}})
    for command in (["run"], ["estimate"]):
        result = cli(*command, str(clash.spec))
        assert result.exit_code == 2 and "confidence: stated" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sim.stats()["requests"] == 0


def test_fresh_is_refused_for_a_cascade_before_anything_is_sent(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """Each round is a run: --fresh on each would pay again for every earlier round's rows."""
    job = _cascade(make_job, "again")

    fresh = cli("run", str(job.spec), "--fresh")

    assert fresh.exit_code == 2
    assert "a cascade does not take --fresh yet" in fresh.stderr and "Traceback" not in fresh.stderr
    dry = cli("run", str(job.spec), "--fresh", "--dry-run")  # the estimate of exactly that run
    assert dry.exit_code == 2 and "a cascade does not take --fresh yet" in dry.stderr
    assert sim.stats()["requests"] == 0


def _start(spec: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "runner", "run", str(spec), "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_at(spec: Path, model: str, nth: int) -> None:
    """Run the job and kill -9 it as the nth run of `model` (a stage) starts sending."""
    proc = _start(spec)
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:
        if '"event": "start"' in line and json.loads(line)["model"] == model:
            seen += 1
            if seen == nth:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    assert seen == nth, "the stage never started"


@pytest.mark.slow
def test_kill_9_during_each_stage_then_resume_pays_nothing_twice_and_gives_the_same_output(
    make_job: Callable[..., JobFiles],
) -> None:
    # A proxy whose samples always agree: answers that do not depend on how often a prompt was asked,
    # so a resumed run can be compared with one that was never stopped.
    settings = {"model_error": {PROXY: 0.3}, "confidence": "flat", "latency_s": 0.01}
    concurrency = SENTIMENT["run"]["concurrency"]
    outputs, paid = {}, {}
    oracle_runs = 0
    for name in ("straight", "killed"):
        with SimulatorThread() as server:
            server.configure(**settings)
            job = _cascade(make_job, name, target=0.95, samples=2)
            job.spec.write_text(job.spec.read_text().replace(f"endpoint: {_endpoint(job)}", f"endpoint: {server.url}"))
            if name == "killed":
                # The proxy pass, the first calibration round, the escalation: each killed in turn.
                for model, nth in ((PROXY, 1), (ORACLE, 1), (ORACLE, oracle_runs)):
                    _kill_at(job.spec, model, nth)
            done = subprocess.run([sys.executable, "-m", "runner", "run", str(job.spec)], capture_output=True)
            assert done.returncode == 0, done.stderr.decode()
            outputs[name] = pl.read_parquet(job.output)
            paid[name] = server.stats()["billed"]["online"]
            oracle_runs = oracle_runs or _oracle_runs(job)

    for column in ("id", "label", "answered_by", "proxy_confidence", "in_calibration"):
        assert outputs["killed"].get_column(column).to_list() == outputs["straight"].get_column(column).to_list()
    # Three kills: at most what was in flight at each was paid for twice.
    assert paid["killed"] <= paid["straight"] + 3 * concurrency


def _endpoint(job: JobFiles) -> str:
    return str(yaml.safe_load(job.spec.read_text())["model"]["endpoint"])


def _oracle_runs(job: JobFiles) -> int:
    """How many runs of the oracle the cascade made (calibration rounds and the escalation)."""
    return int(json.loads(job.summary.read_text())["cascade"]["calibration_rounds"]) + 1


def test_a_cascade_scores_a_gold_column_named_like_its_answer(make_job: Callable[..., JobFiles]) -> None:
    rows = [{"id": r["id"], "text": r["text"], "label": r["gold"]} for r in _rows(60)]
    spec = SENTIMENT | {"eval": {"gold_column": "label"}}
    settings = {"proxy": PROXY, "target": 0.9, "delta": 0.1, "samples": 3, "seed": 1}
    job = make_job(rows, name="cascade", **(spec | {"output": SENTIMENT["output"] | {"cascade": settings}}))

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(job.output)
    assert out.get_column("label_gold").to_list() == [r["label"] for r in rows]
    assert set(json.loads(job.summary.read_text())["cascade"]["accuracy"]) >= {"proxy", "cascade"}


def test_a_confidence_the_proxy_states_tracks_its_errors_and_a_flat_one_does_not(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    """The simulator's model of given skill states a confidence in its answer: lower where it is wrong
    (its unsure rows), unless its confidence is flat."""
    reference = make_job(_rows(120), name="oracle_only", **SENTIMENT)
    assert cli("run", str(reference.spec)).exit_code == 0
    oracle = pl.read_parquet(reference.output).select("id", pl.col("label").alias("oracle"))
    properties = {
        "label": {"enum": ["positive", "negative"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    }
    stated = {"type": "object", "properties": properties, "required": ["label", "confidence"]}
    gap = {}
    for confidence in ("informative", "flat"):
        sim.configure(model_error={PROXY: 0.2}, confidence=confidence)
        output = SENTIMENT["output"] | {"labels": None, "schema": stated}
        job = make_job(_rows(120), name=f"stated_{confidence}", **(SENTIMENT | {"output": output}))
        job.spec.write_text(job.spec.read_text().replace("name: glm-4.6", f"name: {PROXY}"))
        assert cli("run", str(job.spec)).exit_code == 0
        out = pl.read_parquet(job.output).join(oracle, on="id")
        right = out.filter(pl.col("label") == pl.col("oracle")).get_column("confidence").mean()
        wrong = out.filter(pl.col("label") != pl.col("oracle")).get_column("confidence").mean()
        assert isinstance(right, float) and isinstance(wrong, float)
        gap[confidence] = right - wrong
    assert gap["informative"] > 0.15
    assert abs(gap["flat"]) < 0.1


def test_a_cascade_on_a_stated_confidence_asks_the_proxy_once_and_keeps_its_field_out_of_the_output(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    sim.configure(model_error={PROXY: 0.2})
    job = _cascade(make_job, "stated", confidence="stated")
    priced = cli("estimate", str(job.spec), "--json")
    assert priced.exit_code == 0 and json.loads(priced.stdout)["cascade"]["proxy_requests"] == 120

    result = cli("run", str(job.spec))

    assert result.exit_code == 0, result.stderr
    out = pl.read_parquet(job.output)
    assert "confidence" not in out.columns and "agreement" not in out.columns
    confidence = out.get_column("proxy_confidence")
    assert confidence.null_count() == 0 and 0 <= confidence.min() <= confidence.max() <= 1  # type: ignore[operator]
    assert confidence.n_unique() > 3  # stated values, not the share of 3 samples
    assert set(out.get_column("answered_by").unique().to_list()) == {PROXY, ORACLE}
    proxy = pl.read_parquet(job.output.parent / ".glm-batch" / "stated" / "cascade" / "proxy.parquet")
    assert proxy.height == 120 and proxy.get_column("attempts").max() == 1  # one ask per row
    summary = json.loads(job.summary.read_text())["cascade"]
    assert summary["guarantee"] == f"agrees with {ORACLE} on >= 90% of rows with probability >= 90%"
