"""The simulator's native chat body rules, as strict as Zhipu's OpenAPI (real-wire.md): tool_choice
"auto", one stop word, text or json_object, vision parts for vision models, temperature and top_p in
range, thinking enabled or disabled. A refusal is (status, code, message)."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["TOOL_CHOICE_MESSAGE", "is_vision_model", "strict_problem"]

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
