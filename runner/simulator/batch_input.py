"""What the simulated native API accepts: a batch file is refused whole (`file_problem`: bad JSON, a
malformed line, a duplicate custom_id, more than one or an unknown model); a bad line fails alone
(`checked_ask`, also used by the chat completions route), by the chat body rules as strict as Zhipu's
OpenAPI (`strict_problem`). A refusal is (status, code, message)."""

from __future__ import annotations

import json
import re
from typing import Any

from runner.job import catalog
from runner.simulator.answers import Ask, ask_from_chat, count_tokens

LINE_URL = "/v4/chat/completions"
TOOL_CHOICE_MESSAGE = "Tool choice must be auto"  # Zhipu's words (seen live on GLM-5.3, 2026-09)
_VISION = re.compile(r"^glm-\d+(\.\d+)?v")  # glm-4v, glm-4.5v, glm-4.6v-flash...


def is_vision_model(model: str) -> bool:
    """Whether a model takes image parts (the GLM-xV models)."""
    return bool(_VISION.match(model.lower()))


def _number_outside(value: Any, low: float, high: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return not low <= value <= high


def strict_problem(body: dict[str, Any]) -> tuple[int, str, str] | None:
    """Why Zhipu's native API would refuse this chat body on a documented rule, or None."""
    choice = body.get("tool_choice")
    if choice is not None and choice != "auto":
        return 400, "1214", TOOL_CHOICE_MESSAGE
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > 1:
        return 400, "1214", f"stop: at most 1 stop word is allowed, got {len(stop)}"
    for name, kinds in (("response_format", ("text", "json_object")), ("thinking", ("enabled", "disabled"))):
        value = body.get(name)
        kind = value.get("type") if isinstance(value, dict) else None
        if value is not None and kind not in kinds:
            return 400, "1214", f"{name}.type must be {' or '.join(kinds)}, got {kind!r}"
    if "temperature" in body and _number_outside(body["temperature"], 0.0, 1.0):
        return 400, "1214", f"temperature must be in [0, 1], got {body['temperature']!r}"
    if "top_p" in body and _number_outside(body["top_p"], 0.01, 1.0):
        return 400, "1214", f"top_p must be in [0.01, 1], got {body['top_p']!r}"
    if not is_vision_model(str(body.get("model"))):
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(
                isinstance(part, dict) and part.get("type") == "image_url" for part in content
            ):
                return 400, "1210", f"model {body.get('model')} does not take images; use a vision model (glm-4.6v)"
    return None


def eligible(model: str) -> bool:
    """Whether the catalogue lets a model into the Batch API (its `batch.eligible`)."""
    info = catalog.models().get(model)
    return info is not None and info.batch.eligible


def checked_ask(body: Any, model: str | None, scale: float) -> Ask | tuple[int, str, str]:
    """A chat completions body as an `Ask` (made once: checked and answered from the same one), or why
    it would be refused (status, code, message). `model`: the batch file's, which every line must name."""
    if not isinstance(body, dict):
        return 400, "1214", "body must be a JSON object"
    name = body.get("model")
    models = catalog.models()
    if name not in models:
        return 400, "1211", "Unknown Model, please check the model code."
    if model is not None and name != model:
        return 400, "1214", f"model {name} differs from the file's model {model}"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return 400, "1214", "messages must be a non-empty list of objects"
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        return 400, "1214", "max_tokens must be a positive integer"
    strict = strict_problem(body)  # the documented rules: tool_choice, stop, response_format, sampling...
    if strict is not None:
        return strict
    ask = ask_from_chat(body, models[name].max_output)
    if count_tokens(ask.prompt, scale) > models[name].context:
        return 400, "1261", "Prompt too long"
    return ask


def parse_file(data: bytes) -> tuple[list[tuple[str, Any]], str | None, str | None]:
    """A batch file's lines that are JSON objects (custom_id, body), each parsed once; its first model
    named; and the first problem that makes the whole file invalid (bad JSON, a malformed line, a
    duplicate custom_id, more than one or an unknown model), or None. A bad body fails its own line."""
    parsed: list[tuple[str, Any]] = []
    model = None
    problem: str | None = None
    seen: set[str] = set()
    models: set[str] = set()
    known = catalog.models()
    for number, raw in enumerate([ln for ln in data.split(b"\n") if ln.strip()], 1):
        try:
            line = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            problem = problem or f"line {number}: not valid JSON"
            continue
        if not isinstance(line, dict):
            problem = problem or f"line {number}: not a JSON object"
            continue
        custom_id, body = line.get("custom_id"), line.get("body")
        parsed.append((str(custom_id), body))
        if model is None and isinstance(body, dict) and isinstance(body.get("model"), str):
            model = body["model"]
        if problem is None:
            problem = _line_shape_problem(number, line, custom_id, body, seen, models, known)
    return parsed, model, problem


def _line_shape_problem(
    number: int, line: dict[str, Any], custom_id: Any, body: Any, seen: set[str], models: set[str], known: Any
) -> str | None:
    """What makes one parsed line invalidate its file (a duplicate custom_id, more than one model)."""
    if not isinstance(custom_id, str) or not custom_id:
        return f"line {number}: custom_id must be a non-empty string"
    if custom_id in seen:
        return f"line {number}: duplicate custom_id {custom_id!r}"
    seen.add(custom_id)
    if line.get("method") != "POST":
        return f"line {number}: method must be POST"
    if line.get("url") != LINE_URL:
        return f"line {number}: url must be {LINE_URL}"
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return f"line {number}: body must be an object with a model"
    if body["model"] not in known:
        return f"line {number}: Unknown Model {body['model']!r}"
    models.add(body["model"])
    if len(models) > 1:
        return f"line {number}: a file may hold one model; found {', '.join(sorted(models))}"
    return None
