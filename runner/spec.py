"""The job spec: what a YAML file in jobs/ may say, validated strictly, then resolved against the catalogue.

    job = load_job(Path("jobs/demo.yaml"), overrides=["run.concurrency=4"])

Relative paths in a spec resolve against the spec file's directory, so a cron job run from any working
directory reads and writes the same files. Errors name the file and the key path:
``jobs/x.yaml: run.concurrency: Input should be greater than 0``.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import json
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runner import catalog
from runner.errors import UsageError
from runner.structured import AnswerShape
from runner.templates import Template, compile_template

PositiveInt = Annotated[int, Field(gt=0)]
SIMULATOR_TOKENIZER_PATH = "/api/paas/v4/tokenizer"  # where a URL endpoint (the simulator) counts tokens
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
    max_tokens: PositiveInt
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: PositiveInt | None = None
    stop_sequences: list[str] | None = None
    thinking: ThinkingSpec | None = None
    # auto: stream only when max_tokens is large enough to trip the SDK's non-streaming guard.
    stream: bool | Literal["auto"] = "auto"
    prices: PriceOverride | None = None  # in the endpoint's currency; default: configs/models.yaml


class RunSpec(_Strict):
    """How hard to push the endpoint and how long to keep trying."""

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


@dataclass(frozen=True)
class Job:
    """A validated spec with everything resolved: files, templates, endpoint, model, output paths."""

    spec: JobSpec
    spec_path: Path
    name: str
    input_paths: tuple[Path, ...]
    template: Template
    system: Template | None
    endpoint_name: str
    base_url: str | None  # None: start the in-process simulator
    currency: str
    key_env: tuple[str, ...]
    tokenizer_url: str | None  # None with the in-process simulator: its URL is known once it runs
    shape: AnswerShape | None  # the structure answers must have (labels, schema, JSON), or None for text
    model: catalog.ModelInfo
    concurrency: int  # the fixed limit, or where `auto` starts
    adaptive: bool
    output_path: Path
    state_dir: Path

    @property
    def spec_hash(self) -> str:
        """A short hash of the validated spec (after overrides), recorded in manifests."""
        blob = json.dumps(self.spec.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_job(path: Path, overrides: list[str] | None = None, *, today: dt.date | None = None) -> Job:
    """Read, validate and resolve a job spec; raise UsageError naming the file and key on any fault."""
    raw = _read_yaml(path)
    for item in overrides or []:
        _apply_override(raw, item)
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise UsageError(_describe(path, exc)) from exc
    return _resolve(spec, path, today or dt.date.today())


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such job spec; check the path") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the job spec ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a job spec is a YAML mapping starting with 'version: 1'")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `--set key.path=value`; the value is parsed as YAML so numbers and lists keep their type."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set {item!r}: expected key.path=value, e.g. --set run.concurrency=4")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UsageError(f"--set {item!r}: {part} is not a mapping in the spec")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[parts[-1]] = value


def _describe(path: Path, exc: ValidationError) -> str:
    """One line per problem: `file: key.path: what is wrong`.

    A union field (`concurrency: int | "auto"`) fails once per member, under tags like
    `constrained-int`; those are merged into one line per real key path.
    """
    problems: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or str(p).isidentifier())
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif err["type"] == "missing":
            msg = "required key is missing"
        messages = problems.setdefault(loc or "(top level)", [])
        if msg not in messages:
            messages.append(msg)
    return "\n".join(f"{path}: {loc}: {'; or '.join(msgs)}" for loc, msgs in problems.items())


def _resolve(spec: JobSpec, spec_path: Path, today: dt.date) -> Job:
    base = Path(os.path.normpath(spec_path.parent))
    name = spec.name or spec_path.stem
    where = str(spec_path)

    endpoints = catalog.endpoints()
    if spec.model.endpoint in endpoints:
        ep = endpoints[spec.model.endpoint]
        base_url, currency, key_env = ep.base_url, ep.currency, tuple(ep.key_env)
        tokenizer_url = ep.tokenizer_url
    elif spec.model.endpoint.startswith(("http://", "https://")):
        # A literal URL: a proxy or a local simulator. Bill in CNY unless it is z.ai's host.
        base_url = spec.model.endpoint.rstrip("/")
        currency = "USD" if "z.ai" in base_url else "CNY"
        key_env = tuple(catalog.endpoints()["zhipu"].key_env)
        tokenizer_url = f"{base_url}{SIMULATOR_TOKENIZER_PATH}"
    else:
        known = ", ".join(sorted(endpoints))
        raise UsageError(f"{where}: model.endpoint: unknown endpoint {spec.model.endpoint!r}; use {known} or a URL")

    models = catalog.models()
    if spec.model.name not in models:
        known = ", ".join(sorted(models))
        raise UsageError(
            f"{where}: model.name: unknown model {spec.model.name!r}; known: {known} (add it to configs/models.yaml)"
        )
    info = models[spec.model.name]
    if spec.model.max_tokens > info.max_output:
        raise UsageError(
            f"{where}: model.max_tokens: {spec.model.max_tokens} exceeds {spec.model.name}'s "
            f"maximum output of {info.max_output} tokens"
        )
    thinking = spec.model.thinking
    if thinking and thinking.type == "enabled" and (thinking.budget_tokens or 0) >= spec.model.max_tokens:
        raise UsageError(f"{where}: model.thinking.budget_tokens: must be below model.max_tokens")

    if spec.output.samples > 1 and spec.model.temperature == 0:
        raise UsageError(
            f"{where}: output.samples: at model.temperature 0 every sample is the same answer, paid for "
            f"{spec.output.samples} times; set model.temperature above 0 (e.g. 0.7) or remove output.samples"
        )

    input_paths = _expand_inputs(spec.input.paths, base, where)

    if spec.prompt.template_file is not None:
        tpl_path = base / spec.prompt.template_file
        try:
            source = tpl_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{where}: prompt.template_file: cannot read {tpl_path} ({exc.strerror})") from None
        template = compile_template(source, origin=str(tpl_path))
    else:
        assert spec.prompt.template is not None  # the validator guarantees one of the two
        template = compile_template(spec.prompt.template, origin=f"{where}: prompt.template")
    system = compile_template(spec.prompt.system, origin=f"{where}: prompt.system") if spec.prompt.system else None

    output_path = Path(os.path.normpath(base / spec.output.path.format(name=name, run_date=today.isoformat())))
    if output_path.suffix != ".parquet":
        raise UsageError(f"{where}: output.path: must end in .parquet, got {output_path.name!r}")
    state_dir = Path(
        os.path.normpath(
            base / spec.output.state_dir if spec.output.state_dir else _default_state_dir(spec, base, name)
        )
    )

    return Job(
        spec=spec,
        spec_path=spec_path,
        name=name,
        input_paths=input_paths,
        template=template,
        system=system,
        endpoint_name=spec.model.endpoint,
        base_url=base_url,
        currency=currency,
        key_env=key_env,
        tokenizer_url=tokenizer_url,
        shape=AnswerShape.from_spec(spec.output, where),
        model=info,
        concurrency=(
            min(info.concurrency, spec.run.max_concurrency)
            if spec.run.concurrency in (None, "auto")
            else int(spec.run.concurrency)
        ),
        adaptive=spec.run.concurrency == "auto",
        output_path=output_path,
        state_dir=state_dir,
    )


def _expand_inputs(patterns: list[str], base: Path, where: str) -> tuple[Path, ...]:
    paths: list[Path] = []
    for pattern in patterns:
        full = os.path.normpath(os.path.join(base, pattern))
        matches = sorted(glob.glob(full)) if glob.has_magic(pattern) else [full]
        if not matches:
            raise UsageError(f"{where}: input.paths: {pattern!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.suffix not in (".parquet", ".csv"):
                raise UsageError(f"{where}: input.paths: {p.name}: only .parquet and .csv inputs are read")
            if not p.is_file():
                raise UsageError(f"{where}: input.paths: {p} does not exist")
            paths.append(p)
    return tuple(paths)


def _default_state_dir(spec: JobSpec, base: Path, name: str) -> Path:
    """The checkpoint store: beside the output, above any {run_date} folder, so daily runs share answers."""
    template_dir = Path(spec.output.path).parent
    stable = Path()
    for part in template_dir.parts:
        if "{run_date}" in part:
            break
        stable /= part.format(name=name)
    return base / stable / ".glm-batch" / name
