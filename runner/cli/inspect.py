"""The commands that look at what runs did and what is available (`usage`, `report`, `status`, `models`),
and `cancel`. None sends a prompt; `status` and `cancel` may cancel batches at Zhipu."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from runner.cli import JsonOpt, SetOpt, SpecArg, _console, _load, command
from runner.cli.tables import _models_table, _usage_table
from runner.errors import UsageError
from runner.files import recorded_runs

if TYPE_CHECKING:
    from runner.job.resolve import Job


@command
def usage(
    by: Annotated[
        str | None,
        typer.Option(
            "--by",
            metavar="KEYS",
            help="Group by any of job, model, day, endpoint (comma-separated; default job,model,day).",
            show_default=False,
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", metavar="DATE", help="Only days from this date (YYYY-MM-DD).")
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the ledger's rows (one per job, model and day of a run) as JSON, or with --by the table's "
            'totals; simulated runs are marked "simulated": true.',
        ),
    ] = False,
) -> None:
    """Summarise spend and tokens from the usage ledger, by job, model and day."""
    import polars as pl

    from runner.money import ledger

    keys = [k.strip() for k in (by or "job,model,day").split(",") if k.strip()]
    bad = [k for k in keys if k not in ("job", "model", "day", "endpoint")]
    if bad or not keys:
        raise UsageError(f"--by {by!r}: choose from job, model, day, endpoint")
    skipped: list[tuple[Path, str]] = []
    frame, simulated = ledger.usage(skipped=skipped), ledger.usage(simulated=True, skipped=skipped)
    for path, why in skipped:  # a torn file: the rest of the ledger is still worth reading
        print(f"glm-batch: warning: skipped {path}: it does not read ({why})", file=sys.stderr)
    if since is not None:
        try:
            start = dt.date.fromisoformat(since)
        except ValueError:
            raise UsageError(f"--since {since!r}: expected a date like 2026-11-01") from None
        frame, simulated = frame.filter(pl.col("day") >= start), simulated.filter(pl.col("day") >= start)
    if as_json:  # the same rows as the text: real first, then the simulator's, each marked
        rows: list[dict[str, Any]] = []
        for part, flag in ((frame, False), (simulated, True)):
            shown = part.sort("day", "job", "model", "run_id") if by is None else ledger.summarise(part, keys)
            rows.extend({**row, "simulated": flag} for row in shown.to_dicts())
        print(json.dumps(rows, indent=2, default=str))
        return
    console = _console()
    if frame.height == 0:
        print(f"no usage recorded yet (ledger: {ledger.ledger_dir()})")
    else:
        console.print(_usage_table(ledger.summarise(frame, keys), keys, console.width))
    if simulated.height:  # the simulator's make-believe spend: shown apart, never added to the real
        console.print("simulated runs (the built-in simulator: make-believe spend, never billed):", highlight=False)
        console.print(_usage_table(ledger.summarise(simulated, keys), keys, console.width))


@command
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
    force: Annotated[
        bool, typer.Option("--force", help="Let --html replace an existing file that glm-batch did not write.")
    ] = False,
) -> None:
    """Print what a finished run did and, with gold labels, how good its answers were (and draw it as HTML)."""

    from runner.cascade.record import report_section
    from runner.files import write_text
    from runner.job.resolve import job_files
    from runner.observe.report import load_report, print_report
    from runner.observe.report_html import HTML_MARK, html_page
    from runner.observe.summary import named_files

    if target.suffix == ".parquet":
        found = load_report(target, gold=gold)  # refused in one line if it is not an output
        protected = named_files(target, found.summary)
    else:
        if gold is not None:
            raise UsageError(
                f"--gold {gold}: names the gold column of an output file; for a job, set eval.gold_column "
                f"in {target} (or --set eval.gold_column={gold})"
            )
        job = _load(target, set_, None, writes=False, sends=False)
        if not job.output_path.exists():
            raise UsageError(f"{job.output_path} does not exist yet; run the job first: glm-batch run {target}")
        found = load_report(job.output_path, job=job)
        protected = job_files(job)
    found.cascade = report_section(found.output)  # a cascade's words, from its record beside the output
    if html is not None:  # written, or refused in one line, before the report is printed
        write_text(html, html_page(found), key="--html", protected=protected, ours=HTML_MARK, force=force)
    console = _console()
    print_report(found, console)
    if html is not None:
        console.print(f"wrote {html}")


def _cascade_status(job: Job) -> None:
    """`status` of a cascade job: each stage's last run, and the last cascade's outcome."""
    from runner.cascade.record import status_lines
    from runner.observe.summary import Summary

    home = job.state_dir / "cascade"
    for stage in ("proxy", "oracle"):
        runs = recorded_runs(home / stage, Summary)
        if not runs:
            print(f"{job.name}: {stage} stage never run (state would be in {home / stage})")
            continue
        last = runs[-1]
        print(
            f"{stage} stage, last run {last.run_id}: exit {last.exit_code}, {last.answered_ok} ok, "
            f"{last.answered_error} failed, stopped: {last.stopped or 'no'}"
        )
    for line in status_lines(job.output_path):  # its outcome, and its spend against the kept estimate
        print(line)


@command
def status(spec: SpecArg, set_: SetOpt = None) -> None:
    """Show how many rows of the last run are answered, failed or pending, and what that run did."""

    from runner.observe.summary import Summary
    from runner.send.batch.admin import batch_rows, stray_rows
    from runner.state.lock import JobLock

    # Templates unparsed (no jinja2): status renders nothing; it writes only what a look at Zhipu finds.
    job = _load(spec, set_, None, check_templates=False, writes=False, sends=False)
    holder = JobLock(job.state_dir / "lock").holder()
    if holder is not None:
        print(
            f"a run is in progress: pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"since {holder.get('started', '?')}"
        )
    if job.spec.output.cascade is not None:  # its stages keep their own state (runner.cascade.stages)
        _cascade_status(job)
        return
    runs = recorded_runs(job.state_dir, Summary)
    progress = _progress(job)
    if not runs and progress is None:
        print(f"{job.name}: never run (state would be in {job.state_dir})")
        return
    if progress is not None:
        print(
            f"{job.name}: {progress['ok']} rows answered ok, {progress['failed']} failed, "
            + (f"{progress['skipped']} skipped (input.nulls: skip), " if progress.get("skipped") else "")
            + f"{progress['pending']} pending (as of the last run)"
        )
    if runs:
        last = runs[-1]
        print(
            f"last run {last.run_id}: exit {last.exit_code}, {last.answered_ok} ok, "
            f"{last.answered_error} failed, {last.elapsed_s} s, stopped: {last.stopped or 'no'}"
        )
    if holder is None:
        _look_for_strays(job)
    for batch in batch_rows(job):  # batch mode: each chunk's batch and how far it got
        counts = f", {batch['completed']} completed, {batch['failed']} failed" if batch["completed"] is not None else ""
        print(
            f"batch {batch['batch'] or '(not created)'} ({batch['chunk']}, {batch['lines']} lines): "
            f"{batch['step']}, {batch['status'] or 'not looked at yet'}{counts}"
        )
    for stray in stray_rows(job):  # batches of the job no chunk keeps: cancelled, or ran and not collected
        billed = f"; {stray['billed']} lines billed twice, not collected" if stray.get("billed") else ""
        print(
            f"batch {stray['stray']}: made twice for {stray.get('chunk') or 'no chunk of this job'} (a create "
            f"whose answer was lost landed late), {stray.get('status')}{billed}"
        )


def _look_for_strays(job: Job) -> None:
    """`status` of a batch job at Zhipu: look for batches of the job that no chunk keeps (a create whose
    answer was lost landed after the last run ended) and cancel them, as a run would; say what it did."""
    from runner.send.batch.admin import has_batches_to_look_at

    # The built-in simulator's batches end with the run that made them.
    if job.base_url is None or not has_batches_to_look_at(job):
        return
    import asyncio  # only now: `status` of any other job loads nothing that sends

    from runner.api import api_key_for
    from runner.send.batch.admin import look_for_strays
    from runner.send.endpoints import endpoint_url

    try:
        key = api_key_for(job)
    except UsageError as exc:
        print(f"batches at Zhipu not looked at: {exc}")
        return
    with endpoint_url(job) as base_url:
        said = asyncio.run(look_for_strays(job, key, base_url))
    for event in said or []:
        print(event["message"])


def _progress(job: Job) -> dict[str, int] | None:
    """Rows answered ok, failed and pending: as the last output recorded them while map, inputs and answers
    are unchanged (small JSON files), else counted from the row map, the answers and the input (polars)."""
    from runner.runs import fingerprint
    from runner.state.rowmap import RowMap

    rows = RowMap(job.state_dir / "rows")
    parts = sorted(p.name for p in (job.state_dir / "results").glob("*.parquet"))  # Store.result_parts
    samples = job.spec.output.samples
    recorded = rows.recorded_progress(job.state_dir / "output.json", parts, fingerprint(job), samples)
    if recorded is not None:
        return recorded
    from runner.job.inputs import open_input
    from runner.state.store import Store

    try:  # rows the last run never reached are pending too
        total: int | None = open_input(job).rows
    except UsageError:
        total = None  # the input is gone or changed shape: count what the last run mapped
    return Store(job.state_dir, run_id="status").progress(samples, total)


@command
def models(as_json: JsonOpt = False) -> None:
    """List the model catalogue (configs/models.yaml): limits, default concurrency and prices."""
    from runner.job import catalog

    found = catalog.models()
    if as_json:
        print(json.dumps({name: info.model_dump() for name, info in found.items()}, indent=2))
        return
    console = _console()
    console.print(_models_table({name: info.model_dump() for name, info in found.items()}))
    console.print(
        "Prices per million tokens: input / cached input / output; the first tier whose bounds hold "
        "applies (in<32k: input under 32,000 tokens). conc: default requests in flight; batch: taken by "
        "Zhipu's Batch API (run.mode: batch).",
        highlight=False,
    )


@command
def cancel(
    spec: SpecArg,
    set_: SetOpt = None,
    purge: Annotated[
        bool,
        typer.Option("--purge", help="Also delete the job's files at Zhipu (inputs, and results already collected)."),
    ] = False,
) -> None:
    """Cancel the job's open batches (batch mode). What they finished is billed and kept for the next run."""
    import asyncio

    from runner.api import api_key_for
    from runner.send.batch.admin import cancel_batches
    from runner.send.endpoints import endpoint_url

    job = _load(spec, set_, None, sends=False)  # batches a run made before the batch rule can still be cancelled
    if job.base_url is None:
        raise UsageError(
            f"{spec}: the built-in simulator's batches end with the run that started them; nothing to cancel"
        )
    with endpoint_url(job) as base_url:
        report = asyncio.run(cancel_batches(job, api_key_for(job), base_url, purge=purge))
    console = _console()
    for batch in report["batches"]:
        billed = f"; {batch['billed_lines']} lines were already done (billed)" if "billed_lines" in batch else ""
        console.print(f"batch {batch['batch']}: {batch['status']}{billed}")
    console.print(
        f"{len(report['batches'])} batches asked to cancel; {report['billed_lines']} lines already billed "
        "are kept: the next `glm-batch run` collects them and sends the rest"
    )
    if purge:
        console.print(
            f"{report['files_deleted']} files deleted at Zhipu; results not collected yet are kept until "
            "`glm-batch run` collects them"
        )
