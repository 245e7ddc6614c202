"""Accounting: what a run did and what it cost, counted as results arrive.

The Tally (rows, tokens, latency, money) is the single source for the progress display, the JSON logs,
the summary file and the ledger; the Accountant prices answers and keeps the budget.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from array import array
from dataclasses import dataclass, field

from runner.job.resolve import Job
from runner.money.pricing import Budget, PriceTable, price_table, require_prices
from runner.money.tokens import Calibration, estimate_request
from runner.records import Answers, Request, Result, priced
from runner.state.openkeys import KeyTable, OpenKeys, Value


class Distribution:
    """Durations counted in buckets 0.1% wide on a log scale: percentiles to within 0.1%, in memory
    bounded by the range of the values (a few thousand buckets), not by their number."""

    __slots__ = ("_counts", "count")

    STEP = math.log(1.001)

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self.count = 0

    def add(self, value: float) -> None:
        """Count one value (negative values count as zero)."""
        bucket = math.floor(math.log(value) / self.STEP) if value > 1e-6 else _ZERO
        self._counts[bucket] = self._counts.get(bucket, 0) + 1
        self.count += 1

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100) by nearest rank, as its bucket's midpoint; None for no values."""
        if not self.count:
            return None
        rank = max(0, min(self.count - 1, round(q / 100 * self.count) - 1))
        seen = 0
        for bucket in sorted(self._counts):
            seen += self._counts[bucket]
            if seen > rank:
                return 0.0 if bucket == _ZERO else round(math.exp((bucket + 0.5) * self.STEP), 3)
        raise AssertionError("unreachable")  # pragma: no cover

    def summary(self) -> dict[str, float | None]:
        """p50, p90 and p99."""
        return {"p50": self.percentile(50), "p90": self.percentile(90), "p99": self.percentile(99)}


_ZERO = -(10**9)  # the bucket of zero (and of anything under a nanosecond)


def percentile(values: array[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return ordered[rank]


_DAY_COUNTERS = (
    "requests_ok",
    "requests_failed",
    "input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
    "est_input_tokens",
    "cost",
)


@dataclass
class Tally:
    """Running counts of one run."""

    rows_total: int = 0  # input rows, counted before the run
    rows_seen: int = 0  # input rows rendered so far
    rows_settled: int = 0  # rows whose request needed no sending (answered in an earlier run)
    rows_left_out: int = 0  # rows a pilot does not send (outside its sample): neither answered nor pending
    samples: int = 1  # requests per row (output.samples)
    requests_queued: int = 0  # distinct requests handed to the executor
    requests_shared: int = 0  # requests not sent: an identical one was queued this run and answers them too
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # requests not sent by decision (input.nulls: skip), counted apart from failures
    input_tokens: int = 0
    output_tokens: int = 0
    thinking_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    # Per answered request, in two parts: on the wire (the SDK call of its last attempt), and waiting in
    # this process before its attempts went out (the send queue and the in-flight slot).
    latencies_ms: Distribution = field(default_factory=Distribution)
    client_wait_ms: Distribution = field(default_factory=Distribution)
    started: float = field(default_factory=time.monotonic)
    # When the first and the latest answer arrived (monotonic): the rate while answers came, apart from
    # the whole run's (which counts start-up, planning and writing the output too).
    first_answer_at: float | None = None
    last_answer_at: float | None = None
    cost: float = 0.0
    cost_by_tier: dict[str, float] = field(default_factory=dict)
    est_input_tokens: int = 0  # local estimates of the requests answered ok, for calibration
    all_rows_rendered: bool = False
    # (day, model) -> counters, one ledger row each
    by_day: dict[tuple[dt.date, str], dict[str, float]] = field(default_factory=dict)
    _last_day: tuple[dt.date, str] | None = field(default=None, init=False, repr=False, compare=False)
    _last_counts: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def record(self, result: Result, tier: str | None = None) -> None:
        """Count one result; `tier` names the price tier its cost was charged at. (Once per answer.)"""
        day = self._day(result)
        cost = result.cost
        if cost is not None:
            self.cost += cost
            day["cost"] += cost
            if tier is not None:
                self.cost_by_tier[tier] = self.cost_by_tier.get(tier, 0.0) + cost
        if result.status == "skipped":  # input.nulls: skip decided it; nothing was sent or went wrong
            self.skipped += 1
            return
        if result.status != "ok":
            day["requests_failed"] += 1
            self.failed += 1
            name = result.error_type or "unknown"
            self.errors[name] = self.errors.get(name, 0) + 1
            return
        self.ok += 1
        self.last_answer_at = time.monotonic()
        if self.first_answer_at is None:
            self.first_answer_at = self.last_answer_at
        tokens_in = result.input_tokens or 0
        cache_read = result.cache_read_input_tokens or 0
        tokens_out = result.output_tokens or 0
        self.input_tokens += tokens_in
        self.output_tokens += tokens_out
        self.cache_read_input_tokens += cache_read
        self.thinking_tokens += result.thinking_tokens or 0
        self.cache_creation_input_tokens += result.cache_creation_input_tokens or 0
        day["requests_ok"] += 1
        day["input_tokens"] += tokens_in
        day["cache_read_input_tokens"] += cache_read
        day["output_tokens"] += tokens_out
        if result.est_input_tokens is not None:
            self.est_input_tokens += result.est_input_tokens
            day["est_input_tokens"] += result.est_input_tokens
        if result.latency_ms is not None:
            self.latencies_ms.add(result.latency_ms)
        if result.wait_ms is not None:
            self.client_wait_ms.add(result.wait_ms)

    def record_answers(self, answers: Answers, tiers: list[str | None]) -> None:
        """`record` for a block of ok answers (priced by Accountant.settle_answers), in one step."""
        count = len(answers)
        if not count:
            return
        by_tier = self.cost_by_tier
        date = answers.finished_at.date()
        for model, cost, tier, tokens_in, cached, tokens_out, estimate in zip(
            answers.model, answers.cost, tiers, answers.input_tokens, answers.cache_read_input_tokens,
            answers.output_tokens, answers.est_input_tokens, strict=True,
        ):  # fmt: skip
            key = (date, model or "")
            day = self._last_counts if key == self._last_day else self._day_of(key)
            if cost is not None:  # added one by one, as `record` adds them: the same sums to the last bit
                self.cost += cost
                day["cost"] += cost
                if tier is not None:
                    by_tier[tier] = by_tier.get(tier, 0.0) + cost
            day["requests_ok"] += 1
            day["input_tokens"] += tokens_in
            day["cache_read_input_tokens"] += cached
            day["output_tokens"] += tokens_out
            if estimate is not None:
                self.est_input_tokens += estimate
                day["est_input_tokens"] += estimate
        self.ok += count
        self.input_tokens += sum(answers.input_tokens)
        self.output_tokens += sum(answers.output_tokens)
        self.cache_read_input_tokens += sum(answers.cache_read_input_tokens)
        self.thinking_tokens += sum(answers.thinking_tokens)
        self.last_answer_at = time.monotonic()
        if self.first_answer_at is None:
            self.first_answer_at = self.last_answer_at

    def not_kept(self, result: Result) -> None:
        """A recorded result that could not be saved (the disk filled): it no longer counts as answered,
        since the next run asks for it again; its cost and tokens stay counted, because it was paid."""
        if result.status == "ok":
            self.ok -= 1
        elif result.status == "skipped":
            self.skipped -= 1
        else:
            self.failed -= 1
            name = result.error_type or "unknown"
            self.errors[name] -= 1

    def _day(self, result: Result) -> dict[str, float]:
        """The counters of the result's (day, model): nearly always the previous result's."""
        key = (result.finished_at.date(), result.model or "")
        if key == self._last_day:
            return self._last_counts
        return self._day_of(key)

    def _day_of(self, key: tuple[dt.date, str]) -> dict[str, float]:
        """The counters of a (day, model), made on first use; remembered as the last one used."""
        counts = self.by_day.get(key)
        if counts is None:
            counts = self.by_day[key] = dict.fromkeys(_DAY_COUNTERS, 0.0)
        self._last_day, self._last_counts = key, counts
        return counts

    @property
    def answered(self) -> int:
        """Requests that got a result this run."""
        return self.ok + self.failed + self.skipped

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def projected_cost(self) -> float | None:
        """Spend at the end of this run if the remaining requests cost what the answered ones did."""
        if not self.answered:
            return None
        to_answer = max(self.requests_queued, (self.rows_total - self.rows_settled - self.rows_left_out) * self.samples)
        return self.cost / self.answered * to_answer

    def answering_rate(self) -> float | None:
        """Answers a second from the first answer to the latest (None before two answers): what the
        panel shows while sending, unlike `rate`, which spreads them over the whole run."""
        if self.first_answer_at is None or self.last_answer_at is None or self.last_answer_at <= self.first_answer_at:
            return None
        return round((self.ok - 1) / (self.last_answer_at - self.first_answer_at), 2)

    def rate(self) -> float:
        """Results per second so far."""
        return self.answered / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Accountant:
    """Money per request: estimate and reserve before dispatch, price and release when answered.

    `admit` is asked before a request is handed to the executor; with a budget it reserves the
    request's worst case and refuses once the cap could be passed. `settle` prices an answer,
    releases its reservation, and stamps the result with its cost and its pre-send estimate.
    """

    def __init__(
        self,
        table: PriceTable | None,
        calibration: Calibration,
        budget: Budget | None,
        max_tokens: int,
        batch_share: float = 0.5,
        reserve_share: float = 1.0,
    ) -> None:
        self.table = table
        self.batch_share = batch_share  # the Batch API's price as a share of the online one
        self.reserve_share = reserve_share  # the share of the online price a budget reserves (batch mode: batch's)
        self.calibration = calibration
        self.budget = budget
        self._max_tokens = max_tokens
        # key -> (raw estimate, reserved cost) of each request admitted and not settled: in batch mode every
        # row's, so kept in ~40 bytes a key (runner.state.openkeys), not a dict of str.
        self._open = KeyTable()

    def admit(self, request: Request, raw: int | None = None) -> bool:
        """Note the request's estimate (`raw`, if the caller made it already); False if its worst case no
        longer fits the budget."""
        if raw is None:
            raw = estimate_request(request.params)
        reserved = 0.0
        if self.budget is not None and self.table is not None:
            reserved = self.worst_case(raw)
            if not self.budget.try_reserve(reserved):
                return False
        self._open.put(request.key, raw, reserved)
        return True

    def admit_block(self, keys: list[str], raw: list[int]) -> int:
        """`admit` for requests in order, given their keys and raw estimates: how many of the first of them
        fit the budget (all, without one), each admitted as `admit` admits it; the rest are not."""
        budget = self.budget
        if budget is None or self.table is None:
            self._open.put_many(keys, raw)
            return len(keys)
        put, worst_case = self._open.put, self.worst_case
        for count, (key, estimate) in enumerate(zip(keys, raw, strict=True)):
            reserved = worst_case(estimate)
            if not budget.try_reserve(reserved):
                return count
            put(key, estimate, reserved)
        return len(keys)

    def in_flight(self) -> OpenKeys:
        """The keys admitted and not settled, as a set over this accountant's own table: a run that hands
        every admitted request over (this process's) keeps its keys in flight there, once."""
        return OpenKeys(table=self._open)

    @property
    def open_table(self) -> KeyTable:
        """The table of the keys admitted and not settled (what `in_flight` is a set over)."""
        return self._open

    def take(self, keys: list[str]) -> list[Value | None]:
        """Close admitted keys: each one's (raw estimate, reserved cost), None where it was not open."""
        return self._open.pop_many(keys)

    def take_one(self, key: str) -> Value | None:
        """`take` for one key."""
        return self._open.pop(key)

    def shrink(self) -> None:
        """Give back the memory of the requests admitted and settled (a dict keeps its size when emptied)."""
        if not self._open:
            self._open = KeyTable()

    def worst_case(self, raw_input_tokens: int) -> float:
        """What a request of `raw_input_tokens` (uncalibrated) may cost at most: what a budget reserves."""
        if self.table is None:
            return 0.0
        padded = math.ceil(self.calibration.apply(raw_input_tokens) * self.calibration.safety)
        return self.table.worst_case(input_tokens=padded, max_tokens=self._max_tokens) * self.reserve_share

    def input_estimate(self, request: Request) -> int:
        """The calibrated input-token estimate of an admitted request (made once, at admission)."""
        raw = _opened(self._open.get(request.key))[0]
        return self.calibration.apply(raw if raw is not None else estimate_request(request.params))

    def settle(self, result: Result) -> tuple[Result, str | None]:
        """The result with its cost and estimate filled in, and the name of the tier it was charged at."""
        return self.price(result, self._open.pop(result.key))

    def price(self, result: Result, opened: Value | None) -> tuple[Result, str | None]:
        """`settle` for a result whose key was closed already (`take`): `opened` is what that gave."""
        raw, reserved = _opened(opened)
        cost: float | None = None
        tier: str | None = None
        if self.table is not None:
            cost = 0.0  # a request that failed with no answer is not billed
            # Every billed turn costs: an invalid answer's turns, and a failed row's answered turns.
            if result.status == "ok" or result.input_tokens or result.output_tokens:
                cost, tier = self.table.charge(result)
                if result.api == "batch":
                    cost *= self.batch_share
        if self.budget is not None:
            self.budget.settle(reserved, cost or 0.0)
        return priced(result, cost, raw), tier

    def settle_answers(self, answers: Answers, opened: list[Value | None] | None = None) -> list[str | None]:
        """`settle` for a block of ok answers (runner.records.Answers): fills in each one's cost and
        estimate, as `settle` stamps a Result; the tier each was charged at. `opened`: what `take` gave
        for their keys, when they were closed already."""
        table, budget, batch = self.table, self.budget, answers.api == "batch"
        costs: list[float | None] = []
        estimates: list[int | None] = []
        tiers: list[str | None] = []
        if opened is None:
            opened = self._open.pop_many(answers.keys)
        for value, tokens_in, cached, tokens_out in zip(opened, answers.input_tokens,
                                                        answers.cache_read_input_tokens, answers.output_tokens,
                                                        strict=True):  # fmt: skip
            raw, reserved = _opened(value)
            cost: float | None = None
            tier: str | None = None
            if table is not None:  # an ok answer is billed, as in `settle`
                cost, tier = table.charge_tokens(tokens_in, cached, tokens_out)
                if batch:
                    cost *= self.batch_share
            if budget is not None:
                budget.settle(reserved, cost or 0.0)
            costs.append(cost)
            estimates.append(raw)
            tiers.append(tier)
        answers.cost, answers.est_input_tokens = costs, estimates
        return tiers


def _opened(opened: tuple[int, float] | None) -> tuple[int | None, float]:
    """An admitted request's raw estimate and reserved cost as Accountant._open keeps them."""
    if opened is None:  # not admitted by this run (a batch an earlier run made)
        return None, 0.0
    return opened


def accountant_for(job: Job) -> Accountant:
    """The run's accountant: the job's prices (required with a budget), its budget, and an input-token
    calibration from the ledger where estimates gate sending (a budget or a token bucket)."""
    from runner.money import ledger

    run = job.spec.run
    table = require_prices(job, "run.max_cost") if run.max_cost is not None else price_table(job)
    gated = run.max_cost is not None or run.tokens_per_minute is not None
    calibration = (
        ledger.calibration(job.name, job.spec.model.name, simulated=job.base_url is None) if gated else Calibration()
    )
    budget = Budget(run.max_cost) if run.max_cost is not None else None
    share = job.model.batch.price_share
    # Batch mode sends every request through the Batch API; hybrid may send any online.
    reserve = share if run.mode == "batch" else 1.0
    return Accountant(table, calibration, budget, job.spec.model.max_tokens, share, reserve)
