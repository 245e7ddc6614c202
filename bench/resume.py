"""Benchmark: resume a finished N-row job (nothing left to send). Target: seconds at 1,000,000 rows.

    python bench/resume.py [--rows 1000000]

1. Writes an N-row Parquet input and a job spec pointing at a standalone simulator (a subprocess).
2. Seeds the state of a finished job through the store's own API: every row's request key from the
   real RequestBuilder, the simulator's own answer for it, finalised into the output. (Sending 1M
   requests through the SDK would take ~25 minutes of CPU on 2 cores; the resume path is what is timed.)
3. Times `glm-batch run` as a subprocess: it must render every row, find every answer, send nothing,
   and rewrite the output. Reports wall seconds, peak RSS, and the ratio to a baseline measured in the
   same run: polars alone reading the input and writing an output of the same shape.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import polars as pl
from _common import HERE, free_port, measured_run, seed_finished_state, sim_stats, start_simulator, write_job


def baseline_seconds(input_path: Path, output_path: Path) -> float:
    """The irreducible work: read the input, write an output of the same rows and answer columns."""
    started = time.perf_counter()
    frame = pl.read_parquet(input_path)
    answers = pl.read_parquet(output_path, columns=["response_text", "request_key", "status"])
    frame.hstack(answers).write_parquet(output_path.with_name("baseline.parquet"))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--port", type=int, default=0, help="simulator port (default: any free one)")
    args = parser.parse_args()
    work = HERE / "out" / "resume"
    shutil.rmtree(work, ignore_errors=True)
    n = args.rows
    port = args.port or free_port()
    spec = write_job(work, port, n, "{concurrency: 8}", name="resume")
    t0 = time.perf_counter()
    seed_finished_state(spec)
    seed_s = time.perf_counter() - t0

    sim = start_simulator(port)
    try:
        # First resume: every answer exists but no run has mapped these inputs yet, so every row is
        # rendered and looked up (the path taken after an input file changed).
        render = measured_run(spec)
        # Second resume: nothing changed since a run that answered every row (the daily cron case).
        rerun = measured_run(spec)
        stats = sim_stats(port)
    finally:
        sim.terminate()
        sim.wait()
    output = work / "out" / "resume.parquet"
    rows_out = pl.scan_parquet(output).select(pl.len()).collect().item()
    base_s = baseline_seconds(work / "data" / "input.parquet", output)

    report = {
        "rows": n,
        "requests_sent": stats["requests"],
        "output_rows": rows_out,
        "resume_rendering_every_row_s": round(render.wall_s, 2),
        "resume_rendering_every_row_peak_rss_mb": round(render.peak_rss_mb, 1),
        "rerun_unchanged_finished_job_s": round(rerun.wall_s, 2),
        "rerun_unchanged_finished_job_peak_rss_mb": round(rerun.peak_rss_mb, 1),
        "baseline_polars_read_write_s": round(base_s, 2),
        "ratio_render_path_to_baseline": round(render.wall_s / base_s, 1),
        "ratio_rerun_to_baseline": round(rerun.wall_s / base_s, 1),
        "seed_s": round(seed_s, 1),
    }
    print(json.dumps(report, indent=2))
    assert stats["requests"] == 0 and rows_out == n, "resume must send nothing and keep every row"


if __name__ == "__main__":
    main()
