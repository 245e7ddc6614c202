"""All-or-nothing file writes, the one writer of every file the project writes: temporary name, fsync,
rename, fsync of the directory. Job files go through `write_atomic`, `write_json_atomic` or
`fsync_rename`; a file the user names on the command line through `write_text`."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import DiskFull, UsageError
from runner.jsonrecord import R, as_json, from_json

if TYPE_CHECKING:
    import polars as pl
    from _typeshed import DataclassInstance

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(path: Path) -> DiskFull:
    """The error for a write to `path` that found no space."""
    return DiskFull(
        f"no space left on the device holding {path}; free some space there, then run the same command again"
    )


@contextlib.contextmanager
def space_checked(path: Path) -> Iterator[None]:
    """Turn a failed write for lack of space (OSError ENOSPC/EDQUOT, or polars' wrapping of it) into
    DiskFull naming `path`; the temporary file it may have left is removed."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise no_space(path) from None
        raise
    except Exception as exc:
        # polars reports an I/O error of its own writer as a ComputeError. Looked up, not imported: a
        # module that writes only JSON (the batch book, read by `status`) must not load polars, and an
        # error polars raised means polars is loaded.
        polars_errors = sys.modules.get("polars.exceptions")
        full = "No space left" in str(exc) or "Disk quota" in str(exc)
        if full and polars_errors is not None and isinstance(exc, polars_errors.ComputeError):
            raise no_space(path) from None
        raise


def write_atomic(frame: pl.DataFrame, path: Path) -> None:
    """Write Parquet so that `path` is either absent or complete: temp name, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with space_checked(path):
            frame.write_parquet(tmp)
            fsync_rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_rename(tmp: Path, path: Path) -> None:
    """Make `tmp` durable and move it to `path` in one step (and make the move durable)."""
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write bytes so that `path` is either absent or complete; an OSError reaches the caller as raised
    (wrap the call in `space_checked` to have a full disk said as DiskFull)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        fsync_rename(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_json_atomic(data: dict[str, Any], path: Path) -> None:
    """Write JSON with the same all-or-nothing guarantee as the part files."""
    with space_checked(path):
        write_bytes_atomic(json.dumps(data, indent=2, default=str).encode("utf-8"), path)


def read_json_object(path: Path, *, unreadable_raises: bool = False) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when absent, unreadable, torn or foreign; with
    `unreadable_raises`, a file that is there but does not read (permission, I/O) raises its OSError."""
    try:
        return json_object(path.read_bytes())
    except OSError as exc:
        if unreadable_raises and not isinstance(exc, FileNotFoundError | NotADirectoryError):
            raise
        return None


def json_object(raw: bytes) -> dict[str, Any] | None:
    """`raw` parsed as a JSON object; None when it is not UTF-8 JSON or not an object."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


# What glm-batch keeps outside any job (runner.money.ledger, runner.job.facts): its variable and default name.
LEDGER = ("GLM_BATCH_LEDGER", "ledger")
FACTS = ("GLM_BATCH_FACTS", "facts.json")
RESCUE_MARK = ".rescue-"  # a rescue journal is `<output stem>.rescue-<run id>.jsonl` (runner.state.rescue)
RESCUE_FOLDER = "glm-batch-rescue"  # under the temp folder, where rescue journals go when beside the output fails


def user_data(variable: str, name: str) -> Path:
    """Where glm-batch keeps what outlives a job: $`variable`, else ~/.local/share/glm-batch/`name`."""
    return Path(os.environ.get(variable) or Path.home() / ".local" / "share" / "glm-batch" / name)


def summary_path(output: Path) -> Path:
    """Where the summary of the run that wrote `output` is kept: beside it, as `<output>.summary.json`."""
    return output.with_suffix(".summary.json")


def write_summary(output: Path, record: DataclassInstance) -> None:
    """Write a run's summary (or a cascade's record) beside its output as JSON (runner.jsonrecord), the
    folder made if need be."""
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(as_json(record), summary_path(output))


def read_summary(output: Path, kind: type[R]) -> R:
    """The summary beside `output` as a `kind`: every field at its default when there is none, or it is not
    a JSON object; what another version wrote read as runner.jsonrecord tolerates."""
    return from_json(kind, read_json_object(summary_path(output)) or {})


def read_manifest(state_dir: Path) -> dict[str, Any]:
    """A job's manifest, or an empty one when absent or not a JSON object; one that does not read raises,
    or a run would replace a history it could not read. Here so `status` reads it without polars."""
    return read_json_object(state_dir / "manifest.json", unreadable_raises=True) or {"runs": []}


def recorded_runs(state_dir: Path, kind: type[R]) -> list[R]:
    """The runs a job's manifest records, each as a `kind` (runner.jsonrecord), for a reader that only
    reports: none when it does not read."""
    try:
        runs = read_manifest(state_dir).get("runs")
    except OSError:
        return []
    return [from_json(kind, run) for run in runs if isinstance(run, dict)] if isinstance(runs, list) else []


# Why a write to a path the user chose failed, in words; each is that user's to fix (exit 2).
_CANNOT = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted",
    errno.ENOENT: "its folder does not exist",
    errno.EISDIR: "it is a directory",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "the name is too long",
}


def write_error(path: Path, exc: OSError, key: str) -> DiskFull | UsageError:
    """The one-line error for a failed write to `path` (named by the command-line option `key`): no
    space is DiskFull (exit 5); anything else a path the user can fix (exit 2)."""
    if exc.errno in NO_SPACE:
        return no_space(path)
    why = _CANNOT.get(exc.errno or 0, exc.strerror or str(exc))
    return UsageError(f"{key} {path}: cannot write it ({why}); choose another path or fix that")


def write_text(
    path: Path,
    text: str,
    *,
    key: str,
    protected: Iterable[tuple[Path, str]] = (),
    ours: str | None = None,
    force: bool = False,
    exclusive: bool = False,
) -> Path:
    """Write `text` to a file the user named with `key` (e.g. "--html"), all or nothing; return where.
    Refused in one line, before writing: a path that is or resolves into one of `protected` (named
    job files); a directory, device or FIFO; an existing file not ours (without `ours`) unless `force`;
    any existing file if `exclusive`. A symlink is followed."""
    target = Path(os.path.realpath(path))
    for other, what in [*protected, *_job_files_beside(target)]:
        if paths_overlap(target, Path(os.path.realpath(other))):
            raise UsageError(
                f"{key} {path}: that is {what} {other}; glm-batch never writes over it, choose another path"
            )
    try:
        st = target.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise write_error(path, exc, key) from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{key} {path}: it is a directory; give a file path")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{key} {path}: not a regular file (a device, a FIFO or a socket); give a file path")
        if exclusive:
            raise UsageError(f"{key} {path}: already exists; choose another path or remove it first")
        if not force and not _written_by_us(target, ours):
            raise UsageError(f"{key} {path}: already exists and glm-batch did not write it; pass --force to replace it")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc, key) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(st.st_mode) if st is not None else 0o644)  # a replaced file keeps its mode
        if exclusive:
            os.link(tmp, target)  # fails if a file appeared meanwhile: never replace one
            _fsync(target.parent)
        else:
            fsync_rename(tmp, target)
    except FileExistsError:
        raise UsageError(f"{key} {path}: already exists; choose another path or remove it first") from None
    except OSError as exc:
        raise write_error(path, exc, key) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def paths_overlap(path: Path, other: Path) -> bool:
    """Whether `path` is `other` or lies inside it (both resolved)."""
    return path == other or other in path.parents


def _job_files_beside(target: Path) -> list[tuple[Path, str]]:
    """What `target` is if it is a file glm-batch keeps, whatever the command knows: under a `.glm-batch/`
    state folder, an output (a .parquet with its summary beside it) or that summary, a rescue journal (paid
    answers the next run takes back), the usage ledger, the facts file, or a spec (YAML with `input:` and
    `prompt:`)."""
    found = [(p, "a job's state directory") for p in (target, *target.parents) if p.name == ".glm-batch"]
    if target.suffix == ".parquet" and summary_path(target).exists():
        found.append((target, "a job's output"))
    if (
        target.name.endswith(".summary.json")
        and target.with_name(target.name[: -len(".summary.json")] + ".parquet").exists()
    ):
        found.append((target, "a job's summary"))
    if RESCUE_MARK in target.name and target.suffix == ".jsonl":
        found.append((target, "a rescue journal"))
    ledger = Path(os.path.realpath(user_data(*LEDGER)))
    if target.suffix == ".parquet" and ledger in target.parents:  # its files, not whatever folder it is in
        found.append((target, "a file of the usage ledger"))
    if target == Path(os.path.realpath(user_data(*FACTS))):
        found.append((target, "the facts file"))
    rescue_folder = Path(os.path.realpath(Path(tempfile.gettempdir()) / RESCUE_FOLDER))
    if paths_overlap(target, rescue_folder):
        found.append((rescue_folder, "the rescue folder"))
    if target.suffix in (".yaml", ".yml") and _looks_like_a_spec(target):
        found.append((target, "a job spec"))
    return found


_SPEC_KEYS = re.compile(rb"^(input|prompt):", re.MULTILINE)


def head(path: Path) -> bytes | None:
    """The first megabyte of the file at `path`, or None when it does not read."""
    try:
        with path.open("rb") as f:
            return f.read(1 << 20)
    except OSError:
        return None


def _looks_like_a_spec(path: Path) -> bool:
    """Whether the YAML file at `path` has a job spec's top-level `input:` and `prompt:` keys."""
    return {m.group(1) for m in _SPEC_KEYS.finditer(head(path) or b"")} == {b"input", b"prompt"}


def _written_by_us(path: Path, ours: str | None) -> bool:
    """Whether the file at `path` carries glm-batch's mark `ours` (in its first megabyte)."""
    return ours is not None and ours.encode() in (head(path) or b"")


def _fsync(path: Path) -> None:
    """Make the file or directory at `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
