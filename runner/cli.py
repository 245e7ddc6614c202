"""The command line: `glm-batch run | estimate | validate | status | usage | report | models | schema | init`.

Every error glm-batch raises on purpose is printed as one line (`glm-batch: error: ...`) and ends the
process with its exit code; see the README for the table of codes.

Start-up is kept light: this module imports only typer and glm-batch's own error types. Each command
imports what it needs (polars, the engine, the SDK...) when it runs, so `--help`, `--version` and shell
completion do not pay for libraries they never use.
"""

from __future__ import annotations

import os

# polars allocates with jemalloc, which by default keeps freed pages for seconds; a run works in
# phases (send, compact, join, write) whose peaks then stack up. Returning pages at once kept a
# 200k-row run at 350 MB instead of 550 MB (bench/throughput.py). It must be set before polars loads,
# and only by the command line (a library does not set its host's environment); an operator's own
# setting wins. It stays at the top of this module so that every way into the CLI sets it first.
os.environ.setdefault("_RJEM_MALLOC_CONF", "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0")

import datetime as dt
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from runner import __version__
from runner.errors import GlmBatchError, UsageError

P = TypeVar("P")

if TYPE_CHECKING:
    import polars as pl
    from rich.table import Table

    from runner.job.resolve import Job
    from runner.observe.progress import LogFormat


def _plain_flags(params: list[P]) -> list[P]:
    """Show on/off options as bare flags in help: typer's rich help would print `<bool>` beside them."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """A command whose help shows flags as flags."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class _Group(TyperGroup):
    """The top-level command group, showing flags as flags in its help like every command."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    add_completion=True,
    no_args_is_help=True,
    help="Batch prompt processing against Zhipu's GLM models (Anthropic-compatible Messages API).",
)
T = TypeVar("T")


def _command(name: str | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command that uses the flag-friendly help of `_Command`."""
    return app.command(name, cls=_Command)


SpecArg = Annotated[Path, typer.Argument(metavar="JOB", help="The job spec (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a spec field: --set run.concurrency=4 (repeatable)."),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, metavar="N", help="Use only the first N input rows.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _version(value: bool) -> None:
    if value:
        print(f"glm-batch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Batch prompt processing against Zhipu's GLM models (Anthropic-compatible Messages API)."""


def _guarded(fn: Callable[[], T]) -> T:
    """Run `fn`; turn a GlmBatchError into its one-line message and exit code."""
    try:
        return fn()
    except GlmBatchError as exc:
        print(f"glm-batch: error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None


def _load(spec: Path, overrides: list[str] | None, limit: int | None) -> Job:
    from runner.job.resolve import load_job

    items = list(overrides or [])
    if limit is not None:
        items.append(f"input.limit={limit}")
    return load_job(spec, items)


def api_key_for(job: Job) -> str:
    """The key from the environment (never from the spec); see runner.api.api_key_for."""
    from runner.api import api_key_for as key_for

    return key_for(job)


def _console() -> Any:
    """A rich console on stdout (its width: the terminal's, $COLUMNS, or 80 when piped)."""
    from rich.console import Console

    return Console()


def _grid(title: str | None = None, *, header: bool = True) -> Table:
    """A table drawn to fit narrow terminals: no side borders and one space of padding per cell."""
    from rich import box
    from rich.table import Table

    return Table(title=title, show_header=header, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)


def _pairs(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    """A two-column label / value table whose values wrap (never cut off) on a narrow terminal."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(overflow="fold")
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(k, v)
    return table


@_command()
def run(
    spec: SpecArg,
    limit: LimitOpt = None,
    set_: SetOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore earlier answers; send every row again.")] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Send again rows that failed for good in earlier runs.")
    ] = False,
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            metavar="auto|json|text",
            help="auto (a bar on a terminal, JSON lines otherwise), json, text.",
        ),
    ] = "auto",
    resend_lost: Annotated[
        bool,
        typer.Option("--resend-lost", help="Pay again for answers lost with torn state files, however many."),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", metavar="ADDRESS", help="The Ray cluster for run.engine: ray (or $RAY_ADDRESS)."),
    ] = None,
) -> None:
    """Run a job: send every row that has no answer yet and write the results to Parquet."""
    import asyncio

    from runner.api import resume_command
    from runner.engine import RunOptions, run_job  # the engine pulls in the SDK; keep `validate` light
    from runner.observe.progress import make_reporter

    def go() -> int:
        if log_format not in ("auto", "rich", "json", "text"):
            raise UsageError(f"--log-format {log_format!r}: use auto, json or text")
        fmt: LogFormat = log_format  # type: ignore[assignment]
        overrides = [*(set_ or []), *([f"run.ray_address={ray_address}"] if ray_address else [])]
        job = _load(spec, overrides, limit)
        key = api_key_for(job)
        options = RunOptions(
            fresh=fresh,
            retry_failed=retry_failed,
            resume_command=resume_command(job, overrides, limit),
            resend_lost=resend_lost,
        )
        report = asyncio.run(run_job(job, api_key=key, options=options, reporter=make_reporter(fmt)))
        if report.exit_code != 0:
            print(f"glm-batch: {report.message}", file=sys.stderr)
        else:
            print(report.message)
        return report.exit_code

    code = _guarded(go)
    raise typer.Exit(code)


@_command()
def estimate(
    spec: SpecArg,
    exact: Annotated[
        bool, typer.Option("--exact", help="Count a sample of prompts with Zhipu's tokenizer API (free).")
    ] = False,
    pilot: Annotated[
        int | None,
        typer.Option(
            "--pilot", min=1, metavar="N", help="Send N random rows for real first; the run reuses their answers."
        ),
    ] = None,
    latency: Annotated[
        float | None,
        typer.Option("--latency", min=0, metavar="SECONDS", help="Seconds per request to assume for the wall time."),
    ] = None,
    limit: LimitOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Estimate a job's tokens, cost and wall time. Sends nothing unless --exact or --pilot asks."""
    import asyncio

    from runner.money.estimate import EstimateOptions, estimate_job
    from runner.observe.progress import make_reporter

    def go() -> None:
        job = _load(spec, set_, limit)
        key = api_key_for(job) if (exact or pilot) else "unused"
        report = asyncio.run(
            estimate_job(
                job,
                api_key=key,
                options=EstimateOptions(exact=exact, pilot_rows=pilot, latency_s=latency),
                reporter=make_reporter("json" if as_json else "auto"),
            )
        )
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            _print_estimate(report)

    _guarded(go)


def _estimate_table(r: dict[str, Any]) -> Table:
    """The estimate report as a label / value table."""
    cur = r["currency"]
    cost = r["cost"]
    tokens_in = r["input_tokens"]
    tokens_out = r["output_tokens"]
    wall = r["wall_time_s"]
    rows = [
        ("rows", f"{r['rows']:,} ({r['rows_answered_already']:,} already answered)"),
        ("requests to send", f"{r['requests_to_send']:,}"),
        *(
            [("rows failing to render", f"{r['render_failures']['rows']:,}; first: {r['render_failures']['first']}")]
            if r["render_failures"]["rows"]
            else []
        ),
        *(
            [
                (
                    "over the context window",
                    f"{r['over_context']['requests']:,} requests estimated above "
                    f"{r['over_context']['context_tokens']:,} input tokens: the endpoint refuses them "
                    "(1261, not billed); shorten those prompts",
                )
            ]
            if r["over_context"]["requests"]
            else []
        ),
        (
            "input tokens",
            f"{tokens_in['expected']:,} (calibration x{tokens_in['calibration']['ratio']}: "
            f"{tokens_in['calibration']['basis']})",
        ),
        (
            "output tokens",
            f"{tokens_out['low']:,} / {tokens_out['expected']:,} / {tokens_out['high']:,} "
            f"(low / expected / high; ceiling {tokens_out['ceiling']:,})",
        ),
        ("", tokens_out["basis"]),
        (
            "cost",
            f"{cost['low']:.4f} / {cost['expected']:.4f} / {cost['high']:.4f} {cur} (ceiling {cost['ceiling']:.4f})",
        ),
        ("batch API (half price)", f"{r['batch_api_expected']:.4f} {cur} expected"),
        ("price tiers", ", ".join(f"{k}: {v:,}" for k, v in r["tier_mix"].items()) or "-"),
        (
            "wall time",
            f"{wall['expected']:,.0f} s at concurrency {wall['concurrency']}, "
            f"{wall['latency_s_per_request']} s a request ({wall['latency_basis']})",
        ),
    ]
    if not r["prices_confirmed"]:
        rows.append(("note", f"the {cur} prices of {r['model']} are not confirmed (configs/models.yaml)"))
    return _pairs(f"estimate: {r['job']} ({r['model']} on {r['endpoint']})", rows)


def _print_estimate(r: dict[str, Any]) -> None:
    _console().print(_estimate_table(r))


@_command()
def usage(
    by: Annotated[
        str, typer.Option("--by", metavar="KEYS", help="Group by any of job, model, day, endpoint (comma-separated).")
    ] = "job,model,day",
    since: Annotated[
        str | None, typer.Option("--since", metavar="DATE", help="Only days from this date (YYYY-MM-DD).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the ledger's rows (one per job, model and day of a run) as JSON.")
    ] = False,
) -> None:
    """Summarise spend and tokens from the usage ledger, by job, model and day."""
    import polars as pl

    from runner.money import ledger

    def go() -> None:
        keys = [k.strip() for k in by.split(",") if k.strip()]
        bad = [k for k in keys if k not in ("job", "model", "day", "endpoint")]
        if bad or not keys:
            raise UsageError(f"--by {by!r}: choose from job, model, day, endpoint")
        frame = ledger.usage()
        if since is not None:
            try:
                start = dt.date.fromisoformat(since)
            except ValueError:
                raise UsageError(f"--since {since!r}: expected a date like 2026-11-01") from None
            frame = frame.filter(pl.col("day") >= start)
        if as_json:
            print(json.dumps(frame.sort("day", "job", "model", "run_id").to_dicts(), indent=2, default=str))
            return
        if frame.height == 0:
            print(f"no usage recorded yet (ledger: {ledger.ledger_dir()})")
            return
        console = _console()
        console.print(_usage_table(ledger.summarise(frame, keys), keys, console.width))

    _guarded(go)


def _compact(n: int) -> str:
    """A count in at most four or five characters: 9,999 / 12.3k / 123k / 1.23M / 4.56G."""
    if n < 10_000:
        return f"{n:,}"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.3g}{unit}" if value < 1000 else f"{value:,.0f}{unit}"
    return str(n)  # unreachable: n >= 10,000 matched "k"


def _usage_table(summary: pl.DataFrame, keys: list[str], width: int = 80) -> Table:
    """Ledger totals as a table that fits `width` columns: exact counts when they fit, else compact
    ones (12.3k, 1.23M) with a caption pointing to --json. The failed and cached columns appear only
    when some row has any."""
    numeric = {"runs": "runs", "ok": "requests ok", "tokens_in": "tokens in", "tokens_out": "tokens out"}
    if summary.get_column("failed").sum():
        numeric = {**numeric, "failed": "failed"}
    if summary.get_column("cached_in").sum():
        numeric = {**numeric, "cached_in": "cached in"}

    def build(count: Callable[[int], str]) -> tuple[Table, bool]:
        """The table, and whether every figure fits on one line."""
        rows = [
            [*(str(row[k]) for k in keys), *(count(row[c]) for c in numeric), f"{row['cost']:g} {row['currency']}"]
            for row in summary.iter_rows(named=True)
        ]
        table = _grid(f"usage by {', '.join(keys)}")
        for key in keys:
            table.add_column(key, overflow="fold")
        for header in numeric.values():
            table.add_column(header, justify="right", overflow="fold")
        table.add_column("cost", justify="right", overflow="fold")
        for cells in rows:
            table.add_row(*cells)
        # Keep values on one line while that fits (headers wrap instead), figures first, job names last; the
        # columns left over fold into what remains. A fixed width is the one rich will not shrink; a
        # column costs its content, one space of padding and one of border.
        n = len(table.columns)
        used = 6 * n + 1  # every column at a foldable 4 characters, plus the table's edges
        for i in sorted(range(n), key=lambda i: (i < len(keys), i < len(keys) and keys[i] == "job", i)):
            column = table.columns[i]
            header_words = [len(w) for w in str(column.header).split()]
            cells = [w for r in rows for w in r[i].split()] if i == n - 1 else [r[i] for r in rows]
            need = max([len(c) for c in cells] + header_words)  # the cost may wrap between figure and currency
            if used - 4 + need <= width:
                column.width = need
                used += need - 4
        return table, all(c.width is not None for c in table.columns[len(keys) :])

    exact, figures_fit = build(lambda n: f"{n:,}")
    if figures_fit:
        return exact
    compact, _ = build(_compact)
    compact.caption = "k = thousand, M = million; glm-batch usage --json has the exact figures"
    return compact


@_command()
def report(
    target: Annotated[
        Path,
        typer.Argument(
            metavar="JOB_OR_OUTPUT",
            help="The job spec (YAML) of a finished run, or its output Parquet.",
            show_default=False,
        ),
    ],
    html: Annotated[
        Path | None, typer.Option("--html", metavar="FILE", help="Also write the report as an HTML page here.")
    ] = None,
    gold: Annotated[
        str | None, typer.Option("--gold", metavar="COLUMN", help="For an output file: the column with gold labels.")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Print the quality of a finished labeling run against its gold labels (and draw it as HTML)."""
    from rich.table import Table

    from runner.observe import quality

    def go() -> None:
        if target.suffix == ".parquet":
            if not target.exists():
                raise UsageError(f"{target}: no such output file")
            name = target.stem
            summary = quality.summarise_file(target, gold)
            if summary["label_field"] is None:
                raise UsageError(f"{target}: no label column; report works on labeling outputs (output.labels)")
        else:
            job = _load(target, set_, None)
            name = job.name
            shape = job.shape
            if shape is None:
                raise UsageError(f"{target}: output: report needs a structured job (output.labels or output.schema)")
            if not job.output_path.exists():
                raise UsageError(f"{job.output_path} does not exist yet; run the job first: glm-batch run {target}")
            summary = quality.summarise(job, shape)
        console = _console()
        console.print(
            f"{name}: {summary['rows']} rows, {summary['valid']} valid, {summary['invalid']} invalid "
            f"({summary['truncated']} truncated), {summary['repaired']} repaired"
        )
        voting = summary.get("voting")
        if voting is not None:
            console.print(quality.voting_line(voting))
        metrics = summary.get("metrics")
        if metrics is None:
            console.print(
                "no gold labels: set eval.gold_column (and output.labels), or pass --gold COLUMN with an output "
                "file, for accuracy and F1"
            )
            return
        console.print(f"accuracy {metrics['accuracy']:.4f} on {metrics['rows_with_gold']} rows with a gold label")
        table = Table("label", "precision", "recall", "F1", "support")
        for label, m in metrics["per_label"].items():
            table.add_row(label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
        console.print(table)
        columns = list(next(iter(metrics["confusion"].values())))
        matrix = Table("gold \\ predicted", *columns, title="confusion matrix")
        for truth, row in metrics["confusion"].items():
            matrix.add_row(truth, *(str(row[c]) for c in columns))
        console.print(matrix)
        if html is not None:
            html.write_text(quality.html_report(f"glm-batch report: {name}", metrics, summary), encoding="utf-8")
            console.print(f"wrote {html}")

    _guarded(go)


@_command()
def validate(
    spec: SpecArg,
    rows: Annotated[int, typer.Option("--rows", min=1, metavar="N", help="How many rendered rows to print.")] = 3,
    limit: LimitOpt = None,
    set_: SetOpt = None,
) -> None:
    """Check a spec and its input, render the first rows and print them. Sends nothing."""
    import polars as pl
    from rich.console import Console

    from runner.job.inputs import open_input
    from runner.plan import plan
    from runner.state.store import SettledKeys

    def go() -> None:
        job = _load(spec, set_, limit)
        source = open_input(job)
        console = Console()
        for batch in plan(job, source, SettledKeys.none(), batch_rows=rows):
            for row in batch.rows:
                if row.error is not None:
                    raise UsageError(
                        f"{spec}: the prompt template fails on row {row.position} (id {row.id}): {row.error}; "
                        "fix the template or that row (a run would record it as render_error)"
                    )
                request = row.requests[0]
                console.rule(f"row {row.position} id={row.id} key={request.key[:12]}")
                if "system" in request.params:
                    console.print("[bold]system:[/]", request.params["system"], markup=True, highlight=False)
                console.print(request.params["messages"][0]["content"], markup=False, highlight=False)
            break
        total = source.frame.select(pl.len()).collect().item()
        samples = job.spec.output.samples
        each = f" x {samples} samples = {total * samples} requests" if samples > 1 else ""
        console.print(
            f"ok: {spec} is valid; {total} rows{each}, model {job.spec.model.name} on {job.endpoint_name}, "
            f"concurrency {job.concurrency}; output {job.output_path}. Nothing was sent."
        )

    _guarded(go)


@_command()
def status(spec: SpecArg, set_: SetOpt = None) -> None:
    """Show how many rows of the last run are answered, failed or pending, and what that run did."""
    import polars as pl

    from runner.job.inputs import open_input
    from runner.state.store import Store

    def go() -> None:
        job = _load(spec, set_, None)
        store = Store(job.state_dir, run_id="status")
        console = _console()
        holder = store.lock.holder()
        if holder is not None:
            console.print(
                f"a run is in progress: pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"since {holder.get('started', '?')}"
            )
        runs = store.read_manifest().get("runs", [])
        try:  # rows the last run never reached are pending too
            total: int | None = open_input(job).frame.select(pl.len()).collect().item()
        except UsageError:
            total = None  # the input is gone or changed shape: count what the last run mapped
        progress = store.progress(job.spec.output.samples, total)
        if not runs and progress is None:
            console.print(f"{job.name}: never run (state would be in {job.state_dir})")
            return
        if progress is not None:
            console.print(
                f"{job.name}: {progress['ok']} rows answered ok, {progress['failed']} failed, "
                f"{progress['pending']} pending (as of the last run)"
            )
        if runs:
            last = runs[-1]
            console.print(
                f"last run {last['run_id']}: exit {last['exit_code']}, {last['answered_ok']} ok, "
                f"{last['answered_error']} failed, {last['elapsed_s']} s, stopped: {last['stopped'] or 'no'}"
            )

    _guarded(go)


@_command()
def models(as_json: JsonOpt = False) -> None:
    """List the model catalogue (configs/models.yaml): limits, default concurrency and prices."""
    from runner.job import catalog

    def go() -> None:
        found = catalog.models()
        if as_json:
            print(json.dumps({name: info.model_dump() for name, info in found.items()}, indent=2))
            return
        console = _console()
        console.print(_models_table({name: info.model_dump() for name, info in found.items()}))
        console.print(
            "Prices per million tokens: input / cached input / output; the first tier whose bounds hold "
            "applies (in<32k: input under 32,000 tokens). conc: default requests in flight.",
            highlight=False,
        )

    _guarded(go)


def _thousands(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"


def _tier_bounds(tier: dict[str, Any]) -> str:
    bounds = [
        f"{side}<{_thousands(tier[key])}"
        for side, key in (("in", "max_input_tokens"), ("out", "max_output_tokens"))
        if tier.get(key) is not None
    ]
    return ",".join(bounds)


def _models_table(catalogue: dict[str, dict[str, Any]]) -> Table:
    """The catalogue, one line per model, currency and price tier, narrow enough for 80 columns."""
    table = _grid("GLM models (configs/models.yaml)")
    table.add_column("model", no_wrap=True)
    table.add_column("context", justify="right")
    table.add_column("max out", justify="right")
    table.add_column("conc", justify="right")
    table.add_column("cur")
    table.add_column("in/cached/out per 1M tokens", overflow="fold")
    table.add_column("confirmed")
    for name, info in catalogue.items():
        lead = [name, str(info["context"]), str(info["max_output"]), str(info["concurrency"])]
        if not info["prices"]:
            table.add_row(*lead, "-", "no prices in the catalogue", "")
        for currency, prices in info["prices"].items():
            for i, tier in enumerate(prices["tiers"]):
                price = f"{tier['input']:g}/{tier['cached_input']:g}/{tier['output']:g}"
                bounds = _tier_bounds(tier)
                table.add_row(
                    *lead,
                    currency if i == 0 else "",
                    f"{price} {bounds}" if bounds else price,
                    ("yes" if prices["confirmed"] else "no") if i == 0 else "",
                )
                lead = ["", "", "", ""]
    return table


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


@_command()
def schema(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write it to this file instead of stdout.")
    ] = None,
) -> None:
    """Print the JSON Schema of a job spec (for editors; configs/job.schema.json is this output)."""
    text = job_schema_text()
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        print(f"wrote {output}")


@_command()
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

    def go() -> None:
        target = output if output is not None else Path("jobs") / f"{input_path.stem}.yaml"
        if target.exists():
            raise UsageError(f"{target} already exists; pass --output another.yaml or remove it first")
        columns, first = _peek(input_path)
        text = starter_job(input_path, target, columns, first)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with target.open("x", encoding="utf-8") as f:  # "x": never replace a file created meanwhile
                f.write(text)
        except FileExistsError:
            raise UsageError(f"{target} already exists; pass --output another.yaml or remove it first") from None
        print(f"wrote {target}; edit its prompt, then: glm-batch validate {target}")

    _guarded(go)


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
        raise UsageError(f"{path}: cannot read it ({str(exc).splitlines()[0]})") from None
    if not head.columns:
        raise UsageError(f"{path}: no columns")
    columns = {name: str(dtype) for name, dtype in head.schema.items()}
    return columns, head.row(0, named=True) if head.height else {}


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "none", "y", "n"}
_ID_NAMES = ("id", "uuid", "key", "row_id")


def _yaml_str(value: str) -> str:
    """`value` as a YAML scalar: bare when that reads back as the same string, else double-quoted."""
    if _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS:
        return value
    return json.dumps(value, ensure_ascii=False)


def _template_variable(name: str) -> bool:
    """Whether a column can be used in a Jinja2 template as `{{ name }}`."""
    import keyword

    return name.isidentifier() and not keyword.iskeyword(name) and name.lower() not in ("true", "false", "none")


def starter_job(input_path: Path, target: Path, columns: dict[str, str], first: dict[str, Any]) -> str:
    """The text of a commented starter job for an input with these columns, to be saved at `target`.

    Paths in it are relative to `target`'s folder (where a job's paths resolve), the model runs on
    the built-in simulator (no key, no cost) until the user switches the endpoint, and the template
    uses the input's text columns, so `glm-batch validate` passes on it as written.
    """
    spec_dir = target.resolve().parent
    rel_input = Path(os.path.relpath(input_path.resolve(), spec_dir)).as_posix()
    rel_output = Path(os.path.relpath(Path.cwd().resolve() / "out", spec_dir)).as_posix() + "/{name}.parquet"
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", target.stem).lstrip("._-") or "job"

    id_column = next((c for c in columns if c.lower() in _ID_NAMES or c.lower().endswith("_id")), None)
    usable = [c for c in columns if c != id_column and _template_variable(c)]
    texty = [c for c in usable if columns[c] in ("String", "Utf8")]
    in_template = (texty or usable)[:5]
    if not in_template:
        raise UsageError(
            f"{input_path}: no column can be used in a template as {{{{ name }}}} (columns: {', '.join(columns)}); "
            "rename them to plain identifiers"
        )

    def sample(value: Any) -> str:
        text = json.dumps(value, ensure_ascii=False, default=str)
        return text if len(text) <= 40 else text[:37] + "..."

    schema_file = Path.cwd() / "configs" / "job.schema.json"
    lines = []
    if schema_file.is_file():
        rel_schema = Path(os.path.relpath(schema_file.resolve(), spec_dir)).as_posix()
        lines.append(f"# yaml-language-server: $schema={rel_schema}")
    lines += [
        f"# A starter job for {input_path.as_posix()}, written by `glm-batch init`. Edit the prompt, then:",
        f"#   glm-batch validate {target.as_posix()}    renders the first prompts; sends nothing",
        f"#   glm-batch estimate {target.as_posix()}    tokens, cost and time before spending",
        f"#   glm-batch run {target.as_posix()}",
        "# Every relative path here resolves against this file's folder.",
        "#",
        "# The input's columns (type: first row's value):",
        *(f"#   {c} ({t}): {sample(first.get(c))}" for c, t in columns.items()),
        "version: 1",
        f"name: {_yaml_str(name)}",
        "",
        "input:",
        f"  paths: [{json.dumps(rel_input, ensure_ascii=False)}]",
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
        f"  path: {json.dumps(rel_output, ensure_ascii=False)}",
        f"  keep_columns: [{_yaml_str(in_template[0])}]   # input columns copied beside each answer",
        "  # labels: [positive, negative]   # for labeling: validated answers (see the README)",
        "",
    ]
    return "\n".join(lines)


@_command()
def simulate(
    port: Annotated[int, typer.Option("--port", metavar="PORT", help="Port on 127.0.0.1 (0 picks one).")] = 8765,
    latency: Annotated[float, typer.Option("--latency", metavar="SECONDS", help="Seconds before each answer.")] = 0.0,
    jitter: Annotated[
        float, typer.Option("--jitter", metavar="SECONDS", help="Extra random latency, up to this many seconds.")
    ] = 0.0,
    cap: Annotated[
        int | None, typer.Option("--cap", metavar="N", help="Concurrency cap per model (429/1302 above).")
    ] = None,
    fault_rate: Annotated[
        float, typer.Option("--fault-rate", min=0, max=1, metavar="SHARE", help="Share of requests faulted.")
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the simulator's randomness.")] = 0,
) -> None:
    """Run the Zhipu endpoint simulator standalone on 127.0.0.1 until interrupted."""
    import asyncio
    import contextlib

    from runner.testing.simulator import SimConfig, serve_forever

    config = SimConfig(
        latency_s=latency, latency_jitter_s=jitter, concurrency_cap=cap, fault_rate=fault_rate, seed=seed
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C is how a standalone simulator is stopped
        asyncio.run(serve_forever(port, config))


def main() -> None:
    """Console-script entry point."""
    app()
