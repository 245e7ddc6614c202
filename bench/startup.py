"""Benchmark: how long from `glm-batch run` starting to its first request, beyond importing the SDK?

    python bench/startup.py [--runs 5]

Each round, back to back: the wall time of `python -c "import anthropic"` (the floor: a run must load
the SDK before it sends anything), and a `glm-batch run` process over a small input against a
simulator process with no latency, from just before the process is started to the moment its first
request went out (the earliest `finished_at - latency_ms` in its output: the start of the SDK call).
Target: the runner's time to first request at most 0.3 s more than the import. Reports every round's
gap, the worst and the median, and the load average (the machine may be shared).

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


def import_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import anthropic"], check=True)
    return time.perf_counter() - started


def first_request_seconds(port: int, rows: int, checkout: Path) -> float:
    """Seconds from starting `glm-batch run` (the runner in `checkout`) to the start of its first SDK call."""
    shutil.rmtree(WORK, ignore_errors=True)
    spec = write_job(WORK, port, rows, "{concurrency: 8}")
    started = time.time()
    subprocess.run(  # `-m runner` from the checkout's root imports that checkout's runner
        [sys.executable, "-m", "runner", "run", str(spec), "--log-format", "json"],
        env={**os.environ, "ZHIPUAI_API_KEY": "bench"},
        cwd=checkout,
        check=True,
        capture_output=True,
    )
    out = pl.read_parquet(WORK / "out" / "bench.parquet", columns=["finished_at", "latency_ms"])
    sent = out.select(pl.col("finished_at") - pl.duration(microseconds=(pl.col("latency_ms") * 1000).cast(pl.Int64)))
    first: dt.datetime = sent.to_series().min()  # type: ignore[assignment]
    return first.timestamp() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--other", type=Path, metavar="DIR", help="Also measure the runner of this checkout.")
    args = parser.parse_args()
    checkouts = {"this": HERE.parent, **({"other": args.other.resolve()} if args.other else {})}
    port = free_port()
    sim = start_simulator(port)
    rounds: list[dict[str, Any]] = []
    try:
        for _ in range(args.runs):
            base = import_seconds()
            line: dict[str, Any] = {"import_anthropic_s": round(base, 3)}
            for name, checkout in checkouts.items():
                first = first_request_seconds(port, args.rows, checkout)
                line[name] = {"first_request_s": round(first, 3), "gap_s": round(first - base, 3)}
            rounds.append(line)
            print(json.dumps(line), flush=True)
    finally:
        sim.terminate()
        sim.wait()
    result: dict[str, Any] = {"runs": args.runs, "rows": args.rows, "load_average": os.getloadavg()}
    for name in checkouts:
        gaps = [r[name]["gap_s"] for r in rounds]
        result[name] = {"worst_gap_s": max(gaps), "median_gap_s": statistics.median(gaps)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
