"""The run summary is one typed record (runner.observe.summary.Summary), and a cascade's another
(runner.cascade.record.CascadeSummary): written as the JSON users' scripts have always read, key for
key, and read back whatever version wrote it (a missing or mistyped field takes its default, an
unknown one is ignored)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

import runner
from runner.cascade.record import CascadeResult, CascadeSummary
from runner.files import summary_path
from runner.jsonrecord import as_json, from_json
from runner.money.booked import Booked
from runner.observe.progress import RichReporter
from runner.observe.summary import Summary, Voting
from runner.simulator.simulator import SimulatorThread
from tests.conftest import JobFiles, cli
from tests.test_cascade import PROXY, _cascade
from tests.test_labeling import LABELS, REVIEWS

FIXTURES = Path(__file__).parent / "fixtures"
# Written by the code before the summary was typed (a labelled job with gold labels and a kept estimate;
# a cascade), paths made up.
RUN = FIXTURES / "run.summary.json"
CASCADE = FIXTURES / "cascade.summary.json"


def keys(value: Any) -> Any:
    """The shape of a JSON value: an object's keys (in order) with the shapes of their values."""
    if isinstance(value, dict):
        return [(k, keys(v)) for k, v in value.items()]
    if isinstance(value, list) and value:
        return [keys(value[0])]
    return None


def test_a_summary_written_before_the_typed_summary_reads_back_and_writes_out_byte_for_byte() -> None:
    for path, kind in ((RUN, Summary), (CASCADE, CascadeSummary)):
        text = path.read_text(encoding="utf-8")

        record = from_json(kind, json.loads(text))

        assert json.dumps(as_json(record), indent=2) == text, path.name


def test_a_run_writes_the_keys_it_always_wrote_in_the_same_order(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    job = make_job(REVIEWS, output=LABELS, eval={"gold_column": "gold"})
    assert cli("estimate", str(job.spec), "--json", "--pilot", "3").exit_code == 0

    assert cli("run", str(job.spec)).exit_code == 0

    assert keys(json.loads(job.summary.read_text())) == keys(json.loads(RUN.read_text()))


def test_a_summary_read_is_typed_and_defaults_what_is_missing_wrong_or_unknown(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    old = json.loads(RUN.read_text())
    del old["tokens"], old["cost"]["maybe_billed_twice"]  # an older version never wrote them
    old |= {"answered_ok": "five", "inputs": "data.csv", "a_key_from_the_future": 1}  # foreign values
    old["cost"]["spent"] = [0.1]
    summary_path(output).write_text(json.dumps(old))

    found = Summary.read(output)

    assert found.answered_ok == 0 and found.inputs == () and found.cost.spent is None  # defaults
    assert found.tokens.input == 0 and found.cost.maybe_billed_twice.requests == 0
    assert found.rows_total == 5 and found.cost.currency == "CNY" and found.latency_ms.measures == "sdk_call"
    assert found.cost.estimate is not None and found.cost.estimate.mode == "online"
    assert "a_key_from_the_future" not in found.as_dict()
    summary_path(output).write_text("[1, 2]")  # not an object at all
    assert Summary.read(output) == Summary() == Summary.read(tmp_path / "none.parquet")


def test_a_cascade_record_read_as_a_run_summary_keeps_what_they_share() -> None:
    record = from_json(CascadeSummary, json.loads(CASCADE.read_text()))

    shared = record.as_run()

    assert record.cascade is not None and record.cascade.thresholds_tested[0].kept == 18
    assert (shared.job, shared.output, shared.exit_code, shared.cost.spent) == ("cascade", record.output, 0, 0.003462)


def test_the_api_result_carries_the_summary_written_beside_the_output(
    make_job: Callable[..., JobFiles], sim: SimulatorThread
) -> None:
    job = make_job(REVIEWS)

    result = runner.run_job(str(job.spec))

    assert result.ok and result.output == job.output
    assert result.summary.as_dict() == json.loads(job.summary.read_text())
    assert result.summary.answered_ok == 5 and result.summary.cost.spent is not None


def test_a_cascade_run_from_the_api_carries_its_record(make_job: Callable[..., JobFiles], sim: SimulatorThread) -> None:
    sim.configure(model_error={PROXY: 0.2})
    job = _cascade(make_job, "from_the_api")

    result = runner.run_job(str(job.spec))

    assert isinstance(result, CascadeResult) and result.ok and result.output == job.output
    assert as_json(result.record) == json.loads(job.summary.read_text())
    assert result.summary == result.record.as_run() and result.summary.cost.spent == result.record.cost.spent


def test_the_terminal_ends_a_cascade_without_a_run_table_it_has_no_figures_for() -> None:
    console = Console(width=80, record=True, file=io.StringIO())
    record = from_json(CascadeSummary, json.loads(CASCADE.read_text()))

    RichReporter(io.StringIO(), console=console).finish(record, "done")  # its stages showed theirs

    assert console.export_text() == ""


def test_a_key_some_records_have_even_as_null_is_written_only_by_them() -> None:
    """The ledger's `pending` (null: the state folder took no rows either) and a vote's accuracies
    (null: no rows to score) are there only when the run had them to say."""
    for kind, text in (
        (Booked, '{"path": "l", "written": false, "warning": "w", "pending": null}'),
        (Booked, '{"path": "l", "written": true}'),
        (Voting, '{"samples_per_row": 3, "mean_agreement": null, "unanimous_rows": 0, "split_rows": 0, '
         '"agreement_distribution": {"no answer": 2}, "accuracy_unanimous": null, "accuracy_split": 0.5}'),
    ):  # fmt: skip
        assert json.dumps(as_json(from_json(kind, json.loads(text)))) == text
