"""The committed JSON Schema bounds numbers the way editors read them (`exclusiveMinimum`, `minimum`,
`maximum`), never with pydantic's own `gt`/`ge`/`le`, so an editor flags `max_attempts: 0`."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "configs" / "job.schema.json").read_text(encoding="utf-8"))


def keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in keys(v)}
    return set()


def test_the_schema_uses_json_schemas_bound_keywords() -> None:
    assert not {"gt", "ge", "lt", "le"} & keys(SCHEMA)
    assert {"exclusiveMinimum", "minimum", "maximum"} <= keys(SCHEMA)


@pytest.mark.parametrize(
    ("override", "valid"),
    [({}, True), ({"max_attempts": 0}, False), ({"concurrency": 0}, False), ({"max_attempts": 101}, False)],
)
def test_an_editor_validating_with_the_schema_sees_the_bounds(override: dict, valid: bool) -> None:
    spec = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text(encoding="utf-8"))
    spec.setdefault("run", {}).update(override)
    errors = list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(spec))
    assert (not errors) == valid, [e.message for e in errors]
