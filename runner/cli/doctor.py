"""`glm-batch doctor`: the first-real-run probe. With the fewest and smallest requests it finds out what
the account and the route really do, and stores it with runner.job.facts for runs to read."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from runner.cli import JsonOpt, _console, command
from runner.errors import UsageError

if TYPE_CHECKING:
    from runner.job.resolve import Job
    from runner.money.pricing import PriceTable
    from runner.send.probe import Report, Target


def resolve_target(spec: Path | None, endpoint: str | None, model: str | None) -> Target:
    """The endpoint and model from the job (if given), overridden by --endpoint / --model."""
    from runner.job import catalog
    from runner.send.probe import Target

    job: Job | None = None
    if spec is not None:
        from runner.job.resolve import load_job

        # Loaded as an online job: a batch job on a model doctor is to prove would be refused at load.
        overrides = ["run.mode=online"] + ([f"model.endpoint={endpoint}"] if endpoint else [])
        overrides += [f"model.name={model}"] if model else []
        job = load_job(spec, overrides, check_templates=False, writes=False)
        return Target(
            job.endpoint_name,
            job.base_url,
            job.native_url,
            job.currency,
            job.key_env,
            job.spec.model.name,
            job.model,
            job,
        )
    if model is None:
        raise UsageError("doctor: give a job spec, or --model (and --endpoint, default zhipu)")
    name = endpoint or "zhipu"
    ep = catalog.endpoint(name)
    if ep is None:
        known = ", ".join(sorted(catalog.endpoints()))
        raise UsageError(f"--endpoint {name!r}: unknown endpoint; use {known} or a URL")
    return Target(name, ep.base_url, ep.native_url, ep.currency, tuple(ep.key_env), model, catalog.models().get(model))


@contextlib.contextmanager
def _url(target: Target) -> Iterator[str]:
    """The URL to probe; for the in-process simulator, one started for this probe only."""
    if target.job is not None:
        from runner.send.endpoints import endpoint_url

        with endpoint_url(target.job) as url:
            yield url
        return
    if target.base_url is not None:
        yield target.base_url
        return
    from runner.simulator.config import SimConfig
    from runner.simulator.simulator import SimulatorThread

    with SimulatorThread(SimConfig()) as server:
        yield server.url


def _table(target: Target) -> PriceTable | None:
    from runner.money.pricing import PriceTable, price_table

    if target.job is not None:
        return price_table(target.job)
    prices = target.info.prices.get(target.currency) if target.info is not None else None
    if prices is None:
        return None
    return PriceTable(target.model, target.currency, tuple(prices.tiers), prices.confirmed)


def planned_requests(ramp_max: int) -> int:
    """How many one-token Messages requests the probes send at most: four probes of up to 3 tries
    each, and every ramp burst sent at most twice. Usually far fewer go (no faults: 4 + the ramp)."""
    from runner.send.probe import RAMP

    return 4 * 3 + 2 * sum(n for n in RAMP if n <= ramp_max)


async def diagnose(
    target: Target, url: str, key: str, *, batch: bool, batch_wait_s: float, ramp_max: int, say: Callable[[str], None]
) -> Report:
    """Run the probes against `url` and record what they found."""
    from dataclasses import asdict

    from runner.job import catalog
    from runner.job.facts import record_facts
    from runner.send.batch.probe import probe_batch
    from runner.send.probe import CONTROL_MODEL, PROBE_INPUT_TOKENS, Prober, Report, probe_online

    report = Report(target, url)
    table = _table(target)
    n = planned_requests(ramp_max)
    if table is not None:
        per = table.worst_case(input_tokens=PROBE_INPUT_TOKENS, max_tokens=1)
        share = target.info.batch.price_share if target.info is not None else 0.5
        report.worst_case = per * n + (2 * per * share if batch else 0.0)
        cost = f"worst case {report.worst_case:.6f} {target.currency}"
    else:
        cost = f"worst case unknown: no {target.currency} price for {target.model} in the catalogue"
    lines = f" and two 2-line batches ({target.model}, {CONTROL_MODEL} free)" if batch else ""
    say(
        f"doctor: {target.model} on {target.endpoint}: at most {n} one-token requests (retries included){lines}; {cost}"
    )

    prober = Prober(url, key, target.model, table, report)
    try:
        await probe_online(prober, report, ramp_max)
    finally:
        await prober.aclose()
    if batch and report.aborted is None:
        native = catalog.native_url_for(url, target.native_url)
        for model, label in ((target.model, target.model), (CONTROL_MODEL, f"{CONTROL_MODEL} (control)")):
            found = await probe_batch(native, key, model, batch_wait_s, label)
            report.batches.append(found)
            report.add(f"batch {label}", found["eligible"], found["result"])
            usage = found.get("usage")
            if usage and model == target.model and table is not None and target.info is not None:
                report.spent += target.info.batch.price_share * table.cost(**usage)
            if found["eligible"] is not None:
                (report.facts if model == target.model else report.control)["batch_eligible"] = found["eligible"]
    elif not batch:
        report.add("batch", None, "not checked", "add --batch (a 2-line batch, waits up to --batch-wait)")
    where = target.base_url
    if report.facts:
        report.facts = asdict(record_facts(where, target.model, source="doctor", **report.facts))
    if report.control:
        record_facts(where, CONTROL_MODEL, source="doctor", **report.control)
    return report


@command
def doctor(
    spec: Annotated[
        Path | None, typer.Argument(metavar="[JOB]", help="The job spec whose endpoint and model to probe.")
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", metavar="E", help="zhipu, zai, simulator or a URL (default: the job's).")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", metavar="M", help="The model (default: the job's).")] = None,
    batch: Annotated[
        bool, typer.Option("--batch", help="Also send a 2-line batch on the model and on glm-4-flash (free).")
    ] = False,
    batch_wait: Annotated[
        float, typer.Option("--batch-wait", min=1, metavar="SECONDS", help="How long to wait for each batch.")
    ] = 600.0,
    ramp_max: Annotated[
        int, typer.Option("--ramp-max", min=1, max=16, metavar="N", help="The most requests at once the ramp tries.")
    ] = 16,
    as_json: JsonOpt = False,
) -> int:
    """Probe an endpoint and model with one-token requests: key, balance, tool choice, stop words, error
    shape, concurrency, Batch API. Prints what works and stores it for later runs."""

    import asyncio  # when it runs: `glm-batch --help` and the other commands never load it

    from runner.api import key_from_env

    target = resolve_target(spec, endpoint, model)
    key = key_from_env(target.endpoint, target.base_url, target.key_env)
    say: Callable[[str], None] = (lambda _: None) if as_json else print
    with _url(target) as url:
        report = asyncio.run(
            diagnose(target, url, key, batch=batch, batch_wait_s=batch_wait, ramp_max=ramp_max, say=say)
        )
    if as_json:
        print(json.dumps(as_dict(report), indent=2))
    else:
        _print(report)
    return 3 if report.aborted else 0


def as_dict(report: Report) -> dict[str, Any]:
    """The report as `doctor --json` prints it."""
    t = report.target
    return {
        "endpoint": t.endpoint,
        "url": report.url,
        "model": t.model,
        "currency": t.currency,
        "checks": [c.__dict__ for c in report.checks],
        "facts": report.facts,
        "batches": report.batches,
        "cost": {"worst_case": report.worst_case, "spent": round(report.spent, 6), "requests": report.requests},
        "aborted": report.aborted,
    }


def _print(report: Report) -> None:
    from rich.table import Table

    from runner.job.facts import facts_path

    t = report.target
    table = Table(title=f"doctor: {t.model} on {t.endpoint}", title_justify="left", show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("works", no_wrap=True)
    table.add_column("what came back", overflow="fold")
    for c in report.checks:
        seen = f"{c.result}: {c.detail}" if c.detail else c.result
        table.add_row(c.name, {True: "yes", False: "NO", None: "?"}[c.ok], seen)
    console = _console()
    console.print(table)
    for found in report.batches:
        if "shape" in found:
            console.print(
                f"batch object ({found['label']}): {json.dumps(found['shape'])}", highlight=False, soft_wrap=True
            )
    worst = f" (worst case {report.worst_case:.6f})" if report.worst_case is not None else ""
    console.print(f"spent: {report.spent:.6f} {t.currency} on {report.requests} requests{worst}", highlight=False)
    if report.aborted:
        console.print(f"stopped: the endpoint refused the account ({report.aborted})", highlight=False)
    elif report.facts:
        console.print(
            f"stored in {_home_as_tilde(facts_path())}: runs of {t.model} on {t.endpoint} start from it",
            highlight=False,
            soft_wrap=True,
        )


def _home_as_tilde(path: Path) -> str:
    """A path under the home directory as `~/...`, the way a user would type it."""
    try:
        return f"~/{path.relative_to(Path.home())}"
    except ValueError:
        return str(path)
