"""The job spec: what a YAML file in jobs/ may say, as pydantic models with unknown keys forbidden (no
I/O here; runner.job.resolve reads and resolves it)."""

from __future__ import annotations

import string
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from runner.redact import redact


def _distinct(v: list[str]) -> list[str]:
    """A list of names each given once: a name twice would make two columns of one name."""
    seen: set[str] = set()
    for name in v:
        if name in seen:
            raise ValueError(f"{name!r} is named twice; give each name once")
        seen.add(name)
    return v


def well_formed_url(v: str) -> str:
    """An http(s) URL with a host (and a port that is a number): one that cannot be connected to is
    refused at load, not found out as a connection error on every row. Other values (an endpoint's
    name) pass as they are."""
    if not v.startswith(("http://", "https://")):
        return v
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(
            f"{redact(v)!r} is not a well-formed URL ({exc}); write it like https://host:port/path"
        ) from None
    if not parts.hostname or any(c.isspace() or ord(c) < 32 for c in v):
        raise ValueError(
            f"{redact(v)!r} is not a well-formed URL (no host, or a space in it); write it like https://host/path"
        )
    if parts.username is not None or parts.password is not None:
        # The SDK sends no user-info, so every row would fail as a connection error; and it is where a
        # pasted key ends up. Said without the secret.
        raise ValueError(
            f"{redact(v)!r} carries user-info (name:secret@) that is never sent; give the URL without it "
            "and the key in ZHIPUAI_API_KEY"
        )
    return v


# Column names: each at most once (output.keep_columns, input.columns).
Names = Annotated[list[str], AfterValidator(_distinct)]
# An endpoint's name, or an http(s) URL that parses and has a host.
Url = Annotated[str, AfterValidator(well_formed_url)]


# Upper bounds on every number a spec may give: far above anything a real job needs, low enough that a
# typo (an extra three zeros, .inf) is refused at load instead of exhausting memory or never ending.
MAX_CONCURRENCY = 4096
MAX_PER_MINUTE = 10**9  # requests_per_minute and tokens_per_minute
MAX_ATTEMPTS = 100
MAX_SECONDS = 86_400  # timeout_s, grace_s: one day
MAX_BACKOFF_S = 3600
MAX_CHECKPOINT_ROWS = 10_000_000
MAX_CHECKPOINT_S = 3600
MAX_COST = 10**9  # in the endpoint's currency
MAX_PRICE = 10**6  # per million tokens
MAX_INPUT_ROWS = 10**12
MAX_TOKENS = 10**6
MAX_TOP_K = 1000
MAX_REPAIRS = 10


def _refuse_bool(v: Any) -> Any:
    """A YAML `yes`/`on`/`true` is a bool, and pydantic would read it as the number 1: refuse it."""
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {str(v).lower()}")
    return v


# Numbers: never a bool; "8" (a quoted number, or a --set value) is read as 8. Floats must be finite
# (the models below refuse .nan and .inf).
Int = Annotated[int, BeforeValidator(_refuse_bool)]
Float = Annotated[float, BeforeValidator(_refuse_bool)]


def _two_decimals(v: float) -> float:
    if round(v, 2) != v:
        raise ValueError(f"{v!r} has more than two decimals, which Zhipu refuses; use {round(v, 2)!r}")
    return v


TwoDecimals = Annotated[Float, AfterValidator(_two_decimals)]
PositiveInt = Annotated[Int, Field(gt=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]


_JSON_SCHEMA_BOUNDS = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}


def _standard_bounds(schema: dict[str, Any]) -> None:
    """Name number bounds as JSON Schema does (`exclusiveMinimum`, `minimum`...): pydantic writes a
    bound it cannot attach to a validated type (ours refuse booleans first) as `gt`/`ge`, which
    editors ignore."""
    for key, value in list(schema.items()):
        if isinstance(value, dict):
            _standard_bounds(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    _standard_bounds(item)
        if key in _JSON_SCHEMA_BOUNDS and schema.get("type") in ("integer", "number"):
            schema[_JSON_SCHEMA_BOUNDS[key]] = schema.pop(key)


class _Strict(BaseModel):
    # defer_build: a spec is validated whole (JobSpec), so the nested models' own validators are never
    # needed; compiling them all at import was about a third of loading this module.
    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, defer_build=True, json_schema_extra=_standard_bounds
    )


class InputSpec(_Strict):
    """Which rows to read: Parquet, CSV or JSONL files (globs allowed), the id column, the columns to use."""

    paths: list[str] = Field(min_length=1)
    id_column: str | None = Field(None, description="Each row's id; ids must be present and distinct.")
    columns: Names | None = None
    limit: PositiveInt | None = Field(
        None, le=MAX_INPUT_ROWS, description=f"Use only the first N rows (1 to {MAX_INPUT_ROWS:.0e})."
    )
    nulls: Literal["error", "skip", "empty"] = Field(
        "error",
        description="A null in a column the prompt uses: error refuses the job before sending; skip records "
        "the row as failed (error_type null_input) without sending it; empty renders it as ''.",
    )

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class MessageSpec(_Strict):
    """One turn of a fixed conversation: who speaks, and what (a Jinja2 template, rendered per row)."""

    role: Literal["user", "assistant"]
    content: str


class PromptSpec(_Strict):
    """The prompt: an optional system prompt and exactly one of an inline template, a template file,
    or a list of messages (few-shot examples, a fixed conversation) ending with the row's user turn."""

    system: str | None = None
    template: str | None = None
    template_file: str | None = None
    messages: list[MessageSpec] | None = Field(
        None,
        min_length=1,
        description="Turns sent in order, each content a Jinja2 template; the last must be the user's.",
    )

    @model_validator(mode="after")
    def _exactly_one_template(self) -> PromptSpec:
        given = sum(x is not None for x in (self.template, self.template_file, self.messages))
        if given != 1:
            raise ValueError("give exactly one of prompt.template, prompt.template_file or prompt.messages")
        return self


class ThinkingSpec(_Strict):
    """Extended thinking: on with a token budget, or off (GLM-4.5/4.6 are hybrid; 4.7+ always think)."""

    type: Literal["enabled", "disabled"]
    budget_tokens: PositiveInt | None = Field(
        None, le=MAX_TOKENS, description=f"Thinking tokens, below model.max_tokens (at most {MAX_TOKENS})."
    )


class PriceOverride(_Strict):
    """Prices per million tokens that replace the catalogue's for this job (one tier)."""

    input: Float = Field(ge=0, le=MAX_PRICE, description=f"0 to {MAX_PRICE} per million input tokens.")
    output: Float = Field(ge=0, le=MAX_PRICE, description=f"0 to {MAX_PRICE} per million output tokens.")
    cached_input: Float | None = Field(
        None, ge=0, le=MAX_PRICE, description="Per million cached input tokens; default: the input price."
    )


class ModelSpec(_Strict):
    """Which model, where, and how it samples."""

    name: str
    endpoint: Url = "zhipu"
    # Zhipu's native API (tokenizer, Batch API) for a URL endpoint; default: /api/paas/v4 beside it.
    native_endpoint: Annotated[str, Field(pattern=r"^https?://"), AfterValidator(well_formed_url)] | None = None
    max_tokens: PositiveInt = Field(
        le=MAX_TOKENS, description="The longest answer, in tokens; at most the model's own maximum output."
    )
    # Zhipu's documented ranges (real-wire.md, native chat body), at most two decimals: 0.123 is
    # refused at load, not by the endpoint on every row.
    temperature: TwoDecimals | None = Field(None, ge=0, le=1, description="0 to 1, at most two decimals.")
    top_p: TwoDecimals | None = Field(None, ge=0.01, le=1, description="0.01 to 1, at most two decimals.")
    top_k: PositiveInt | None = Field(None, le=MAX_TOP_K, description=f"1 to {MAX_TOP_K}.")
    stop_sequences: list[str] | None = None
    thinking: ThinkingSpec | None = None
    # auto: stream only when max_tokens is large enough to trip the SDK's non-streaming guard.
    stream: bool | Literal["auto"] = "auto"
    prices: PriceOverride | None = None  # in the endpoint's currency; default: configs/models.yaml


class BatchSpec(_Strict):
    """How requests are packed into Zhipu's Batch API files and how often batches are looked at."""

    max_requests: Annotated[Int, Field(gt=0, le=50_000)] = 50_000  # lines per file (Zhipu's limit: 50,000)
    max_bytes: Annotated[Int, Field(gt=0, le=100_000_000)] = 95_000_000  # bytes per file (limit: 100 MB)
    poll_initial_s: Annotated[Float, Field(gt=0, le=3600)] = 5.0  # first look at a batch after this long...
    poll_max_s: Annotated[Float, Field(gt=0, le=3600)] = 300.0  # ...then less often, up to this
    max_rounds: Annotated[Int, Field(ge=1, le=20)] = 3  # batch rounds for lines to send again (batch mode)
    # hybrid: how long before the deadline to cancel what the Batch API has not finished and send it online
    # Default: 10% of the time from the start to the deadline, at least 1 s. The deadline bounds the batch
    # part; the online tail is sent after it, whole (README, Batch mode).
    online_margin_s: Annotated[Float, Field(ge=0, le=86_400)] | None = None
    # Send a model Zhipu's eligibility list does not name (GLM-4.5 and newer) to the Batch API anyway;
    # the run says it may fail at validation. Not needed once `glm-batch doctor --batch` proved the model.
    allow_unconfirmed: bool = False
    # Keep a batch's result files at Zhipu after its answers are journalled (an account holds at most
    # 1,000 files; by default they are deleted, and so is an input file a create refused).
    keep_files: bool = False


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

    concurrency: Annotated[PositiveInt, Field(le=MAX_CONCURRENCY)] | Literal["auto"] | None = Field(
        None, description=f"Requests in flight, 1 to {MAX_CONCURRENCY}, or auto; default: the model's."
    )
    max_concurrency: PositiveInt = Field(
        64, le=MAX_CONCURRENCY, description=f"The most `auto` may reach, 1 to {MAX_CONCURRENCY}."
    )
    requests_per_minute: PositiveFloat | None = Field(
        None, le=MAX_PER_MINUTE, description=f"An extra request bucket, above 0, at most {MAX_PER_MINUTE:.0e}."
    )
    tokens_per_minute: PositiveFloat | None = Field(
        None, le=MAX_PER_MINUTE, description=f"An extra token bucket, above 0, at most {MAX_PER_MINUTE:.0e}."
    )
    max_attempts: PositiveInt = Field(6, le=MAX_ATTEMPTS, description=f"Tries per request, 1 to {MAX_ATTEMPTS}.")
    timeout_s: PositiveFloat = Field(
        600.0, le=MAX_SECONDS, description=f"Seconds a non-streamed attempt may take, above 0, at most {MAX_SECONDS}."
    )
    # Streaming, an answer may take as long as it needs; no event for this long means a hung connection.
    stall_s: PositiveFloat = Field(
        120.0,
        le=MAX_SECONDS,
        description=f"Streaming: seconds without an event before a retry (at most {MAX_SECONDS}).",
    )
    backoff_initial_s: PositiveFloat = Field(
        0.5,
        le=MAX_BACKOFF_S,
        description=f"Full-jitter exponential backoff between attempts starts here (at most {MAX_BACKOFF_S} s)...",
    )
    backoff_max_s: PositiveFloat = Field(
        30.0,
        le=MAX_BACKOFF_S,
        description=f"...and is capped here, as is a longer retry-after (at most {MAX_BACKOFF_S} s).",
    )
    checkpoint_rows: PositiveInt = Field(
        1000, le=MAX_CHECKPOINT_ROWS, description=f"Save answers every N rows (at most {MAX_CHECKPOINT_ROWS:.0e})..."
    )
    checkpoint_seconds: PositiveFloat = Field(
        2.0, le=MAX_CHECKPOINT_S, description=f"...or every N seconds (at most {MAX_CHECKPOINT_S})."
    )
    max_cost: PositiveFloat | None = Field(
        None,
        le=MAX_COST,
        description=f"Spend cap per run in the endpoint's currency (CNY or USD), at most {MAX_COST:.0e}.",
    )
    grace_s: Float = Field(
        30.0,
        ge=0,
        le=MAX_SECONDS,
        description=f"On SIGINT/SIGTERM, how long requests in flight may finish (0 to {MAX_SECONDS}).",
    )


class CascadeSpec(_Strict):
    """A cascade (runner.cascade): the proxy answers every row, the oracle (model.name) a calibration
    sample and the rows the proxy is unsure of, so that the output agrees with the oracle on at least
    `target` of the rows with probability at least 1 - `delta` (BARGAIN's method)."""

    proxy: str = Field(description="The cheap model that answers every row (checked against configs/models.yaml).")
    oracle: str | None = Field(None, description="The model whose answers to match; default: model.name.")
    target: Float = Field(0.95, gt=0, lt=1, description="Agreement with the oracle to reach, above 0 and below 1.")
    delta: Float = Field(0.05, gt=0, lt=1, description="Allowed chance of missing the target, above 0 and below 1.")
    confidence: Literal["samples", "stated"] = Field(
        "samples",
        description="samples: the share of the proxy's samples that agree with its majority answer; stated: "
        "the proxy is asked once and states its confidence (0 to 1) in its answer.",
    )
    samples: Int = Field(15, ge=2, le=15, description="Proxy samples per row (2 to 15).")
    temperature: Float = Field(0.7, gt=0, le=1, description="The proxy's sampling temperature (above 0, at most 1).")
    seed: Int = Field(0, description="Seeds the calibration sample's draws.")


class OutputSpec(_Strict):
    """Where results go (a Parquet path, may use {name} and {run_date}), which input columns to keep,
    and, for labeling, the structure answers must have: labels, a JSON Schema, or any JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, defer_build=True)

    path: str
    keep_columns: Names | None = Field(
        None,
        description="Input columns copied beside each answer. Default: none for text answers; for labeling "
        "(labels, schema, parse) the columns the prompt uses. [] keeps none.",
    )
    state_dir: str | None = None
    labels: list[str] | None = None  # one categorical label (a list of them with multi: true)
    multi: bool = False
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # a JSON Schema object
    parse: Literal["json"] | None = None  # any JSON object, unvalidated beyond parsing
    mode: Literal["tool", "text"] = "tool"  # a forced tool call, or JSON extracted from the text
    max_repairs: Int = Field(
        2, ge=0, le=MAX_REPAIRS, description=f"Re-ask an invalid answer at most this many times (0 to {MAX_REPAIRS})."
    )
    samples: Int = Field(
        1, ge=1, le=15, description="Ask each row this many times (1 to 15) and keep the majority answer."
    )
    cascade: CascadeSpec | None = None

    @model_validator(mode="after")
    def _one_structure(self) -> OutputSpec:
        if sum(x is not None for x in (self.labels, self.schema_, self.parse)) > 1:
            raise ValueError("give at most one of output.labels, output.schema, output.parse")
        if self.cascade is not None and self.labels is None and self.schema_ is None:
            raise ValueError("a cascade compares answers: give output.labels or output.schema with it")
        if self.cascade is not None and self.samples > 1:
            raise ValueError("a cascade samples the proxy itself (output.cascade.samples); leave output.samples at 1")
        if self.samples > 1 and self.labels is None and self.schema_ is None and self.parse is None:
            raise ValueError(
                "samples above 1 vote between structured answers; add output.labels, output.schema "
                "or output.parse: json"
            )
        return self

    @field_validator("path")
    @classmethod
    def _known_placeholders(cls, v: str) -> str:
        # Only the two bare placeholders: a format spec or conversion ({name:d}, {run_date!x},
        # {name:>5000}) would fail, or build a path no file system takes, when the path is formatted.
        for _, field, format_spec, conversion in string.Formatter().parse(v):
            if field is None:
                continue
            if field not in ("name", "run_date"):
                raise ValueError(f"unknown placeholder {{{field}}}; use {{name}} or {{run_date}}")
            if format_spec or conversion:
                shown = field + (f"!{conversion}" if conversion else "") + (f":{format_spec}" if format_spec else "")
                raise ValueError(f"{{{shown}}}: placeholders take no format spec or conversion; write {{{field}}}")
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

    latency_s: Annotated[Float, Field(ge=0)] = 0.0
    latency_jitter_s: Annotated[Float, Field(ge=0)] = 0.0
    concurrency_cap: PositiveInt | None = None
    fault_rate: Annotated[Float, Field(ge=0, le=1)] = 0.0
    invalid_rate: Annotated[Float, Field(ge=0, le=1)] = 0.0  # structured answers broken on the first try
    sample_disagreement: Annotated[Float, Field(ge=0, le=1)] = 0.0  # repeats of a prompt answered otherwise
    # Models of different skill: model name -> share of rows it answers wrong (more on hard rows), its
    # sample agreement lower where it is wrong ("informative") or unrelated to it ("flat").
    model_error: dict[str, Annotated[Float, Field(ge=0, le=1)]] = Field(default_factory=dict)
    confidence: Literal["informative", "flat"] = "informative"
    seed: Int = 0
    faults: list[str] | None = None  # fault kinds fault_rate draws from (default: every transient one)
    slow_s: PositiveFloat = 30.0  # how long a "slow" or "hang" fault takes
    # The Batch API (/api/paas/v4): phase timings, processing rate, and the real world's quirks.
    batch_validating_s: Annotated[Float, Field(ge=0)] = 0.0
    batch_lines_per_s: PositiveFloat | None = None  # None: every line at once
    batch_finalizing_s: Annotated[Float, Field(ge=0)] = 0.0
    batch_expire_after_s: PositiveFloat | None = None  # a batch still running this long expires part-done
    batch_error_rate: Annotated[Float, Field(ge=0, le=1)] = 0.0  # lines failing transiently (500, 429/1302)
    batch_output_404_s: Annotated[Float, Field(ge=0)] = 0.0  # result files 404 this long after the end
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
