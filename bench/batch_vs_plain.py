"""Benchmark: glm-batch's batch mode against the plain script (bench/plain_batch.py), in pairs.

    python bench/batch_vs_plain.py [--rows 100000] [--runs 5]

Each pair is a fresh N-row input (distinct rows), a fresh simulator process whose Batch API answers
every batch at once (no validating, processing or finalizing time), and two processes on it, one after
the other (the order alternates from pair to pair): `glm-batch run JOB --set run.mode=batch` and the
plain script doing the same work by hand. Each is measured as a whole process (CPU seconds user+system,
wall seconds and peak RSS, read by a small wrapper from RUSAGE_CHILDREN), imports included: what a user
pays. The simulator's CPU is its own process's and counts for neither.

Printed: each pair's CPU and wall ratio (ours / plain) and both peak RSS figures, then the worst and
median ratio over the pairs, with the load average before and after (2 shared cores: the ratios
within a pair are the claim, not absolute seconds). Targets (issue 23): CPU at most 2x at 100k rows
and 1.5x at 1M, worst of the pairs; peak RSS flat from 100k to 1M.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import HERE, INSTANT_BATCH_API, configure_simulator, free_port, sim_stats, start_simulator, write_job

WORK = Path(os.environ.get("GLM_BATCH_BENCH_DIR", HERE / "out" / "batch_vs_plain"))
MODEL = "glm-4-air-250414"  # on Zhipu's Batch API list
TEMPLATE, SYSTEM = "Summarise: {{ text }}", "Be brief."  # what _common.write_job's spec says
WRAPPER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); p = subprocess.run(sys.argv[1:]); "
    "w = time.perf_counter() - t; r = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print(r.ru_utime + r.ru_stime, w, r.ru_maxrss, file=sys.stderr); sys.exit(p.returncode)"
)


def measured(argv: list[str], folder: Path) -> dict[str, float]:
    """CPU seconds, wall seconds and peak RSS (MB) of one process running `argv`."""
    ledger = {"GLM_BATCH_LEDGER": str(folder / "ledger"), "GLM_BATCH_FACTS": str(folder / "facts.json")}
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *argv],
        env={**os.environ, "ZHIPUAI_API_KEY": "bench", **ledger},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    cpu, wall, rss_kb = proc.stderr.strip().splitlines()[-1].split()
    return {"cpu_s": round(float(cpu), 2), "wall_s": round(float(wall), 2), "rss_mb": round(int(rss_kb) / 1024, 1)}


def one_pair(rows: int, index: int) -> dict[str, Any]:
    """Both sides on a fresh simulator and input of `rows` rows; their figures and ratios."""
    folder = WORK / f"rows-{rows}-pair-{index}"
    shutil.rmtree(folder, ignore_errors=True)
    port = free_port()
    spec = write_job(folder, port, rows, "{batch: {poll_initial_s: 0.05, poll_max_s: 0.5}}")
    sim = start_simulator(port)
    try:
        configure_simulator(port, **INSTANT_BATCH_API)
        ours_argv = [sys.executable, "-m", "runner", "run", str(spec), "--set", "run.mode=batch",
                     "--set", f"model.name={MODEL}", "--log-format", "json"]  # fmt: skip
        plain_argv = [sys.executable, str(HERE / "plain_batch.py"), str(folder / "data" / "input.parquet"),
                      str(folder / "plain"), "--base", f"http://127.0.0.1:{port}/api/paas/v4",
                      "--template", TEMPLATE, "--system", SYSTEM, "--model", MODEL]  # fmt: skip
        sides = [("ours", ours_argv), ("plain", plain_argv)]
        result: dict[str, Any] = {}
        for name, argv in sides if index % 2 == 0 else sides[::-1]:
            result[name] = measured(argv, folder)
            print(json.dumps({name: result[name]}), flush=True)  # kept should the simulator fail after
        stats = sim_stats(port, timeout_s=300)  # a simulator holding 2M lines' files answers slowly
    finally:
        sim.terminate()
        sim.wait()
        shutil.rmtree(folder, ignore_errors=True)
    assert stats["batch_lines_processed"] == 2 * rows, stats
    result["cpu_ratio"] = round(result["ours"]["cpu_s"] / result["plain"]["cpu_s"], 2)
    result["wall_ratio"] = round(result["ours"]["wall_s"] / result["plain"]["wall_s"], 2)
    result["load"] = round(os.getloadavg()[0], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5, help="pairs (worst and median)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    started = time.perf_counter()
    pairs = []
    for index in range(args.runs):
        pairs.append(one_pair(args.rows, index))
        print(json.dumps(pairs[-1]), flush=True)
    report: dict[str, Any] = {"rows": args.rows, "pairs": len(pairs)}
    for key in ("cpu_ratio", "wall_ratio"):
        values = [p[key] for p in pairs]
        report[key] = {"worst": max(values), "median": statistics.median(values)}
    for side in ("ours", "plain"):
        for key in ("cpu_s", "wall_s", "rss_mb"):
            values = [p[side][key] for p in pairs]
            report[f"{side}.{key}"] = {"worst": max(values), "median": statistics.median(values)}
    after = os.getloadavg()
    report["load_average"] = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in after]}
    report["bench_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
