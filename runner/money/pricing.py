"""Prices: which tier a request falls in (by input length and, for GLM-4.x on bigmodel.cn, answer
length), what an answer cost (cached input at the cached price), and the budget that caps a run."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runner.errors import UsageError
from runner.job.catalog import CurrencyPrices, PriceTier
from runner.job.resolve import Job

if TYPE_CHECKING:
    from runner.records import Result

PER_TOKENS = 1_000_000


@functools.cache  # once per tier, not once per answer
def tier_label(tier: PriceTier) -> str:
    """A short name for a tier, for summaries: `in<32000,out<200`, `in<32000`, `all`."""
    parts = []
    if tier.max_input_tokens is not None:
        parts.append(f"in<{tier.max_input_tokens}")
    if tier.max_output_tokens is not None:
        parts.append(f"out<{tier.max_output_tokens}")
    return ",".join(parts) or "all"


def tier_cost(tier: PriceTier, *, input_tokens: int, output_tokens: int, cache_read_tokens: int = 0) -> float:
    """What one answer charged at `tier` cost (PriceTable.cost, when the tier is known already)."""
    return (
        input_tokens * tier.input + cache_read_tokens * tier.cached_input + output_tokens * tier.output
    ) / PER_TOKENS


@dataclass(frozen=True)
class PriceTable:
    """One model's prices in one currency."""

    model: str
    currency: str
    tiers: tuple[PriceTier, ...]
    confirmed: bool

    def tier(self, input_tokens: int, output_tokens: int) -> PriceTier:
        """The first tier whose bounds hold; the last one if none does (the top of the scale)."""
        for tier in self.tiers:
            if tier.max_input_tokens is not None and input_tokens >= tier.max_input_tokens:
                continue
            if tier.max_output_tokens is not None and output_tokens >= tier.max_output_tokens:
                continue
            return tier
        return self.tiers[-1]

    def cost(self, *, input_tokens: int, output_tokens: int, cache_read_tokens: int = 0) -> float:
        """What one answer cost. `input_tokens` excludes the cached ones, as the API reports it."""
        tier = self.tier(input_tokens + cache_read_tokens, output_tokens)
        return tier_cost(
            tier, input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cache_read_tokens
        )

    def charge(self, result: Result) -> tuple[float, str]:
        """What a result's answered turns cost (at the online price) and the label of their tier."""
        tokens_in, cached = result.input_tokens or 0, result.cache_read_input_tokens or 0
        return self.charge_tokens(tokens_in, cached, result.output_tokens or 0)

    def charge_tokens(self, tokens_in: int, cached: int, tokens_out: int) -> tuple[float, str]:
        """`charge` given the answered turns' tokens (input without the cached ones, cached, output)."""
        tier = self.tier(tokens_in + cached, tokens_out)  # once: the cost and its label (once per answer)
        cost = tier_cost(tier, input_tokens=tokens_in, output_tokens=tokens_out, cache_read_tokens=cached)
        return cost, tier_label(tier)

    def worst_case(self, *, input_tokens: int, max_tokens: int) -> float:
        """The most one request can cost: nothing cached, and the dearest answer up to max_tokens (at
        max_tokens or the top of a tier split on output length)."""
        lengths = {max_tokens} | {
            t.max_output_tokens - 1 for t in self.tiers if t.max_output_tokens and t.max_output_tokens <= max_tokens
        }
        return max(self.cost(input_tokens=input_tokens, output_tokens=n) for n in lengths)


def price_table(job: Job) -> PriceTable | None:
    """The job's prices: its own override, else the catalogue's for its currency, else None."""
    override = job.spec.model.prices
    if override is not None:
        cached = override.cached_input if override.cached_input is not None else override.input
        tier = PriceTier(input=override.input, cached_input=cached, output=override.output)
        return PriceTable(job.spec.model.name, job.currency, (tier,), confirmed=True)
    prices: CurrencyPrices | None = job.model.prices.get(job.currency)
    if prices is None:
        return None
    return PriceTable(job.spec.model.name, job.currency, tuple(prices.tiers), prices.confirmed)


def require_prices(job: Job, why: str) -> PriceTable:
    """The price table, or a UsageError saying how to give one."""
    table = price_table(job)
    if table is None:
        reason = job.model.unpriced.get(job.currency)
        known = f"price unknown: {reason}" if reason else "no prices in configs/models.yaml"
        raise UsageError(
            f"{job.spec_path}: model.prices: {job.spec.model.name} has no {job.currency} price on endpoint "
            f"{job.endpoint_name} ({known}), which {why} needs; add model.prices: {{input: ..., output: ...}} "
            "from the endpoint's price page"
        )
    return table


class Budget:
    """A spending cap for one run: a request is dispatched only if its worst case still fits, and holds
    that reservation until its real cost replaces it."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.spent = 0.0
        self.reserved = 0.0

    def try_reserve(self, worst_case: float) -> bool:
        """Reserve `worst_case` if it fits under the cap; False (and nothing reserved) if not."""
        if self.spent + self.reserved + worst_case > self.limit:
            return False
        self.reserved += worst_case
        return True

    def settle(self, reserved: float, actual: float) -> None:
        """An answer came back: release its reservation and book what it really cost."""
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += actual
