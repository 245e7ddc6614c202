"""Helpers shared by the benchmarks: a standalone simulator process, and seeding a job's state."""

from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl

from runner.inputs import ID, ROW, open_input
from runner.prompts import RequestBuilder
from runner.records import Result
from runner.simulator import answer_for, prompt_text
from runner.spec import load_job
from runner.store import KEY, Store

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_simulator(port: int, *args: str) -> subprocess.Popen[bytes]:
    """A simulator in its own process (so it does not share the runner's CPU core and GIL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "simulate", "--port", str(port), *args], stdout=subprocess.DEVNULL
    )
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/stats", timeout=1)
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("simulator did not start")


def sim_stats(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/stats", timeout=5) as r:
        data: dict[str, int] = json.load(r)
        return data


def configure_simulator(port: int, **changes: Any) -> None:
    """Change a running simulator's behaviour (POST /_sim/config)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/_sim/config",
        data=json.dumps(changes).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=5).read()


def seed_finished_state(spec: Path, skip_every: int = 0) -> None:
    """Write the durable state a finished run would have left, through Store's API.

    With `skip_every` n, every n-th row is left unanswered, so a run has those to send.
    """
    job = load_job(spec)
    source = open_input(job)
    builder = RequestBuilder(job)
    store = Store(job.state_dir, job.output_path, run_id="seed")
    store.open()
    now = dt.datetime.now(dt.UTC)
    try:
        for frame in source.batches(50_000):
            keys = []
            for row in frame.iter_rows(named=True):
                request = builder.build(row)
                keys.append(request.key)
                if skip_every and row[ROW] % skip_every == 0:
                    continue
                text = answer_for(prompt_text(request.params))
                store.add(
                    Result(
                        key=request.key,
                        status="ok",
                        attempts=1,
                        latency_ms=1.0,
                        finished_at=now,
                        model=job.spec.model.name,
                        response_text=text,
                        input_tokens=10,
                        output_tokens=10,
                    )
                )
            store.add_rows(frame.select(ROW, ID).with_columns(pl.Series(KEY, keys)))
            store.flush()
        store.finalize(job.spec.input.id_column or "id")
    finally:
        store.close()
