"""A run's summary record: what it did, sent and cost, written beside the output (`<output>.summary.json`)
and appended to the manifest (its exit code and message are runner.finish's, its ledger rows the ledger's)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from pathlib import Path
from typing import Any

from runner.control import Control
from runner.errors import STATE_FAILURES, DiskFull
from runner.files import write_summary
from runner.job.resolve import Job
from runner.money.accounting import Accountant, Tally
from runner.send.base import Gauges
from runner.state.store import Store


def summary(
    job: Job,
    run_id: str,
    estimate: dict[str, Any] | None,
    tally: Tally,
    control: Control,
    started_at: dt.datetime,
    exit_code: int,
    finalized: bool,
    accountant: Accountant,
) -> dict[str, Any]:
    """The run's record: written beside the output and appended to the manifest."""
    snap = tally.snapshot()
    table = accountant.table
    cost: dict[str, Any] = {
        "currency": job.currency,
        "spent": round(tally.cost, 6) if table is not None else None,
        "by_tier": {k: round(v, 6) for k, v in tally.cost_by_tier.items()},
        "prices_confirmed": table.confirmed if table is not None else None,
        "max_cost": job.spec.run.max_cost,
        # Attempts sent and then given up on (timeouts, stalls): the endpoint may have billed them too.
        "maybe_billed_twice": {
            "requests": len(control.maybe_billed),
            "worst_case": round(
                sum(
                    table.worst_case(input_tokens=t, max_tokens=job.spec.model.max_tokens) for t in control.maybe_billed
                ),
                6,
            )
            if table is not None
            else None,
        },
    }
    if estimate is not None and table is not None and tally.ok:
        # How good was `glm-batch estimate`? Compared only when it was made for this model and requests.
        from runner.money.kept_estimate import compare

        cost["estimate"] = compare(job, estimate, ok=tally.ok, spent=tally.cost)
    return {
        "job": job.name,
        "run_id": run_id,
        "spec": str(job.spec_path),
        "spec_hash": job.spec_hash,
        "model": job.spec.model.name,
        "endpoint": job.endpoint_name,
        "inputs": [{"path": str(p), "bytes": _size(p)} for p in job.input_paths],
        "started_at": started_at.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "exit_code": exit_code,
        "stopped": control.reason,
        "output": str(job.output_path) if finalized else None,
        "retries": dict(control.retries),
        "cost": cost,
        **snap,
    }


def _size(path: Path) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def sending(job: Job, gauges: Gauges) -> dict[str, Any]:
    """How the sending went, for the summary: the concurrency limit at the end, the refused share."""
    concurrency = {"adaptive": gauges.adaptive, "final": gauges.limit, "overload_429_rate": gauges.overload_429_rate}
    queue = {"batch_queue": gauges.batch_queue} if gauges.batch_queue else {}
    return {"concurrency": concurrency, "simulated": job.base_url is None, **queue}


def write(job: Job, store: Store, report: dict[str, Any]) -> None:
    """Write the summary beside the output and the run into the manifest (a full disk was already said:
    the journal holds the answers)."""
    with contextlib.suppress(DiskFull):
        write_summary(job.output_path, report)
    with contextlib.suppress(*STATE_FAILURES):  # already said: the run stopped for it
        store.record_run(report)
