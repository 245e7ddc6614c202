"""The commands that send requests or serve them: `run`, `estimate` and `simulate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from runner.cli import LimitOpt, SetOpt, SpecArg, _console, _load, command
from runner.cli.tables import _estimate_table
from runner.errors import UsageError


@command
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
) -> int:
    """Run a job: send every row that has no answer yet and write the results to Parquet."""
    if dry_run:
        _dry_run(spec, set_, limit, fresh=fresh, retry_failed=retry_failed)
        return 0
    import asyncio

    from runner.api import resume_command, run_loaded
    from runner.observe.progress import make_reporter
    from runner.runs import RunOptions

    if log_format not in ("auto", "rich", "json", "text"):
        raise UsageError(f"--log-format {log_format!r}: use auto, json or text")
    overrides = [*(set_ or []), *([f"run.ray_address={ray_address}"] if ray_address else [])]
    job = _load(spec, overrides, limit)
    options = RunOptions(
        fresh=fresh,
        retry_failed=retry_failed,
        resume_command=resume_command(job, overrides, limit),
        resend_lost=resend_lost,
    )
    report = asyncio.run(run_loaded(job, options, make_reporter(log_format)))  # type: ignore[arg-type]
    if report.exit_code != 0:
        print(f"glm-batch: {report.message}", file=sys.stderr)
    else:
        print(report.message)
    return report.exit_code


def _dry_run(spec: Path, set_: list[str] | None, limit: int | None, *, fresh: bool, retry_failed: bool) -> None:
    """`run --dry-run`: the estimate of exactly this run (its --fresh, --retry-failed, --limit, --set),
    from the job's state as it is, read only: no lock, no key needed, nothing sent or written."""
    import asyncio

    from runner.api import estimate_loaded
    from runner.estimate import EstimateOptions
    from runner.observe.progress import make_reporter

    job = _load(spec, set_, limit, writes=False)
    options = EstimateOptions(fresh=fresh, retry_failed=retry_failed, record=False)
    report = asyncio.run(estimate_loaded(job, "unused", options, make_reporter("json")))
    _console().print(_estimate_table(report))
    cost, cur = report["cost"], report["currency"]
    cap = job.spec.run.max_cost
    cascade = report.get("cascade")
    if cascade is not None:
        run, only = cascade["next_run"], cascade["oracle_only_cost"]
        asks = run["oracle_requests"]
        oracle_asks = f"{asks['low']:,}" if asks["low"] == asks["high"] else f"{asks['low']:,} to {asks['high']:,}"
        print(
            f"dry run: a cascade; {cascade['proxy']} would send {run['proxy_requests']:,} requests and "
            f"{cascade['oracle']} {oracle_asks} for {report['rows']:,} rows "
            f"({report['rows_answered_already']:,} already answered): expected {cost['expected']:.4f} {cur} "
            f"({cost['low']:.4f} to {cost['high']:.4f})"
            + (f" (run.max_cost {cap:g} stops it before that)" if cap is not None and cap < cost["high"] else "")
            + f"; the whole cascade {cascade['cost']['expected']:.4f} against {only['expected']:.4f} for the "
            "oracle alone; nothing was sent"
        )
        return
    print(
        f"dry run: would send {report['requests_to_send']:,} requests for {report['rows']:,} rows "
        f"({report['rows_answered_already']:,} already answered), expected {cost['expected']:.4f} {cur}, "
        f"ceiling {cost['ceiling']:.4f} {cur}"
        + (f" (run.max_cost {cap:g} stops it before that)" if cap is not None and cap < cost["ceiling"] else "")
        + "; nothing was sent"
    )


@command
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

    from runner.api import api_key_for, estimate_loaded
    from runner.estimate import EstimateOptions
    from runner.observe.progress import make_reporter

    job = _load(spec, set_, limit)
    key = api_key_for(job) if (exact or pilot) else "unused"
    options = EstimateOptions(exact=exact, pilot_rows=pilot, latency_s=latency, fresh=fresh)
    report = asyncio.run(estimate_loaded(job, key, options, make_reporter("json" if as_json else "auto")))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _console().print(_estimate_table(report))
        for warning in report["warnings"]:  # reasoning that may not fit max_tokens: said before spending
            print(f"warning: {warning}", file=sys.stderr)


@command
def simulate(
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, metavar="PORT", help="Port on 127.0.0.1 (0 picks one).")
    ] = 8765,
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

    from runner.simulator.config import SimConfig
    from runner.simulator.simulator import serve_forever

    config = SimConfig(
        latency_s=latency, latency_jitter_s=jitter, concurrency_cap=cap, fault_rate=fault_rate, seed=seed
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C is how a standalone simulator is stopped
            asyncio.run(serve_forever(port, config))
    except OSError as exc:  # the port is taken, or not ours to take (below 1024 without privileges)
        raise UsageError(
            f"--port {port}: cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}); "
            "choose another port (--port 0 picks a free one)"
        ) from None
