"""Benchmark: the Ray engine against the local engine on this machine, as ratios from one run.

    python bench/ray_engine.py [--rows 20000] [--capped-rows 2000]

1. Rows per second with a zero-latency simulator: what each engine's own work costs (reading, rendering,
   keying, journalling, writing), `glm-batch run` wall time including start-up (Ray's included).
2. Utilisation with a capped simulator (cap 16 requests in flight, 0.2 s latency): the ideal wall time
   `rows x 0.2 / 16` over the measured one; the account's limit, not the machine, is the bound here.
3. The limiter's leases per second during the Ray runs (grants / the limiter's lifetime, from the summary).

Each run is a fresh job folder and a `glm-batch run` subprocess; the simulator runs in its own process.
The Ray engine starts a local Ray instance per run (no RAY_ADDRESS), as a user without a cluster would.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benches import their _common helper by path

from _common import configure_simulator, free_port, measured_run, sim_stats, start_simulator, write_job

CAP = 16
LATENCY_S = 0.2


def one(folder: Path, port: int, rows: int, engine: str) -> dict[str, Any]:
    """One `glm-batch run` of a fresh job on `engine`: wall time, rows/s, and what the summary says."""
    shutil.rmtree(folder, ignore_errors=True)
    spec = write_job(folder, port, rows, f"{{engine: {engine}, concurrency: {CAP}, max_attempts: 8}}", name=engine)
    before = sim_stats(port)["billed"]["online"]
    measured = measured_run(spec)
    summary = json.loads((folder / "out" / f"{engine}.summary.json").read_text())
    billed = sim_stats(port)["billed"]["online"] - before
    limiter = summary.get("engine", {}).get("limiter", {})
    return {
        "engine": engine,
        "rows": rows,
        "wall_s": round(measured.wall_s, 2),
        "cpu_s": round(measured.cpu_s, 2),  # the driver process only (Ray's workers are not its children)
        "rows_per_s": round(rows / measured.wall_s, 1),
        "billed": billed,
        "leases_per_s": round(limiter["grants_per_s"], 1) if limiter else None,
        "peak_granted": limiter.get("peak_granted"),
    }


def phase(base: Path, rows: int, **sim: Any) -> tuple[dict[str, Any], int]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the zero-latency job")
    parser.add_argument("--capped-rows", type=int, default=2_000, help="rows of the capped job")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        fast, _ = phase(base, args.rows, latency_s=0.0, concurrency_cap=None)
        capped, max_in_flight = phase(base, args.capped_rows, latency_s=LATENCY_S, concurrency_cap=CAP)
    ideal = args.capped_rows * LATENCY_S / CAP
    for run in capped.values():
        run["utilisation"] = round(ideal / run["wall_s"], 3)
    results = {
        "zero_latency": fast,
        "capped": capped,
        "capped_max_in_flight": max_in_flight,
        "ratios_ray_over_local": {
            "rows_per_s": round(fast["ray"]["rows_per_s"] / fast["local"]["rows_per_s"], 3),
            "utilisation": round(capped["ray"]["utilisation"] / capped["local"]["utilisation"], 3),
        },
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
