"""What a run finds when it opens a job's state: what earlier runs settled, and what a crash or a torn
file left behind (reported, salvaged, and refused when too much would be paid again)."""

from __future__ import annotations

import polars as pl

from runner.job.resolve import Job
from runner.observe.progress import Reporter
from runner.output.salvage import check_resend, lost_beyond_allowance, salvage, salvage_sources
from runner.state.rowmap import file_identities
from runner.state.settled import SettledKeys
from runner.state.store import Store


def settled_keys(job: Job, store: Store, *, fresh: bool, retry_failed: bool, resend_lost: bool,
                 rows_total: int, reporter: Reporter) -> SettledKeys:  # fmt: skip
    """The request keys this run must not send; reports what opening the store recovered or set aside."""
    if store.lock.took_over:
        reporter.event("stale_lock_taken_over", previous=store.lock.took_over)
    if store.recovered:
        reporter.event("journal_recovered", answers=store.recovered)
    if store.corrupt:
        reporter.event("corrupt_parts_quarantined", files=[str(p) for p in store.corrupt])
    if store.row_map_dropped:
        reporter.event("row_map_rebuilt", reason="a row-map file did not read; it is a cache of the input")
    salvaged = 0
    if store.corrupt or (not fresh and _answers_gone(job, store)):
        salvaged = _salvage(job, store, reporter)
    if fresh:
        return SettledKeys.none()
    settled = _settled(job, store, retry_failed, reporter)
    if store.quarantined:  # answers were set aside before: are too many of the last run's lost?
        if not salvaged and lost_beyond_allowance(job, store, settled, rows_total) and _salvage(job, store, reporter):
            settled = _settled(job, store, retry_failed, reporter)  # the salvaged part counts now
        check_resend(job, store, settled, rows_total, resend_lost)
    return settled


def _answers_gone(job: Job, store: Store) -> bool:
    """No answer file is left (deleted, or the whole state lost) while this job's output is there: its
    answers are a copy to take back before anything is paid again."""
    return not store.result_parts() and bool(salvage_sources(job))


def _salvage(job: Job, store: Store, reporter: Reporter) -> int:
    sources = salvage_sources(job)
    salvaged = salvage(job, store, sources)
    if salvaged:
        reporter.event("answers_salvaged", answers=salvaged, source=", ".join(map(str, sources)))
    return salvaged


def _settled(job: Job, store: Store, retry_failed: bool, reporter: Reporter) -> SettledKeys:
    """The settled keys, read on first use (an unchanged re-run may never need them); a part found torn
    then is set aside (said), and the output's answers taken back before any is sent again."""
    basis = {"parts": file_identities(store.result_parts()), "retry_failed": retry_failed}

    def load() -> pl.Series:
        seen = len(store.corrupt)
        keys = store.settled_keys(retry_failed=retry_failed).series()
        if len(store.corrupt) > seen:
            reporter.event("corrupt_parts_quarantined", files=[str(p) for p in store.corrupt[seen:]])
            if _salvage(job, store, reporter):
                keys = store.settled_keys(retry_failed=retry_failed).series()
        if file_identities(store.result_parts()) != basis["parts"]:
            settled.basis = None  # read from other files than listed: vouch for nothing in the cover record
        return keys

    settled = SettledKeys(load, basis)
    return settled
