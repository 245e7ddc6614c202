"""Where a job reads and writes: its input paths expanded, and its output and state directory checked
before anything runs (not an input, not matched by an input pattern, writable, apart from each other).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from runner.errors import UsageError
from runner.files import paths_overlap
from runner.job.spec import JobSpec

INPUT_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")


def expand_inputs(patterns: list[str], base: Path, where: str) -> tuple[Path, ...]:
    """The input files the patterns name, in order; a pattern matching nothing or a file we cannot read is refused."""
    paths: list[Path] = []
    for pattern in patterns:
        full = os.path.normpath(os.path.join(base, pattern))
        matches = sorted(glob.glob(full)) if glob.has_magic(pattern) else [full]
        if not matches:
            raise UsageError(f"{where}: input.paths: {pattern!r} matches no file (looked for {full})")
        for m in matches:
            p = Path(m)
            if p.suffix not in INPUT_SUFFIXES:
                raise UsageError(
                    f"{where}: input.paths: {p.name}: only .parquet, .csv and .jsonl (.ndjson) inputs are read"
                )
            if not p.is_file():
                shown = pattern if not glob.has_magic(pattern) else str(p)
                looked = (
                    f" (looked for {p}: relative paths resolve against the spec's folder)" if shown != str(p) else ""
                )
                raise UsageError(f"{where}: input.paths: {shown} does not exist{looked}")
            paths.append(p)
    return tuple(paths)


def check_not_an_input(
    path: Path,
    what: str,
    key: str,
    spec: JobSpec,
    spec_path: Path,
    inputs: tuple[Path, ...],
    *,
    folder: bool = False,
) -> None:
    """Refuse an output or a folder the run writes in (`folder`: the state directory, the usage ledger)
    that would overwrite, or next run be read as, input: compared with every input file, the spec, and
    every input glob."""
    base, where = spec_path.parent, str(spec_path)
    real = os.path.realpath(path)
    if real == os.path.realpath(spec_path):
        raise UsageError(f"{where}: {key}: {path} is the job spec itself; choose another {key}")
    for p in inputs:
        if paths_overlap(Path(real), Path(os.path.realpath(p))):
            raise UsageError(f"{where}: {key}: {what} {path} would overwrite the input {p}; choose another {key}")
    # Compared as written and with symlinks resolved, on both sides: an output under a link into the
    # input folder (out -> data) is matched by data/*.parquet as surely as data/x.parquet is.
    targets = {tuple(os.path.abspath(path).split(os.sep)), tuple(real.split(os.sep))}
    for pattern in spec.input.paths:
        if not glob.has_magic(pattern):
            continue
        written = os.path.abspath(os.path.normpath(os.path.join(base, pattern))).split(os.sep)
        fixed = next(i for i, part in enumerate(written) if glob.has_magic(part))
        resolved = os.path.realpath(os.sep.join(written[:fixed]) or os.sep).split(os.sep) + written[fixed:]
        for parts in (written, resolved):
            for absolute in targets:
                # The path itself matches, or (a directory) a file inside it could.
                reach = len(parts) == len(absolute) or (folder and len(parts) > len(absolute))
                if reach and all(_glob_part(pat, name) for pat, name in zip(parts, absolute, strict=False)):
                    raise UsageError(
                        f"{where}: {key}: input.paths pattern {pattern!r} matches {what} {path}"
                        + (f" (it is {real})" if real != os.path.abspath(path) else "")
                        + f", so the next run would read its own output as input; choose another {key} "
                        "or a narrower pattern"
                    )


def check_holds_no_job_file(state_dir: Path, key: str, spec_path: Path, inputs: Iterable[Path], where: str) -> None:
    """Refuse a state directory that holds the job's spec or an input (`output.state_dir: data`, `~`): the
    runner manages everything in it (a crash sweep deletes its `*.tmp` files, journals are read and
    removed), so it must be a folder of its own."""
    real = os.path.realpath(state_dir)
    for path, what in [(spec_path, "the job spec"), *((p, "the input") for p in inputs)]:
        if paths_overlap(Path(os.path.realpath(path)), Path(real)):
            raise UsageError(
                f"{where}: {key}: the state directory {state_dir} holds {what} {path}; the runner manages "
                "everything in it, so give it a folder of its own (or leave output.state_dir out: by default it is "
                "beside the output)"
            )


def _glob_part(pattern: str, name: str) -> bool:
    """One path component against one glob component, as `glob.glob` matches it (a `*` skips dot-names)."""
    if not glob.has_magic(pattern):
        return pattern == name
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def check_writable(path: Path, key: str, where: str, *, parent: bool) -> None:
    """Refuse, in one line, a destination whose directory is a file or cannot be written (`parent=True`:
    `path` is a file). The nearest existing directory is probed with a temporary file (os.access says
    yes to root on a read-only mount)."""
    if too_long(path):
        raise UsageError(
            f"{where}: {key}: {path} is too long a name (a part over {_name_max(path)} bytes, or the whole "
            f"over {_path_max(path)}); choose a shorter path or job name"
        )
    if parent and path.is_dir():
        raise UsageError(f"{where}: {key}: {path} is a directory; give a .parquet file path")
    directory = path.parent if parent else path
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        blocked = "not a directory" if probe == directory else f"so {directory} cannot be created"
        raise UsageError(f"{where}: {key}: {probe} is a file, {blocked}; choose another {key}")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UsageError(
            f"{where}: {key}: cannot write in {probe} ({exc.strerror}); fix its permissions or choose another {key}"
        ) from None


def too_long(path: Path) -> bool:
    """Is a part of `path` longer than its file system allows a name to be, or the whole path too long?
    (The OS says ENAMETOOLONG, which must never be reported as a permission problem.)"""
    limit = _name_max(path)
    return any(len(part.encode()) > limit for part in path.parts) or len(str(path).encode()) >= _path_max(path)


def _existing(path: Path) -> Path:
    while not os.path.isdir(path) and path != path.parent:  # os.path.isdir: False, never an error
        path = path.parent
    return path


def _name_max(path: Path) -> int:
    try:
        return os.pathconf(_existing(path), "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _path_max(path: Path) -> int:
    try:
        return os.pathconf(_existing(path), "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096


def default_state_dir(spec: JobSpec, base: Path, name: str) -> Path:
    """The checkpoint store: beside the output, above any {run_date} folder, so daily runs share answers."""
    template_dir = Path(spec.output.path).parent
    stable = Path()
    for part in template_dir.parts:
        if "{run_date}" in part:
            break
        stable /= part.format(name=name)
    return base / stable / ".glm-batch" / name
