"""Profile: where a sending run's time goes, the SDK's against the runner's own (py-spy, by category).

    python bench/profile_send.py record --rows 20000 -o before.raw    # needs `pip install py-spy`
    python bench/profile_send.py table before.raw after.raw           # side by side, in percent

`record` runs `glm-batch run` on a `rows`-row job (64 in flight) against a simulator process with no
latency, under `py-spy record --format raw`. `table` sorts every sample by its innermost frame in
runner/: below it the SDK or its transport (anthropic, httpx, aiohttp, pydantic) is the SDK's time,
otherwise the runner's own, by module. Import frames are start-up. An idle pool thread blocked on its
queue is left out (py-spy counts it as active). Percentages are of the remaining samples.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
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
    ("engine: deliver/supervise", "runner/engine.py", ""),
    ("engine: deliver/supervise", "runner/supervise.py", ""),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="profile one run")
    rec.add_argument("--rows", type=int, default=20_000)
    rec.add_argument("-o", "--output", type=Path, required=True)
    tab = commands.add_parser("table", help="profiles side by side")
    tab.add_argument("profiles", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "record":
        record(args.rows, args.output)
    else:
        print(table(args.profiles))


if __name__ == "__main__":
    main()
