"""Benchmark: does `concurrency: auto` use the endpoint's hidden in-flight cap in EVERY run, not just most?

    python bench/concurrency.py [--runs 10] [--rows 1600] [--baseline-runs N]

A simulator (in its own process) refuses at once with 429/1302 whatever is over a cap of 16 in flight,
and answers the rest after 0.2 s plus Gaussian noise (sd 0.04 s, i.e. +-20%). Each run sends a
1,600-row job through the real command line (`glm-batch run`, in a subprocess) with `concurrency: auto`,
then the same with a fixed `concurrency: 16` as the baseline. Per run it prints:

- utilisation: rows answered / wall time of the sending phase (first request out to last answer in)
  / the cap's ideal rate (16 / 0.2 = 80 rows/s);
- the share of requests the simulator refused with 429/1302;
- the controller's final limit, and its lowest after the first refusal (where it collapsed to, if it did).

Then the worst, median and best of each, and auto's worst and median as a ratio to the fixed baseline,
with the machine's load average before and after (it is shared: the ratio to the fixed baseline is the
steadier figure). The worst run is the claim: the target is worst >= 0.92 of the cap with under 3%
refused in every run.

`--learned`: each auto run is a second run. A first run of a quarter of the rows on the same simulator
measures the cap and records it in the facts (a scratch facts file per run), and the measured run starts
at it (`concurrency: auto` reads it) instead of ramping up from the catalogue's default.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from _common import HERE, free_port, sim_stats, spawn_simulator, write_job

WORK = HERE / "out" / "concurrency"


# ---- the simulator process ------------------------------------------------------------------------


def serve(port: int, cap: int, latency: float, jitter: float, seed: int) -> None:
    """Run a simulator with Gaussian latency noise in this process until it is terminated."""
    from runner.simulator.config import SimConfig
    from runner.simulator.simulator import Simulator

    async def forever() -> None:
        # latency_jitter_s is the standard deviation of Gaussian noise (truncated at 0); refusals over
        # the cap are answered at once.
        sim = Simulator(SimConfig(latency_s=latency, latency_jitter_s=jitter, concurrency_cap=cap, seed=seed))
        await sim.start(port)
        await asyncio.Event().wait()

    asyncio.run(forever())


# ---- the runner process ---------------------------------------------------------------------------


def run_recorded(spec: str, trace_path: str) -> None:
    """`glm-batch run SPEC` in this process, recording when the first request went out and how the
    adaptive limit moved; the record is written to `trace_path` however the run ends."""
    import runner.send.limits
    from runner.cli import main as cli_main
    from runner.send.limits import AimdController, Limits

    trace: dict[str, Any] = {"first_send": None, "lowest_after_refusal": None, "final": None}

    class RecordingController(AimdController):
        def on_success(self, *args: Any, **kwargs: Any) -> None:
            super().on_success(*args, **kwargs)
            self._record()

        def on_overload(self, *args: Any, **kwargs: Any) -> None:
            super().on_overload(*args, **kwargs)
            trace["refused_seen"] = True
            self._record()

        def _record(self) -> None:
            trace["final"] = self.limit
            if trace.get("refused_seen"):
                low = trace["lowest_after_refusal"]
                trace["lowest_after_refusal"] = self.limit if low is None else min(low, self.limit)

    class RecordingLimits(Limits):
        def slot(self, input_tokens: int) -> Any:
            if trace["first_send"] is None:
                trace["first_send"] = time.time()
            return super().slot(input_tokens)

    def write() -> None:
        Path(trace_path).write_text(json.dumps(trace), encoding="utf-8")

    atexit.register(write)
    # The executor factory (runner.send.make_executor) imports these from runner.send.limits when it
    # builds the online executor, so patching the module's names reaches the run.
    runner.send.limits.AimdController = RecordingController  # type: ignore[misc]
    runner.send.limits.Limits = RecordingLimits  # type: ignore[misc]
    sys.argv = ["glm-batch", "run", spec, "--log-format", "json"]
    cli_main()


# ---- the benchmark --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """What one run achieved."""

    utilisation: float
    share_429: float
    final: int | None
    lowest: int | None
    seconds: float


def one_run(name: str, i: int, run: str, args: argparse.Namespace) -> Run:
    """Start a fresh simulator, send the job through `glm-batch run`, and measure it."""
    port = free_port()
    sim = spawn_simulator(
        port,
        [
            sys.executable,
            __file__,
            "--serve",
            str(port),
            "--cap",
            str(args.cap),
            "--latency",
            str(args.latency),
            "--jitter",
            str(args.jitter),
            "--seed",
            str(i),
        ],
    )
    folder = WORK / f"{name}-{i}"
    shutil.rmtree(folder, ignore_errors=True)
    # The facts a run learns (the cap) go to a scratch file: never the user's, never another run's.
    env = {**os.environ, "ZHIPUAI_API_KEY": "bench", "GLM_BATCH_FACTS": str(folder / "facts.json")}
    try:
        before = {"requests": 0, "refused": 0}
        if args.learned and name == "auto":  # a first run here measures the cap; the measured one reuses it
            first = write_job(folder / "first", port, args.rows // 4, run)
            done = subprocess.run([sys.executable, "-m", "runner", "run", str(first)], env=env, capture_output=True)
            if done.returncode != 0:
                raise SystemExit(f"the first run failed ({done.returncode}): {done.stderr[-3000:]!r}")
            stats = sim_stats(port)
            before = {"requests": stats["requests"], "refused": stats["outcomes"].get("429_1302_cap", 0)}
        spec = write_job(folder, port, args.rows, run)
        trace_path = folder / "trace.json"
        proc = subprocess.run(
            [sys.executable, __file__, "--run-recorded", str(spec), str(trace_path)],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"glm-batch run failed ({proc.returncode}): {proc.stderr[-3000:]}")
        stats = sim_stats(port)
    finally:
        sim.terminate()
        sim.wait()
    trace = json.loads(trace_path.read_text(encoding="utf-8"))
    out = pl.read_parquet(folder / "out" / "bench.parquet", columns=["finished_at", "status"])
    ok = out.filter(pl.col("status") == "ok")
    last = ok.get_column("finished_at").max()
    seconds = last.timestamp() - trace["first_send"]  # type: ignore[union-attr]
    ideal = args.cap / args.latency
    refused = stats["outcomes"].get("429_1302_cap", 0) - before["refused"]
    return Run(
        utilisation=ok.height / seconds / ideal,
        share_429=refused / (stats["requests"] - before["requests"]),
        final=trace["final"],
        lowest=trace["lowest_after_refusal"],
        seconds=seconds,
    )


def show(name: str, runs: list[Run]) -> None:
    """Print the per-run table, then worst, median and best."""
    print(f"\n{name}")
    print(f"{'run':>4} {'util':>6} {'429%':>6} {'final':>6} {'lowest':>7} {'send s':>7}")
    for i, r in enumerate(runs, 1):
        print(
            f"{i:>4} {r.utilisation:>6.3f} {100 * r.share_429:>6.2f} {r.final or '-':>6} {r.lowest or '-':>7}"
            f" {r.seconds:>7.2f}"
        )
    utils = [r.utilisation for r in runs]
    shares = [r.share_429 for r in runs]
    print(
        f"worst {min(utils):.3f}  median {statistics.median(utils):.3f}  best {max(utils):.3f}  |  "
        f"429% worst {100 * max(shares):.2f}  median {100 * statistics.median(shares):.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs with concurrency: auto")
    parser.add_argument("--baseline-runs", type=int, default=None, help="runs with the fixed cap (default: --runs)")
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--cap", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--jitter", type=float, default=0.04, help="standard deviation of the latency noise")
    parser.add_argument("--learned", action="store_true", help="auto runs start at the cap a first run measured")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-recorded", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.cap, args.latency, args.jitter, args.seed)
        return
    if args.run_recorded is not None:
        run_recorded(*args.run_recorded)
        return

    started = time.perf_counter()
    load = [os.getloadavg()[0]]
    print(
        f"cap {args.cap}, latency {args.latency} s (sd {args.jitter} s), {args.rows} rows;"
        f" ideal {args.cap / args.latency:.0f}/s{'; auto runs start at a learned cap' if args.learned else ''}"
    )
    auto = [
        one_run("auto", i, "{concurrency: auto, max_concurrency: 64, max_attempts: 20}", args) for i in range(args.runs)
    ]
    show("concurrency: auto", auto)
    load.append(os.getloadavg()[0])
    baseline_runs = args.runs if args.baseline_runs is None else args.baseline_runs
    fixed = [one_run("fixed", i, f"{{concurrency: {args.cap}, max_attempts: 20}}", args) for i in range(baseline_runs)]
    show(f"concurrency: {args.cap} (baseline)", fixed)
    load.append(os.getloadavg()[0])
    a = [r.utilisation for r in auto]
    f = [r.utilisation for r in fixed]
    print(
        f"\nauto / fixed: worst {min(a) / min(f):.3f}, median {statistics.median(a) / statistics.median(f):.3f}"
        f"  (bench {time.perf_counter() - started:.0f} s; load average {min(load):.1f}-{max(load):.1f})"
    )


if __name__ == "__main__":
    main()
