"""Structured answers: the shape a label or record must have, how to ask for it (a forced tool call, or
`mode: text`: JSON in the text), check it against its JSON Schema, and ask again quoting the problem. A
truncated answer is never re-asked: the same request would be cut at the same place."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from runner.errors import UsageError

if TYPE_CHECKING:
    import polars as pl

    from runner.records import Answer

TOOL_NAME = "record_answer"
TEXT_INSTRUCTION = "Reply with only a JSON object that matches this JSON Schema:"

_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.S)


class Unusable(Exception):
    """An answer that is not the structure asked for; `kind` is `invalid` or `truncated`."""

    def __init__(self, kind: Literal["invalid", "truncated"], message: str) -> None:
        super().__init__(message)
        self.kind = kind


def extract_json(text: str) -> Any:
    """The JSON value in a model's text: a fenced block, else the outermost {...} or [...]; ValueError
    saying what was wrong."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)]
    bare = []
    for opening, closing in (("{", "}"), ("[", "]")):
        start, end = text.find(opening), text.rfind(closing)
        if start != -1 and end > start:
            bare.append((start, text[start : end + 1]))
    candidates += [span for _, span in sorted(bare)]  # the outermost value opens first
    if not candidates:
        raise ValueError("no JSON object found in the answer")
    last_error = ""
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError as exc:
            last_error = f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    raise ValueError(last_error)


def polars_dtype(schema: dict[str, Any]) -> pl.DataType:
    """The polars type a JSON Schema value becomes: objects are Structs, arrays Lists."""
    import polars as pl

    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"] and the like: the first non-null type
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object":
        fields = schema.get("properties", {})
        return pl.Struct({name: polars_dtype(sub) for name, sub in fields.items()}) if fields else pl.String()
    if kind == "array":
        return pl.List(polars_dtype(schema.get("items", {})))
    return {"integer": pl.Int64(), "number": pl.Float64(), "boolean": pl.Boolean()}.get(str(kind), pl.String())


@dataclass(frozen=True)
class AnswerShape:
    """The structure a job's answers must have, and how to ask for it."""

    schema: dict[str, Any]
    mode: Literal["tool", "text"]
    max_repairs: int
    label_field: str | None  # for `labels:` jobs, the field holding the label(s)

    @classmethod
    def from_spec(cls, output: Any, where: str) -> AnswerShape | None:
        """Build from a job's `output` section; None when the job wants free text."""
        if output.labels is not None:
            if len(set(output.labels)) != len(output.labels) or not output.labels:
                raise UsageError(f"{where}: output.labels: give distinct labels")
            item = {"type": "string", "enum": list(output.labels)}
            field, prop = (
                ("labels", {"type": "array", "items": item, "minItems": 1}) if output.multi else ("label", item)
            )
            schema = {"type": "object", "properties": {field: prop}, "required": [field], "additionalProperties": False}
            return cls(schema, output.mode, output.max_repairs, field)
        if output.schema_ is not None:
            import jsonschema

            try:
                jsonschema.Draft202012Validator.check_schema(output.schema_)
            except jsonschema.SchemaError as exc:
                raise UsageError(f"{where}: output.schema: not a valid JSON Schema: {exc.message}") from None
            if output.schema_.get("type") != "object":
                raise UsageError(f"{where}: output.schema: the top level must be `type: object`")
            return cls(output.schema_, output.mode, output.max_repairs, None)
        if output.parse == "json":
            return cls({"type": "object"}, "text", output.max_repairs, None)
        return None

    @property
    def fields(self) -> dict[str, pl.DataType]:
        """The typed output columns: one per top-level property."""
        return {name: polars_dtype(sub) for name, sub in self.schema.get("properties", {}).items()}

    def ask(self, params: dict[str, Any]) -> dict[str, Any]:
        """The request parameters that ask for this structure."""
        if self.mode == "tool":
            tool = {"name": TOOL_NAME, "description": "Record the answer.", "input_schema": self.schema}
            return {**params, "tools": [tool], "tool_choice": {"type": "tool", "name": TOOL_NAME}}
        instruction = f"{TEXT_INSTRUCTION}\n{json.dumps(self.schema, ensure_ascii=False)}"
        system = f"{params['system']}\n\n{instruction}" if params.get("system") else instruction
        return {**params, "system": system}

    def auto(self, params: dict[str, Any]) -> dict[str, Any]:
        """The same request with tool_choice auto, for an endpoint that refuses a forced tool (Zhipu's
        native backend: "Tool choice must be auto"); `check` and `repair` make up for the lost force."""
        if self.mode != "tool" or not isinstance(params.get("tool_choice"), dict):
            return params
        if params["tool_choice"].get("type") not in ("tool", "any"):
            return params
        return {**params, "tool_choice": {"type": "auto"}}

    def check(self, answer: Answer) -> Any:
        """The validated value of an answer; raises Unusable saying what is wrong."""
        import jsonschema

        if answer.stop_reason == "max_tokens":
            raise Unusable("truncated", "the answer was cut off at max_tokens; raise model.max_tokens")
        if self.mode == "tool":
            if answer.tool_input is None:
                raise Unusable("invalid", f"no call to the {TOOL_NAME} tool")
            value = answer.tool_input
        else:
            try:
                value = extract_json(answer.text)
            except ValueError as exc:
                raise Unusable("invalid", str(exc)) from None
        errors = sorted(jsonschema.Draft202012Validator(self.schema).iter_errors(value), key=lambda e: e.path)
        if errors:
            first = errors[0]
            where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
            raise Unusable("invalid", f"{where}: {first.message}")
        if self.label_field == "labels":  # a set of labels: each once, in the order the job lists them
            order = self.schema["properties"]["labels"]["items"]["enum"]
            value = {"labels": sorted(set(value["labels"]), key=order.index)}
        return value

    def repair(self, params: dict[str, Any], answer: Answer, problem: str) -> dict[str, Any]:
        """The same conversation plus the answer and a turn that quotes what was wrong with it."""
        note = f"That answer is not valid: {problem}. Answer again, following the schema exactly."
        if self.mode == "tool" and answer.tool_use_id is not None:
            reply = [{"type": "tool_result", "tool_use_id": answer.tool_use_id, "is_error": True, "content": note}]
        else:
            reply = note  # type: ignore[assignment]
        messages = [
            *params["messages"],
            {"role": "assistant", "content": answer.content},
            {"role": "user", "content": reply},
        ]
        return {**params, "messages": messages}
