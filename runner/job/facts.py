"""What is known about one endpoint and model on this account, learned by `glm-batch doctor` or a run:
a hint to start right, never a reason to refuse a job. One JSON file ($GLM_BATCH_FACTS or
~/.local/share/glm-batch/facts.json) keyed by "<base url> <model>"; an unreadable file is an empty one,
and a path that holds anything but a facts file is never written over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import stat
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from runner.files import FACTS, json_object, user_data, write_json_atomic


@dataclass(frozen=True)
class Facts:
    """Facts about one endpoint and model; None means unknown."""

    forced_tool_choice: bool | None = None  # does the Messages route accept tool_choice {"type": "tool"}?
    stop_sequences_max: int | None = None  # how many stop sequences a request may carry (None: unknown)
    # "anthropic" ({"type":"error","error":{"type":..}}) or "native" ({"error":{"code":..}})
    error_shape: str | None = None
    concurrency: int | None = None  # requests in flight the account allows, as measured
    batch_eligible: bool | None = None  # did a batch on this model pass validation?
    checked: str | None = None  # ISO date of the last update
    source: str | None = None  # "doctor" or "run"


_FIELDS = frozenset(f.name for f in fields(Facts))
SIMULATOR = "simulator"  # the in-process simulator's key (`model.endpoint: simulator`: its port changes per run)


def facts_path() -> Path:
    """Where the facts file lives."""
    return user_data(*FACTS)


def facts_key(base_url: str | None, model: str) -> str:
    """The file's key for one endpoint and model: the URL without credentials, query or trailing slash
    (a job's base URL is None on the in-process simulator, whose port changes per run)."""
    if base_url is None:
        return f"{SIMULATOR} {model}"
    parts = urlsplit(base_url.strip())
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    clean = urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    return f"{clean} {model}"


MAX_FACTS_BYTES = 8 << 20  # far more than any account's endpoints and models


def _read_all(path: Path) -> dict[str, Any] | None:
    """The facts file's entries: {} when there is none yet (or a torn one: a .json file that does not
    parse); None when the path holds something that is not a facts file (another file named by mistake:
    a job's input or manifest; a device, a FIFO, anything huge), never read whole nor written over."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return {}
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FACTS_BYTES:
        return None
    if info.st_size == 0:
        return {}
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    data = json_object(raw)
    if data is None:  # a torn facts file is an empty one; any other file is left alone
        torn = path.suffix == ".json" and raw.lstrip()[:1] == b"{"
        return {} if torn else None
    if not all(isinstance(v, dict) and "checked" in v for v in data.values()):
        return None  # a JSON object that is not facts (a job's manifest, say)
    return data


def load_facts(base_url: str | None, model: str) -> Facts:
    """The facts known for one endpoint and model (all None when nothing is known)."""
    entry = (_read_all(facts_path()) or {}).get(facts_key(base_url, model))
    if not isinstance(entry, dict):
        return Facts()
    return Facts(**{k: v for k, v in entry.items() if k in _FIELDS})


def record_facts(base_url: str | None, model: str, *, source: str, **learned: Any) -> Facts:
    """Merge what was just learned (None values ignored) and write the file; one that cannot be written,
    or is not a facts file, is left as it was (bookkeeping never fails a run)."""
    unknown = set(learned) - (_FIELDS - {"checked", "source"})
    if unknown:
        raise TypeError(f"not a fact: {sorted(unknown)}")
    path = facts_path()
    found_file = _read_all(path)
    everything = dict(found_file or {})
    key = facts_key(base_url, model)
    found = everything.get(key)
    entry: dict[str, Any] = found if isinstance(found, dict) else {}
    merged = {**entry, **{k: v for k, v in learned.items() if v is not None}}
    merged["checked"] = dt.date.today().isoformat()
    merged["source"] = source
    everything[key] = merged
    if found_file is not None:  # never over something that is not a facts file
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(everything, path)
    return Facts(**{k: v for k, v in merged.items() if k in _FIELDS})
