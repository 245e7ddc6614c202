"""When the job's state folder stops taking writes mid-run, nothing paid is lost: `state_guard` turns any
state failure into DiskFull (exit 5) or StateUnwritable (exit 74); the answers held in memory go to a
rescue journal that the next run adopts (docs/decisions.md, "State failures")."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import DiskFull, GlmBatchError, StateUnwritable, first_line
from runner.files import NO_SPACE, RESCUE_FOLDER, RESCUE_MARK, no_space, write_bytes_atomic
from runner.job.resolve import output_of_any_day
from runner.records import Result, journal_line, read_journal

if TYPE_CHECKING:
    from runner.job.resolve import Job


def state_failure(exc: Exception, state_dir: Path, *, refusals: bool = True) -> GlmBatchError | None:
    """`exc`, raised writing (or reading back) the state in `state_dir`, as the error the run stops with;
    None when not the state files' failure. With `refusals`, a writer's own GlmBatchError counts too."""
    if isinstance(exc, DiskFull | StateUnwritable):
        return exc
    if isinstance(exc, OSError):
        if exc.filename and not _within(Path(os.fsdecode(exc.filename)), state_dir):
            return None  # a file elsewhere (the output): not the state's failure
        if exc.errno in NO_SPACE:
            return no_space(Path(exc.filename) if exc.filename else state_dir)
        where = f"{exc.filename}: " if exc.filename else ""
        return StateUnwritable(
            f"the job's state folder {state_dir} stopped taking writes ({where}{exc.strerror or exc}); "
            "fix it (permissions, chattr -i, a folder that was deleted), then run the same command again"
        )
    if isinstance(exc, GlmBatchError):  # a writer's own refusal of the path
        if not refusals:
            return None
        return StateUnwritable(f"the job's state folder {state_dir} stopped taking writes: {exc}")
    polars_errors = sys.modules.get("polars.exceptions")
    if polars_errors is not None and isinstance(exc, polars_errors.PolarsError):
        # polars wraps its writer's I/O errors ("Invalid thrift: transport error" on a full disk): the
        # free space says which it was.
        if "No space left" in str(exc) or _full(state_dir):
            return no_space(state_dir)
        return StateUnwritable(
            f"a file in the job's state folder {state_dir} could not be written or read back whole "
            f"({first_line(exc)}); check the disk, then run the same command again"
        )
    return None


def _within(path: Path, folder: Path) -> bool:
    return os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep)


def _full(state_dir: Path) -> bool:
    """Is the filesystem holding `state_dir` (or its nearest existing parent) out of space?"""
    probe = state_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


@contextlib.contextmanager
def state_guard(state_dir: Path, *, refusals: bool = True) -> Iterator[None]:
    """Raise any failure of the state's files inside as DiskFull or StateUnwritable (see state_failure)."""
    try:
        yield
    except Exception as exc:
        failure = state_failure(exc, state_dir, refusals=refusals)
        if failure is None:
            raise
        if failure is exc:
            raise
        raise failure from None


def rescue_places(output_path: Path, state_dir: Path) -> list[Path]:
    """Where a job's rescue journals go, in order of preference: beside the output, then under the temp
    folder (named by the state folder, so two jobs never share one)."""
    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:16]
    return [output_path.parent, Path(tempfile.gettempdir()) / RESCUE_FOLDER / digest]


def write_rescue(results: list[Result], run_id: str, output_path: Path, state_dir: Path) -> Path | None:
    """Write `results` as a rescue journal in the first place that takes it; its path, or None when no
    place did (then the answers are lost, and the caller says so)."""
    data = b"".join(journal_line(r) for r in results)
    name = f"{output_path.stem}{RESCUE_MARK}{run_id}.jsonl"
    for place in rescue_places(output_path, state_dir):
        path = place / name
        try:
            place.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(data, path)
            return path
        except OSError:
            continue
    return None


def find_rescued(job: Job) -> list[Path]:
    """The rescue journals earlier runs of this job left, oldest first: beside its output, under the temp
    folder, and, with `{run_date}` in output.path, beside the output of any other day (a cron job stopped
    at night and run again the next day takes back what it paid for)."""
    found: set[Path] = set()
    pattern = f"{job.output_path.stem}{RESCUE_MARK}*.jsonl"
    for place in rescue_places(job.output_path, job.state_dir):
        with contextlib.suppress(OSError):
            found.update(place.glob(pattern))
    any_day = output_of_any_day(job)
    if any_day is not None:
        found.update(
            Path(p) for p in glob.glob(any_day.removesuffix(".parquet") + pattern[len(job.output_path.stem) :])
        )
    return sorted(found, key=lambda p: p.name)


def read_rescued(path: Path) -> tuple[str, list[Result]]:
    """A rescue journal's run id and answers (a line that does not read is skipped)."""
    run_id = path.name.split(RESCUE_MARK, 1)[1].removesuffix(".jsonl")
    return run_id, read_journal(path)
