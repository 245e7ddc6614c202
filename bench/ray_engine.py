"""Benchmark: the Ray engine against the local engine on this machine, as same-run ratios.

    python bench/ray_engine.py [--rows 100000] [--capped-rows 6000] [--runs 3]

Each run does, in this order, with a fresh job folder and a `glm-batch run` subprocess per engine:

1. Rows per second with a zero-latency simulator (`--rows`, 100,000 by default): what each engine's own
   work costs (reading, rendering, keying, journalling, writing), wall time of the whole command, Ray's
   start-up included.
2. Utilisation of the account's cap with a capped simulator (16 requests in flight, 0.2 s latency, so the
   ideal is 80 rows/s): `rows x 0.2 / 16` over the measured time, both over the command's wall time
   (Ray's start-up included) and over the sending window alone (first answer to last, plus one latency,
   from the answers' `finished_at` in the job's state). 100,000 rows would take 21 minutes per engine at
   the cap, so `--capped-rows` defaults to 6,000: 75 s of sending at the ideal rate, over 60 s of steady
   state even after a ramp.
3. The limiter actor's leases (grants) per second in the Ray runs: grants over the limiter's lifetime
   (from the summary) and over the sending window.
4. The sending actors' peak memory in the Ray runs, from /proc/PID/smaps_rollup every half second: RSS,
   its anonymous part (the actor's own heap) and the object store's shared memory it maps (Pss_Shmem).
   RSS alone misleads: it counts every object-store page an actor touched.

Every figure of the Ray engine is divided by the local engine's from the same run; the worst and the
median of those ratios over `--runs` are printed at the end, with the load average before and after.
The Ray engine starts a local Ray instance per run (no RAY_ADDRESS), as a user without a cluster would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benches import their _common helper by path

from _common import configure_simulator, free_port, measured_run, sim_stats, start_simulator, write_job

CAP = 16
LATENCY_S = 0.2


def sending_window_s(folder: Path, name: str) -> float:
    """Seconds from the first answer to the last, plus one latency (the first request's own)."""
    parts = sorted((folder / "out" / ".glm-batch" / name / "results").glob("part-*.parquet"))
    finished = pl.col("finished_at")
    first, last = pl.scan_parquet(parts).select(finished.min(), finished.max().alias("last")).collect().row(0)
    return float((last - first).total_seconds()) + LATENCY_S


# smaps_rollup fields -> the names a run reports their peak under (MB)
MEMORY_FIELDS = {"Rss": "actor_peak_rss_mb", "Anonymous": "actor_peak_anon_mb", "Pss_Shmem": "actor_peak_shmem_mb"}


class ActorMemory:
    """The sending actors' peak memory while it runs (a thread reading /proc), in MB."""

    def __init__(self) -> None:
        self.peak = dict.fromkeys(MEMORY_FIELDS.values(), 0.0)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ActorMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(0.5):
            for proc in Path("/proc").iterdir():
                try:
                    if not (proc / "cmdline").read_bytes().startswith(b"ray::MapWorker"):
                        continue
                    lines = (proc / "smaps_rollup").read_text().splitlines()
                except OSError:
                    continue  # gone, or not ours to read
                for line in lines:
                    name, _, value = line.partition(":")
                    if name in MEMORY_FIELDS:
                        key = MEMORY_FIELDS[name]
                        self.peak[key] = max(self.peak[key], round(int(value.split()[0]) / 1024, 1))


def one(folder: Path, port: int, rows: int, engine: str) -> dict[str, Any]:
    """One `glm-batch run` of a fresh job on `engine`: wall time, rows/s, and what the summary says."""
    shutil.rmtree(folder, ignore_errors=True)
    spec = write_job(folder, port, rows, f"{{engine: {engine}, concurrency: {CAP}, max_attempts: 8}}", name=engine)
    before = sim_stats(port)["billed"]["online"]
    with ActorMemory() as memory:
        measured = measured_run(spec)
    summary = json.loads((folder / "out" / f"{engine}.summary.json").read_text())
    window = sending_window_s(folder, engine)
    limiter = summary.get("engine", {}).get("limiter", {})
    return {
        "engine": engine,
        "rows": rows,
        "wall_s": round(measured.wall_s, 2),
        "sending_s": round(window, 2),
        "cpu_s": round(measured.cpu_s, 2),  # the driver process only (Ray's workers are not its children)
        "rows_per_s": round(rows / measured.wall_s, 1),
        "billed": sim_stats(port)["billed"]["online"] - before,
        "leases_per_s_lifetime": round(limiter["grants_per_s"], 1) if limiter else None,
        "leases_per_s_sending": round(limiter["grants"] / window, 1) if limiter else None,
        "peak_granted": limiter.get("peak_granted"),
        **(memory.peak if engine == "ray" else {}),
    }


def phase(base: Path, rows: int, **sim: Any) -> tuple[dict[str, dict[str, Any]], int]:
    """Both engines against one fresh simulator configured with `sim`; their runs and its max in flight."""
    port = free_port()
    proc = start_simulator(port)
    try:
        configure_simulator(port, **sim)
        runs = {e: one(base / f"{e}-{rows}-{sim['latency_s']}", port, rows, e) for e in ("local", "ray")}
        return runs, int(sim_stats(port)["max_in_flight"])
    finally:
        proc.terminate()
        proc.wait()


def one_run(base: Path, rows: int, capped_rows: int) -> dict[str, Any]:
    """One run of both phases; the Ray engine's figures as ratios to the local engine's."""
    fast, _ = phase(base, rows, latency_s=0.0, concurrency_cap=None)
    capped, max_in_flight = phase(base, capped_rows, latency_s=LATENCY_S, concurrency_cap=CAP)
    ideal = capped_rows * LATENCY_S / CAP
    for run in capped.values():
        run["utilisation_wall"] = round(ideal / run["wall_s"], 3)
        run["utilisation_sending"] = round(ideal / run["sending_s"], 3)
    return {
        "zero_latency": fast,
        "capped": capped,
        "capped_max_in_flight": max_in_flight,
        "ratios_ray_over_local": {
            "rows_per_s": round(fast["ray"]["rows_per_s"] / fast["local"]["rows_per_s"], 3),
            "utilisation_wall": round(capped["ray"]["utilisation_wall"] / capped["local"]["utilisation_wall"], 3),
            "utilisation_sending": round(
                capped["ray"]["utilisation_sending"] / capped["local"]["utilisation_sending"], 3
            ),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the zero-latency job")
    parser.add_argument("--capped-rows", type=int, default=6_000, help="rows of the capped job")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps({"load_before": os.getloadavg()}), flush=True)
    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(one_run(Path(tmp), args.rows, args.capped_rows))
        print(json.dumps({"run": i + 1, **runs[-1]}), flush=True)
    summary: dict[str, Any] = {"runs": args.runs, "load_after": os.getloadavg()}
    for name in ("rows_per_s", "utilisation_wall", "utilisation_sending"):
        ratios = [r["ratios_ray_over_local"][name] for r in runs]
        summary[f"ray_over_local_{name}"] = {"worst": min(ratios), "median": statistics.median(ratios)}
    for engine in ("local", "ray"):
        for name in ("utilisation_wall", "utilisation_sending"):
            values = [r["capped"][engine][name] for r in runs]
            summary[f"{engine}_{name}"] = {"worst": min(values), "median": statistics.median(values)}
    leases = [r["capped"]["ray"]["leases_per_s_sending"] for r in runs] + [
        r["zero_latency"]["ray"]["leases_per_s_sending"] for r in runs
    ]
    summary["ray_leases_per_s_sending"] = {"capped": leases[: args.runs], "zero_latency": leases[args.runs :]}
    summary["capped_max_in_flight"] = max(r["capped_max_in_flight"] for r in runs)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
