"""Where a run's spend was booked (`Booked`, the summary's `ledger`): apart from runner.money.ledger so
that reading a summary loads no polars."""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.jsonrecord import ABSENT, OMITTED_WHEN_NONE, Absent


@dataclass(frozen=True)
class Booked:
    """The ledger the spend went to, or, when it was not written, the job's state folder (`pending`;
    None when that failed too)."""

    path: str = ""
    written: bool = True
    pending_booked: int | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # earlier runs' rows booked now
    warning: str | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    pending: str | Absent | None = ABSENT
