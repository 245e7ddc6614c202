"""The endpoint list and the model catalogue, read from configs/ (beside the package in a checkout,
`runner/configs` in a wheel, or $GLM_BATCH_CONFIGS)."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner.errors import UsageError
from runner.job.reading import load_yaml, read_text_file


class _Entry(BaseModel):
    """A catalogue entry: unknown keys refused, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoint(_Entry):
    """One named endpoint: where requests go, which currency it bills in, where its key comes from."""

    base_url: str | None  # None = the in-process simulator
    native_url: str | None = None  # Zhipu's native API base (/api/paas/v4): tokenizer, files, batches
    currency: str
    key_env: list[str] = Field(default_factory=list)


NATIVE_PATH = "/api/paas/v4"
ANTHROPIC_PATH = "/api/anthropic"


def native_url_for(base_url: str, native_url: str | None = None) -> str:
    """Zhipu's native API (tokenizer, files, batches) of an endpoint: the `native_url` it names, else
    `/api/paas/v4` beside its Anthropic-compatible `base_url` (in place of `/api/anthropic`, or under the
    URL itself, which is where the simulator serves it)."""
    if native_url:
        return native_url
    base = base_url.rstrip("/")
    return (base.removesuffix(ANTHROPIC_PATH) if base.endswith(ANTHROPIC_PATH) else base) + NATIVE_PATH


class PriceTier(_Entry):
    """Prices per million tokens for requests within the tier's bounds (bounds are exclusive)."""

    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    input: float
    cached_input: float
    output: float


class Sourced(_Entry):
    """Where a figure comes from: confirmed on Zhipu's own pages, or reported (or guessed) elsewhere."""

    confirmed: bool
    source: str


class CurrencyPrices(Sourced):
    """A model's price tiers in one currency, and where they come from."""

    source: str = ""
    tiers: list[PriceTier] = Field(min_length=1)


class BatchInfo(_Entry):
    """Whether Zhipu's Batch API takes a model, at what share of the online price, and whether that is
    read off Zhipu's own pages (`confirmed`)."""

    eligible: bool
    confirmed: bool = False
    source: str = ""
    price_share: float = Field(default=0.5, ge=0, le=1)
    # Requests the model may have queued in unfinished batches (Zhipu's per-model queue cap, documented
    # for the GLM-4 family): a batch file holds no more, or its create could never find room.
    queue_cap: int | None = Field(default=None, gt=0)


class ModelInfo(_Entry):
    """What the catalogue knows of one GLM model."""

    context: int
    max_output: int
    concurrency: int
    batch: BatchInfo = BatchInfo(eligible=False)
    prices: dict[str, CurrencyPrices] = Field(default_factory=dict)
    # A currency with no price known, and why (not offered on that platform, no price published):
    # estimate and max_cost refuse the model there by name rather than guess.
    unpriced: dict[str, str] = Field(default_factory=dict)
    # Where context, max_output and concurrency come from.
    sources: dict[Literal["context", "max_output", "concurrency"], Sourced] = Field(default_factory=dict)


def configs_dir() -> Path:
    """Where the catalogue lives: $GLM_BATCH_CONFIGS, the wheel's copy, or the checkout's configs/."""
    override = os.environ.get("GLM_BATCH_CONFIGS")
    if override:
        return Path(override)
    package = Path(__file__).parent.parent  # runner/
    packaged = package / "configs"
    return packaged if packaged.is_dir() else package.parent / "configs"


def _load_yaml(name: str) -> dict[str, Any]:
    path = configs_dir() / name
    try:
        data = load_yaml(read_text_file(path, str(path), "the catalogue"), origin=str(path))
    except UsageError as exc:
        raise UsageError(f"{exc}; reinstall glm-batch or fix the catalogue") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of names to entries")
    return data


@cache
def endpoints() -> dict[str, Endpoint]:
    """The named endpoints from configs/endpoints.yaml."""
    try:
        return {name: Endpoint.model_validate(v) for name, v in _load_yaml("endpoints.yaml").items()}
    except ValidationError as exc:
        raise UsageError(f"configs/endpoints.yaml: {exc}") from exc


def endpoint(name: str, native_url: str | None = None) -> Endpoint | None:
    """The endpoint `name` (a spec's model.endpoint, doctor's --endpoint): a named one, or for a URL (a
    proxy, a simulator) one billed in CNY unless it is z.ai's host, with zhipu's key variables and the
    native API `native_url` or beside it. None for anything else."""
    named = endpoints()
    if name in named:
        return named[name]
    if not name.startswith(("http://", "https://")):
        return None
    base = name.rstrip("/")
    currency = "USD" if "z.ai" in base else "CNY"
    return Endpoint(base_url=base, native_url=native_url_for(base, native_url), currency=currency,
                    key_env=named["zhipu"].key_env)  # fmt: skip


@cache
def models() -> dict[str, ModelInfo]:
    """The model catalogue from configs/models.yaml (keys starting with `_` hold shared YAML anchors)."""
    try:
        return {
            name: ModelInfo.model_validate(v)
            for name, v in _load_yaml("models.yaml").items()
            if not str(name).startswith("_")
        }
    except ValidationError as exc:
        raise UsageError(f"configs/models.yaml: {exc}") from exc
