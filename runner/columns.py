"""The output's column names, in one place that imports nothing heavy, and the rule (`clash`) that refuses
a job two of whose columns share a name before anything is sent."""

from __future__ import annotations

from collections.abc import Iterable

REUSED_FROM = "reused_from"  # the id of the row whose request paid for this row's answer
AGREEMENT = "agreement"
SAMPLE_ANSWERS = "sample_answers"
VOTE_COLUMNS = (AGREEMENT, SAMPLE_ANSWERS)  # what a voted output adds
# What each request used and cost: a row of several samples has their sum (runner.output.voting).
BILLED_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "thinking_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cost",
)
# The answer columns of the output, in the order people read them; the id and kept columns come first.
OUTPUT_COLUMNS = (
    "response_text",
    "thinking",
    "stop_reason",
    *BILLED_COLUMNS,
    REUSED_FROM,
    "latency_ms",
    "attempts",
    "repairs",
    "status",
    "error_type",
    "error_message",
    "request_id",
    "model",
    "finished_at",
    "request_key",
    "run_id",
    "api",
)
# Names the assembly uses on the way (the row map's and the stored answers' own columns).
WORKING_COLUMNS = ("_row", "_id", "_sample", "_parsed", "key", "parsed_json", "est_input_tokens", "retryable")


def clash(id_name: str, kept: Iterable[str], fields: Iterable[str], samples: int) -> str | None:
    """What is wrong when two of the output's columns would share a name, or None when none do."""
    ours = {name: "an answer column" for name in (*OUTPUT_COLUMNS, *WORKING_COLUMNS)}
    if samples > 1:
        ours.update({name: "a vote column" for name in VOTE_COLUMNS})
    seen: dict[str, str] = {}
    for name, what, key in (
        (id_name, "the id column", "input.id_column"),
        *((name, "a kept input column", "output.keep_columns") for name in kept),
        *((name, "an answer field", "output.schema") for name in fields),
    ):
        if name in ours:
            return f"{key}: {name!r} is the name of {ours[name]} of the output; rename it in the input or the schema"
        if name in seen and seen[name] != what:
            return (
                f"{key}: {name!r} is both {seen[name]} and {what}; the output cannot hold both: rename one, "
                "or leave the input column out of output.keep_columns (set it explicitly)"
            )
        seen.setdefault(name, what)
    return None


GOLD_SUFFIX = "_gold"


def gold_names(gold: Iterable[str], id_name: str, fields: Iterable[str], samples: int) -> dict[str, str]:
    """The output column each gold input column (eval) is carried in: its own name, or `<name>_gold` when
    the output has a column of that name already (a labels job's gold `label` beside its answer `label`)."""
    taken = {id_name, *fields, *OUTPUT_COLUMNS, *WORKING_COLUMNS, *(VOTE_COLUMNS if samples > 1 else ())}
    return {c: f"{c}{GOLD_SUFFIX}" if c in taken else c for c in gold}
