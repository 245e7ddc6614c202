"""What a run is asked to do and how it ended: the options, the report, and the fingerprint a row map is
built from. Shared by the local engine (runner.engine) and the Ray engine (runner.distributed.engine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner.job.resolve import Job


@dataclass(frozen=True)
class RunOptions:
    """How this invocation treats earlier answers, and whether it is a pilot."""

    fresh: bool = False  # ignore earlier answers and send everything again
    retry_failed: bool = False  # send again the rows that failed for good in earlier runs
    pilot_rows: int | None = None  # send only this many randomly chosen rows; write no output
    pilot_seed: int = 0
    resume_command: str | None = None  # the exact command that resumes this job (for messages)
    resend_lost: bool = False  # pay again for answers lost with torn files, however many


@dataclass
class RunReport:
    """How a run ended: the exit code, one line for the user, and the summary that was written."""

    exit_code: int
    message: str
    summary: dict[str, Any] = field(default_factory=dict)


def fingerprint(job: Job) -> dict[str, Any]:
    """What a row map depends on: the spec (after overrides) and each input file's identity."""
    files = []
    for path in job.input_paths:
        st = path.stat()
        files.append([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    return {"spec_hash": job.spec_hash, "inputs": files}
