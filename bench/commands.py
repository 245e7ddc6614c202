"""Benchmark: how long `--help`, `validate`, `status` and `estimate` take on the demo job, against the interpreter.

    python bench/commands.py [--runs 5]

None of these commands sends a request, so none should pay for the SDK; the target is each under 0.5 s
of wall time. Each round runs, back to back: two floors, `python -c pass` (an interpreter that does
nothing) and `python -c "import polars, pydantic, jinja2, typer"` (the libraries `validate` and
`estimate` cannot do without: the input reader, the spec's models, the templates, the command line),
then every command once, each in a fresh process, measuring its wall time and its CPU time (user +
system, from the process's own rusage, which a loaded machine inflates far less than wall time).
`--help`, `validate` and `estimate` (no pilot, no key) run on a copy of jobs/demo.yaml that was never
run; `status` on a copy that was run once, so it reads a real manifest, row map and results.
Reports each command's wall and CPU seconds, its wall time minus the same round's interpreter floor
(`over_floor_s`) and its wall and CPU time minus the same round's library floor (`over_libs_s`,
`cpu_over_libs_s`: what the runner adds to the libraries; negative for a command that does not load
them all): every round, the worst and the median, and the load average (the machine may be shared).

`--other DIR` also runs each command with the runner of another checkout (e.g. `git worktree add
/tmp/base main`) in the same rounds, so a change is compared with what it changes under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import HERE

ROOT = HERE.parent
WORK = HERE / "out" / "commands"

# The library floor: what `validate` and `estimate` must import whatever the runner does.
LIBRARIES = "import polars, pydantic, jinja2, typer"

COMMANDS: dict[str, list[str]] = {
    "help": ["--help"],
    "validate": ["validate", "{fresh}"],
    "status": ["status", "{finished}"],
    "estimate": ["estimate", "{fresh}"],
}


def demo_copy(name: str) -> Path:
    """A copy of the demo job and its input under WORK/name, so the bench leaves the repository's out/ alone."""
    folder = WORK / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "jobs").mkdir(parents=True)
    (folder / "data").mkdir()
    shutil.copy(ROOT / "data" / "reviews.csv", folder / "data" / "reviews.csv")
    spec = folder / "jobs" / "demo.yaml"
    shutil.copy(ROOT / "jobs" / "demo.yaml", spec)
    return spec


def timed(argv: list[str], cwd: Path | None = None) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one process, from its own rusage; it must succeed."""
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {errors.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def spread(values: list[float]) -> dict[str, float]:
    return {"worst": round(max(values), 3), "median": round(statistics.median(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=sorted(COMMANDS), help="Measure only these commands.")
    parser.add_argument("--other", type=Path, metavar="DIR", help="Also measure the runner of this checkout.")
    args = parser.parse_args()
    checkouts = [("", ROOT), *([("other ", args.other.resolve())] if args.other else [])]
    fresh, finished = demo_copy("fresh"), demo_copy("finished")
    subprocess.run(  # the demo runs on the built-in simulator: no key, nothing leaves the machine
        [sys.executable, "-m", "runner", "run", str(finished), "--log-format", "json"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    # (label, command, checkout): each command of this checkout, then the same of the other one
    runs = [(label + command, command, root) for command in args.only or COMMANDS for label, root in checkouts]
    names = [name for name, _, _ in runs]
    rounds: list[dict[str, Any]] = []
    for _ in range(args.runs):
        floor_wall, floor_cpu = timed([sys.executable, "-c", "pass"])
        libs_wall, libs_cpu = timed([sys.executable, "-c", LIBRARIES])
        line: dict[str, Any] = {
            "floor": {"wall_s": round(floor_wall, 3), "cpu_s": round(floor_cpu, 3)},
            "libs": {"wall_s": round(libs_wall, 3), "cpu_s": round(libs_cpu, 3)},
        }
        for name, command, root in runs:
            words = [w.format(fresh=fresh, finished=finished) for w in COMMANDS[command]]
            # `-m runner` from a checkout's root imports that checkout's runner.
            wall, cpu = timed([sys.executable, "-m", "runner", *words], cwd=root)
            line[name] = {
                "wall_s": round(wall, 3),
                "cpu_s": round(cpu, 3),
                "over_floor_s": round(wall - floor_wall, 3),
                "over_libs_s": round(wall - libs_wall, 3),
                "cpu_over_libs_s": round(cpu - libs_cpu, 3),
            }
        rounds.append(line)
        print(json.dumps(line), flush=True)
    print(json.dumps({"runs": args.runs, "load_average": [round(x, 2) for x in os.getloadavg()]}))
    for name in ["floor", "libs", *names]:  # one line each: worst and median of every measure
        print(json.dumps({"command": name} | {key: spread([r[name][key] for r in rounds]) for key in rounds[0][name]}))


if __name__ == "__main__":
    main()
