"""The commands for writing and checking a job spec: `schema`, `validate` (renders the first prompts,
sends nothing) and `init` (a commented starter job for an input file)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from runner.cli import LimitOpt, SetOpt, SpecArg, _load, command
from runner.errors import UsageError, first_line


def job_schema() -> dict[str, Any]:
    """The job spec's JSON Schema (draft 2020-12), generated from `JobSpec` with YAML key names."""
    from runner.job.spec import JobSpec

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **JobSpec.model_json_schema(by_alias=True),
    }


def job_schema_text() -> str:
    """`job_schema()` as the text of configs/job.schema.json (two-space indent, final newline)."""
    return json.dumps(job_schema(), indent=2, ensure_ascii=False) + "\n"


# What every schema glm-batch writes contains (its title): `schema -o` replaces such a file without --force.
SCHEMA_MARK = '"title": "JobSpec"'


@command
def schema(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write it to this file instead of stdout.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Let -o replace an existing file that glm-batch did not write.")
    ] = False,
) -> None:
    """Print the JSON Schema of a job spec (for editors; configs/job.schema.json is this output)."""
    text = job_schema_text()
    if output is None:
        sys.stdout.write(text)
        return

    from runner.files import write_text

    write_text(output, text, key="-o", ours=SCHEMA_MARK, force=force)
    print(f"wrote {output}")


@command
def validate(
    spec: SpecArg,
    rows: Annotated[int, typer.Option("--rows", min=1, metavar="N", help="How many rendered rows to print.")] = 3,
    limit: LimitOpt = None,
    set_: SetOpt = None,
) -> None:
    """Check a spec and its input, render the first rows and print them. Sends nothing."""
    # RequestBuilder alone: runner.plan would bring the event loop, retries and accounting a preview never uses.
    from rich.console import Console

    from runner.job.inputs import open_input
    from runner.job.prompts import RequestBuilder
    from runner.job.sandbox import RenderError

    job = _load(spec, set_, limit)
    source = open_input(job)
    builder = RequestBuilder(job)
    console = Console(highlight=False)  # prompts as they are; the highlighter alone costs about 10 ms
    first = next(source.batches(rows), None)  # open_input found rows, so there is a first batch
    for position, row_id, request in builder.render(first.iter_rows(named=True) if first is not None else ()):
        if isinstance(request, RenderError):
            if request.error_type == "null_input":
                console.rule(f"row {position} id={row_id}: skipped: {request}")
                continue
            raise UsageError(
                f"{spec}: the prompt template fails on row {position} (id {row_id}): {request}; "
                "fix the template or that row (a run would record it as render_error)"
            ) from None
        console.rule(f"row {position} id={row_id} key={request.key[:12]}")
        if "system" in request.params:
            console.print("[bold]system:[/]", request.params["system"], markup=True)
        messages = request.params["messages"]
        if len(messages) == 1:
            console.print(messages[0]["content"], markup=False)
            continue
        for message in messages:  # prompt.messages: each turn, under its role
            console.print(f"[bold]{message['role']}:[/]", markup=True)
            console.print(message["content"], markup=False)
    thinking = job.thinking
    if thinking.note is not None:
        console.print(thinking.note, markup=False)
    if thinking.warning is not None:
        console.print(f"warning: {thinking.warning}", markup=False)
    samples = job.spec.output.samples
    each = f" x {samples} samples = {source.rows * samples} requests" if samples > 1 else ""
    console.print(
        f"ok: {spec} is valid; {source.rows} rows{each}, model {job.spec.model.name} on {job.endpoint_name}, "
        f"concurrency {job.concurrency}; output {job.output_path}. Nothing was sent."
    )


@command
def init(
    input_path: Annotated[
        Path,
        typer.Argument(metavar="INPUT", help="A Parquet, CSV or JSONL file to write a job for.", show_default=False),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", metavar="FILE", help="Where to write the job.  [default: jobs/<INPUT name>.yaml]"
        ),
    ] = None,
) -> None:
    """Write a commented starter job for an input file's columns (never overwrites a file)."""

    from runner.files import write_error, write_text

    target = output if output is not None else Path("jobs") / f"{input_path.stem}.yaml"
    if target.exists():
        raise UsageError(f"{target} already exists; pass --output another.yaml or remove it first")
    columns, first = _peek(input_path)
    text = starter_job(input_path, target, columns, first)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(target.parent, exc, "--output") from None
    # exclusive: never replace a file, even one created meanwhile; never the input it describes.
    write_text(target, text, key="--output", protected=[(input_path, "the input")], exclusive=True)
    print(f"wrote {target}; edit its prompt, then: glm-batch validate {target}")


def _peek(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """An input file's columns (name to polars type) and its first row, reading no more than that."""
    import polars as pl

    if not path.is_file():
        raise UsageError(f"{path}: no such input file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pl.scan_csv(path, infer_schema_length=100)
        elif suffix in (".jsonl", ".ndjson"):
            frame = pl.scan_ndjson(path, infer_schema_length=100)
        elif suffix == ".parquet":
            frame = pl.scan_parquet(path)
        else:
            raise UsageError(f"{path}: init reads .parquet, .csv or .jsonl files")
        head = frame.head(1).collect()
    except pl.exceptions.PolarsError as exc:
        raise UsageError(f"{path}: cannot read it ({first_line(exc)})") from None
    if not head.columns:
        raise UsageError(f"{path}: no columns")
    columns = {name: str(dtype) for name, dtype in head.schema.items()}
    return columns, head.row(0, named=True) if head.height else {}


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "none", "y", "n"}
_ID_NAMES = ("id", "uuid", "key", "row_id")
# Columns that hold the answer a model is scored against: never put in a starter prompt.
_GOLD_NAMES = {
    "gold", "label", "labels", "answer", "answers", "target", "targets", "y", "ground_truth", "groundtruth",
    "truth", "gt", "expected", "expected_answer", "expected_output", "reference", "correct", "correct_answer",
    "true_label", "gold_label", "class_label", "annotation",
}  # fmt: skip
_GOLD_AFFIXES = ("gold_", "label_", "truth_", "_gold", "_label", "_labels", "_truth", "_answer", "_target")


def gold_like(name: str) -> bool:
    """Whether a column's name says it holds gold labels (gold, label, y, ground_truth, *_label...)."""
    plain = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return plain in _GOLD_NAMES or plain.startswith(_GOLD_AFFIXES[:3]) or plain.endswith(_GOLD_AFFIXES[3:])


def _yaml_str(value: str) -> str:
    """`value` as a one-line YAML scalar that reads back as the same string, in block or flow context:
    bare when that is safe, else double-quoted with every line break and control character escaped
    (so a column name can never end a line and start a key of its own)."""
    if _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS:
        return value
    import yaml

    text: str = yaml.safe_dump([value], default_style='"', default_flow_style=True, allow_unicode=True, width=2**30)
    return text.strip()[1:-1]


def _one_line(text: str) -> str:
    """`text` for a YAML comment: as it is when it is one line of printable text, else escaped."""
    if text.isprintable():
        return text
    return _yaml_str(text)[1:-1]


def _template_variable(name: str) -> bool:
    """Whether a column can be used in a Jinja2 template as `{{ name }}`."""
    import keyword

    return name.isidentifier() and not keyword.iskeyword(name) and name.lower() not in ("true", "false", "none")


def starter_job(input_path: Path, target: Path, columns: dict[str, str], first: dict[str, Any]) -> str:
    """The text of a commented starter job for these columns, to be saved at `target`: paths relative to
    its folder, the model on the built-in simulator, and a template that validates as written."""
    spec_dir = target.resolve().parent
    rel_input = Path(os.path.relpath(input_path.resolve(), spec_dir)).as_posix()
    rel_output = Path(os.path.relpath(Path.cwd().resolve() / "out", spec_dir)).as_posix() + "/{name}.parquet"
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", target.stem).lstrip("._-") or "job"

    id_column = next((c for c in columns if c.lower() in _ID_NAMES or c.lower().endswith("_id")), None)
    gold = [c for c in columns if c != id_column and gold_like(c)]  # never in the prompt: label leakage
    usable = [c for c in columns if c != id_column and c not in gold and _template_variable(c)]
    texty = [c for c in usable if columns[c] in ("String", "Utf8")]
    in_template = (texty or usable)[:5]
    if not in_template:
        raise UsageError(
            f"{_one_line(str(input_path))}: no column can be used in a template as {{{{ name }}}} "
            f"(columns: {_one_line(', '.join(columns))}; gold-like ones are left out); rename them to plain identifiers"
        )

    def sample(value: Any) -> str:
        text = _one_line(json.dumps(value, ensure_ascii=False, default=str))
        return text if len(text) <= 40 else text[:37] + "..."

    schema_file = Path.cwd() / "configs" / "job.schema.json"
    lines = []
    if schema_file.is_file():
        rel_schema = Path(os.path.relpath(schema_file.resolve(), spec_dir)).as_posix()
        lines.append(f"# yaml-language-server: $schema={_one_line(rel_schema)}")
    shown_target = _one_line(target.as_posix())
    lines += [
        f"# A starter job for {_one_line(input_path.as_posix())}, written by `glm-batch init`. Edit the prompt, then:",
        f"#   glm-batch validate {shown_target}    renders the first prompts; sends nothing",
        f"#   glm-batch estimate {shown_target}    tokens, cost and time before spending",
        f"#   glm-batch run {shown_target}",
        "# Every relative path here resolves against this file's folder.",
        "#",
        "# The input's columns (type: first row's value):",
        *(f"#   {_yaml_str(c)} ({_one_line(t)}): {sample(first.get(c))}" for c, t in columns.items()),
        "version: 1",
        f"name: {_yaml_str(name)}",
        "",
        "input:",
        f"  paths: [{_yaml_str(rel_input)}]",
        (
            f"  id_column: {_yaml_str(id_column)}   # must be unique per row; answers are matched to rows by it"
            if id_column
            else "  # id_column: id   # a column unique per row; without one, a row's id hashes its content"
        ),
        f"  columns: [{', '.join(_yaml_str(c) for c in in_template)}]   # what the template may use",
        "  # limit: 50   # a smoke run on the first rows (or: glm-batch run --limit 50)",
        "",
        "prompt:",
        "  system: You are a careful assistant. Answer in one short sentence.",
        "  template: |   # Jinja2; every {{ column }} must be listed in input.columns",
        *(f"    {c}: {{{{ {c} }}}}" for c in in_template),
        "    What is the main point of this record?",
        "",
        "model:",
        "  name: glm-4.5-air   # glm-batch models lists the others, with limits and prices",
        "  endpoint: simulator   # offline, free, no key; then zhipu (CNY, ZHIPUAI_API_KEY) or zai (USD)",
        "  max_tokens: 256",
        "  temperature: 0.2",
        "",
        "run:",
        "  # concurrency: 5   # requests in flight; default: the model's (glm-batch models), or auto",
        "  # max_cost: 1.0    # stop before a run spends more than this, in the endpoint's currency",
        "  max_attempts: 6",
        "",
        "output:",
        f"  path: {_yaml_str(rel_output)}",
        f"  keep_columns: [{_yaml_str(in_template[0])}]   # input columns copied beside each answer",
        "  # labels: [positive, negative]   # for labeling: validated answers (see the README)",
        "",
    ]
    if gold:  # the gold labels stay out of the prompt: the model must not see what it is scored against
        lines += [
            f"# {_one_line(', '.join(gold))}: gold-like, so left out of the prompt (a prompt reading the",
            "# eval column is refused). With output.labels set, score the answers against it (it is kept",
            "# in the output, as <name>_gold if an answer column has its name):",
            f"# eval: {{gold_column: {_yaml_str(gold[0])}}}",
            "",
        ]
    return "\n".join(lines)
