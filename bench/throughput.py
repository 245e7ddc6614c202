"""Benchmark: does the runner use the endpoint's real limit, what does it cost per row, does it scale?

    python bench/throughput.py [--quick]

Every figure is a ratio to a baseline measured in the same run, on this machine:

1. Limit utilisation. A simulator with a hidden in-flight cap C and latency L can answer at most C/L
   requests a second. Achieved rows/s (while answering) / (C/L), with `concurrency: C` given and with
   `concurrency: auto`, and the share of requests refused with 429/1302. Then a cap that drops from 16
   to 6 halfway (peak hours): each phase against its own C/L. Targets: >= 0.95 given, >= 0.90 auto with
   under 5% 429s, and auto following the drop.
2. Overhead. A simulator with no latency: the runner end to end (read, render, send, write Parquet)
   against a bare loop of the same SDK calls (same client and transport, asyncio.gather under a
   semaphore, nothing written; bench/bare_loop.py, in a process that imports only the SDK), with
   `--overhead-rows` rows each (default 5,000), the two taking turns to go first. Target (issue 14):
   rows/s while sending >= 0.9 of the bare loop's. Also the CPU ratio: the bare loop's CPU per answer
   over the runner's, each from its first answer to its last (the runner's from its summary,
   `cpu_while_answering`), which the machine's other load disturbs less than wall time; and each
   side's CPU per row including start-up.
3. Scale. Inputs of 100k and 1M rows whose answers all exist but every 100th row's: the run renders
   every row, sends 1%, writes every row. Peak RSS and rows/s at each size. Targets: peak RSS under
   500 MB and within 1.5x between the two.

The simulator always runs in its own process, so it does not take the runner's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
from _common import (
    HERE,
    configure_simulator,
    free_port,
    measured_run,
    seed_finished_state,
    sim_stats,
    start_simulator,
    write_job,
)

WORK = HERE / "out" / "throughput"


def answering_rate(spec: Path) -> tuple[float, float, float]:
    """Rows/s while answers were arriving (first to last `finished_at`), and that window."""
    out = pl.read_parquet(spec.parent / "out" / "bench.parquet", columns=["finished_at", "status"])
    ok = out.filter(pl.col("status") == "ok").get_column("finished_at")
    start, end = ok.min(), ok.max()
    window = (end - start).total_seconds()  # type: ignore[operator, union-attr]
    return ok.len() / window, start.timestamp(), end.timestamp()  # type: ignore[union-attr]


def utilisation(quick: bool) -> dict[str, Any]:
    cap, latency = 16, 0.2
    rows = 800 if quick else 1600
    ideal = cap / latency
    report: dict[str, Any] = {"cap": cap, "latency_s": latency, "ideal_rows_per_s": ideal}
    for name, run in (
        ("given", f"{{concurrency: {cap}, max_attempts: 20}}"),
        ("auto", "{concurrency: auto, max_concurrency: 64, max_attempts: 20}"),
    ):
        port = free_port()
        sim = start_simulator(port, "--latency", str(latency), "--cap", str(cap))
        try:
            folder = WORK / f"util-{name}"
            shutil.rmtree(folder, ignore_errors=True)
            spec = write_job(folder, port, rows, run)
            measured_run(spec)
            stats = sim_stats(port)
        finally:
            sim.terminate()
            sim.wait()
        rate, _, _ = answering_rate(spec)
        refused = stats["outcomes"].get("429_1302_cap", 0)
        report[name] = {
            "rows_per_s": round(rate, 1),
            "utilisation": round(rate / ideal, 3),
            "share_429": round(refused / stats["requests"], 4),
        }
    report["drop_16_to_6"] = cap_drop(quick)
    return report


def cap_drop(quick: bool) -> dict[str, Any]:
    """Auto concurrency while the cap falls from 16 to 6 halfway through."""
    latency, rows = 0.2, (900 if quick else 1600)
    port = free_port()
    sim = start_simulator(port, "--latency", str(latency), "--cap", "16")
    folder = WORK / "util-drop"
    shutil.rmtree(folder, ignore_errors=True)
    spec = write_job(folder, port, rows, "{concurrency: auto, max_concurrency: 64, max_attempts: 30}")
    dropped_at: list[float] = []

    def drop_when_half_done() -> None:
        while sim_stats(port)["ok"] < rows // 3:
            time.sleep(0.05)
        configure_simulator(port, concurrency_cap=6)
        dropped_at.append(time.time())

    watcher = threading.Thread(target=drop_when_half_done, daemon=True)
    watcher.start()
    try:
        measured_run(spec)
        stats = sim_stats(port)
    finally:
        sim.terminate()
        sim.wait()
    out = pl.read_parquet(folder / "out" / "bench.parquet", columns=["finished_at"]).get_column("finished_at")
    times = sorted(t.timestamp() for t in out)
    drop = dropped_at[0]
    before = [t for t in times if t < drop]
    after = [t for t in times if t >= drop + 1.0]  # allow one second to adapt
    rate_before = len(before) / (before[-1] - before[0])
    rate_after = len(after) / (after[-1] - after[0])
    return {
        "before": {"rows_per_s": round(rate_before, 1), "utilisation": round(rate_before / (16 / latency), 3)},
        "after": {"rows_per_s": round(rate_after, 1), "utilisation": round(rate_after / (6 / latency), 3)},
        "share_429": round(stats["outcomes"].get("429_1302_cap", 0) / stats["requests"], 4),
        "max_in_flight_seen_by_server": stats["max_in_flight"],
    }


def bare(port: int, rows: int, concurrency: int) -> tuple[float, float, float]:
    """The bare loop (bench/bare_loop.py) in a fresh process that imports only the SDK, as a user's
    script would (this one holds polars and the runner too, which the collector would walk): its wall
    seconds, CPU seconds (the SDK's import left out) and CPU seconds from its first answer to its last."""
    command = [sys.executable, str(HERE / "bare_loop.py"), str(port), str(rows), str(concurrency)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return figures["wall_s"], figures["cpu_s"], figures["answering_cpu_s"]


def overhead_round(rows: int, concurrency: int, runner_first: bool) -> dict[str, Any]:
    """One same-run comparison: the bare loop and the runner against one simulator, back to back."""
    load_before = os.getloadavg()[0]
    port = free_port()
    sim = start_simulator(port)
    folder = WORK / "overhead"
    shutil.rmtree(folder, ignore_errors=True)
    spec = write_job(folder, port, rows, f"{{concurrency: {concurrency}}}")
    try:
        if runner_first:
            runner = measured_run(spec)
            bare_s, bare_cpu, bare_answering_cpu = bare(port, rows, concurrency)
        else:
            bare_s, bare_cpu, bare_answering_cpu = bare(port, rows, concurrency)
            runner = measured_run(spec)
    finally:
        sim.terminate()
        sim.wait()
    sending_rate, _, _ = answering_rate(spec)
    end_to_end = rows / runner.wall_s
    bare_rate = rows / bare_s
    summary = json.loads((folder / "out" / "bench.summary.json").read_text(encoding="utf-8"))
    runner_answering = (summary.get("cpu_while_answering") or {}).get("ms_per_answer")
    bare_answering = 1000 * bare_answering_cpu / (rows - 1)
    return {
        "rows": rows,
        "runner_first": runner_first,
        "bare_sdk_rows_per_s": round(bare_rate, 1),
        "runner_rows_per_s_while_sending": round(sending_rate, 1),
        "runner_rows_per_s_end_to_end": round(end_to_end, 1),
        "ratio_while_sending": round(sending_rate / bare_rate, 3),
        "ratio_end_to_end_with_startup": round(end_to_end / bare_rate, 3),
        # CPU per answer from the first answer to the last, bare / runner (None: a runner without it).
        "cpu_ratio_while_answering": round(bare_answering / runner_answering, 3) if runner_answering else None,
        "bare_cpu_ms_per_answer": round(bare_answering, 3),
        "runner_cpu_ms_per_answer": runner_answering,
        "bare_cpu_ms_per_row": round(1000 * bare_cpu / rows, 2),
        "runner_cpu_ms_per_row": round(1000 * runner.cpu_s / rows, 2),
        # The machine may be shared: the 1-minute load average before and after the round.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def overhead(rows: int, rounds: int = 1) -> dict[str, Any]:
    """`rounds` same-run comparisons, alternating which goes first (the load on a shared machine drifts)."""
    concurrency = 64
    results = []
    for i in range(rounds):
        results.append(overhead_round(rows, concurrency, runner_first=i % 2 == 1))
        if rounds > 1:
            print(json.dumps({"overhead_round": i + 1, **results[-1]}), flush=True)
    if rounds == 1:
        return results[0]
    ratios = sorted(r["ratio_while_sending"] for r in results)
    cpu_ratios = sorted(r["cpu_ratio_while_answering"] for r in results if r["cpu_ratio_while_answering"])
    loads = [load for r in results for load in r["load_average"]]
    return {
        "rounds": rounds,
        "rows": rows,
        "ratio_while_sending_worst": ratios[0],
        "ratio_while_sending_median": statistics.median(ratios),
        "cpu_ratio_while_answering_worst": cpu_ratios[0] if cpu_ratios else None,
        "cpu_ratio_while_answering_median": statistics.median(cpu_ratios) if cpu_ratios else None,
        "ratio_end_to_end_median": statistics.median(r["ratio_end_to_end_with_startup"] for r in results),
        "bare_cpu_ms_per_row_median": statistics.median(r["bare_cpu_ms_per_row"] for r in results),
        "runner_cpu_ms_per_row_median": statistics.median(r["runner_cpu_ms_per_row"] for r in results),
        "load_average_range": [min(loads), max(loads)],
    }


def scale(quick: bool) -> dict[str, Any]:
    sizes = (20_000, 200_000) if quick else (100_000, 1_000_000)
    report: dict[str, Any] = {}
    for rows in sizes:
        port = free_port()
        folder = WORK / f"scale-{rows}"
        shutil.rmtree(folder, ignore_errors=True)
        spec = write_job(folder, port, rows, "{concurrency: 64}")
        seed_finished_state(spec, skip_every=100)
        sim = start_simulator(port)
        try:
            result = measured_run(spec)
            sent = sim_stats(port)["requests"]
        finally:
            sim.terminate()
            sim.wait()
        report[str(rows)] = {
            "sent": sent,
            "rows_per_s": round(rows / result.wall_s, 1),
            "peak_rss_mb": round(result.peak_rss_mb, 1),
        }
    small, large = (report[str(n)] for n in sizes)
    report["rss_ratio_large_to_small"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", choices=["utilisation", "overhead", "scale"], default=None)
    parser.add_argument("--rounds", type=int, default=1, help="overhead: same-run comparisons (worst, median)")
    parser.add_argument("--overhead-rows", type=int, default=5000, help="overhead: rows a side in each round")
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict[str, Any] = {}
    parts: dict[str, Any] = {
        "utilisation": utilisation,
        "overhead": lambda quick: overhead(args.overhead_rows, args.rounds),
        "scale": scale,
    }
    for name, part in parts.items():
        if args.only in (None, name):
            report[name] = part(args.quick)
            print(json.dumps({name: report[name]}), flush=True)
    report["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
