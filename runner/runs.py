"""What a run is asked to do and how it ended: its options, its result, and the fingerprint a row map is
built from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.job.resolve import Job
from runner.observe.summary import Summary


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
class RunResult:
    """How a run ended (`runner.run_job` returns it): its exit code (the README's table), one line for a
    person, and the summary written beside the output (`summary.as_dict()` is that JSON object)."""

    exit_code: int
    message: str
    summary: Summary = field(default_factory=Summary)

    @property
    def output(self) -> Path | None:
        """The output file (None unless every row has a result)."""
        return Path(self.summary.output) if self.summary.output else None

    @property
    def ok(self) -> bool:
        """Did every row get an ok answer?"""
        return self.exit_code == 0


def fingerprint(job: Job) -> dict[str, Any]:
    """What a row map depends on: the spec (after overrides) and each input file's identity (its ctime too:
    a write in place can keep the size and put the mtime back, but cannot set the ctime back)."""
    files = []
    for path in job.input_paths:
        st = path.stat()
        files.append([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns])
    return {"spec_hash": job.spec_hash, "inputs": files}
