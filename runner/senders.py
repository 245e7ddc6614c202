"""The choice of sender for a run: this process's, or Ray's for `run.engine: ray` (imported only then)."""

from __future__ import annotations

from runner.errors import UsageError
from runner.job.resolve import Job
from runner.local import LocalSender
from runner.run import Sender
from runner.runs import RunOptions


def sender_for(job: Job, options: RunOptions) -> Sender:
    """The sender the spec asks for: Ray's for `run.engine: ray` (but a pilot's few rows are sent from
    here), else this process's. UsageError for what Ray cannot send."""
    if job.spec.run.engine != "ray" or options.pilot_rows is not None:
        return LocalSender()
    if job.spec.run.mode != "online":
        raise UsageError(f"{job.spec_path}: run.engine: ray: batch mode runs on the local engine")
    from runner.distributed.sender import RaySender  # a local run never loads the distributed package

    return RaySender()
