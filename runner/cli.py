"""The command line: `glm-batch run | validate | status | simulate`.

Every error glm-batch raises on purpose is printed as one line (`glm-batch: error: ...`) and ends the
process with its exit code; see the README for the table of codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

# polars allocates with jemalloc, which by default keeps freed pages for seconds; a run works in
# phases (send, compact, join, write) whose peaks then stack up. Returning pages at once kept a
# 200k-row run at 350 MB instead of 550 MB (bench/throughput.py). It must be set before polars loads,
# and only by the command line (a library does not set its host's environment); an operator's own
# setting wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0")

import polars as pl
import typer
from rich.console import Console
from rich.table import Table

from runner.api import api_key_for, resume_command
from runner.errors import GlmBatchError, UsageError
from runner.job.inputs import open_input
from runner.job.resolve import Job, load_job
from runner.observe.progress import LogFormat, make_reporter
from runner.plan import plan
from runner.state.store import SettledKeys, Store

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Batch prompt processing against Zhipu's GLM models (Anthropic-compatible Messages API).",
)
T = TypeVar("T")

SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a spec field: --set run.concurrency=4 (repeatable).")
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="Use only the first N input rows.")]


def _guarded(fn: Callable[[], T]) -> T:
    """Run `fn`; turn a GlmBatchError into its one-line message and exit code."""
    try:
        return fn()
    except GlmBatchError as exc:
        print(f"glm-batch: error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None


def _load(spec: Path, overrides: list[str] | None, limit: int | None) -> Job:
    items = list(overrides or [])
    if limit is not None:
        items.append(f"input.limit={limit}")
    return load_job(spec, items)


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    limit: LimitOpt = None,
    set_: SetOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore earlier answers; send every row again.")] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Send again rows that failed for good in earlier runs.")
    ] = False,
    log_format: Annotated[
        str, typer.Option("--log-format", help="auto (a bar on a terminal, JSON lines otherwise), json, text.")
    ] = "auto",
    resend_lost: Annotated[
        bool,
        typer.Option("--resend-lost", help="Pay again for answers lost with torn state files, however many."),
    ] = False,
) -> None:
    """Run a job: send every row that has no answer yet and write the results to Parquet."""
    from runner.engine import RunOptions, run_job  # the engine pulls in the SDK; keep `validate` light

    def go() -> int:
        if log_format not in ("auto", "rich", "json", "text"):
            raise UsageError(f"--log-format {log_format!r}: use auto, json or text")
        fmt: LogFormat = log_format  # type: ignore[assignment]
        job = _load(spec, set_, limit)
        key = api_key_for(job)
        resume = resume_command(job, set_, limit)
        report = asyncio.run(
            run_job(
                job,
                api_key=key,
                options=RunOptions(
                    fresh=fresh, retry_failed=retry_failed, resume_command=resume, resend_lost=resend_lost
                ),
                reporter=make_reporter(fmt),
            )
        )
        if report.exit_code != 0:
            print(f"glm-batch: {report.message}", file=sys.stderr)
        else:
            print(report.message)
        return report.exit_code

    code = _guarded(go)
    raise typer.Exit(code)


@app.command()
def estimate(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    exact: Annotated[
        bool, typer.Option("--exact", help="Count a sample of prompts with Zhipu's tokenizer API (free).")
    ] = False,
    pilot: Annotated[
        int | None,
        typer.Option("--pilot", min=1, help="Send N random rows for real first; the run reuses their answers."),
    ] = None,
    latency: Annotated[
        float | None, typer.Option("--latency", min=0, help="Seconds per request to assume for the wall time.")
    ] = None,
    limit: LimitOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Estimate a job's tokens, cost and wall time. Sends nothing unless --exact or --pilot asks."""
    from runner.money.estimate import EstimateOptions, estimate_job

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


def _print_estimate(r: dict[str, Any]) -> None:
    console = Console()
    cur = r["currency"]
    table = Table(title=f"estimate: {r['job']} ({r['model']} on {r['endpoint']})", show_header=False)
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
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


@app.command()
def usage(
    by: Annotated[str, typer.Option("--by", help="Group by any of job, model, day, endpoint.")] = "job,model,day",
    since: Annotated[str | None, typer.Option("--since", help="Only days from this date (YYYY-MM-DD).")] = None,
) -> None:
    """Summarise spend and tokens from the usage ledger, by job, model and day."""
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
        if frame.height == 0:
            print(f"no usage recorded yet (ledger: {ledger.ledger_dir()})")
            return
        summary = ledger.summarise(frame, keys)
        table = Table(title=f"usage by {', '.join(keys)}")
        for column in summary.columns:
            table.add_column(column, justify="right" if summary.schema[column].is_numeric() else "left")
        for row in summary.iter_rows():
            table.add_row(*(str(v) for v in row))
        Console().print(table)

    _guarded(go)


@app.command()
def report(
    target: Annotated[Path, typer.Argument(help="The job spec (YAML) of a finished run, or its output Parquet.")],
    html: Annotated[Path | None, typer.Option("--html", help="Also write the report as an HTML page here.")] = None,
    gold: Annotated[str | None, typer.Option("--gold", help="For an output file: the column with gold labels.")] = None,
    set_: SetOpt = None,
) -> None:
    """Print the quality of a finished labeling run against its gold labels (and draw it as HTML)."""
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
        console = Console()
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


@app.command()
def validate(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    rows: Annotated[int, typer.Option("--rows", min=1, help="How many rendered rows to print.")] = 3,
    limit: LimitOpt = None,
    set_: SetOpt = None,
) -> None:
    """Check a spec and its input, render the first rows and print them. Sends nothing."""

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


@app.command()
def status(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    set_: SetOpt = None,
) -> None:
    """Show how many rows of the last run are answered, failed or pending, and what that run did."""

    def go() -> None:
        job = _load(spec, set_, None)
        store = Store(job.state_dir, run_id="status")
        console = Console()
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


@app.command()
def simulate(
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1 (0 picks one).")] = 8765,
    latency: Annotated[float, typer.Option("--latency", help="Seconds before each answer.")] = 0.0,
    jitter: Annotated[float, typer.Option("--jitter", help="Extra random latency, up to this many seconds.")] = 0.0,
    cap: Annotated[int | None, typer.Option("--cap", help="Concurrency cap per model (429/1302 above).")] = None,
    fault_rate: Annotated[float, typer.Option("--fault-rate", min=0, max=1, help="Share of requests faulted.")] = 0.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Run the Zhipu endpoint simulator standalone on 127.0.0.1 until interrupted."""
    from runner.testing.simulator import SimConfig, serve_forever

    config = SimConfig(
        latency_s=latency, latency_jitter_s=jitter, concurrency_cap=cap, fault_rate=fault_rate, seed=seed
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C is how a standalone simulator is stopped
        asyncio.run(serve_forever(port, config))


def main() -> None:
    """Console-script entry point."""
    app()
