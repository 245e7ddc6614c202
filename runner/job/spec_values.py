"""Value types of the job spec that check more than their type: names given once, URLs that parse.

Apart from runner.job.spec (the models) to keep each module short; no I/O.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator

from runner.redact import redact


def _distinct(v: list[str]) -> list[str]:
    """A list of names each given once: a name twice would make two columns of one name."""
    seen: set[str] = set()
    for name in v:
        if name in seen:
            raise ValueError(f"{name!r} is named twice; give each name once")
        seen.add(name)
    return v


def well_formed_url(v: str) -> str:
    """An http(s) URL with a host (and a port that is a number): one that cannot be connected to is
    refused at load, not found out as a connection error on every row. Other values (an endpoint's
    name) pass as they are."""
    if not v.startswith(("http://", "https://")):
        return v
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(
            f"{redact(v)!r} is not a well-formed URL ({exc}); write it like https://host:port/path"
        ) from None
    if not parts.hostname or any(c.isspace() or ord(c) < 32 for c in v):
        raise ValueError(
            f"{redact(v)!r} is not a well-formed URL (no host, or a space in it); write it like https://host/path"
        )
    if parts.username is not None or parts.password is not None:
        # The SDK sends no user-info, so every row would fail as a connection error; and it is where a
        # pasted key ends up. Said without the secret.
        raise ValueError(
            f"{redact(v)!r} carries user-info (name:secret@) that is never sent; give the URL without it "
            "and the key in ZHIPUAI_API_KEY"
        )
    return v


# Column names: each at most once (output.keep_columns, input.columns).
Names = Annotated[list[str], AfterValidator(_distinct)]
# An endpoint's name, or an http(s) URL that parses and has a host.
Url = Annotated[str, AfterValidator(well_formed_url)]
