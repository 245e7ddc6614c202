"""Benchmark: how long from `glm-batch run` starting to its first request, beyond importing the SDK?

    python bench/startup.py [--runs 5] [--other DIR] [--no-background]

Each round, back to back: the wall time of `python -c "import anthropic"` (the floor: a run must load
the SDK before it sends anything), and a `glm-batch run` process over a small input against a
simulator process with no latency, from just before the process is started to the moment its first
request went out (the earliest `finished_at - latency_ms` in its output: the start of the SDK call).
Target: the runner's time to first request at most 0.3 s more than the import. Reports every round's
gap, the worst and the median, and the load average (the machine may be shared); and the same in CPU
seconds (the run's CPU by its first connection less the import's), which a loaded machine inflates far
less than wall time.

Each run goes through a small probe (`PROBE`) that records, without changing what the run does, when
the run reached each step: the job loaded, the SDK's background import started and ended, the
engine's phases, the first import of the big libraries (and by which thread), and the first
connection. The median of each step is printed as the breakdown of the gap. `--no-background` also
runs this checkout with the SDK's background import turned off (the SDK is then imported where the
sender first needs it, on the main thread), to show what the background thread buys.

`--other DIR` also runs the runner of another checkout (e.g. `git worktree add /tmp/base main`) in the
same rounds, right after this one, so a change is compared with what it changes under the same load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
from _common import HERE, free_port, start_simulator, write_job

WORK = HERE / "out" / "startup"

# Runs `glm-batch run SPEC` as the command line does, noting when each step happened (seconds since
# the parent started the process, and the process's CPU seconds by then) on stderr as one JSON line.
PROBE = r"""
import json, sys, threading, time
started, background, spec = float(sys.argv[1]), sys.argv[2] == "on", sys.argv[3]
marks = {}
def mark(what):
    if what not in marks:
        name = threading.current_thread().name
        marks[what] = [round(time.time() - started, 4), round(time.process_time(), 4), name]
mark("interpreter up")
WATCH = ("polars", "anthropic", "pydantic", "jinja2", "asyncio", "aiohttp", "runner.engine", "runner.plan")
def hook(event, args):
    if event == "import" and args[0] in WATCH:
        mark("import " + args[0])
    elif event == "socket.connect":
        mark("first connect")
sys.addaudithook(hook)
import runner.api as api
import runner.job.resolve as resolve
import runner.observe.progress as progress
def traced_import(modules=api.SENDING_MODULES):
    mark("background import starts")
    def load():
        for name in modules:
            try:
                __import__(name)
            except Exception:
                pass
        mark("background import ends")
    thread = threading.Thread(target=load, name="glm-batch-import", daemon=False)
    thread.start()
    return thread
api.import_in_background = traced_import if background else (lambda *args, **kwargs: None)
load_job = resolve.load_job
def traced_load(*args, **kwargs):
    mark("load_job starts")
    job = load_job(*args, **kwargs)
    mark("load_job ends")
    return job
resolve.load_job = traced_load
make_reporter = progress.make_reporter
def traced_reporter(*args, **kwargs):
    reporter = make_reporter(*args, **kwargs)
    phase = reporter.phase
    def traced_phase(name):
        mark("phase " + name)
        phase(name)
    reporter.phase = traced_phase
    return reporter
progress.make_reporter = traced_reporter
sys.argv = ["glm-batch", "run", spec, "--log-format", "json"]
from runner.cli import main
try:
    main()
finally:
    print("PROBE " + json.dumps(marks), file=sys.stderr)
"""


def import_seconds() -> tuple[float, float]:
    """Wall and CPU seconds (user + system, from the process's rusage) of `python -c "import anthropic"`."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "import anthropic"])
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def first_request(port: int, rows: int, checkout: Path, *, background: bool) -> tuple[float, dict[str, Any]]:
    """Seconds from starting `glm-batch run` (the runner in `checkout`) to the start of its first SDK
    call, and the probe's marks (step: [seconds since start, CPU seconds by then, thread])."""
    shutil.rmtree(WORK, ignore_errors=True)
    spec = write_job(WORK, port, rows, "{concurrency: 8}")
    started = time.time()
    done = subprocess.run(  # the probe runs from the checkout's root, so it imports that checkout's runner
        [sys.executable, "-c", PROBE, repr(started), "on" if background else "off", str(spec)],
        env={**os.environ, "ZHIPUAI_API_KEY": "bench"},
        cwd=checkout,
        check=True,
        capture_output=True,
        text=True,
    )
    marks: dict[str, Any] = next(
        json.loads(line.removeprefix("PROBE ")) for line in done.stderr.splitlines() if line.startswith("PROBE ")
    )
    out = pl.read_parquet(WORK / "out" / "bench.parquet", columns=["finished_at", "latency_ms"])
    sent = out.select(pl.col("finished_at") - pl.duration(microseconds=(pl.col("latency_ms") * 1000).cast(pl.Int64)))
    first: dt.datetime = sent.to_series().min()  # type: ignore[assignment]
    return first.timestamp() - started, marks


def breakdown(marks: list[dict[str, Any]]) -> dict[str, Any]:
    """Each step's median time since start, median CPU seconds by then, and the thread that took it."""
    steps = {step for m in marks for step in m}
    rows = []
    for step in steps:
        seen = [m[step] for m in marks if step in m]
        rows.append((statistics.median(s[0] for s in seen), step, statistics.median(s[1] for s in seen), seen[0][2]))
    return {step: {"at_s": at, "cpu_s": cpu, "thread": thread} for at, step, cpu, thread in sorted(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--other", type=Path, metavar="DIR", help="Also measure the runner of this checkout.")
    parser.add_argument(
        "--no-background", action="store_true", help="Also measure this checkout with the SDK's background import off."
    )
    args = parser.parse_args()
    # (name, checkout, background import on)
    variants = [("this", HERE.parent, True)]
    if args.no_background:
        variants.append(("this, no background import", HERE.parent, False))
    if args.other:
        variants.append(("other", args.other.resolve(), True))
    port = free_port()
    sim = start_simulator(port)
    rounds: list[dict[str, Any]] = []
    marks: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    try:
        for _ in range(args.runs):
            base, base_cpu = import_seconds()
            line: dict[str, Any] = {"import_anthropic_s": round(base, 3), "import_anthropic_cpu_s": round(base_cpu, 3)}
            for name, checkout, background in variants:
                first, seen = first_request(port, args.rows, checkout, background=background)
                # CPU seconds the run had used by its first connection, beyond the import's: the
                # runner's own cost in a measure that a loaded machine inflates far less than wall time.
                cpu_gap = seen["first connect"][1] - base_cpu if "first connect" in seen else None
                line[name] = {
                    "first_request_s": round(first, 3),
                    "gap_s": round(first - base, 3),
                    "cpu_gap_s": None if cpu_gap is None else round(cpu_gap, 3),
                }
                marks[name].append(seen)
            rounds.append(line)
            print(json.dumps(line), flush=True)
    finally:
        sim.terminate()
        sim.wait()
    result: dict[str, Any] = {
        "runs": args.runs,
        "rows": args.rows,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    for key in ("import_anthropic_s", "import_anthropic_cpu_s"):
        floor = [r[key] for r in rounds]
        result[key] = {"worst": max(floor), "median": statistics.median(floor)}
    for name, _, _ in variants:
        result[name] = {}
        for key in ("gap_s", "cpu_gap_s"):
            gaps = [r[name][key] for r in rounds if r[name][key] is not None]
            result[name][key] = {"worst": max(gaps), "median": statistics.median(gaps)} if gaps else None
    print(json.dumps(result))
    for name, _, _ in variants:
        print(json.dumps({"breakdown": name, "steps": breakdown(marks[name])}))


if __name__ == "__main__":
    main()
