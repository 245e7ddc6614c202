"""Reading a batch's result files: a line as a ResultLine (never raises), and what a failure means
(`classify_failure`). Pure functions."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from runner.send.batch.native_answer import PlainChat, plain_chat
from runner.send.batch.shapes import whole_number
from runner.send.retries import ABORT_CODES, TRANSIENT_CODES, Verdict, error_parts

# What the batch machinery writes for a request it never ran: it was not the request's fault.
_NOT_PROCESSED = re.compile(r"expire|cancel|timeout|timed_out|not_processed|not processed", re.I)

_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*"([^"\\]{1,256})"')


@dataclass(slots=True)  # not frozen: made once per line, and a frozen __init__ costs ~4x (treat it as a value)
class ResultLine:
    """One line of a batch's output or error file. `problem`: it could not be read (only `custom_id`
    may be known); `error_code`/`error_message`: it reports a failed request."""

    custom_id: str | None
    status_code: int | None = None
    body: dict[str, Any] | None = None  # the chat completion (or error body) the request got
    request_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    line_id: str | None = None  # the batch's own id for the line (`batch_req_...`)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """Did the request succeed (status 200, a body, no error reported)?"""
        # A missing status with a body is read as success: the docs show no line without one, and
        # answer_from_chat still refuses a body that is not a chat completion.
        return (
            self.problem is None
            and self.status_code in (200, None)
            and self.body is not None
            and self.error_code is None
            and self.error_message is None
        )


def parse_result_line(line: bytes | str) -> ResultLine:
    """Read one output-file or error-file line; never raises. The docs show only the success line, so
    every shape an OpenAI-style batch might use is read: `{"custom_id", "response": {"status_code",
    "request_id", "body"}}` (an error status with `body.error`), `{"custom_id", "response": null, "error"}`
    (a request never run), `{"custom_id", "error"}`, and a body given as a JSON string."""
    raw = line.encode("utf-8", "replace") if isinstance(line, str) else line
    stripped = raw.strip()
    if not stripped:
        return ResultLine(custom_id=None, problem="empty line")
    try:
        data = _loads(stripped)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        return ResultLine(custom_id=_fish_custom_id(stripped), problem=f"not JSON ({exc}): {_snippet(stripped)}")
    if not isinstance(data, dict):
        return ResultLine(custom_id=None, problem=f"not a JSON object: {_snippet(stripped)}")
    answered = _answered(data)
    if answered is not None:
        return answered

    custom_id = data.get("custom_id")
    custom_id = str(custom_id) if isinstance(custom_id, (str, int)) and custom_id != "" else None
    line_id = data.get("id") if isinstance(data.get("id"), str) else None

    response = data.get("response")
    status: int | None = None
    body: dict[str, Any] | None = None
    request_id: str | None = None
    if isinstance(response, Mapping):
        status = whole_number(response.get("status_code"))
        body_value = response.get("body")
        if isinstance(body_value, str):  # a body serialized twice: read it once more
            try:
                body_value = json.loads(body_value)
            except ValueError:
                body_value = None
        body = body_value if isinstance(body_value, dict) else None
        rid = response.get("request_id") or (body or {}).get("request_id")
        request_id = str(rid) if rid else None
    elif response is not None:
        return ResultLine(
            custom_id=custom_id, line_id=line_id, problem=f"`response` is not an object: {_snippet(stripped)}"
        )

    code: str | None = None
    message: str | None = None
    for holder in (data, body or {}):
        error = holder.get("error")
        if isinstance(error, Mapping):
            code, message, _ = error_parts(holder)
            break
        if isinstance(error, str) and error:
            message = error
            break
    if custom_id is None:
        problem = "no custom_id"
    elif response is None and code is None and message is None:
        problem = "neither a response nor an error"
    else:
        problem = None
    return ResultLine(
        custom_id=custom_id,
        status_code=status,
        body=body,
        request_id=request_id,
        error_code=code,
        error_message=message,
        line_id=line_id,
        problem=problem,
    )


def _answered(data: dict[str, Any]) -> ResultLine | None:
    """The line nearly every line is, read in one step: a 200 whose body is an object with no error,
    and no error beside it. Anything else (None) is read by the general path below it."""
    response = data.get("response")
    if type(response) is not dict or data.get("error") is not None:
        return None
    status = response.get("status_code")
    if type(status) is not int or status != 200:
        return None
    body, custom_id, line_id = response.get("body"), data.get("custom_id"), data.get("id")
    if type(body) is not dict or body.get("error") is not None or type(custom_id) is not str or not custom_id:
        return None
    request_id = response.get("request_id") or body.get("request_id")
    return ResultLine(
        custom_id=custom_id,
        status_code=200,
        body=body,
        request_id=str(request_id) if request_id else None,
        line_id=line_id if type(line_id) is str else None,
    )


def plain_result(raw: bytes) -> tuple[str, PlainChat] | None:
    """A result line that is a plain answer (a 200 with a free-text chat completion, as `_answered` and
    `plain_chat` read it): its custom_id and the answer's fields, read at once. None for every other
    line, which parse_result_line and answer_from_chat then read as always (so each rule is theirs)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None  # parse_result_line reads it (json takes what orjson refuses) or says what is wrong
    if type(data) is not dict or data.get("error") is not None:
        return None
    response = data.get("response")
    if type(response) is not dict or response.get("status_code") != 200 or type(response["status_code"]) is not int:
        return None
    body, custom_id = response.get("body"), data.get("custom_id")
    if type(body) is not dict or type(custom_id) is not str or not custom_id:
        return None
    request_id = response.get("request_id") or body.get("request_id")
    fields = plain_chat(body, str(request_id) if request_id else None)
    return None if fields is None else (custom_id, fields)


def _loads(raw: bytes) -> Any:
    """A line's JSON: orjson (a fifth of json's time, and this runs once per line), or, for what orjson
    refuses and json reads (NaN, integers over 64 bits), json, so a line reads as it always did."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def oversized_line(head: bytes, tail: bytes, limit: int) -> ResultLine:
    """A result line longer than `limit` bytes, known by its first and last bytes only: its request
    fails (answer_too_large: asked again it would be as large, and it was billed), named by the
    custom_id found at either end."""
    custom_id = _fish_custom_id(head) or _fish_custom_id(tail)
    message = f"its result line is over {limit:,} bytes, past what one answer may take; it was not read"
    return ResultLine(custom_id=custom_id, error_code="answer_too_large", error_message=message)


def _fish_custom_id(raw: bytes) -> str | None:
    match = _CUSTOM_ID.search(raw)
    return match.group(1).decode("utf-8", "replace") if match else None


def _snippet(raw: bytes, limit: int = 120) -> str:
    text = raw[:limit].decode("utf-8", "replace")
    return text + ("..." if len(raw) > limit else "")


def classify_failure(line: ResultLine) -> Verdict:
    """What a failed line means for its request. ABORT (every other request would fail the same): the
    retries.ABORT_CODES (no balance, plan exhausted, bad key, unknown model) and 401/403. RETRY (the
    request may be fine): rate and overload codes, 408/409/429, 5xx, requests the batch never ran
    (expired, cancelled, timed out), and a line with no code and no status (unreadable, or a 200 whose
    body was no answer; the executor's attempt limit bounds it). FAIL (asked again, answered the same):
    any other 4xx, and any other code (bad parameters, prompt too long, sensitive content)."""
    code = line.error_code
    status = line.status_code
    if status is None and code is not None and len(code) == 3 and code.isdigit():
        status = int(code)  # an error line with no response, whose code is an HTTP status ("429", "503")
    if code in ABORT_CODES or status in (401, 403):
        return Verdict.ABORT
    if code in TRANSIENT_CODES or (code is not None and _NOT_PROCESSED.search(code)):
        return Verdict.RETRY
    if status is not None and (status in (408, 409, 429) or status >= 500):
        return Verdict.RETRY
    if status is not None and 400 <= status < 500:
        return Verdict.FAIL
    if line.error_message and _NOT_PROCESSED.search(line.error_message):
        return Verdict.RETRY
    return Verdict.FAIL if code is not None else Verdict.RETRY
