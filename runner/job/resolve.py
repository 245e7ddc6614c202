"""Resolve a job spec: read the YAML, validate it, and turn it into a plain, picklable `Job`.

    job = load_job(Path("jobs/demo.yaml"), overrides=["run.concurrency=4"])

Relative paths in a spec resolve against the spec file's directory, so a cron job run from any working
directory reads and writes the same files. Errors name the file and the key path:
``jobs/x.yaml: run.concurrency: Input should be greater than 0``. A `Job` holds no open file, compiled
template or client: it pickles, so it can be handed to another process or a cluster worker.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from runner.errors import UsageError
from runner.job import catalog, paths
from runner.job.spec import JobSpec
from runner.job.structured import AnswerShape
from runner.job.templates import Template, compile_template, deferred_template


@dataclass(frozen=True)
class Job:
    """A validated spec with everything resolved: files, templates, endpoint, model, output paths."""

    spec: JobSpec
    spec_path: Path
    name: str
    input_paths: tuple[Path, ...]
    template: Template  # the row's turn: the last user message
    system: Template | None
    endpoint_name: str
    base_url: str | None  # None: start the in-process simulator
    currency: str
    key_env: tuple[str, ...]
    native_url: str | None  # Zhipu's own API (/api/paas/v4: tokenizer, files, batches); None: the simulator's
    shape: AnswerShape | None  # the structure answers must have (labels, schema, JSON), or None for text
    model: catalog.ModelInfo
    concurrency: int  # the fixed limit, or where `auto` starts
    adaptive: bool
    output_path: Path
    state_dir: Path
    # prompt.messages: the turns before the row's own, in order, as (role, template); () for a template job.
    history: tuple[tuple[str, Template], ...] = ()
    # output.keep_columns as given, or its default: none for text answers, the prompt's columns for labeling.
    keep_columns: tuple[str, ...] = ()

    @property
    def prompt_variables(self) -> frozenset[str]:
        """Every variable the prompt reads: the system prompt's, each message's and the row turn's."""
        return _variables(self.template, self.system, self.history)

    @property
    def spec_hash(self) -> str:
        """A short hash of the validated spec (after overrides) and the resolved kept columns, recorded
        in manifests and in the row map's fingerprint (which caches the kept columns).

        Values left at their defaults are left out, so a field the spec gains later does not change the
        hash of a job that does not use it; keep_columns is hashed as resolved."""
        data = self.spec.model_dump(mode="json", exclude_defaults=True)
        data.setdefault("output", {})["keep_columns"] = list(self.keep_columns)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_job(
    path: Path,
    overrides: list[str] | None = None,
    *,
    today: dt.date | None = None,
    check_templates: bool = True,
    writes: bool = True,
) -> Job:
    """Read, validate and resolve a job spec; raise UsageError naming the file and key on any fault.

    `check_templates=False` leaves the prompt templates unparsed until their variables are asked for
    (for a command that renders nothing, like `status`, so it does not load jinja2 for a text job), and
    `writes=False` skips checking that the output and state directories can be written (for one that
    only reads them: `status` on a read-only copy of a job)."""
    raw = _read_yaml(path)
    overridden: dict[str, str] = {}
    for item in overrides or []:
        overridden[_apply_override(raw, item)] = item
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise UsageError(_describe(path, exc, overridden)) from exc
    template_of = compile_template if check_templates else deferred_template
    return _resolve(spec, path, today or dt.date.today(), template_of, writes)


def derive(job: Job, changes: dict[str, Any]) -> Job:
    """Another job made from this one's validated spec with dotted keys changed (`{"model.name": "x"}`):
    a stage of a cascade. Its paths resolve as the original's; given ones should be absolute."""
    data = job.spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise UsageError(_describe(job.spec_path, exc)) from exc
    return _resolve(spec, job.spec_path, dt.date.today(), compile_template, True)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such job spec; check the path") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the job spec ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{path}: the job spec is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a job spec is a YAML mapping starting with 'version: 1'")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML lets the last one win silently,
    so a second `run:` would quietly undo the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Apply one `--set key.path=value` and return the key path; the value is parsed as YAML so numbers
    and lists keep their type."""
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
    return ".".join(parts)


def _describe(path: Path, exc: ValidationError, overridden: dict[str, str] | None = None) -> str:
    """One line per problem: `file: key.path: what is wrong`.

    A union field (`concurrency: int | "auto"`) fails once per member, under tags like
    `constrained-int`; those are merged into one line per real key path. A key that came from
    `--set` says so, since the spec file does not have it.
    """
    overridden = overridden or {}
    problems: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or str(p).isidentifier())
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
            if loc in overridden:
                msg = f"unknown key (from --set {overridden[loc]}); check its spelling"
        elif err["type"] == "missing":
            msg = "required key is missing"
        messages = problems.setdefault(loc or "(top level)", [])
        if msg not in messages:
            messages.append(msg)
    return "\n".join(f"{path}: {loc}: {'; or '.join(msgs)}" for loc, msgs in problems.items())


def _resolve(spec: JobSpec, spec_path: Path, today: dt.date, template_of: Callable[..., Template], writes: bool) -> Job:
    base = Path(os.path.normpath(spec_path.parent))
    name = spec.name or spec_path.stem
    where = str(spec_path)

    endpoints = catalog.endpoints()
    if spec.model.endpoint in endpoints:
        ep = endpoints[spec.model.endpoint]
        base_url, currency, key_env = ep.base_url, ep.currency, tuple(ep.key_env)
        native_url = ep.native_url
    elif spec.model.endpoint.startswith(("http://", "https://")):
        # A literal URL: a proxy or a local simulator. Bill in CNY unless it is z.ai's host.
        base_url = spec.model.endpoint.rstrip("/")
        currency = "USD" if "z.ai" in base_url else "CNY"
        key_env = tuple(catalog.endpoints()["zhipu"].key_env)
        native_url = spec.model.native_endpoint or catalog.native_url_beside(base_url)
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
    if spec.run.mode != "online" and not info.batch.eligible:
        raise UsageError(
            f"{where}: run.mode: {spec.model.name} is not known to be taken by Zhipu's Batch API "
            f"(configs/models.yaml says eligible: false); use run.mode: online"
        )
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

    input_paths = paths.expand_inputs(spec.input.paths, base, where)

    history: tuple[tuple[str, Template], ...] = ()
    if spec.prompt.template_file is not None:
        tpl_path = base / spec.prompt.template_file
        try:
            source = tpl_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{where}: prompt.template_file: cannot read {tpl_path} ({exc.strerror})") from None
        template = template_of(source, origin=str(tpl_path))
    elif spec.prompt.messages is not None:
        last = len(spec.prompt.messages) - 1
        if spec.prompt.messages[last].role != "user":
            raise UsageError(
                f"{where}: prompt.messages.{last}.role: the last message must be role user (the row's turn, "
                "which the model answers); end the list with a user message"
            )
        compiled = [
            (m.role, template_of(m.content, origin=f"{where}: prompt.messages.{i}.content"))
            for i, m in enumerate(spec.prompt.messages)
        ]
        history, template = tuple(compiled[:-1]), compiled[-1][1]
    else:
        assert spec.prompt.template is not None  # the validator guarantees exactly one of the three
        template = template_of(spec.prompt.template, origin=f"{where}: prompt.template")
    system = template_of(spec.prompt.system, origin=f"{where}: prompt.system") if spec.prompt.system else None
    shape = AnswerShape.from_spec(spec.output, where)
    keep_columns = _keep_columns(spec, shape, template, system, history)

    output_path = Path(os.path.normpath(base / spec.output.path.format(name=name, run_date=today.isoformat())))
    if output_path.suffix != ".parquet":
        raise UsageError(f"{where}: output.path: must end in .parquet, got {output_path.name!r}")
    state_dir = Path(
        os.path.normpath(
            base / spec.output.state_dir if spec.output.state_dir else paths.default_state_dir(spec, base, name)
        )
    )
    state_key = "output.state_dir" if spec.output.state_dir else "output.path"
    paths.check_not_an_input(output_path, "the output", "output.path", spec, base, spec_path, input_paths, where)
    paths.check_not_an_input(state_dir, "the state directory", state_key, spec, base, spec_path, input_paths, where)
    if paths.within(os.path.realpath(output_path), os.path.realpath(state_dir)):
        raise UsageError(
            f"{where}: output.path: {output_path} is inside the state directory {state_dir}, which the runner "
            "manages (and may set files aside in); choose an output.path outside it"
        )
    if writes:
        paths.check_writable(output_path, "output.path", where, parent=True)
        paths.check_writable(state_dir, state_key, where, parent=False)

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
        native_url=native_url,
        shape=shape,
        model=info,
        concurrency=(
            min(info.concurrency, spec.run.max_concurrency)
            if spec.run.concurrency in (None, "auto")
            else int(spec.run.concurrency)
        ),
        adaptive=spec.run.concurrency == "auto",
        output_path=output_path,
        state_dir=state_dir,
        history=history,
        keep_columns=keep_columns,
    )


def _keep_columns(
    spec: JobSpec,
    shape: AnswerShape | None,
    template: Template,
    system: Template | None,
    history: tuple[tuple[str, Template], ...],
) -> tuple[str, ...]:
    """output.keep_columns as given; unset, none for a text job and, for labeling, the columns the prompt
    reads (so the output shows what was labeled), less the id column (the output has it already) and any
    named like an answer field: that column holds the answer. Given explicitly, a clash is refused when the
    input is opened (runner.output.columns.clash)."""
    if spec.output.keep_columns is not None:
        return tuple(spec.output.keep_columns)
    if shape is None:
        return ()
    taken = set(shape.fields) | {spec.input.id_column or "id"}
    return tuple(sorted(v for v in _variables(template, system, history) if v not in taken))


def _variables(
    template: Template, system: Template | None, history: tuple[tuple[str, Template], ...]
) -> frozenset[str]:
    variables = template.variables | (system.variables if system is not None else frozenset())
    for _, tpl in history:
        variables |= tpl.variables
    return variables
