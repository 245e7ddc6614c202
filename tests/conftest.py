"""Shared fixtures: a real simulator on loopback, a job factory, and a way to call the real CLI.

Nothing here mocks the SDK or the engine: every test sends real HTTP through `anthropic.AsyncAnthropic`
to `runner.simulator.simulator` on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import copy
import csv
import importlib.util
import inspect
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import settings
from typer.testing import CliRunner

from runner.cli import app
from runner.simulator.config import SimConfig
from runner.simulator.simulator import SimulatorThread

# Hypothesis' per-example deadline is a timing assertion: on a loaded 2-core machine it fails tests whose
# behaviour is fine. Properties are checked for what they compute, never for how fast.
settings.register_profile("glm-batch", deadline=None)
settings.load_profile("glm-batch")

# The Ray tests need the ray extra. Without it they are skipped, except in CI, which installs it: there a
# missing ray is a broken setup, and their imports fail loudly.
NO_RAY = importlib.util.find_spec("ray") is None and not os.environ.get("CI")


class _NeedsRay(pytest.Module):
    def collect(self) -> Any:
        pytest.skip("needs ray: pip install -e '.[ray]'", allow_module_level=True)


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """A Ray test module, skipped whole (before its imports run) where ray is not installed."""
    return (
        _NeedsRay.from_parent(parent, path=module_path) if NO_RAY and module_path.name.startswith("test_ray_") else None
    )


API_KEY = "test-key-0123456789abcdef.SECRETVALUE42"


def eventually(
    condition: Callable[[], Any],
    *,
    within_s: float = 20.0,
    every_s: float = 0.01,
    context: Callable[[], object] | None = None,
) -> Any:
    """Poll `condition` until it is true and return its value; fail the test if it is not within
    `within_s` (generous: a condition, not a timing, is what a test checks), saying `context()` too."""
    deadline = time.monotonic() + within_s
    while not (value := condition()):
        assert time.monotonic() < deadline, _not_true(condition, within_s, context)
        time.sleep(every_s)
    return value


async def until(
    condition: Callable[[], Any],
    *,
    within_s: float = 20.0,
    every_s: float = 0.01,
    context: Callable[[], object] | None = None,
) -> Any:
    """`eventually` inside an event loop: polls without blocking the loop's other tasks; `condition`
    may be a coroutine function."""
    deadline = time.monotonic() + within_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, _not_true(condition, within_s, context)
        await asyncio.sleep(every_s)


def _not_true(condition: Callable[[], Any], within_s: float, context: Callable[[], object] | None) -> str:
    said = f"not true within {within_s} s: {getattr(condition, '__qualname__', condition)}"
    return said if context is None else f"{said}: {context()}"


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    """A fresh simulator per test, answering at once with no faults."""
    with SimulatorThread(SimConfig()) as server:
        yield server


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A known key in the environment, a ledger of the test's own, nothing from the developer's shell."""
    monkeypatch.setenv("ZHIPUAI_API_KEY", API_KEY)
    monkeypatch.setenv("GLM_BATCH_LEDGER", str(tmp_path / "ledger"))
    monkeypatch.setenv("GLM_BATCH_FACTS", str(tmp_path / "facts.json"))
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)


def sample_rows(n: int, start: int = 0) -> list[dict[str, str]]:
    """n distinct rows with an id and a text."""
    return [{"id": f"r{i:06d}", "text": f"review number {i}: the product was fine"} for i in range(start, start + n)]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows (dicts with the same keys) as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["id", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """base updated with extra, mappings merged recursively."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class JobFiles:
    """A job written to disk: its spec, its input and where its output will be."""

    spec: Path
    input: Path
    output: Path
    summary: Path


@pytest.fixture
def make_job(tmp_path: Path, sim: SimulatorThread) -> Callable[..., JobFiles]:
    """Write an input CSV and a spec pointing at the test simulator; return their paths."""

    def make(rows: list[dict[str, Any]] | None = None, name: str = "job", **spec: Any) -> JobFiles:
        data = write_csv(tmp_path / "data" / f"{name}.csv", rows if rows is not None else sample_rows(20))
        base = {
            "version": 1,
            "name": name,
            "input": {"paths": [f"data/{name}.csv"], "id_column": "id"},
            "prompt": {"system": "Be brief.", "template": "Summarise: {{ text }}"},
            "model": {"name": "glm-4.6", "endpoint": sim.url, "max_tokens": 64},
            "run": {
                "concurrency": 4,
                "max_attempts": 4,
                "timeout_s": 10,
                "backoff_initial_s": 0.001,
                "backoff_max_s": 0.01,
                "checkpoint_seconds": 0.2,
            },
            "output": {"path": f"out/{name}.parquet", "keep_columns": ["text"]},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(deep_merge(base, spec), sort_keys=False), encoding="utf-8")
        out = tmp_path / "out" / f"{name}.parquet"
        return JobFiles(path, data, out, out.with_suffix(".summary.json"))

    return make


@dataclass
class CliResult:
    """What one CLI invocation did."""

    exit_code: int
    stdout: str
    stderr: str


def cli(*args: str) -> CliResult:
    """Invoke the real `glm-batch` command in-process."""
    result = CliRunner().invoke(app, [*args, "--log-format", "json"] if args and args[0] == "run" else list(args))
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # A traceback is a defect in itself; show it in the assertion message rather than losing it.
        stderr += "".join(traceback.format_exception(result.exception))
    return CliResult(result.exit_code, result.stdout, stderr)


def sigterm_once_started(spec: Path, state_dir: Path, **env: str) -> tuple[int, str]:
    """`glm-batch run` of `spec` in a child process, sent SIGTERM as soon as it has opened its state (its
    lock exists: it is a run now, still starting); its exit code and stderr."""
    run = subprocess.Popen(
        [sys.executable, "-m", "runner", "run", str(spec), "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
        text=True,
    )
    eventually(lambda: (state_dir / "lock").exists() or run.poll() is not None, within_s=120, every_s=0.002)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=180)
    return run.returncode, stderr


@contextmanager
def messages_endpoint(handler: Callable[[Any], Awaitable[Any]], path: str = "/v1/messages") -> Iterator[str]:
    """An endpoint of the test's own on loopback, answering POST `path` (by default /v1/messages) with
    `handler` (an aiohttp handler) in a thread of its own: for answers the simulator does not give.
    Yields its base URL."""
    import socket
    import threading

    from aiohttp import web

    loop = asyncio.new_event_loop()
    server = web.Application()
    server.router.add_post(path, handler)
    app_runner = web.AppRunner(server)
    loop.run_until_complete(app_runner.setup())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    loop.run_until_complete(web.SockSite(app_runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(app_runner.cleanup())
        loop.close()
