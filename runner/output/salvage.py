"""Salvage: when answers are lost (a torn part file, deleted answers, the state folder gone), take back
the answers the finished output holds before anything is paid again (not for a sampled job: its output
holds only the vote)."""

from __future__ import annotations

import glob
from pathlib import Path

import polars as pl

from runner.columns import REUSED_FROM
from runner.errors import UsageError
from runner.job.resolve import Job, output_of_any_day
from runner.records import KEY, RESULT_SCHEMA
from runner.state.settled import SettledKeys
from runner.state.store import Store

RESEND_FREE_SHARE = 0.01  # lost answers re-sent without asking: up to this share of the rows...
RESEND_FREE_ROWS = 10  # ...or this many, whichever is more


def answers_from_output(output: Path, fields: list[str]) -> pl.DataFrame:
    """The ok answers in a finished output, as results (RESULT_SCHEMA), one per request key; empty
    when the file is missing, unreadable or not an output of this project."""
    empty = pl.DataFrame(schema=RESULT_SCHEMA)
    try:
        frame = pl.scan_parquet(output)
        names = set(frame.collect_schema().names())
    except Exception:  # an output that does not read is no copy to salvage from
        return empty
    if not {"request_key", "status"} <= names:
        return empty
    if REUSED_FROM in names:
        frame = frame.filter(pl.col(REUSED_FROM).is_null())
    columns = []
    for name, dtype in RESULT_SCHEMA.items():
        if name == KEY:
            expr = pl.col("request_key")
        elif name == "parsed_json":  # the typed answer columns, back to the JSON they were parsed from
            expr = pl.struct(fields).struct.json_encode() if fields and set(fields) <= names else pl.lit(None)
        elif name == "retryable":
            expr = pl.lit(False)
        else:
            expr = pl.col(name) if name in names else pl.lit(None)
        columns.append(expr.cast(dtype).alias(name))
    try:
        return frame.filter(pl.col("status") == "ok").select(columns).unique(subset=[KEY]).collect()
    except pl.exceptions.PolarsError:  # a file that scans but does not read through
        return empty


def salvage_sources(job: Job) -> list[Path]:
    """The outputs whose answers can be taken back, first choice first: the job's own, also for a limited
    run (which writes apart), when it is there, else the one this run writes; then, with `{run_date}` in
    output.path, the job's outputs of other days, newest first."""
    full = job.full_output_path
    sources = [full if full is not None and full.exists() else job.output_path]
    any_day = output_of_any_day(job, full=True)
    if any_day is not None:
        days = [Path(p) for p in sorted(glob.glob(any_day), reverse=True)]
        sources += [p for p in days if p not in sources]
    return [p for p in sources if p.exists()]


def salvage(job: Job, store: Store, sources: list[Path]) -> int:
    """After torn parts were quarantined, keep the answers the outputs (`salvage_sources`) still hold; how
    many."""
    if job.spec.output.samples > 1:
        return 0
    fields = list(job.shape.fields) if job.shape else []
    found = [answers_from_output(source, fields) for source in sources]
    answers = pl.concat(found).unique(subset=[KEY], keep="first") if found else pl.DataFrame(schema=RESULT_SCHEMA)
    if answers.height:
        store.add_part(answers, "salvaged")
    return answers.height


def lost_beyond_allowance(job: Job, store: Store, settled: SettledKeys, rows_total: int) -> int:
    """How many of the last run's requests have no answer, when that is more than may be re-sent
    without asking (RESEND_FREE_SHARE of the rows or RESEND_FREE_ROWS); else 0."""
    lost = store.rows.unsettled(settled, job.spec.output.samples)
    allowed = max(RESEND_FREE_ROWS, int(rows_total * RESEND_FREE_SHARE))
    return lost if lost is not None and lost > allowed else 0


def check_resend(job: Job, store: Store, settled: SettledKeys, rows_total: int, resend_lost: bool) -> None:
    """Refuse to pay again for more than a small share of answers lost with torn files, unless asked."""
    lost = 0 if resend_lost else lost_beyond_allowance(job, store, settled, rows_total)
    if not lost:
        return
    files = ", ".join(str(p) for p in store.quarantined)
    raise UsageError(
        f"{len(store.quarantined)} answer file(s) were torn and set aside ({files}); {lost} requests of the last "
        f"run have no answer left in any copy and would be paid again; run with --resend-lost to send them"
    )
