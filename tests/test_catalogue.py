"""The model catalogue (configs/models.yaml) against what Zhipu documents (real-wire.md), and the spec's
sampling bounds against the real API's.

Every model has a price on every endpoint or is refused there by name; every figure names its source.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from runner.job import catalog
from runner.job.resolve import load_job
from runner.money.pricing import price_table
from tests.conftest import JobFiles, cli

MODELS = sorted(catalog.models())
ENDPOINTS = sorted(catalog.endpoints())
# Zhipu's Batch API eligibility list (real-wire.md, "Batch API: Eligibility").
BATCH_LIST = {
    "glm-4-plus",
    "glm-4-air-250414",
    "glm-4-flashx-250414",
    "glm-4-long",
    "glm-4",
    "glm-4-0520",
    "glm-4-flash",
}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_model_has_a_price_on_every_endpoint_or_is_refused_there_by_name(
    endpoint: str, make_job: Callable[..., JobFiles], tmp_path: Path
) -> None:
    refused = []
    for model in MODELS:
        files = make_job(name=f"j-{model}", model={"name": model, "endpoint": endpoint, "max_tokens": 16})
        job = load_job(files.spec)
        if price_table(job) is not None:
            continue
        assert job.model.unpriced.get(job.currency), f"{model}: no {job.currency} prices and no reason given"
        result = cli("estimate", str(files.spec), "--json")
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.stderr
        assert f"{model} has no {job.currency} price on endpoint {endpoint}" in lines[0]
        assert "price unknown" in lines[0] and "model.prices" in lines[0]
        refused.append(model)
    # The simulator and open.bigmodel.cn bill in CNY: every model there but plain glm-4 has a price.
    if endpoint != "zai":
        assert refused == ["glm-4"]


def test_every_price_and_limit_says_whether_it_is_confirmed_and_where_it_comes_from() -> None:
    for name, info in catalog.models().items():
        assert set(info.sources) == {"context", "max_output", "concurrency"}, name
        assert all(s.source for s in info.sources.values()), name
        assert all(p.source for p in info.prices.values()), name
        assert info.batch.source, name
        for currency in ("CNY", "USD"):
            assert (currency in info.prices) != (currency in info.unpriced), f"{name} {currency}"


def test_the_catalogue_holds_the_documented_figures() -> None:
    """Prices, limits and eligibility as real-wire.md quotes them."""
    models = catalog.models()

    def cny(model: str) -> list[tuple[float, float, float]]:
        return [(t.input, t.output, t.cached_input) for t in models[model].prices["CNY"].tiers]

    assert cny("glm-5") == [(4, 18, 1), (6, 22, 1.5)]
    assert cny("glm-5-turbo") == [(5, 22, 1.2), (7, 26, 1.8)]
    assert cny("glm-5.2") == cny("glm-5.3") == [(8, 28, 2)]
    assert cny("glm-5.3-flash") == [(0.8, 2.8, 0.23)]
    assert cny("glm-4.7-flashx") == [(0.5, 3, 0.1)]
    assert cny("glm-4.7-flash") == [(0, 0, 0)]
    assert cny("glm-4.5-x") == [(8, 16, 1.6), (12, 32, 2.4), (16, 64, 3.2)]
    assert cny("glm-4.5-airx") == [(4, 12, 0.8), (4, 16, 0.8), (8, 32, 1.6)]
    concurrency = {"glm-4.6": 5, "glm-4.5": 10, "glm-4.5-x": 1, "glm-4.5-air": 5, "glm-4.5-airx": 5}
    concurrency |= {"glm-4.5-flash": 2, "glm-4.7": 3, "glm-4-plus": 20}
    assert {m: models[m].concurrency for m in concurrency} == concurrency
    context = {"glm-4.5": 131072, "glm-4.7": 204800, "glm-5.1": 204800, "glm-5.3-flash": 1_000_000}
    assert {m: models[m].context for m in context} == context
    assert {m for m, info in models.items() if info.batch.eligible} == BATCH_LIST
    assert all(models[m].batch.confirmed for m in BATCH_LIST)
    assert models["glm-4-flash"].batch.price_share == 0  # its batch is free


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("temperature", 1.01, "less than or equal to 1"),
        ("temperature", 0.123, "more than two decimals"),
        ("top_p", 0, "greater than or equal to 0.01"),
        ("top_p", 0.005, "more than two decimals"),
    ],
)
def test_sampling_outside_the_real_apis_bounds_is_refused_at_load(
    field: str, value: float, says: str, make_job: Callable[..., JobFiles]
) -> None:
    files = make_job(model={field: value})
    result = cli("validate", str(files.spec))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert f"model.{field}: " in lines[0] and says in lines[0]


def test_two_decimals_within_the_bounds_are_accepted(make_job: Callable[..., JobFiles]) -> None:
    files = make_job(model={"temperature": 0.07, "top_p": 0.01})
    assert cli("validate", str(files.spec)).exit_code == 0
