"""The Python API: run, estimate and load jobs from a notebook or a script, with the command line's
rules (a bad spec raises UsageError; a run that stopped returns its exit code)."""

from __future__ import annotations

import functools
import importlib
import os
import shlex
import threading
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from runner.errors import UsageError
from runner.job.resolve import Job
from runner.job.resolve import load_job as _load_job
from runner.observe.progress import LogReporter, Reporter
from runner.redact import redact
from runner.runs import RunOptions, RunResult

if TYPE_CHECKING:
    from runner.estimate import EstimateOptions

__all__ = ["RunResult", "aestimate_job", "api_key_for", "arun_job", "estimate_job", "load_job", "run_job"]

P = ParamSpec("P")
R = TypeVar("R")

SIMULATOR_KEY = "simulator-key"  # the built-in simulator accepts any key


def load_job(spec: str | Path, *, set: Mapping[str, Any] | None = None, limit: int | None = None) -> Job:
    """Read, validate and resolve a job spec, with `--set`-style overrides (`{"run.concurrency": 4}`)."""
    items = [f"{key}={_yaml_value(value)}" for key, value in (set or {}).items()]
    if limit is not None:
        items.append(f"input.limit={limit}")
    return _load_job(Path(spec), items)


def api_key_for(job: Job) -> str:
    """The key from the environment (never from the spec); the simulator needs none."""
    return key_from_env(job.endpoint_name, job.base_url, job.key_env)


def key_from_env(endpoint: str, base_url: str | None, key_env: tuple[str, ...]) -> str:
    """The key in the first of `key_env` that is set (see checked_key); none for the simulator (no URL)."""
    if base_url is None:
        return SIMULATOR_KEY
    for name in key_env:
        value = os.environ.get(name)
        if value and value.strip():
            return checked_key(name, value)
    names = " or ".join(key_env) or "ZHIPUAI_API_KEY"
    raise UsageError(f"no API key for endpoint {endpoint!r}: set {names} in the environment")


def checked_key(name: str, value: str) -> str:
    """The key in `name` without surrounding whitespace (a key file saved on Windows ends in CR LF);
    UsageError naming the variable when what is left is not one printable ASCII word, which no HTTP
    header can carry (the SDK would fail every row as a bare "Connection error.")."""
    key = value.strip()
    bad = next((c for c in key if not (c.isascii() and c.isprintable()) or c.isspace()), None)
    if bad is not None:
        what = "a space" if bad == " " else f"the character {bad!r}"
        raise UsageError(
            f"${name}: the API key has {what} inside it (at position {key.index(bad) + 1}); "
            f"set {name} to the key alone, as one line of letters, digits and punctuation"
        )
    return key


async def arun_job(
    spec: str | Path | Job,
    *,
    set: Mapping[str, Any] | None = None,
    limit: int | None = None,
    fresh: bool = False,
    retry_failed: bool = False,
    reporter: Reporter | None = None,
) -> RunResult:
    """Run a job to completion, interruption or abort (the async form; see `run_job`)."""
    job = spec if isinstance(spec, Job) else load_job(spec, set=set, limit=limit)
    options = RunOptions(fresh=fresh, retry_failed=retry_failed, resume_command=resume_command(job, set, limit))
    return await run_loaded(job, options, reporter or LogReporter())


async def run_loaded(job: Job, options: RunOptions, reporter: Reporter) -> RunResult:
    """Run a loaded job (the command line's `run` too): its cascade's stages, or one run on the sender
    its spec asks for (runner.senders.sender_for), with the key from the environment."""
    key = api_key_for(job)
    if will_send_online(job, fresh=options.fresh):
        import_in_background()  # the SDK loads while the engine (polars) loads and checks the input
    from runner.engine import execute
    from runner.senders import sender_for

    if job.spec.output.cascade is None:
        return await execute(job, api_key=key, options=options, reporter=reporter, sender=sender_for(job, options))
    from runner.cascade.stages import run_cascade  # stages that are runs like any other, then a join

    return await run_cascade(job, api_key=key, options=options, reporter=reporter)


async def aestimate_job(
    spec: str | Path | Job,
    *,
    set: Mapping[str, Any] | None = None,
    limit: int | None = None,
    exact: bool = False,
    pilot: int | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Estimate a job (the async form; see `estimate_job`)."""
    from runner.estimate import EstimateOptions

    job = spec if isinstance(spec, Job) else load_job(spec, set=set, limit=limit)
    key = api_key_for(job) if (exact or pilot) else "unused"
    return await estimate_loaded(job, key, EstimateOptions(exact=exact, pilot_rows=pilot), reporter or LogReporter())


async def estimate_loaded(job: Job, api_key: str, options: EstimateOptions, reporter: Reporter) -> dict[str, Any]:
    """Estimate a loaded job, a cascade's or one run's (the command line's `estimate` and `run --dry-run`
    too); its `warnings` are what to know before spending (reasoning that may not fit max_tokens)."""
    if job.spec.output.cascade is not None:
        from runner.cascade.estimate import estimate_cascade

        report = await estimate_cascade(job, api_key=api_key, options=options, reporter=reporter)
    else:
        from runner.estimate import estimate_job as estimate

        report = await estimate(job, api_key=api_key, options=options, reporter=reporter)
    warning = job.thinking.warning
    return {**report, "warnings": [warning] if warning else []}


def _blocking(name: str, coroutine: Callable[P, Coroutine[Any, Any, R]], doc: str) -> Callable[P, R]:
    """The blocking form of an async function of the API, refused (before anything starts) inside a
    running event loop, where asyncio.run would fail with a bare "cannot be called from a running event loop"."""

    @functools.wraps(coroutine)
    def blocking(*args: P.args, **kwargs: P.kwargs) -> R:
        import asyncio

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coroutine(*args, **kwargs))
        raise RuntimeError(
            f"runner.{name}() cannot run inside a running event loop (Jupyter, an async app); "
            f"there, use: await runner.{coroutine.__name__}(...)"
        )

    blocking.__name__ = blocking.__qualname__ = name
    blocking.__doc__ = doc
    return blocking


run_job = _blocking(
    "run_job",
    arun_job,
    """Run a job and wait for it: send every row with no answer yet, write the output, return how it ended.
    Where an event loop already runs (Jupyter), `await arun_job(...)` instead.""",
)
estimate_job = _blocking(
    "estimate_job",
    aestimate_job,
    """What the job would cost and how long it would take (the report `glm-batch estimate --json` prints).
    Where an event loop already runs (Jupyter), `await aestimate_job(...)` instead.""",
)


# What a run's first request needs that loading the job and planning do not (third-party only): the SDK,
# what it imports on its first client and request, the retry and rate-limit libraries.
SENDING_MODULES = ("anthropic", "httpcore2", "opentelemetry.propagate", "tenacity", "aiolimiter")


def import_in_background(modules: tuple[str, ...] = SENDING_MODULES) -> threading.Thread:
    """Import `modules` in a thread, so a run's start does not wait for the SDK after everything else
    (docs/decisions.md, "CLI start-up"); a module that fails here raises where it is used."""

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
    """Will this run send through the SDK? Sure with no state yet, with --fresh, or when input or spec
    changed since the row map was built; an unchanged re-run may send nothing, and must not load it."""
    run = job.spec.run
    if run.engine != "local" or run.mode != "online":  # Ray workers send; batch mode uploads files
        return False
    if fresh or not job.state_dir.exists():
        return True
    from runner.runs import fingerprint
    from runner.state.rowmap import RowMap  # its JSON records only: polars is not loaded for this

    return RowMap(job.state_dir / "rows").fingerprint() != fingerprint(job)


def resume_command(job: Job, overrides: Mapping[str, Any] | list[str] | None, limit: int | None) -> str:
    """The exact command that runs this same job again: its spec, every --set and --limit."""
    items = overrides.items() if isinstance(overrides, Mapping) else (i.partition("=")[::2] for i in overrides or [])
    words = ["glm-batch", "run", str(job.spec_path)]
    if limit is not None:
        words += ["--limit", str(limit)]
    for key, value in items:
        words += ["--set", f"{key}={_yaml_value(value)}"]
    return redact(shlex.join(words))


def _yaml_value(value: Any) -> str:
    """A Python value as the YAML text `--set` parses back to it."""
    if isinstance(value, str):
        return value
    import json

    return json.dumps(value)  # JSON is YAML: numbers, booleans, lists and mappings round-trip
