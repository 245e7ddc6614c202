"""The job spec: what a YAML file in jobs/ may say, as pydantic models with unknown keys forbidden.

No I/O happens here; `runner.job.resolve` reads the YAML, validates it against `JobSpec` and resolves
it (files, templates, endpoint, catalogue) into a `Job`. `glm-batch schema` prints `JobSpec`'s JSON Schema.
"""

from __future__ import annotations

import string
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """Which rows to read: Parquet or CSV files (globs allowed), the id column, the columns to use."""

    paths: list[str] = Field(min_length=1)
    id_column: str | None = None
    columns: list[str] | None = None
    limit: PositiveInt | None = None

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class PromptSpec(_Strict):
    """The prompt: an optional system prompt and exactly one of an inline template or a template file."""

    system: str | None = None
    template: str | None = None
    template_file: str | None = None

    @model_validator(mode="after")
    def _exactly_one_template(self) -> PromptSpec:
        if (self.template is None) == (self.template_file is None):
            raise ValueError("give exactly one of prompt.template or prompt.template_file")
        return self


class ThinkingSpec(_Strict):
    """Extended thinking: on with a token budget, or off (GLM-4.5/4.6 are hybrid; 4.7+ always think)."""

    type: Literal["enabled", "disabled"]
    budget_tokens: PositiveInt | None = None


class PriceOverride(_Strict):
    """Prices per million tokens that replace the catalogue's for this job (one tier)."""

    input: Annotated[float, Field(ge=0)]
    output: Annotated[float, Field(ge=0)]
    cached_input: Annotated[float, Field(ge=0)] | None = None  # default: the input price


class ModelSpec(_Strict):
    """Which model, where, and how it samples."""

    name: str
    endpoint: str = "zhipu"
    # Zhipu's native API (tokenizer, Batch API) for a URL endpoint; default: /api/paas/v4 beside it.
    native_endpoint: Annotated[str, Field(pattern=r"^https?://")] | None = None
    max_tokens: PositiveInt
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: PositiveInt | None = None
    stop_sequences: list[str] | None = None
    thinking: ThinkingSpec | None = None
    # auto: stream only when max_tokens is large enough to trip the SDK's non-streaming guard.
    stream: bool | Literal["auto"] = "auto"
    prices: PriceOverride | None = None  # in the endpoint's currency; default: configs/models.yaml


class BatchSpec(_Strict):
    """How requests are packed into Zhipu's Batch API files and how often batches are looked at."""

    max_requests: Annotated[int, Field(gt=0, le=50_000)] = 50_000  # lines per file (Zhipu's limit: 50,000)
    max_bytes: Annotated[int, Field(gt=0, le=100_000_000)] = 95_000_000  # bytes per file (limit: 100 MB)
    poll_initial_s: Annotated[float, Field(gt=0, le=3600)] = 5.0  # first look at a batch after this long...
    poll_max_s: Annotated[float, Field(gt=0, le=3600)] = 300.0  # ...then less often, up to this
    max_rounds: Annotated[int, Field(ge=1, le=20)] = 3  # batch rounds for lines to send again (batch mode)
    # hybrid: how long before the deadline to cancel what the Batch API has not finished and send it online
    online_margin_s: Annotated[float, Field(ge=0, le=86_400)] | None = None  # default: from the online rate


class RunSpec(_Strict):
    """How hard to push the endpoint and how long to keep trying."""

    # online: the Messages API; batch: Zhipu's Batch API (half price, no concurrency limit, hours);
    # hybrid: the Batch API, with what is not back before `deadline` (and repairs) finished online.
    mode: Literal["online", "batch", "hybrid"] = "online"
    # local: this process sends; ray: Ray Data reads and renders, actors send under one cluster-wide limit
    # (online mode only). ray_address: the cluster to join (default: $RAY_ADDRESS, else a local instance).
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    # hybrid: when the job must be done, as a duration from the start ("90m", "6h", "45s") or a clock
    # time ("06:30", local, the next such time).
    deadline: Annotated[str, Field(pattern=r"^(\d+(\.\d+)?(s|m|h)|([01]?\d|2[0-3]):[0-5]\d)$")] | None = None
    batch: BatchSpec = BatchSpec()

    # A number, or "auto" to find and track the endpoint's real limit (up to max_concurrency).
    # None: the model's default from the catalogue.
    concurrency: PositiveInt | Literal["auto"] | None = None
    max_concurrency: PositiveInt = 64
    requests_per_minute: PositiveFloat | None = None
    tokens_per_minute: PositiveFloat | None = None
    max_attempts: PositiveInt = 6
    timeout_s: PositiveFloat = 600.0
    backoff_initial_s: PositiveFloat = 0.5  # full-jitter exponential backoff between attempts...
    backoff_max_s: PositiveFloat = 30.0  # ...capped here; a longer retry-after is capped here too
    checkpoint_rows: PositiveInt = 1000
    checkpoint_seconds: PositiveFloat = 2.0
    max_cost: PositiveFloat | None = None  # per run, in the endpoint's currency (CNY or USD)
    grace_s: Annotated[float, Field(ge=0)] = 30.0  # on SIGINT/SIGTERM, how long in-flight requests may finish


class OutputSpec(_Strict):
    """Where results go (a Parquet path, may use {name} and {run_date}), which input columns to keep,
    and, for labeling, the structure answers must have: labels, a JSON Schema, or any JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    path: str
    keep_columns: list[str] = Field(default_factory=list)
    state_dir: str | None = None
    labels: list[str] | None = None  # one categorical label (a list of them with multi: true)
    multi: bool = False
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # a JSON Schema object
    parse: Literal["json"] | None = None  # any JSON object, unvalidated beyond parsing
    mode: Literal["tool", "text"] = "tool"  # a forced tool call, or JSON extracted from the text
    max_repairs: Annotated[int, Field(ge=0)] = 2
    # Ask each row this many times and keep the majority answer, with the share that agreed.
    samples: Annotated[int, Field(ge=1, le=15)] = 1

    @model_validator(mode="after")
    def _one_structure(self) -> OutputSpec:
        if sum(x is not None for x in (self.labels, self.schema_, self.parse)) > 1:
            raise ValueError("give at most one of output.labels, output.schema, output.parse")
        if self.samples > 1 and self.labels is None and self.schema_ is None and self.parse is None:
            raise ValueError(
                "samples above 1 vote between structured answers; add output.labels, output.schema "
                "or output.parse: json"
            )
        return self

    @field_validator("path")
    @classmethod
    def _known_placeholders(cls, v: str) -> str:
        fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        unknown = fields - {"name", "run_date"}
        if unknown:
            raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}}; use {{name}} or {{run_date}}")
        return v


class EvalSpec(_Strict):
    """Quality against known answers: the input column holding the gold label (for `labels:` jobs),
    and/or, for `schema:` jobs, a gold input column per answer field (per-field exact match)."""

    gold_column: str | None = None
    gold_fields: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _something_to_compare(self) -> EvalSpec:
        if self.gold_column is None and not self.gold_fields:
            raise ValueError("give eval.gold_column or eval.gold_fields")
        return self


class SimulatorSpec(_Strict):
    """How the built-in simulator behaves when `model.endpoint: simulator` (demos and tests only)."""

    latency_s: Annotated[float, Field(ge=0)] = 0.0
    latency_jitter_s: Annotated[float, Field(ge=0)] = 0.0
    concurrency_cap: PositiveInt | None = None
    fault_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    invalid_rate: Annotated[float, Field(ge=0, le=1)] = 0.0  # structured answers broken on the first try
    sample_disagreement: Annotated[float, Field(ge=0, le=1)] = 0.0  # repeats of a prompt answered otherwise
    seed: int = 0
    faults: list[str] | None = None  # fault kinds fault_rate draws from (default: every transient one)
    slow_s: PositiveFloat = 30.0  # how long a "slow" or "hang" fault takes
    # The Batch API (/api/paas/v4): phase timings, processing rate, and the real world's quirks.
    batch_validating_s: Annotated[float, Field(ge=0)] = 0.0
    batch_lines_per_s: PositiveFloat | None = None  # None: every line at once
    batch_finalizing_s: Annotated[float, Field(ge=0)] = 0.0
    batch_expire_after_s: PositiveFloat | None = None  # a batch still running this long expires part-done
    batch_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.0  # lines failing transiently (500, 429/1302)
    batch_output_404_s: Annotated[float, Field(ge=0)] = 0.0  # result files 404 this long after the end
    batch_queue_cap: PositiveInt | None = None  # requests a model may have queued in unfinished batches
    batch_refuse_ineligible: bool = False  # refuse models the catalogue marks batch: false
    batch_max_lines: PositiveInt = 50_000


class JobSpec(_Strict):
    """A whole job file (`version: 1`)."""

    version: Literal[1]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] | None = None
    description: str | None = None
    input: InputSpec
    prompt: PromptSpec
    model: ModelSpec
    run: RunSpec = RunSpec()
    output: OutputSpec
    eval: EvalSpec | None = None
    simulator: SimulatorSpec = SimulatorSpec()
