"""A run's summary (`Summary`): what it did, sent and cost; built here, written beside the output
(`<output>.summary.json`, through runner.files) and appended to the manifest. Its JSON keys are the
fields' names, in order (runner.jsonrecord); readers take it with `Summary.read(output)`."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from runner.errors import STATE_FAILURES, DiskFull
from runner.files import read_summary, summary_path, write_summary
from runner.jsonrecord import ABSENT, OMITTED_WHEN_NONE, Absent, as_json
from runner.money.booked import Booked
from runner.money.kept_estimate import EstimateCheck, compare

if TYPE_CHECKING:
    from runner.control import Control
    from runner.job.resolve import Job
    from runner.money.accounting import Accountant, Distribution, Tally
    from runner.send.base import Gauges
    from runner.state.store import Store


@dataclass(frozen=True)
class InputFile:
    path: str = ""
    bytes: int | None = None


@dataclass(frozen=True)
class MaybeBilledTwice:
    """Attempts sent and then given up on (timeouts, stalls): the endpoint may have billed them too."""

    requests: int = 0
    worst_case: float | None = None


@dataclass(frozen=True)
class Cost:
    currency: str | None = None
    spent: float | None = None  # None: no prices for this model
    by_tier: dict[str, float] = field(default_factory=dict)
    prices_confirmed: bool | None = None
    max_cost: float | None = None
    maybe_billed_twice: MaybeBilledTwice = MaybeBilledTwice()
    # how good `glm-batch estimate` was, when one was kept
    estimate: EstimateCheck | None = field(default=None, metadata=OMITTED_WHEN_NONE)


@dataclass(frozen=True)
class Tokens:
    input: int = 0
    output: int = 0
    thinking: int = 0  # part of output
    cache_read: int = 0
    cache_creation: int = 0


@dataclass(frozen=True)
class Percentiles:
    """A time's p50, p90 and p99 in ms, and what it measures."""

    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    measures: str | None = None


@dataclass(frozen=True)
class Concurrency:
    adaptive: bool | None = None
    final: int | None = None  # the limit at the end
    overload_429_rate: float | None = None


@dataclass(frozen=True)
class Engine:
    """A Ray run's sending: its actors and its cluster-wide limiter's figures."""

    name: str = "ray"
    actors: int = 0
    limiter: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CpuWhileAnswering:
    """This process's CPU time from the first answer to the end of sending (runner.observe.cpu)."""

    seconds: float = 0.0
    ms_per_answer: float = 0.0


@dataclass(frozen=True)
class Sending:
    """How a sender sent a run, for its summary (each sender says it)."""

    concurrency: Concurrency = Concurrency()
    simulated: bool = False
    # the model's batch queue: creates refused, seconds waited
    batch_queue: dict[str, Any] | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    # how a structured job asked for its tool call, when not forced
    tool_choice: str | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    engine: Engine | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # a Ray run's


@dataclass(frozen=True)
class LabelScore:
    precision: float = 0.0
    recall: float = 0.0
    f1: float = 0.0
    support: int = 0


@dataclass(frozen=True)
class Metrics:
    """A label column against a gold one (runner.observe.quality.label_metrics)."""

    rows_with_gold: int = 0
    accuracy: float | None = None
    invalid_rate: float | None = None
    per_label: dict[str, LabelScore] = field(default_factory=dict)
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # gold -> predicted -> rows
    predicted_distribution: dict[str, int] = field(default_factory=dict)
    gold_notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class FieldMatch:
    rows_with_gold: int = 0
    exact_match: float | None = None


@dataclass(frozen=True)
class Voting:
    """How a sampled job's samples agreed; the accuracies only with gold labels (None: no rows to score)."""

    samples_per_row: int = 1
    mean_agreement: float | None = None
    unanimous_rows: int = 0
    split_rows: int = 0
    agreement_distribution: dict[str, int] = field(default_factory=dict)  # "3 of 3": rows, ...
    accuracy_unanimous: float | Absent | None = ABSENT
    accuracy_split: float | Absent | None = ABSENT


@dataclass(frozen=True)
class Quality:
    """A structured run's answers: validity, repairs and, with gold, how good (runner.observe.quality)."""

    rows: int = 0
    valid: int = 0
    invalid: int = 0
    truncated: int = 0
    repaired: int = 0
    label_field: str | None = None
    gold_column: str | None = None
    labels: tuple[str, ...] | None = None
    metrics: Metrics | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    field_exact_match: dict[str, FieldMatch] | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    voting: Voting | None = field(default=None, metadata=OMITTED_WHEN_NONE)


@dataclass(frozen=True)
class Summary:
    """A run's record (the README's `<output>.summary.json`); every field has a default, so a summary
    written by another version, or a cascade's, reads as one."""

    job: str = ""
    run_id: str | None = None
    spec: str | None = None
    spec_hash: str | None = None
    model: str | None = None
    endpoint: str | None = None
    inputs: tuple[InputFile, ...] = ()
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    stopped: str | None = None  # why the run stopped early (budget, SIGINT, ...)
    output: str | None = None  # None unless every row has a result
    retries: dict[str, int] = field(default_factory=dict)
    cost: Cost = Cost()
    rows_total: int = 0
    rows_settled_before: int = 0
    samples_per_row: int = 1
    requests_queued: int = 0
    answered_ok: int = 0
    answered_error: int = 0
    rows_skipped: int = 0  # input.nulls: skip; not failures
    errors: dict[str, int] = field(default_factory=dict)
    tokens: Tokens = Tokens()
    elapsed_s: float | None = None
    requests_per_s: float | None = None  # over the whole run
    requests_per_s_answering: float | None = None  # from the first answer to the last
    # Whose time: `latency_ms` is the SDK call (the endpoint, the network and this process's own event
    # loop while the call was open); `client_wait_ms` is the time the request waited in this process
    # before its attempts were sent (queue + in-flight slot + rate buckets).
    latency_ms: Percentiles = Percentiles()
    client_wait_ms: Percentiles = Percentiles()
    concurrency: Concurrency = Concurrency()
    simulated: bool = False
    batch_queue: dict[str, Any] | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    tool_choice: str | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    engine: Engine | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    cpu_while_answering: CpuWhileAnswering | None = None
    ledger: Booked = field(default_factory=Booked)
    quality: Quality | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # a structured job's
    pilot: bool | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # in the manifest only: a pilot's record

    def as_dict(self) -> dict[str, Any]:
        """The summary as plain data: the JSON object written beside the output."""
        return as_json(self)

    @classmethod
    def read(cls, output: Path) -> Summary:
        """The summary beside `output` (every field at its default when there is none)."""
        return read_summary(output, cls)


def summary(
    run: RunFacts,
    exit_code: int,
    finalized: bool,
    sending: Sending,
    cpu: CpuWhileAnswering | None,
    ledger: Booked,
) -> Summary:
    """The run's record: written beside the output and appended to the manifest."""
    job, tally, control, table = run.job, run.tally, run.control, run.accountant.table
    estimate = run.store.read_estimate()
    check = None
    if estimate is not None and table is not None and tally.ok:
        # How good was `glm-batch estimate`? Compared only when it was made for this model and requests.
        check = compare(job, estimate, ok=tally.ok, spent=tally.cost)
    worst = None
    if table is not None:
        max_tokens = job.spec.model.max_tokens
        worst = round(sum(table.worst_case(input_tokens=t, max_tokens=max_tokens) for t in control.maybe_billed), 6)
    cost = Cost(
        currency=job.currency,
        spent=round(tally.cost, 6) if table is not None else None,
        by_tier={k: round(v, 6) for k, v in tally.cost_by_tier.items()},
        prices_confirmed=table.confirmed if table is not None else None,
        max_cost=job.spec.run.max_cost,
        maybe_billed_twice=MaybeBilledTwice(len(control.maybe_billed), worst),
        estimate=check,
    )
    return Summary(
        job=job.name,
        run_id=run.store.run_id,
        spec=str(job.spec_path),
        spec_hash=job.spec_hash,
        model=job.spec.model.name,
        endpoint=job.endpoint_name,
        inputs=tuple(InputFile(str(p), _size(p)) for p in job.input_paths),
        started_at=run.started_at.isoformat(),
        finished_at=dt.datetime.now(dt.UTC).isoformat(),
        exit_code=exit_code,
        stopped=control.reason,
        output=str(job.output_path) if finalized else None,
        retries=dict(control.retries),
        cost=cost,
        rows_total=tally.rows_total,
        rows_settled_before=tally.rows_settled,
        samples_per_row=tally.samples,
        requests_queued=tally.requests_queued,
        answered_ok=tally.ok,
        answered_error=tally.failed,
        rows_skipped=tally.skipped // max(1, tally.samples),
        errors=dict(tally.errors),
        tokens=Tokens(
            tally.input_tokens,
            tally.output_tokens,
            tally.thinking_tokens,
            tally.cache_read_input_tokens,
            tally.cache_creation_input_tokens,
        ),
        elapsed_s=round(tally.elapsed_s, 3),
        requests_per_s=round(tally.rate(), 2),
        requests_per_s_answering=tally.answering_rate(),
        latency_ms=_percentiles(tally.latencies_ms, "sdk_call"),
        client_wait_ms=_percentiles(tally.client_wait_ms, "queue_and_slot_wait"),
        concurrency=sending.concurrency,
        simulated=sending.simulated,
        batch_queue=sending.batch_queue,
        tool_choice=sending.tool_choice,
        engine=sending.engine,
        cpu_while_answering=cpu,
        ledger=ledger,
    )


class RunFacts(Protocol):
    """What the summary reads of a run (runner.run.Run)."""

    job: Job
    tally: Tally
    control: Control
    accountant: Accountant
    store: Store
    started_at: dt.datetime


def _percentiles(times: Distribution, measures: str) -> Percentiles:
    return Percentiles(times.percentile(50), times.percentile(90), times.percentile(99), measures)


def _size(path: Path) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def sending(job: Job, gauges: Gauges, *, tool_choice: str | None = None, engine: Engine | None = None) -> Sending:
    """How the sending went, for the summary: the concurrency limit at the end, the refused share (and
    what the sender adds: how a structured job asked for its tool call, a Ray run's engine)."""
    concurrency = Concurrency(gauges.adaptive, gauges.limit, gauges.overload_429_rate)
    return Sending(concurrency, job.base_url is None, gauges.batch_queue or None, tool_choice, engine)


def write(job: Job, store: Store, report: Summary) -> None:
    """Write the summary beside the output and the run into the manifest (a full disk was already said:
    the journal holds the answers)."""
    with contextlib.suppress(DiskFull):
        write_summary(job.output_path, report)
    record(store, report)


def record(store: Store, report: Summary) -> None:
    """Append the run to the manifest (a state that broke was already said: the run stopped for it)."""
    with contextlib.suppress(*STATE_FAILURES):
        store.record_run(as_json(report))


def named_files(output: Path, found: Summary) -> list[tuple[Path, str]]:
    """An output given alone and what its summary names, for runner.files.write_text to protect: it,
    its summary, the spec and inputs the summary names, and the state folder beside it."""
    files = [
        (output, "the output"),
        (summary_path(output), "the output's summary"),
        (output.parent / ".glm-batch", "state"),
    ]
    if found.spec:
        files.append((Path(found.spec), "the job spec"))
    return files + [(Path(item.path), "an input of the job") for item in found.inputs if item.path]
