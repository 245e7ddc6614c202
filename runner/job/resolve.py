"""Resolve a job spec: read the YAML, validate it, and turn it into a plain, picklable `Job` (no open
file, compiled template or client). Relative paths resolve against the spec's folder; errors name the
file and the key path.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from runner.columns import gold_names
from runner.errors import UsageError
from runner.files import paths_overlap, summary_path
from runner.job import catalog, paths
from runner.job.eligibility import BatchEligibility, batch_eligibility
from runner.job.facts import load_facts
from runner.job.reading import describe_invalid, load_yaml, read_text_file
from runner.job.spec import JobSpec
from runner.job.structured import AnswerShape
from runner.job.templates import Template, compile_template, deferred_template
from runner.job.thinking import ThinkingPlan, thinking_plan
from runner.redact import redact


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
    # May this job's model go to the Batch API on this endpoint, and on what grounds.
    batch: BatchEligibility | None = None
    # A limited run (--limit, input.limit): the job's own output, which it never writes; None otherwise.
    full_output_path: Path | None = None
    # `concurrency` is the cap an earlier run or doctor measured on this endpoint and model (facts), not
    # the catalogue's default: `auto` starts at it and holds it.
    concurrency_learned: bool = False

    @property
    def row_map(self) -> str:
        """The row map's folder in the state directory: a limited run's own, so the job's stays whole."""
        return "rows" if self.spec.input.limit is None else f"rows.limit-{self.spec.input.limit}"

    @property
    def prompt_variables(self) -> frozenset[str]:
        """Every variable the prompt reads: the system prompt's, each message's and the row turn's."""
        return _variables(self.template, self.system, self.history)

    @property
    def thinking(self) -> ThinkingPlan:
        """What the job sends as `thinking` when its spec says nothing, and what to warn about."""
        m, output = self.spec.model, self.spec.output
        structured = output.labels is not None or output.schema_ is not None
        return thinking_plan(m.name, m.thinking.type if m.thinking else None, structured, m.max_tokens)

    @property
    def gold_columns(self) -> dict[str, str]:
        """Each gold input column of eval (gold_column, gold_fields' columns) and the output column that
        carries it (runner.columns.gold_names): what the quality report reads."""
        evaluation = self.spec.eval
        if evaluation is None:
            return {}
        gold = [c for c in [evaluation.gold_column, *evaluation.gold_fields.values()] if c is not None]
        id_column = self.spec.input.id_column
        fields = self.shape.fields if self.shape else ()
        named = gold_names([c for c in gold if c != id_column], id_column or "id", fields, self.spec.output.samples)
        return {c: named.get(c, c) for c in gold}

    @property
    def spec_hash(self) -> str:
        """A short hash of the validated spec (after overrides, defaults left out, so a new field does
        not change it) and the resolved kept columns: in manifests and the row map's fingerprint."""
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
    sends: bool = True,
) -> Job:
    """Read, validate and resolve a job spec; UsageError naming the file and key on any fault. For
    commands that only look: `check_templates=False` leaves templates unparsed, `writes=False` skips
    the writable checks, `sends=False` skips the batch rule."""
    raw = _read_yaml(path)
    overridden: dict[str, str] = {}
    for item in overrides or []:
        overridden[_apply_override(raw, item)] = item
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise UsageError(describe_invalid(path, exc, overridden, raw)) from None
    template_of = compile_template if check_templates else deferred_template
    job = _resolve(spec, path, today or dt.date.today(), template_of, writes, sends)
    if check_templates:
        _refuse_gold_in_prompt(job, path)
    return job


def _refuse_gold_in_prompt(job: Job, path: Path) -> None:
    """Refuse a prompt that reads a gold column (eval.gold_column, eval.gold_fields): the model would be
    shown the answer it is scored against, and the scores would mean nothing."""
    leaked = sorted(set(job.gold_columns) & job.prompt_variables)
    if leaked:
        names = ", ".join(f"{{{{ {c} }}}}" for c in leaked)
        raise UsageError(
            f"{path}: prompt: it reads {names}, a gold column of eval: the model would see the answer it is "
            f"scored against; take {'it' if len(leaked) == 1 else 'them'} out of the prompt (and input.columns)"
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    """The spec file's YAML: a regular file of bounded size, read with the bounded loader."""
    try:
        os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such job spec; check the path") from None
    except OSError:
        pass  # said in read_text_file's words (a name too long, a permission)
    data = load_yaml(read_text_file(path, str(path), "the job spec"), origin=str(path))
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a job spec is a YAML mapping starting with 'version: 1'")
    return data


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
    node[parts[-1]] = load_yaml(value, origin=f"--set {item!r}", text_if_unparsed=True)
    return ".".join(parts)


def _resolve(
    spec: JobSpec, spec_path: Path, today: dt.date, template_of: Callable[..., Template], writes: bool, sends: bool
) -> Job:
    base = Path(os.path.normpath(spec_path.parent))
    name = spec.name or spec_path.stem
    where = str(spec_path)

    ep = catalog.endpoint(spec.model.endpoint, spec.model.native_endpoint)
    if ep is None:
        known = ", ".join(sorted(catalog.endpoints()))
        raise UsageError(f"{where}: model.endpoint: unknown endpoint {spec.model.endpoint!r}; use {known} or a URL")
    base_url, native_url, currency, key_env = ep.base_url, ep.native_url, ep.currency, tuple(ep.key_env)

    models = catalog.models()
    if spec.model.name not in models:
        known = ", ".join(sorted(models))
        raise UsageError(
            f"{where}: model.name: unknown model {spec.model.name!r}; known: {known} (add it to configs/models.yaml)"
        )
    info = models[spec.model.name]
    learned = load_facts(base_url, spec.model.name)  # what glm-batch doctor found here
    batch_basis = batch_eligibility(
        spec.model.name, info, spec.model.endpoint, base_url, learned, spec.run.batch.allow_unconfirmed
    )
    if sends and spec.run.mode != "online" and not batch_basis.allowed:
        raise UsageError(f"{where}: run.mode: {spec.run.mode}: {batch_basis.why}")
    if spec.run.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise UsageError(
            f"{where}: run.engine: ray needs Ray, which is not installed here; "
            "pip install -e '.[ray]' (or glm-batch[ray]), or use run.engine: local"
        )
    if spec.model.max_tokens > info.max_output:
        raise UsageError(
            f"{where}: model.max_tokens: {spec.model.max_tokens} exceeds {spec.model.name}'s "
            f"maximum output of {info.max_output} tokens"
        )
    stops = spec.model.stop_sequences or []
    if spec.run.mode != "online" and len(stops) > 1:
        raise UsageError(
            f"{where}: model.stop_sequences: Zhipu's Batch API takes a single stop word (run.mode "
            f"{spec.run.mode}), got {len(stops)}; keep one or use run.mode: online"
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
        source = read_text_file(tpl_path, f"{where}: prompt.template_file")  # a regular file of bounded size
        template = template_of(source, origin=f"{where}: prompt.template_file ({tpl_path})")
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
    full_output_path = None
    if spec.input.limit is not None:  # a smoke run never replaces the fuller output (docs/decisions.md)
        limited = f"{output_path.stem}.limit-{spec.input.limit}{output_path.suffix}"
        full_output_path, output_path = output_path, output_path.with_name(limited)
    state_dir = Path(
        os.path.normpath(
            base / spec.output.state_dir if spec.output.state_dir else paths.default_state_dir(spec, base, name)
        )
    )
    state_key = "output.state_dir" if spec.output.state_dir else "output.path"
    paths.check_not_an_input(output_path, "the output", "output.path", spec, spec_path, input_paths)
    paths.check_not_an_input(state_dir, "the state directory", state_key, spec, spec_path, input_paths, folder=True)
    paths.check_holds_no_job_file(state_dir, state_key, spec_path, input_paths, where)
    if paths_overlap(Path(os.path.realpath(output_path)), Path(os.path.realpath(state_dir))):
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
        endpoint_name=redact(spec.model.endpoint),  # what records and logs show: never a key pasted into a URL
        base_url=base_url,
        currency=currency,
        key_env=key_env,
        native_url=native_url,
        shape=shape,
        model=info,
        concurrency=(
            min(learned.concurrency or info.concurrency, spec.run.max_concurrency)
            if spec.run.concurrency in (None, "auto")
            else int(spec.run.concurrency)
        ),
        adaptive=spec.run.concurrency == "auto",
        concurrency_learned=learned.concurrency is not None and spec.run.concurrency in (None, "auto"),
        output_path=output_path,
        state_dir=state_dir,
        history=history,
        keep_columns=keep_columns,
        batch=batch_basis,
        full_output_path=full_output_path,
    )


def _keep_columns(
    spec: JobSpec,
    shape: AnswerShape | None,
    template: Template,
    system: Template | None,
    history: tuple[tuple[str, Template], ...],
) -> tuple[str, ...]:
    """output.keep_columns as given; unset, none for a text job and, for labeling, the columns the prompt
    reads less the id column and any named like an answer field (given explicitly, a clash is refused
    when the input is opened)."""
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


def check_written_apart(job: Job, ledger: Path, rescue_journal: Path) -> None:
    """Refuse, when a run starts, a place the run may write outside the spec's own paths that the job's
    input patterns would read next time: the usage ledger folder (the environment's, so known only
    now) and a rescue journal beside the output (`rescue_journal`: one such name)."""
    spec, inputs = job.spec, job.input_paths
    paths.check_not_an_input(ledger, "the usage ledger", "GLM_BATCH_LEDGER", spec, job.spec_path, inputs, folder=True)
    paths.check_not_an_input(rescue_journal, "a rescue journal", "output.path", spec, job.spec_path, inputs)


def output_of_any_day(job: Job, *, full: bool = False) -> str | None:
    """With `{run_date}` in output.path, a glob matching the output (of this run, or with `full` the job's
    own when this is a limited run) as a run on any day wrote it: what an earlier day left beside it (a
    rescue journal, the answers of a state lost since) is this job's too. None without `{run_date}`."""
    if "{run_date}" not in job.spec.output.path:
        return None
    day = "\x00"  # escaped apart from the rest of the path, then a wildcard
    output = Path(os.path.normpath(job.spec_path.parent / job.spec.output.path.format(name=job.name, run_date=day)))
    if job.full_output_path is not None and not full:  # a limited run's name carries its limit
        output = output.with_name(job.output_path.name.replace(job.full_output_path.stem, output.stem, 1))
    return glob.escape(str(output)).replace(day, "*")


def job_files(job: Job) -> list[tuple[Path, str]]:
    """The files of a job that no command may write a report or a schema over, each with what it is
    (for runner.files.write_text): its spec, template file, inputs, output, summary and state."""
    files = [(job.spec_path, "the job spec")]
    if job.spec.prompt.template_file is not None:
        files.append((job.spec_path.parent / job.spec.prompt.template_file, "the job's template file"))
    files += [(p, "an input of the job") for p in job.input_paths]
    files += [
        (job.output_path, "the job's output"),
        (summary_path(job.output_path), "the job's summary"),
        (job.state_dir, "the job's state directory"),
    ]
    return files
