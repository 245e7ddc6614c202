"""The commands that send requests or serve them: `run`, `estimate` and `simulate`.

Each imports the engine, the SDK or the simulator when it runs, never at import time.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from runner.cli import LimitOpt, SetOpt, SpecArg, _console, _guarded, _load, api_key_for
from runner.cli.tables import _estimate_table
from runner.errors import UsageError

if TYPE_CHECKING:
    from runner.job.resolve import Job
    from runner.observe.progress import LogFormat


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
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Say what the run would send and what it would cost; send and write nothing."),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", metavar="ADDRESS", help="The Ray cluster for run.engine: ray (or $RAY_ADDRESS)."),
    ] = None,
) -> None:
    """Run a job: send every row that has no answer yet and write the results to Parquet."""
    import asyncio

    if dry_run:
        _guarded(lambda: _dry_run(spec, set_, limit, fresh=fresh, retry_failed=retry_failed))
        raise typer.Exit(0)

    def go() -> int:
        if log_format not in ("auto", "rich", "json", "text"):
            raise UsageError(f"--log-format {log_format!r}: use auto, json or text")
        fmt: LogFormat = log_format  # type: ignore[assignment]
        overrides = [*(set_ or []), *([f"run.ray_address={ray_address}"] if ray_address else [])]
        job = _load(spec, overrides, limit)
        key = api_key_for(job)
        if will_send_online(job, fresh=fresh):
            import_in_background(SENDING_MODULES)
        from runner.api import resume_command
        from runner.engine import RunOptions, run_job
        from runner.observe.progress import make_reporter

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


# What a run's first request needs that loading the job and planning do not: the SDK (about 1.2 s to
# import, most of a small run's start), what the SDK imports only when its first client is built
# (httpcore2, for the TLS context) and when it sends its first request (opentelemetry.propagate, for the
# trace headers), and the retry and rate-limit libraries. Only third-party modules: the runner's own
# stay with the thread that runs the job.
SENDING_MODULES = ("anthropic", "httpcore2", "opentelemetry.propagate", "tenacity", "aiolimiter")


def import_in_background(modules: tuple[str, ...]) -> threading.Thread:
    """Import `modules` in a thread, so a run's start does not wait for the SDK after everything else.

    The import overlaps what the run does before its first request: checking the input, recovering
    its state and rendering the first rows. Much of that is polars and file work that releases the
    GIL, so on two cores the SDK is mostly loaded by the time it is needed; where it is not, the
    importing code waits for this thread's import (the import lock), as it would have imported it
    anyway. A module that fails here is left alone: importing it where it is used raises the error
    where it matters. The thread is not a daemon: a process that ends early waits for the import
    rather than stopping a thread that holds the import lock.
    """

    def load() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # see above: the import where the module is used reports it
                continue

    thread = threading.Thread(target=load, name="glm-batch-import", daemon=False)
    thread.start()
    return thread


def will_send_online(job: Job, *, fresh: bool) -> bool:
    """Will this run send through the SDK? Sure for a job with no state yet, with --fresh, or when its
    input or spec changed since the row map was built (new rows to render); a re-run of an unchanged job
    may have nothing to send, and then must not pay for the SDK (runner.engine never loads it)."""
    run = job.spec.run
    if run.engine != "local" or run.mode != "online":  # Ray workers send; batch mode uploads files
        return False
    if fresh or not job.state_dir.exists():
        return True
    from runner.runs import fingerprint
    from runner.state.store import Store

    return Store(job.state_dir, run_id="probe").rows.fingerprint() != fingerprint(job)


def _dry_run(spec: Path, set_: list[str] | None, limit: int | None, *, fresh: bool, retry_failed: bool) -> None:
    """`run --dry-run`: the estimate of exactly this run (its --fresh, --retry-failed, --limit, --set),
    from the job's state as it is, read only: no lock, no key needed, nothing sent or written."""
    import asyncio

    from runner.money.estimate import EstimateOptions, estimate_job
    from runner.observe.progress import make_reporter

    job = _load(spec, set_, limit)
    options = EstimateOptions(fresh=fresh, retry_failed=retry_failed, record=False)
    report = asyncio.run(estimate_job(job, api_key="unused", options=options, reporter=make_reporter("json")))
    _print_estimate(report)
    cost, cur = report["cost"], report["currency"]
    cap = job.spec.run.max_cost
    print(
        f"dry run: would send {report['requests_to_send']:,} requests for {report['rows']:,} rows "
        f"({report['rows_answered_already']:,} already answered), expected {cost['expected']:.4f} {cur}, "
        f"ceiling {cost['ceiling']:.4f} {cur}"
        + (f" (run.max_cost {cap:g} stops it before that)" if cap is not None and cap < cost["ceiling"] else "")
        + "; nothing was sent"
    )


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
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Price a full re-run: count every request, answered before or not.")
    ] = False,
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
                options=EstimateOptions(exact=exact, pilot_rows=pilot, latency_s=latency, fresh=fresh),
                reporter=make_reporter("json" if as_json else "auto"),
            )
        )
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            _print_estimate(report)

    _guarded(go)


def _print_estimate(r: dict[str, Any]) -> None:
    _console().print(_estimate_table(r))


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
