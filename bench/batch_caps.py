"""Issue 22's full-size done-when: a batch job under Zhipu's account caps ends with every row answered.

    python bench/batch_caps.py [--rows 30000] [--max-requests 1000] [--file-cap 20] [--queue-cap 10000]

A `--rows`-row job runs with `run.mode=batch` and `run.batch.max_requests` lines a file against the
simulator in its own process, which holds at most `--file-cap` files on the account and queues at most
`--queue-cap` requests per model (a create past it answers 429 "wait for current tasks"); each batch
validates for `--validating-s` and then answers `--lines-per-s` lines a second. While it runs, the
simulator's file count is sampled every 50 ms (the most files the account held).

Checked at the end (the script exits 1 if any fails): exit code 0; every row answered `ok` with its own
answer; the simulator billed each line once (no prompt twice); no file left on the account; the queue
wait shown in the summary (`batch_queue`) and in the progress log lines. The smaller CI test of the same
is tests/test_batch_files.py (1,500 rows, an 8-file cap, a 300-request queue).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import polars as pl
from _common import HERE, configure_simulator, free_port, sim_stats, start_simulator, write_job

from runner.simulator.answers import answer_for

WORK = HERE / "out" / "batch_caps"
MODEL = "glm-4-air-250414"  # on Zhipu's Batch API list


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--max-requests", type=int, default=1000)
    parser.add_argument("--file-cap", type=int, default=20)
    parser.add_argument("--queue-cap", type=int, default=10_000)
    parser.add_argument("--lines-per-s", type=float, default=1000.0)
    parser.add_argument("--validating-s", type=float, default=0.2)
    args = parser.parse_args()

    folder = WORK
    shutil.rmtree(folder, ignore_errors=True)
    port = free_port()
    run = f"{{mode: batch, batch: {{poll_initial_s: 0.1, poll_max_s: 0.5, max_requests: {args.max_requests}}}}}"
    spec = write_job(folder, port, args.rows, run)
    sim = start_simulator(port)
    files_held: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            files_held.append(sim_stats(port)["files"])

    try:
        configure_simulator(
            port,
            batch_file_cap=args.file_cap,
            batch_queue_cap=args.queue_cap,
            batch_lines_per_s=args.lines_per_s,
            batch_validating_s=args.validating_s,
        )
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        began = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "runner", "run", str(spec), "--set", f"model.name={MODEL}", "--log-format", "json"],
            env={**os.environ, "ZHIPUAI_API_KEY": "bench", "GLM_BATCH_LEDGER": str(folder / "ledger")},
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - began
        done.set()
        sampler.join()
        stats = sim_stats(port)
    finally:
        sim.terminate()
        sim.wait()

    out = pl.read_parquet(folder / "out" / "bench.parquet")
    summary = json.loads((folder / "out" / "bench.summary.json").read_text(encoding="utf-8"))
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    progress_queue = [e["batch_queue"] for e in events if e.get("event") == "progress" and "batch_queue" in e]
    progress_lines = [e["batch_lines"] for e in events if e.get("event") == "progress" and "batch_lines" in e]
    texts = [answer_for(f"Be brief.\nSummarise: review {i}: the product was fine") for i in range(args.rows)]
    result: dict[str, Any] = {
        "rows": args.rows,
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "rows_ok": int((out.get_column("status") == "ok").sum()),
        "answers_right": out.sort("id").get_column("response_text").to_list() == texts,
        "billed_batch": stats["billed"]["batch"],
        "billed_online": stats["billed"]["online"],
        "prompts_billed_twice": stats["prompts_billed_twice"],
        "batches_created": stats["outcomes"].get("batch_created"),
        "creates_refused_queue_full": stats["outcomes"].get("batch_queue_full", 0),
        "uploads_refused_file_cap": stats["outcomes"].get("upload_400_1214", 0),
        "files_left": stats["files"],
        "most_files_held": max(files_held, default=None),
        "summary_batch_queue": summary.get("batch_queue"),
        "progress_lines_with_queue_wait": len(progress_queue),
        "last_progress_queue": progress_queue[-1] if progress_queue else None,
        "progress_lines_with_batch_lines": len(progress_lines),
    }
    checks = {
        "exit 0": proc.returncode == 0,
        "every row answered": result["rows_ok"] == args.rows and result["answers_right"],
        "each line billed once": result["billed_batch"] == args.rows and result["prompts_billed_twice"] == 0,
        "no file left behind": result["files_left"] == 0,
        "file cap held": (result["most_files_held"] or 0) <= args.file_cap,
        "queue wait shown": bool(summary.get("batch_queue", {}).get("waited_s")) and bool(progress_queue),
    }
    result["checks"] = checks
    print(json.dumps(result, indent=2))
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
