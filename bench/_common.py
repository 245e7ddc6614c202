"""Helpers shared by the benchmarks: a standalone simulator process, and seeding a job's state."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from runner.job.inputs import ID, ROW, open_input
from runner.job.prompts import RequestBuilder
from runner.job.resolve import load_job
from runner.output.assemble import OutputShape, finalize
from runner.output.sinks import ParquetSink
from runner.records import KEY, Result
from runner.simulator.answers import answer_for, prompt_text
from runner.state.store import Store

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


def sim_stats(port: int, timeout_s: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/stats", timeout=timeout_s) as r:
        data: dict[str, Any] = json.load(r)
        return data


@dataclass(frozen=True)
class Measured:
    """What one `glm-batch run` process took."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float


def measured_run(spec: Path) -> Measured:
    """Run `glm-batch run SPEC` in a subprocess and measure its wall time, CPU time and peak RSS.

    A small wrapper process runs it and reads its own RUSAGE_CHILDREN, so the figures are that run's
    alone, not the benchmark's.
    """
    probe = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
        "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(r.ru_utime + r.ru_stime, r.ru_maxrss, file=sys.stderr); sys.exit(p.returncode)"
    )
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "-m", "runner", "run", str(spec), "--log-format", "json"],
        # What a run learns (an `auto` run: the cap) goes beside its spec, not to the user's facts file.
        env={**os.environ, "ZHIPUAI_API_KEY": "bench", "GLM_BATCH_FACTS": str(spec.parent / "facts.json")},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"glm-batch run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    cpu, rss_kb = proc.stderr.strip().splitlines()[-1].split()
    return Measured(wall, float(cpu), int(rss_kb) / 1024)


# A Batch API that answers at once: what the batch benches measure is the client's own work.
INSTANT_BATCH_API: dict[str, Any] = {
    "batch_lines_per_s": None,
    "batch_validating_s": 0.0,
    "batch_finalizing_s": 0.0,
    "batch_output_404_s": 0.0,
    "batch_check_on_upload": False,
}


def configure_simulator(port: int, **changes: Any) -> None:
    """Change a running simulator's behaviour (POST /_sim/config)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/_sim/config",
        data=json.dumps(changes).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=5).read()


def write_job(folder: Path, port: int, rows: int, run: str, name: str = "bench") -> Path:
    """An input of `rows` distinct rows and a job spec against the simulator on `port`."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    frame = pl.DataFrame(
        {"id": [f"r{i:08d}" for i in range(rows)], "text": [f"review {i}: the product was fine" for i in range(rows)]}
    )
    frame.write_parquet(folder / "data" / "input.parquet")
    spec = folder / "job.yaml"
    spec.write_text(
        f"""version: 1
name: {name}
input: {{paths: [data/input.parquet], id_column: id}}
prompt: {{system: Be brief., template: "Summarise: {{{{ text }}}}"}}
model: {{name: glm-4.6, endpoint: "http://127.0.0.1:{port}", max_tokens: 64}}
run: {run}
output: {{path: out/{name}.parquet}}
""",
        encoding="utf-8",
    )
    return spec


def seed_finished_state(spec: Path, skip_every: int = 0) -> None:
    """Write the durable state a finished run would have left, through Store's API.

    With `skip_every` n, every n-th row is left unanswered, so a run has those to send.
    """
    job = load_job(spec)
    source = open_input(job)
    builder = RequestBuilder(job)
    store = Store(job.state_dir, run_id="seed")
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
            store.rows.add(frame.select(ROW, ID).with_columns(pl.Series(KEY, keys)))
            store.flush()
        finalize(store, ParquetSink(job.output_path, job.state_dir), OutputShape(job.spec.input.id_column or "id"))
    finally:
        store.close()


def spawn_simulator(port: int, argv: list[str]) -> subprocess.Popen[bytes]:
    """A simulator started by `argv` in its own process, returned once it answers on `port`.

    For a benchmark that serves the simulator itself (start_simulator runs `glm-batch simulate`).
    """
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/stats", timeout=1)
            return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("simulator did not start")


# ---- peak RSS by phase, inside the measured process ------------------------------------------------


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (not Linux?)")


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (VmHWM), in MB; since the last reset_peak_rss."""
    return _status_mb("VmHWM")


def rss_mb() -> float:
    """This process's resident set size now (VmRSS), in MB."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Lower this process's peak RSS mark to its current RSS, so the next peak_rss_mb() is the peak of
    what ran in between (Linux: `5` into /proc/self/clear_refs). False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False
