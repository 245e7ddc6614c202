"""Profile: where a sending run's time goes, the SDK's against the runner's own (py-spy, by category).

    python bench/profile_send.py record --rows 20000 -o before.raw    # needs `pip install py-spy`
    python bench/profile_send.py table before.raw after.raw           # side by side, in percent
    python bench/profile_send.py own --rows 20000 --runs 6 [--other DIR]   # the runner's own CPU a row

`record` runs `glm-batch run` on a `rows`-row job (64 in flight) against a simulator process with no
latency, under `py-spy record --format raw`. `table` sorts every sample by its innermost frame in
runner/: below it the SDK or its transport (anthropic, httpx, aiohttp, pydantic) is the SDK's time,
otherwise the runner's own, by module. Import frames are start-up. An idle pool thread blocked on its
queue is left out (py-spy counts it as active). Percentages are of the remaining samples.

`own` takes the SDK out: the job runs in a fresh process whose `Client.send` answers at once (after
one turn of the event loop, as an answer off the socket would), so everything else is the runner's own:
planning, the executor and its slots, settling, the journal, parts, progress. It prints the process CPU
per row over the sending window (first to last request sent) and over the whole run (start-up left
out), and the time the garbage collector took. `--other DIR` runs another checkout's runner in the same
rounds, alternating which goes first (e.g. `git archive main | tar -x -C DIR`).
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
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from _common import HERE, free_port, start_simulator, write_job

SDK = ("anthropic/", "httpx/", "aiohttp/", "pydantic/", "pydantic_core", "multidict", "yarl/", "anyio/", "httpcore/")
SDK_TIME = "SDK + transport (messages.create, parse, aiohttp)"
# The runner's own time by where it is spent: (category, file prefix, function prefix or "").
OWN: list[tuple[str, str, str]] = [
    ("send: Client.send/_answer (our wrapper around the SDK)", "runner/send/client.py", ""),
    ("send: slots (limits.py)", "runner/send/limits.py", ""),
    ("send: retries (retries.py)", "runner/send/retries.py", ""),
    ("send: Conversation/Result (base.py)", "runner/send/base.py", ""),
    ("send: workers, first attempt, retry (online.py)", "runner/send/online.py", ""),
    ("state: Store.add + journal JSON", "runner/state/store.py", "Store.add"),
    ("state: Store.add + journal JSON", "runner/records.py", "journal_line"),
    ("state: Store.add + journal JSON", "runner/records.py", "result_to_json"),
    ("state: flush parts (Store.flush, results_frame)", "runner/state/store.py", "Store.flush"),
    ("state: flush parts (Store.flush, results_frame)", "runner/records.py", "results_frame"),
    ("state: other", "runner/state/", ""),
    ("money: settle/tally", "runner/money/", ""),
    ("observe: progress/summary", "runner/observe/", ""),
    ("plan: render/key/dispatch", "runner/plan.py", ""),
    ("plan: render/key/dispatch", "runner/job/", ""),
    ("run: deliver/supervise", "runner/run.py", ""),
    ("run: deliver/supervise", "runner/supervise.py", ""),
    ("run: deliver/supervise", "runner/local.py", ""),
    ("output: finalize/write", "runner/output/", ""),
]


def record(rows: int, output: Path) -> None:
    """A `rows`-row run against a zero-latency simulator, sampled by py-spy into `output` (raw format)."""
    port = free_port()
    sim = start_simulator(port)
    folder = HERE / "out" / "profile"
    shutil.rmtree(folder, ignore_errors=True)
    spec = write_job(folder, port, rows, "{concurrency: 64}")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    command = [sys.executable, "-m", "runner", "run", str(spec), "--log-format", "json"]
    try:
        subprocess.run(
            [py_spy, "record", "--format", "raw", "--nolineno", "-r", "100", "-o", str(output), "--", *command],
            env={**os.environ, "ZHIPUAI_API_KEY": "bench"},
            stderr=subprocess.DEVNULL,
            check=True,
        )
    finally:
        sim.terminate()
        sim.wait()


def stacks(path: Path) -> Iterator[tuple[list[str], int]]:
    """Each distinct stack of a raw py-spy file (outermost frame first) and its sample count."""
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        yield stack.split(";"), int(count)


def _file(frame: str) -> str:
    return frame[frame.rfind("(") + 1 : -1]


def _function(frame: str) -> str:
    return frame[: frame.rfind(" (")]


def category(stack: list[str]) -> str | None:
    """Where one sample's time went; None for an idle pool thread."""
    files = [_file(frame) for frame in stack]
    if _function(stack[-1]) == "_worker" and files[-1] == "concurrent/futures/thread.py":
        return None
    if any("importlib" in f for f in files):
        return "start-up: imports"
    entry = ("runner/cli", "runner/__main__")  # the command line: not the runner's work per row
    ours = [i for i, f in enumerate(files) if f.startswith("runner/") and not f.startswith(entry)]
    below = files[ours[-1] + 1 :] if ours else files
    if any(f.startswith(SDK) for f in below):
        return SDK_TIME
    if not ours:
        return "event loop (asyncio, no runner frame)" if any(f.startswith("asyncio/") for f in files) else "other"
    function, file = _function(stack[ours[-1]]), files[ours[-1]]
    for name, prefix, function_prefix in OWN:
        if file.startswith(prefix) and function.startswith(function_prefix):
            return name
    return f"runner other: {function} ({file})"


def table(paths: list[Path]) -> str:
    """A markdown table: each category's share of each profile's samples, largest first."""
    shares: list[dict[str, float]] = []
    totals: list[int] = []
    for path in paths:
        counts: Counter[str] = Counter()
        for stack, count in stacks(path):
            name = category(stack)
            if name is not None:
                counts[name] += count
        total = sum(counts.values())
        own = sum(n for name, n in counts.items() if name not in (SDK_TIME, "start-up: imports", "other")
                  and not name.startswith("event loop"))  # fmt: skip
        counts["= the runner's own (runner/ frames with no SDK below)"] = own
        shares.append({name: 100 * n / total for name, n in counts.items()})
        totals.append(total)
    names = sorted({n for s in shares for n in s}, key=lambda n: -max(s.get(n, 0.0) for s in shares))
    lines = ["| where | " + " | ".join(p.name for p in paths) + " |", "|---" * (len(paths) + 1) + "|"]
    lines += [
        f"| {n} | " + " | ".join(f"{s.get(n, 0.0):.1f}%" for s in shares) + " |"
        for n in names
        if max(s.get(n, 0.0) for s in shares) >= 0.2
    ]
    lines.append("| samples | " + " | ".join(str(t) for t in totals) + " |")
    return "\n".join(lines)


def own_child(rows: int, folder: Path) -> dict[str, float]:
    """In this process: a `rows`-row job whose Client.send answers at once; CPU a row (µs) and GC ms."""
    import asyncio
    import gc

    import runner.send.client as client_module  # the SDK is imported here, before anything is timed
    from runner.api import run_job
    from runner.observe.progress import make_reporter
    from runner.records import Answer

    answer = Answer("fine", None, "end_turn", 12, 3, 0, 0, "req-own", "glm-4.6")
    marks: list[float] = []
    sent = [0]

    async def send(self: object, params: dict[str, object]) -> Answer:
        await asyncio.sleep(0)  # an answer off a socket comes in a later turn of the event loop
        sent[0] += 1
        if sent[0] == 1 or sent[0] == rows:
            marks.append(time.process_time())
        return answer

    client_module.Client.send = send  # type: ignore[method-assign]
    gc_time = [0.0, 0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_time[1] = time.process_time()
        else:
            gc_time[0] += time.process_time() - gc_time[1]

    shutil.rmtree(folder, ignore_errors=True)
    spec = write_job(folder, free_port(), rows, "{concurrency: 64}")
    gc.callbacks.append(on_gc)
    start = time.process_time()
    with open(os.devnull, "w", encoding="utf-8") as devnull:
        result = run_job(spec, reporter=make_reporter("json", stream=devnull))
    end = time.process_time()
    assert result.exit_code == 0, result.message
    return {
        "sending_us_per_row": 1e6 * (marks[-1] - marks[0]) / (rows - 1),
        "run_us_per_row": 1e6 * (end - start) / rows,
        "gc_ms": 1000 * gc_time[0],
    }


def own(rows: int, runs: int, other: Path | None) -> dict[str, object]:
    """`runs` rounds of `own_child` in fresh processes, this checkout and `other` alternating."""
    checkouts = {"this": HERE.parent, **({"other": other.resolve()} if other else {})}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    load = [os.getloadavg()[0]]
    for i in range(runs):
        names = list(checkouts) if i % 2 == 0 else list(checkouts)[::-1]
        for name in names:
            env = {
                **os.environ,
                "PYTHONPATH": str(checkouts[name]),
                "PYTHONDONTWRITEBYTECODE": "1",
                "ZHIPUAI_API_KEY": "bench",
            }
            folder = HERE / "out" / f"own-{name}"
            command = [sys.executable, __file__, "_own-child", "--rows", str(rows), "--folder", str(folder)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps({"run": i + 1, "checkout": name, **results[name][-1]}), flush=True)
        load.append(os.getloadavg()[0])
    report: dict[str, object] = {"rows": rows, "runs": runs, "load_average_range": [min(load), max(load)]}
    for name, runs_of in results.items():
        report[name] = {
            field: {
                "worst": round(max(r[field] for r in runs_of), 1),  # the most CPU: a claim is the worst run
                "median": round(statistics.median(r[field] for r in runs_of), 1),
            }
            for field in runs_of[0]
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="profile one run")
    rec.add_argument("--rows", type=int, default=20_000)
    rec.add_argument("-o", "--output", type=Path, required=True)
    tab = commands.add_parser("table", help="profiles side by side")
    tab.add_argument("profiles", type=Path, nargs="+")
    mine = commands.add_parser("own", help="the runner's own CPU a row, the SDK taken out")
    mine.add_argument("--rows", type=int, default=20_000)
    mine.add_argument("--runs", type=int, default=6)
    mine.add_argument("--other", type=Path, default=None, help="another checkout, measured in the same rounds")
    child = commands.add_parser("_own-child")
    child.add_argument("--rows", type=int, required=True)
    child.add_argument("--folder", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "record":
        record(args.rows, args.output)
    elif args.command == "table":
        print(table(args.profiles))
    elif args.command == "own":
        print(json.dumps(own(args.rows, args.runs, args.other), indent=2))
    else:
        print(json.dumps(own_child(args.rows, args.folder)))


if __name__ == "__main__":
    main()
