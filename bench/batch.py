"""Benchmark: the Batch API path's own cost, files out and results in, against polars on the same JSONL.

    python bench/batch.py [--rows 100000] [--runs 5] [--sizes 10000,30000]

A job of `--rows` rows runs with `run.mode=batch` against the simulator, which runs in its own process
and answers every batch at once (`batch_lines_per_s` None, no validating or finalizing time, no
validation of the file on upload), so what is timed is our side. `glm-batch run` runs in a child
process (`python bench/batch.py child-run`) that wraps BatchExecutor's and BatchAPI's methods to time
them (wrapped to time them, not changed) and then calls the real command line. Two phases:

(a) prepare + upload: reading the input, rendering every row, writing the chunk files and the
    round's requests file (`runner.send.batch.files.write_round`), and uploading the chunks (`BatchAPI.upload`).
    Creating the batches is left out: the simulator answers a whole batch inside `POST /batches`,
    which is its work, not ours (reported as `simulator_s`).
(b) download + journal: from the start of the first harvest of a finished batch to the end of the run:
    downloading the result files, reading every line into an answer, holding it for its part (batch
    answers are not journalled line by line: runner.state.store) and checkpointing Parquet parts, then
    the output Parquet and the summary.

Baseline, in a child process of its own on the same files, after the run: polars writing the same JSONL
lines (`write_ndjson` of the chunk files' lines, the chat bodies with their custom_id, fsynced as the
chunk files are) and reading them back (`read_ndjson`). Reading the result files the run downloaded is
timed too, for reference (they are about twice as large as the request lines).

Peak RSS per phase: the child lowers its high-water mark to its current RSS when a phase begins
(`/proc/self/clear_refs`) and reads `VmHWM` when it ends, so each figure is that phase's peak. It
includes the interpreter and what it imported (the runner's libraries, or polars alone for the baseline).

Every figure is a ratio to the baseline of the same run: worst and median over `--runs` runs at
`--rows`, and the peak RSS at each size (`--sizes` plus `--rows`) to show whether it stays flat.
Targets: each phase within 3x of its baseline; RSS flat in the number of rows. The whole run against a
plain script doing the same work by hand is `bench/batch_vs_plain.py`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import (
    HERE,
    INSTANT_BATCH_API,
    configure_simulator,
    free_port,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    sim_stats,
    start_simulator,
    write_job,
)

WORK = HERE / "out" / "batch"
RUN = "{batch: {poll_initial_s: 0.05, poll_max_s: 0.5}}"  # the mode comes from --set run.mode=batch
TARGET_TIME_RATIO = 3.0
OURS_FIGURES = (
    *("a_s", "a_cpu_s", "prepare_s", "upload_s"),
    *("b_s", "b_cpu_s", "download_s", "parse_journal_s", "finish_s", "simulator_s"),
)
RSS_FIGURES = ("a_prepare_upload_mb", "b_download_journal_mb", "b_finish_mb", "baseline_write_mb", "baseline_read_mb")


# ---- the measured processes ----------------------------------------------------------------------


class Probe:
    """Spans of wrapped calls, and the peak RSS of each phase of the process."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.spans: list[tuple[str, float, float, float]] = []  # label, began, ended, CPU seconds
        self.peaks: dict[str, float] = {}
        self.phase = "startup"
        self.cpu_at: dict[str, float] = {}  # phase -> process CPU seconds when it began
        self.rss_at: dict[str, float] = {}  # phase -> RSS when it began (what earlier phases left behind)
        self.phase_rss = reset_peak_rss()  # False: each peak is the process's so far, not the phase's

    def enter(self, phase: str) -> None:
        """End the current phase (keep its peak RSS) and begin `phase`; a phase begins once only."""
        if phase == self.phase or phase in self.peaks:
            return
        self.peaks[self.phase] = peak_rss_mb()
        reset_peak_rss()
        self.phase = phase
        self.cpu_at[phase] = time.process_time()
        self.rss_at[phase] = round(rss_mb(), 1)

    def end(self) -> None:
        self.peaks[self.phase] = peak_rss_mb()

    def wrap(self, owner: object, name: str, label: str, phase: str | None = None, after: str | None = None) -> None:
        """Time every call of the async method `owner.name` as `label` (wall and process CPU); its first
        call begins `phase`, and its return begins `after`."""
        original: Callable[..., Awaitable[Any]] = getattr(owner, name)

        @functools.wraps(original)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            if phase is not None:
                self.enter(phase)
            began, cpu = time.perf_counter(), time.process_time()
            try:
                return await original(*args, **kwargs)
            finally:
                self.spans.append((label, began, time.perf_counter(), time.process_time() - cpu))
                if after is not None:
                    self.enter(after)

        setattr(owner, name, timed)

    def total(self, label: str) -> float:
        return sum(end - began for name, began, end, _ in self.spans if name == label)

    def cpu(self, label: str) -> float:
        return sum(cpu for name, _, _, cpu in self.spans if name == label)

    def first(self, label: str) -> float:
        return min(began for name, began, _, _ in self.spans if name == label)

    def last_end(self, label: str) -> float:
        return max(end for name, _, end, _ in self.spans if name == label)

    def count(self, label: str) -> int:
        return sum(1 for name, _, _, _ in self.spans if name == label)


def child_run(out: Path, spec: Path) -> None:
    """`glm-batch run SPEC --set run.mode=batch` in this process, its batch phases timed."""
    probe = Probe()
    from runner import cli
    from runner.send.batch import executor as batch
    from runner.send.batch.api import BatchAPI
    from runner.send.batch.executor import BatchExecutor
    from runner.send.batch.harvest import Harvester

    probe.wrap(BatchExecutor, "run", "executor", after="finish")
    probe.wrap(batch, "write_round", "prepare", phase="prepare_upload")
    probe.wrap(BatchAPI, "upload", "upload")
    probe.wrap(BatchAPI, "create", "create")
    probe.wrap(BatchAPI, "retrieve", "retrieve", phase="simulator")
    probe.wrap(Harvester, "harvest", "harvest", phase="download_journal")
    probe.wrap(BatchAPI, "download", "download")
    # glm-4-air-250414: on Zhipu's Batch API list (the shared bench spec's glm-4.6 is not)
    batch_model = ["--set", "model.name=glm-4-air-250414"]
    sys.argv = ["glm-batch", "run", str(spec), "--set", "run.mode=batch", *batch_model, "--log-format", "json"]
    code: int | str | None = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    ended, ended_cpu = time.perf_counter(), time.process_time()
    probe.end()
    if code not in (0, None):
        raise SystemExit(f"glm-batch run exited {code}")
    harvest_began = probe.first("harvest")
    report = {
        "rounds": probe.count("prepare"),
        "chunks": probe.count("upload"),
        "startup_s": probe.first("prepare") - probe.started,  # imports, input scan, state: before any file
        "prepare_s": probe.total("prepare"),
        "upload_s": probe.total("upload"),
        "a_s": probe.total("prepare") + probe.total("upload"),
        "a_cpu_s": probe.cpu("prepare") + probe.cpu("upload"),
        "simulator_s": probe.total("create") + (harvest_began - probe.first("retrieve")),
        "download_s": probe.total("download"),
        "parse_journal_s": probe.total("harvest") - probe.total("download"),
        "finish_s": ended - probe.last_end("executor"),  # last checkpoint, output Parquet, summary
        "b_s": ended - harvest_began,
        "b_cpu_s": ended_cpu - probe.cpu_at["download_journal"],
        "total_s": ended - probe.started,
        "rss_mb": {phase: round(mb, 1) for phase, mb in probe.peaks.items()},
        "rss_by_phase": probe.phase_rss,
        "rss_at_phase_start_mb": probe.rss_at,
    }
    out.write_text(json.dumps(report), encoding="utf-8")


def child_baseline(out: Path, dest: Path, requests: list[Path], results: list[Path]) -> None:
    """polars writing the request lines as JSONL and reading them back; reading the result files."""
    probe = Probe()
    import polars as pl

    frame = pl.concat([pl.read_ndjson(path) for path in requests], how="vertical")  # set-up, not timed
    rows = frame.height
    gc.collect()
    probe.enter("write")
    began, cpu = time.perf_counter(), time.process_time()
    frame.write_ndjson(dest)
    fd = os.open(dest, os.O_RDONLY)  # the chunk files are fsynced; so is this
    os.fsync(fd)
    os.close(fd)
    write_s, write_cpu_s = time.perf_counter() - began, time.process_time() - cpu
    del frame
    gc.collect()
    probe.enter("read")
    began, cpu = time.perf_counter(), time.process_time()
    back = pl.read_ndjson(dest)
    read_s, read_cpu_s = time.perf_counter() - began, time.process_time() - cpu
    assert back.height == rows
    del back
    gc.collect()
    probe.enter("read_results")
    began = time.perf_counter()
    answers = pl.concat([pl.read_ndjson(path) for path in results], how="vertical")
    read_results_s = time.perf_counter() - began
    assert answers.height == rows
    probe.end()
    report = {
        "write_s": write_s,
        "read_s": read_s,
        "read_results_s": read_results_s,
        "write_cpu_s": write_cpu_s,
        "read_cpu_s": read_cpu_s,
        "request_bytes": sum(p.stat().st_size for p in requests),
        "result_bytes": sum(p.stat().st_size for p in results),
        "rss_mb": {phase: round(mb, 1) for phase, mb in probe.peaks.items()},
        "rss_by_phase": probe.phase_rss,
    }
    out.write_text(json.dumps(report), encoding="utf-8")


# ---- the driver ----------------------------------------------------------------------------------


def _child(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run this script in a child mode; its report (the child writes it to a file)."""
    out = Path(args[1])
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return data


def one_run(rows: int, index: int) -> dict[str, Any]:
    """A fresh job of `rows` rows on a fresh simulator, measured; then the baseline on its files."""
    folder = WORK / f"rows-{rows}-run-{index}"
    shutil.rmtree(folder, ignore_errors=True)
    port = free_port()
    spec = write_job(folder, port, rows, RUN)
    sim = start_simulator(port)
    try:
        configure_simulator(port, **INSTANT_BATCH_API)
        ours = _child(
            "child-run",
            str(folder / "run.json"),
            str(spec),
            env={"ZHIPUAI_API_KEY": "bench", "GLM_BATCH_LEDGER": str(folder / "ledger")},
        )
        stats = sim_stats(port)
    finally:
        sim.terminate()
        sim.wait()
    assert stats["batch_lines_processed"] == rows, stats
    assert ours["rounds"] == 1, ours
    batches = next(folder.rglob("batches"))
    requests = sorted(batches.glob("round-*/chunk-*.jsonl"))
    results = sorted(batches.glob("*.output.jsonl"))
    assert len(requests) == ours["chunks"] and results, (requests, results)
    base = _child(
        "child-baseline",
        str(folder / "baseline.json"),
        str(folder / "baseline.jsonl"),
        *map(str, requests),
        "--results",
        *map(str, results),
    )
    shutil.rmtree(folder, ignore_errors=True)  # a 100k-row run leaves ~200 MB of files
    return {"rows": rows, "ours": ours, "baseline": base}


def _ratios(run: dict[str, Any]) -> dict[str, float]:
    ours, base = run["ours"], run["baseline"]
    return {
        "a": ours["a_s"] / base["write_s"],
        "b": ours["b_s"] / base["read_s"],
        "b_vs_results": ours["b_s"] / base["read_results_s"],
        "a_cpu": ours["a_cpu_s"] / base["write_cpu_s"],
        "b_cpu": ours["b_cpu_s"] / base["read_cpu_s"],
    }


def _worst_median(values: list[float]) -> tuple[float, float]:
    return max(values), statistics.median(values)


def report(runs: list[dict[str, Any]], by_size: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Worst and median of each figure over the runs, ratios per run, and peak RSS by size."""
    ratios = [_ratios(r) for r in runs]
    figures: dict[str, Any] = {}
    for key in ("a", "b", "b_vs_results", "a_cpu", "b_cpu"):
        worst, median = _worst_median([r[key] for r in ratios])
        figures[f"ratio_{key}"] = {"worst": round(worst, 2), "median": round(median, 2)}
    for side, keys in (
        ("ours", OURS_FIGURES),
        ("baseline", ("write_s", "write_cpu_s", "read_s", "read_cpu_s", "read_results_s")),
    ):
        for key in keys:
            worst, median = _worst_median([r[side][key] for r in runs])
            figures[f"{side}.{key}"] = {"worst": round(worst, 3), "median": round(median, 3)}
    rss: dict[str, Any] = {}
    for rows, sized in sorted(by_size.items()):
        rss[str(rows)] = {
            "a_prepare_upload_mb": max(r["ours"]["rss_mb"]["prepare_upload"] for r in sized),
            "b_download_journal_mb": max(r["ours"]["rss_mb"]["download_journal"] for r in sized),
            "b_finish_mb": max(r["ours"]["rss_mb"]["finish"] for r in sized),
            "b_finish_began_at_mb": max(r["ours"]["rss_at_phase_start_mb"]["finish"] for r in sized),
            "startup_mb": max(r["ours"]["rss_mb"]["startup"] for r in sized),
            "baseline_write_mb": max(r["baseline"]["rss_mb"]["write"] for r in sized),
            "baseline_read_mb": max(r["baseline"]["rss_mb"]["read"] for r in sized),
            "runs": len(sized),
        }
    sizes = sorted(by_size)
    small, large = rss[str(sizes[0])], rss[str(sizes[-1])]
    growth = {key: round(large[key] / small[key], 2) for key in RSS_FIGURES}
    return {"rows": runs[0]["rows"], "runs": len(runs), "figures": figures, "rss_by_rows": rss, "rss_growth": growth}


def print_table(result: dict[str, Any]) -> None:
    f = result["figures"]

    def pair(key: str, unit: str = "") -> str:
        return f"{f[key]['worst']}{unit} / {f[key]['median']}{unit}"

    print(f"\n{result['rows']:,} rows, {result['runs']} runs: worst / median\n")
    print(f"{'phase':<40} {'ours':>21} {'polars':>21} {'ratio':>13}  target")
    print(
        f"{'(a) prepare + upload':<40} {pair('ours.a_s', ' s'):>21} {pair('baseline.write_s', ' s'):>21}"
        f" {pair('ratio_a'):>13}  <= {TARGET_TIME_RATIO}"
    )
    print(
        f"{'    CPU':<40} {pair('ours.a_cpu_s', ' s'):>21} {pair('baseline.write_cpu_s', ' s'):>21}"
        f" {pair('ratio_a_cpu'):>13}"
    )
    print(f"{'    render + write files':<40} {pair('ours.prepare_s', ' s'):>21}")
    print(f"{'    upload':<40} {pair('ours.upload_s', ' s'):>21}")
    print(
        f"{'(b) download + journal (to run end)':<40} {pair('ours.b_s', ' s'):>21} {pair('baseline.read_s', ' s'):>21}"
        f" {pair('ratio_b'):>13}  <= {TARGET_TIME_RATIO}"
    )
    print(
        f"{'    CPU':<40} {pair('ours.b_cpu_s', ' s'):>21} {pair('baseline.read_cpu_s', ' s'):>21}"
        f" {pair('ratio_b_cpu'):>13}"
    )
    print(f"{'    download':<40} {pair('ours.download_s', ' s'):>21}")
    print(f"{'    parse + answer + journal':<40} {pair('ours.parse_journal_s', ' s'):>21}")
    print(f"{'    last checkpoint + output + summary':<40} {pair('ours.finish_s', ' s'):>21}")
    print(
        f"{'(b) vs polars reading the result files':<40} {'':>21} {pair('baseline.read_results_s', ' s'):>21}"
        f" {pair('ratio_b_vs_results'):>13}"
    )
    print(f"{'simulator answering (not ours)':<40} {pair('ours.simulator_s', ' s'):>21}")
    print("\npeak RSS (MB) by rows: ours (a) prepare+upload, (b) harvest, (b) output; polars write, read")
    for rows, r in result["rss_by_rows"].items():
        print(
            f"  {int(rows):>9,}: {r['a_prepare_upload_mb']:>7} {r['b_download_journal_mb']:>7} {r['b_finish_mb']:>7}"
            f"   {r['baseline_write_mb']:>7} {r['baseline_read_mb']:>7}"
            f"   (startup {r['startup_mb']}, output phase began at {r['b_finish_began_at_mb']}, {r['runs']} run(s))"
        )
    print(f"  largest / smallest: {result['rss_growth']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("child-run", help=argparse.SUPPRESS)
    child.add_argument("out", type=Path)
    child.add_argument("spec", type=Path)
    baseline = sub.add_parser("child-baseline", help=argparse.SUPPRESS)
    baseline.add_argument("out", type=Path)
    baseline.add_argument("dest", type=Path)
    baseline.add_argument("requests", type=Path, nargs="+")
    baseline.add_argument("--results", type=Path, nargs="+", required=True)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5, help="runs at --rows (worst and median)")
    parser.add_argument("--sizes", default="10000,30000", help="smaller sizes for the RSS curve, one run each")
    args = parser.parse_args()
    if args.command == "child-run":
        child_run(args.out, args.spec)
        return
    if args.command == "child-baseline":
        child_baseline(args.out, args.dest, args.requests, args.results)
        return

    started = time.perf_counter()
    by_size: dict[int, list[dict[str, Any]]] = {}
    for rows in sorted({int(s) for s in args.sizes.split(",") if s} - {args.rows}):
        by_size[rows] = [one_run(rows, 0)]
        print(json.dumps({"rows": rows, **by_size[rows][0]}), flush=True)
    runs = []
    for index in range(args.runs):
        run = one_run(args.rows, index)
        runs.append(run)
        print(json.dumps({"ratios": {k: round(v, 2) for k, v in _ratios(run).items()}, **run}), flush=True)
    by_size[args.rows] = runs
    result = report(runs, by_size)
    result["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    print_table(result)


if __name__ == "__main__":
    main()
