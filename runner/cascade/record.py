"""A cascade's record (`CascadeSummary`): written beside its output in place of a run's summary, through
the same writer (runner.files.write_summary), read back by `read_cascade`, and said in words for
`report` and `status`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from runner.cascade.threshold import Tested
from runner.files import read_summary
from runner.jsonrecord import OMITTED_WHEN_NONE, as_json, from_json
from runner.money.kept_estimate import EstimateCheck
from runner.observe.report import Section
from runner.observe.summary import Summary
from runner.runs import RunResult


@dataclass(frozen=True)
class AtThreshold:
    """Rows whose confidence equals the threshold: some are kept (the top ones in a seeded random order)."""

    rows: int = 0
    kept: int = 0


@dataclass(frozen=True)
class CascadeCost:
    currency: str | None = None
    proxy: float = 0.0
    oracle: float = 0.0
    cascade: float = 0.0  # what the output's rows cost with both models
    oracle_only_expected: float | None = None
    share_of_oracle_only: float | None = None


@dataclass(frozen=True)
class Accuracy:
    """Shares of the rows with a gold label answered right."""

    proxy: float | None = None
    oracle_where_asked: float | None = None
    proxy_where_oracle_asked: float | None = None
    cascade: float | None = None


@dataclass(frozen=True)
class Cascade:
    """The cascade itself: the guarantee in words, the threshold, who answered, cost, and accuracy."""

    guarantee: str = ""
    proxy: str = ""
    oracle: str = ""
    target: float = 0.0
    delta: float = 0.0
    threshold: float | None = None  # None: no proxy answer kept
    at_threshold: AtThreshold | None = None
    rows: int = 0
    rows_kept_from_proxy: int = 0
    rows_escalated: int = 0
    rows_in_calibration: int = 0
    calibration_rounds: int = 0
    thresholds_tested: tuple[Tested, ...] = ()
    cost: CascadeCost = CascadeCost()
    accuracy: Accuracy | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # with gold labels


@dataclass(frozen=True)
class Spent:
    currency: str | None = None
    spent: float = 0.0  # what this run paid, both stages
    estimate: EstimateCheck | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # against the kept one


@dataclass(frozen=True)
class CascadeSummary:
    """What a finished cascade writes beside its output (its first fields are a run summary's too)."""

    job: str = ""
    model: str | None = None  # the oracle's
    endpoint: str | None = None
    output: str | None = None
    exit_code: int = 0
    cost: Spent = Spent()
    simulated: bool = False
    cascade: Cascade | None = None

    def as_run(self) -> Summary:
        """The record read as a run's summary (what `report` reads of it): the fields they share."""
        return from_json(Summary, as_json(self))


@dataclass
class CascadeResult(RunResult):
    """How a finished cascade ended: a run's result, with the cascade's record."""

    record: CascadeSummary = CascadeSummary()


def read_cascade(output: Path) -> Cascade | None:
    """The cascade section of the summary beside an output (None when it is not a cascade's)."""
    return read_summary(output, CascadeSummary).cascade


def estimate_lines(cost: Spent) -> list[str]:
    """The run's spend against the estimate kept before it, in words (or why there is no figure to
    compare); none when no estimate was kept."""
    check, currency = cost.estimate, cost.currency or ""
    if check is None:
        return []
    if check.estimated is None:
        return [f"estimate: none to compare with ({check.no_match})"]
    line = f"estimate: estimated {check.estimated:.4f} {currency}".rstrip()
    if check.low is not None and check.high is not None:
        line += f" (interval {check.low:.4f}-{check.high:.4f})"
    line += f", spent {check.spent:.4f}"
    if check.within is not None:
        line += ", within the interval" if check.within else ", outside the interval"
    return [line]


def status_lines(output: Path) -> list[str]:
    """What `glm-batch status` says of the last cascade written to `output` (nothing when none was)."""
    record = read_summary(output, CascadeSummary)
    done = record.cascade
    if done is None:
        return []
    kept = f"{done.rows_kept_from_proxy} of {done.rows} rows kept from {done.proxy}"
    return [f"last cascade: {kept}; the output {done.guarantee}", *estimate_lines(record.cost)]


def cascade_lines(c: Cascade) -> list[str]:
    """A cascade in plain words: the guarantee, the threshold, who answered, cost, and accuracy."""
    cost = c.cost
    threshold = "none: no proxy answer kept" if c.threshold is None else f"{c.threshold:.3f}"
    tied = c.at_threshold
    if tied and tied.kept < tied.rows:
        threshold += f" (of the {tied.rows} rows at exactly that, {tied.kept}, in a seeded random order)"
    lines = [
        f"cascade: the output {c.guarantee} (proxy {c.proxy}, oracle {c.oracle})",
        f"threshold: proxy confidence >= {threshold}; {c.rows_kept_from_proxy} rows kept from the proxy, "
        f"{c.rows_escalated} escalated to the oracle, {c.rows_in_calibration} in the calibration sample",
    ]
    if cost.oracle_only_expected and cost.share_of_oracle_only is not None:
        lines.append(
            f"cost: {cost.cascade:.4f} {cost.currency} against {cost.oracle_only_expected:.4f} for the "
            f"oracle only ({cost.share_of_oracle_only:.0%}; proxy {cost.proxy:.4f}, oracle {cost.oracle:.4f})"
        )
    if c.accuracy is not None:
        shown = ", ".join(f"{who.replace('_', ' ')} {v:.4f}" for who, v in as_json(c.accuracy).items() if v is not None)
        lines.append(f"accuracy against gold: {shown}")
    return lines


def report_section(output: Path) -> Section | None:
    """The cascade's part of `glm-batch report` (None when the output is not a cascade's): its lines,
    and who answered the rows, drawn as bars on the page."""
    record = read_summary(output, CascadeSummary)
    c = record.cascade
    if c is None:
        return None
    who = {
        f"kept from {c.proxy}": c.rows_kept_from_proxy,
        f"escalated to {c.oracle}": c.rows_escalated,
        f"calibration ({c.oracle})": c.rows_in_calibration,
    }
    return Section([*cascade_lines(c), *estimate_lines(record.cost)], who)
