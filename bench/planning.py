"""Benchmark: does a first run PLAN in bounded memory? Peak RSS and rows/s of planning at 1M and 10M rows.

    python bench/planning.py [--rows 1000000 10000000] [--runs 1] [--online 1000000]
    python bench/planning.py --keys 1000000 10000000      # the queued-key set alone (minutes, not hours)
    python bench/planning.py --rows --send-all 1000000    # one real first run that sends every row (~30 min)
    python bench/planning.py --rows --replan 1000000 --runs 5 [--other CHECKOUT]   # a template edit

Planning is everything a run does before a request is handed over: read the input, render each row,
key it, deduplicate the keys, record the row map. Each measurement is one process (so peak RSS is its
own) running `runner.engine.execute` on an input of N distinct rows (every 50th row repeats an
earlier one, so the deduplication works too), with nothing answered before:

- `fake`: the in-process FakeExecutor answers each request at once (runner.send.fake), so planning
  and recording answers are all that is timed; peak RSS and seconds are read the moment the planner
  has yielded its last request, and again at the end (output written).
- `online` (with `--online N`): the same run through the real online executor (SDK, aiohttp) against
  a simulator process with no latency, on an N-row input 99% answered beforehand, so the run plans
  every row and sends 1%; and `fake` on the very same state, to show that the two plan at the same
  rows/s (the fake executor does not flatter planning).
- `send-all` (with `--send-all N`): one real first run of N rows through the online executor against a
  simulator with no latency, every row sent, and a fake-executor first run of the same input after it: rows/s
  and peak RSS of each. Sending paces planning, so the real run's figure is its sending rate.

- `replan` (with `--replan N`): the re-plan after a template edit. A first run of N rows (fake
  executor) leaves the job finished; the template is then edited (nothing else), so every row is
  rendered and keyed again and none is settled; each timed run starts from a copy of that state and
  hands its requests to an executor that takes them and answers none, so what is timed is the
  re-plan: reading the earlier answers' keys, rendering and keying every row, the row map, the
  queued keys, the budget (wall and CPU seconds, imports included). With `--other CHECKOUT` the same
  runs alternate with that checkout's runner (PYTHONPATH) from the same state: the ratio of the
  two, worst and median (`--seeded DIR` reuses the state a run before made). `--unsealed`: no
  template edit, the row map unsealed instead (a grown input, the cron case): every row rendered,
  keyed and found answered, nothing to send. A runner that hands requests over in blocks hands them
  to that executor as blocks, whose Requests are made only by an executor that sends them;
  `--materialise` has the executor make every Request of every block too.

Targets: the 10M-row peak RSS at the end of planning under 1 GB and at most 1.5x the 1M-row figure.
Inputs are generated once into /tmp/glm-batch-bench/planning (not the repo) and reused; each run's job
and state live in a folder of their own there, removed afterwards, so two benches never share one.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import polars as pl
from _common import free_port, seed_finished_state, start_simulator

DATA = Path("/tmp/glm-batch-bench/planning")
REPEAT_EVERY = 50  # every 50th row asks what an earlier row asked


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_input(rows: int) -> Path:
    """An input of `rows` rows (2% repeats), written by polars without Python objects per row."""
    path = DATA / f"input-{rows}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        i = pl.int_range(0, rows, dtype=pl.Int64, eager=True).alias("i")
        # Row i repeats row i - 1 when i is a multiple of REPEAT_EVERY: the same text, another id.
        source = pl.when((i % REPEAT_EVERY == 0) & (i > 0)).then(i - 1).otherwise(i)
        frame = pl.DataFrame({"i": i}).select(
            pl.format("r{}", pl.col("i").cast(pl.String).str.zfill(9)).alias("id"),
            pl.format("review {}: the product was fine", source).alias("text"),
        )
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # another bench may be writing it too
        frame.write_parquet(tmp, row_group_size=100_000)
        tmp.rename(path)
    return path


def write_spec(folder: Path, input_path: Path, port: int) -> Path:
    """A job over `input_path` (linked into `folder`), pointed at a simulator on `port`."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "data").mkdir(parents=True)
    os.symlink(input_path, folder / "data" / "input.parquet")
    spec = folder / "job.yaml"
    spec.write_text(
        f"""version: 1
name: bench
input: {{paths: [data/input.parquet], id_column: id}}
prompt: {{system: Be brief., template: "Summarise: {{{{ text }}}}"}}
model: {{name: glm-4.6, endpoint: "http://127.0.0.1:{port}", max_tokens: 64}}
run: {{concurrency: 64}}
output: {{path: out/bench.parquet}}
""",
        encoding="utf-8",
    )
    return spec


MATERIALISE = os.environ.get("GLM_BATCH_BENCH_MATERIALISE") == "1"


class Timed:
    """Wraps an executor: notes the wall time and peak RSS when the planner's requests run out."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.planned_s: float | None = None
        self.planned_cpu_s: float | None = None
        self.planned_rss_mb: float | None = None
        self.started = time.perf_counter()

    def gauges(self) -> Any:
        return self.inner.gauges()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def run(self, requests: AsyncIterator[Any], deliver: Any, control: Any) -> None:
        async def watched() -> AsyncIterator[Any]:
            count = 0
            async for request in requests:
                yield request
                count += 1
                if count % 1_000_000 == 0:  # progress on stderr: requests so far, seconds, peak RSS
                    seconds = time.perf_counter() - self.started
                    print(
                        json.dumps({"requests": count, "s": round(seconds, 1), "peak_rss_mb": peak_rss_mb()}),
                        file=sys.stderr,
                        flush=True,
                    )
            self.planned_s = time.perf_counter() - self.started
            self.planned_cpu_s = time.process_time()  # the process's CPU seconds, imports included
            self.planned_rss_mb = peak_rss_mb()

        await self.inner.run(watched(), deliver, control)


class TimedBlocks(Timed):
    """Timed, for an inner executor that takes blocks (and a runner that hands them over so)."""

    async def run_blocks(self, blocks: AsyncIterator[Any], deliver: Any, control: Any) -> None:
        """As `run`, for a runner that hands requests over in blocks (when the inner executor takes them)."""

        async def watched() -> AsyncIterator[Any]:
            async for block in blocks:
                yield block
            self.planned_s = time.perf_counter() - self.started
            self.planned_cpu_s = time.process_time()
            self.planned_rss_mb = peak_rss_mb()

        await self.inner.run_blocks(watched(), deliver, control)


class Drain:
    """An executor that takes every request and answers none: a run that only plans."""

    def gauges(self) -> Any:
        from runner.send.base import Gauges

        return Gauges(in_flight=0)

    async def aclose(self) -> None:
        return None

    async def run(self, requests: AsyncIterator[Any], deliver: Any, control: Any) -> None:
        async for _ in requests:
            pass

    async def run_blocks(self, blocks: AsyncIterator[Any], deliver: Any, control: Any) -> None:
        """Blocks of requests (a runner that hands them over so; an older one calls `run`): taken whole,
        or with MATERIALISE set each block's requests made too, as an executor sending them would."""
        async for block in blocks:
            if MATERIALISE:
                for _ in block.requests():
                    pass


def child(spec: Path, executor: str) -> dict[str, Any]:
    """One run in this process: planning seconds and peak RSS, then the whole run's."""
    try:
        from runner.engine import execute
    except ImportError:  # a checkout from before the rename (engine.run_job), for --other
        from runner.engine import run_job as execute  # type: ignore[attr-defined,no-redef]
    from runner.job.resolve import load_job
    from runner.local import LocalSender
    from runner.money.tokens import estimate_request
    from runner.observe.progress import make_reporter
    from runner.runs import RunOptions

    started = time.perf_counter()
    job = load_job(spec)
    if executor == "fake":
        from runner.send.fake import FakeExecutor

        inner: Any = FakeExecutor()
    elif executor == "drain":
        inner = Drain()
    else:
        from runner.send import make_executor

        assert job.base_url is not None
        inner = make_executor(job, job.base_url, "bench", lambda r: estimate_request(r.params))
    timed = TimedBlocks(inner) if hasattr(inner, "run_blocks") else Timed(inner)
    timed.started = started
    with open(os.devnull, "w") as quiet:
        report = asyncio.run(
            execute(
                job,
                api_key="bench",
                options=RunOptions(),
                reporter=make_reporter("json", quiet, interval_s=3600),
                sender=LocalSender(timed),
            )
        )
    assert report.exit_code == 0 or executor == "drain", report.message
    assert timed.planned_s is not None
    return {
        "planning_s": round(timed.planned_s, 2),
        "planning_cpu_s": round(timed.planned_cpu_s or 0.0, 2),
        "planning_peak_rss_mb": round(timed.planned_rss_mb or 0.0, 1),
        "run_s": round(time.perf_counter() - started, 2),
        "run_peak_rss_mb": round(peak_rss_mb(), 1),
        "requests_sent": (
            report.summary["requests_queued"] if isinstance(report.summary, dict) else report.summary.requests_queued
        ),  # a checkout from before the typed summary holds a dict
    }


def measure(spec: Path, executor: str, rows: int, checkout: Path | None = None) -> dict[str, Any]:
    """`child` in a fresh process (so its peak RSS is its own), on `checkout`'s runner if given."""
    path = {"PYTHONPATH": str(checkout)} if checkout is not None else {}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(spec), "--executor", executor],
        stdout=subprocess.PIPE,  # its progress lines go straight to our stderr
        text=True,
        env={**os.environ, "ZHIPUAI_API_KEY": "bench", **path},
    )
    if proc.returncode != 0:
        raise SystemExit(f"planning run failed ({proc.returncode})")
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    data["planning_rows_per_s"] = round(rows / data["planning_s"], 1)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--runs", type=int, default=1, help="runs per size (each is a fresh first run)")
    parser.add_argument("--online", type=int, default=0, help="also the online-vs-fake check at this size")
    parser.add_argument("--send-all", type=int, default=0, help="one real first run sending this many rows")
    parser.add_argument("--replan", type=int, default=0, help="re-plans after a template edit at this size")
    parser.add_argument("--other", type=Path, help="a checkout to alternate with in --replan (before/after)")
    parser.add_argument("--seeded", type=Path, help="--replan: start from this folder a run of it seeded before")
    parser.add_argument("--unsealed", action="store_true", help="--replan: no template edit; the row map unsealed")
    parser.add_argument("--materialise", action="store_true", help="--replan: make each handed block's Requests")
    parser.add_argument("--keys", type=int, nargs="*", default=[], help="only the queued-key set, at these sizes")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--executor", default="fake", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.materialise:  # read by the child processes (MATERIALISE)
        os.environ["GLM_BATCH_BENCH_MATERIALISE"] = "1"
    if args.child is not None:
        if args.executor.startswith("keys:"):
            print(json.dumps(keys_child(int(args.child.name), spill=args.executor == "keys:spill")))
        else:
            print(json.dumps(child(args.child, args.executor)))
        return
    if args.keys:
        print(json.dumps(keys_only(args.keys), indent=2))
        return
    report: dict[str, Any] = {}
    for rows in args.rows:
        runs = []
        for _ in range(args.runs):
            folder = Path(tempfile.mkdtemp(prefix=f"job-{rows}-", dir=DATA))
            try:
                runs.append(measure(write_spec(folder, make_input(rows), free_port()), "fake", rows))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            print(json.dumps({rows: runs[-1]}), flush=True)
        report[str(rows)] = {
            "runs": runs,
            "worst_planning_peak_rss_mb": max(r["planning_peak_rss_mb"] for r in runs),
            "worst_planning_rows_per_s": min(r["planning_rows_per_s"] for r in runs),
        }
    if len(args.rows) == 2:
        small, large = (report[str(n)]["worst_planning_peak_rss_mb"] for n in args.rows)
        report["planning_rss_ratio_large_to_small"] = round(large / small, 2)
    if args.online:
        report["online_vs_fake"] = online_vs_fake(args.online)
    if args.send_all:
        report["send_all"] = send_all(args.send_all)
    if args.replan:
        report["replan"] = replan(args.replan, args.runs, args.other, args.seeded, edit=not args.unsealed)
    print(json.dumps(report, indent=2))


def keys_child(count: int, spill: bool) -> dict[str, Any]:
    """Queue `count` distinct keys (and every 50th again) in RequestKeys, planning batch by planning
    batch, as a run does; this process's peak RSS before and after."""
    from runner.plan import RENDER_BATCH_ROWS, RequestKeys

    before = peak_rss_mb()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=DATA) as scratch:
        keys = RequestKeys(Path(scratch) if spill else None)
        for start in range(0, count, RENDER_BATCH_ROWS):
            batch = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(start, start + RENDER_BATCH_ROWS)]
            batch += batch[::REPEAT_EVERY]  # rows sharing a prompt: found again, in memory or in a file
            keys.add_batch(batch)
        assert len(keys) == -(-count // RENDER_BATCH_ROWS) * RENDER_BATCH_ROWS
        keys.close()
    return {"keys": count, "spill": spill, "peak_rss_mb": round(peak_rss_mb(), 1),
            "start_rss_mb": round(before, 1), "s": round(time.perf_counter() - started, 1)}  # fmt: skip


def keys_only(sizes: list[int]) -> dict[str, Any]:
    """Peak RSS of the queued-key set alone at each size, with its low halves in files and in memory."""
    DATA.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    for spill in (True, False):
        for count in sizes:
            argv = [
                sys.executable,
                __file__,
                "--child",
                str(count),
                "--executor",
                "keys:spill" if spill else "keys:memory",
            ]
            done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            report[f"{count}{'-spill' if spill else '-memory'}"] = run
            print(json.dumps(run), flush=True)
    return report


def online_vs_fake(rows: int) -> dict[str, Any]:
    """Plan `rows` rows (99% answered before) through the real online executor and through the fake one."""
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix=f"online-{rows}-", dir=DATA))
    spec = write_spec(folder, make_input(rows), port)
    seed_finished_state(spec, skip_every=100)
    from runner.job.resolve import load_job

    state = load_job(spec).state_dir
    saved = spec.parent / "seeded-state"
    shutil.copytree(state, saved)
    result: dict[str, Any] = {"rows": rows}
    sim = start_simulator(port)
    try:
        for executor in ("online", "fake", "online", "fake"):
            shutil.rmtree(state)
            shutil.copytree(saved, state)
            run = measure(spec, executor, rows)
            result.setdefault(executor, []).append(run)
            print(json.dumps({"online_vs_fake": executor, **run}), flush=True)
    finally:
        sim.terminate()
        sim.wait()
        shutil.rmtree(folder, ignore_errors=True)
    online = min(r["planning_rows_per_s"] for r in result["online"])
    fake = min(r["planning_rows_per_s"] for r in result["fake"])
    result["planning_rows_per_s_online_to_fake"] = round(online / fake, 2)
    return result


def replan(rows: int, runs: int, other: Path | None, seeded: Path | None, edit: bool = True) -> dict[str, Any]:
    """`runs` re-plans of `rows` rows after a template edit (or, `edit` False, with the row map unsealed:
    every row rendered and found answered), alternating with `other`'s runner if given; both start each
    run from a copy of the same finished state (`seeded`: a folder this made before)."""
    sides: list[tuple[str, Path | None]] = [("this", None)] + ([("other", other.resolve())] if other else [])
    DATA.mkdir(parents=True, exist_ok=True)
    if seeded is None:  # a finished first run, then the template edited; kept to start each run from
        seeded = Path(tempfile.mkdtemp(prefix=f"replan-{rows}-", dir=DATA))
        spec = write_spec(seeded, make_input(rows), free_port())
        first = measure(spec, "fake", rows)
        if edit:
            text = spec.read_text(encoding="utf-8")
            spec.write_text(text.replace("Summarise:", "Summarise briefly:"), encoding="utf-8")
        shutil.copytree(seeded / "out", seeded / "seeded")
        print(json.dumps({"replan_seeded": str(seeded), "first_run": first}), flush=True)
    spec = seeded / "job.yaml"
    load = [round(x, 2) for x in os.getloadavg()]
    result: dict[str, Any] = {"rows": rows, "seeded": str(seeded), "load_average_before": load}
    for index in range(runs):
        for name, checkout in sides if index % 2 == 0 else sides[::-1]:
            shutil.rmtree(seeded / "out", ignore_errors=True)
            shutil.copytree(seeded / "seeded", seeded / "out")
            if not edit:  # forget that a run mapped these inputs: every row is rendered, keyed and looked up
                for record in ("fingerprint.json", "covered.json"):
                    for found in (seeded / "out").rglob(f"rows/{record}"):
                        found.unlink()
            run = measure(spec, "drain", rows, checkout)
            run["load"] = round(os.getloadavg()[0], 2)
            result.setdefault(name, []).append(run)
            print(json.dumps({"replan": name, **run}), flush=True)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    for name, _ in sides:
        for figure in ("planning_s", "planning_cpu_s"):
            values = [r[figure] for r in result[name]]
            result[f"{name}_{figure}"] = {"worst": max(values), "median": statistics.median(values)}
    if other is not None:
        for figure in ("planning_s", "planning_cpu_s"):
            pairs = zip(result["this"], result["other"], strict=True)
            speedups = [o[figure] / t[figure] for t, o in pairs]
            worst, median = round(min(speedups), 2), round(statistics.median(speedups), 2)
            result[f"speedup_{figure}"] = {"worst": worst, "median": median}
    return result


def send_all(rows: int) -> dict[str, Any]:
    """A first run of `rows` rows that sends every one (online, zero latency), then the fake executor's."""
    port = free_port()
    result: dict[str, Any] = {"rows": rows, "load_average_before": round(os.getloadavg()[0], 2)}
    sim = start_simulator(port)
    try:
        for executor in ("online", "fake"):
            folder = Path(tempfile.mkdtemp(prefix=f"send-all-{rows}-", dir=DATA))
            try:
                run = measure(write_spec(folder, make_input(rows), port), executor, rows)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            run["rows_per_s"] = round(rows / run["run_s"], 1)
            run["load_average_after"] = round(os.getloadavg()[0], 2)
            result[executor] = run
            print(json.dumps({"send_all": executor, **run}), flush=True)
    finally:
        sim.terminate()
        sim.wait()
    return result


if __name__ == "__main__":
    main()
