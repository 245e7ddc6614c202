"""Frozen dataclasses as JSON objects and back: the one codec of the records written as JSON. Reading
tolerates other versions: a missing or mistyped key takes the field's default, an unknown one is ignored."""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

R = TypeVar("R", bound="DataclassInstance")
_WRONG = object()  # a value that does not fit its field
_hints = cache(get_type_hints)


# The metadata of a field absent from the JSON while it is None (a section only some runs have):
# `field(default=None, metadata=OMITTED_WHEN_NONE)`.
OMITTED_WHEN_NONE = {"omit_none": True}


class Absent(enum.Enum):
    """A field whose key is left out of the JSON (where None would be written as null): the default of a
    key that only some records have, even as null (`x: float | None | Absent = ABSENT`)."""

    ABSENT = "absent"


ABSENT = Absent.ABSENT


def as_json(record: DataclassInstance) -> dict[str, Any]:
    """The record as a JSON object: nested records as objects, tuples as arrays."""
    return {
        f.name: _plain(value)
        for f in dataclasses.fields(record)
        if (value := getattr(record, f.name)) is not ABSENT and (value is not None or not f.metadata.get("omit_none"))
    }


def from_json(kind: type[R], data: Mapping[str, Any]) -> R:
    """The record of type `kind` that `data` holds (see the module's docstring for what is tolerated)."""
    hints = _hints(kind)
    given = {}
    for f in dataclasses.fields(kind):
        if f.name in data and (value := _typed(hints[f.name], data[f.name])) is not _WRONG:
            given[f.name] = value
    return kind(**given)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return as_json(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _typed(hint: Any, value: Any) -> Any:
    """`value` as a `hint` (records from objects, tuples from arrays), or _WRONG when it is not one."""
    origin = get_origin(hint)
    if origin is Union or origin is types.UnionType:
        for arm in get_args(hint):
            if (typed := _typed(arm, value)) is not _WRONG:
                return typed
        return _WRONG
    if hint is Any:
        return value
    if hint is type(None):
        return None if value is None else _WRONG
    if hint is Absent:  # never in the JSON
        return _WRONG
    if origin is Literal:
        return value if value in get_args(hint) else _WRONG
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_json(hint, value) if isinstance(value, dict) else _WRONG
    if origin is tuple:
        if not isinstance(value, list):
            return _WRONG
        items = [_typed(get_args(hint)[0], v) for v in value]
        return _WRONG if _WRONG in items else tuple(items)
    if origin is dict and isinstance(value, dict):  # its values typed (records from objects)
        entries = {k: _typed(get_args(hint)[1], v) for k, v in value.items()}
        return _WRONG if _WRONG in entries.values() else entries
    if origin is not None:  # list[...]: taken as it is
        return value if isinstance(value, origin) else _WRONG
    if hint is float:
        return value if isinstance(value, int | float) and not isinstance(value, bool) else _WRONG
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG
    return value if isinstance(value, hint) else _WRONG
