"""What a kept estimate was made for, and how a run compares its cost with it: only one made for the
same model, endpoint and requests, at its own mode's figure (docs/decisions.md)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from runner.job.resolve import Job
from runner.jsonrecord import OMITTED_WHEN_NONE


@dataclass(frozen=True)
class EstimateCheck:
    """A run's spend against the kept estimate's figure for as many answers (the summary's `cost.estimate`)."""

    estimated: float | None = None  # None: no estimate made for this run's model and requests
    spent: float = 0.0
    error_pct: float | None = None
    no_match: str | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # why there is no figure
    mode: str | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # the mode whose figure was taken
    low: float | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # a cascade's: the estimate's interval
    high: float | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    within: bool | None = field(default=None, metadata=OMITTED_WHEN_NONE)  # did the spend fall inside it


def requests_fingerprint(job: Job) -> str:
    """A short hash of what shapes each request and its price (templates, model section, answer shape,
    samples, input files and columns), not of how requests go out (concurrency, budget, mode, limit)."""
    spec = job.spec.model_dump(mode="json", exclude_defaults=True, by_alias=True)
    output = {k: v for k, v in spec.get("output", {}).items() if k not in ("path", "state_dir", "keep_columns")}
    data = {
        "templates": [t.source for t in (job.system, *(t for _, t in job.history), job.template) if t is not None],
        "model": {k: v for k, v in spec.get("model", {}).items() if k not in ("name", "endpoint")},  # told apart
        "output": output,
        "input": {k: v for k, v in spec.get("input", {}).items() if k not in ("paths", "limit")},
        "input_paths": [str(p) for p in job.input_paths],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def made_for(job: Job) -> dict[str, str]:
    """What an estimate of `job` priced: kept in its report, checked by the next run."""
    return {
        "model": job.spec.model.name,
        "endpoint": job.endpoint_name,
        "mode": job.spec.run.mode,
        "requests": requests_fingerprint(job),
    }


def _expected(kept: dict[str, Any], mode: str) -> float | None:
    """The kept estimate's expected cost of all its requests in `mode`, or None if it gives none."""
    if mode == "online":
        return float(kept["cost"]["expected"])
    figure = kept.get("modes", {}).get(mode, {}).get("cost")
    return float(figure) if isinstance(figure, int | float) else None


def _made_for_another(job: Job, kept: dict[str, Any]) -> str | None:
    """Why the kept estimate does not price this job's requests (None when it does)."""
    now = made_for(job)
    then = kept.get("made_for")
    if not isinstance(then, dict):
        return "the kept estimate does not say what it was made for (made by an older version)"
    differ = [k for k in ("model", "endpoint", "requests") if then.get(k) != now[k]]
    if not differ:
        return None
    what = ", ".join("the prompt or settings" if k == "requests" else k for k in differ)
    return (
        f"the kept estimate was made for {then.get('model')} on {then.get('endpoint')}; this run "
        f"({now['model']} on {now['endpoint']}) differs in {what}"
    )


def compare(job: Job, kept: dict[str, Any], *, ok: int, spent: float) -> EstimateCheck:
    """The run's spend against the kept estimate's figure for as many answers (`ok`), or, when the
    estimate was made for something else, no figure and why."""
    mode = job.spec.run.mode
    why = _made_for_another(job, kept)
    expected = _expected(kept, mode) if why is None else None
    if expected is None:
        why = why or f"the kept estimate gives no single {mode} figure (see `glm-batch estimate`: modes)"
        return EstimateCheck(None, round(spent, 6), None, no_match=why)
    answerable = kept.get("requests_answerable", kept["requests_to_send"])
    estimated = expected / max(1, answerable) * ok
    error_pct = round(100 * (estimated - spent) / spent, 1) if spent else None
    return EstimateCheck(round(estimated, 6), round(spent, 6), error_pct, mode=mode)


def compare_whole(job: Job, kept: dict[str, Any], *, spent: float) -> EstimateCheck:
    """For a run that does all its estimate priced (a cascade's every stage): its spend against the
    expected figure and the low-high interval, or no figure and why."""
    why = _made_for_another(job, kept)
    if why is not None:
        return EstimateCheck(None, round(spent, 6), None, no_match=why)
    cost = kept["cost"]
    expected = float(cost["expected"])
    low, high = float(cost["low"]), float(cost["high"])
    error_pct = round(100 * (expected - spent) / spent, 1) if spent else None
    return EstimateCheck(
        round(expected, 6), round(spent, 6), error_pct, low=low, high=high, within=low <= spent <= high
    )
