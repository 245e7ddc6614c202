"""A job derived from another by changing keys of its validated spec: the stages of a cascade."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import ValidationError

from runner.errors import UsageError
from runner.job.reading import describe_invalid
from runner.job.resolve import Job, _resolve
from runner.job.spec import JobSpec
from runner.job.templates import compile_template


def derive(job: Job, changes: dict[str, Any]) -> Job:
    """Another job made from this one's validated spec with dotted keys changed (`{"model.name": "x"}`):
    a stage of a cascade. Its paths resolve as the original's; given ones should be absolute."""
    data = job.spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise UsageError(describe_invalid(job.spec_path, exc)) from exc
    return _resolve(spec, job.spec_path, dt.date.today(), compile_template, True, True)
