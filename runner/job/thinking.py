"""Which GLM models think, and whether they can be told not to: one rule for the runner and the
simulator, from Zhipu's docs (real-wire.md). Reasoning is billed as output and counts against max_tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ThinkingMode = Literal["never", "default", "always"]

_ALWAYS = ("glm-4.7", "glm-4.5v", "glm-z1")
_NEVER = ("glm-4-", "glm-3")

# A label or a small record is a few tokens; reasoning before it is typically hundreds. A budget below
# this, with thinking on, risks answers cut off inside their reasoning (finish_reason length, no text).
MIN_TOKENS_WITH_THINKING = 1024
# What an estimate assumes a thinking model reasons for, per request, before any answer is measured.
ASSUMED_REASONING_TOKENS = 512


def thinking_mode(model: str) -> ThinkingMode:
    """Whether `model` never thinks (the GLM-4 family), thinks unless told `disabled` (GLM-4.5, 4.6 and an
    unnamed model: GLM-5.x and later) or always thinks (GLM-4.7, GLM-4.5V)."""
    name = model.lower()
    if name == "glm-4" or name.startswith(_NEVER):
        return "never"
    if name.startswith(_ALWAYS):
        return "always"
    return "default"


def thinks(model: str, requested: str | None) -> bool:
    """Whether a request to `model` whose thinking type is `requested` ("enabled", "disabled", "adaptive"
    or None for not given) is answered with reasoning, as Zhipu's native API does it."""
    mode = thinking_mode(model)
    if mode == "never":
        return False
    if mode == "always":
        return True
    return requested != "disabled"


@dataclass(frozen=True)
class ThinkingPlan:
    """What a job sends as `thinking` and what to tell its user about it."""

    default: dict[str, str] | None  # sent when the spec gives no model.thinking (None: send nothing)
    note: str | None  # for `validate`: a default the job did not ask for
    warning: str | None  # for `validate` and `estimate`: reasoning may not fit max_tokens
    thinks: bool = False  # the model will reason before answering (billed as output)


def thinking_plan(model: str, spec_thinking: str | None, structured: bool, max_tokens: int) -> ThinkingPlan:
    """How a job on `model` thinks: a labeling job (output.labels or output.schema) on a model that can
    turn it off sends `disabled` unless the spec says otherwise. Warns when the model will think and
    max_tokens is below MIN_TOKENS_WITH_THINKING."""
    mode = thinking_mode(model)
    default: dict[str, str] | None = None
    note = None
    if spec_thinking is None and structured and mode == "default":
        default = {"type": "disabled"}
        note = (
            f"thinking: disabled for this labeling job ({model} thinks by default; reasoning is billed as "
            "output); set model.thinking: {type: enabled} to have it think"
        )
    thinking = mode == "always" or (mode == "default" and spec_thinking in ("enabled", "adaptive"))
    warning = None
    if thinking and max_tokens < MIN_TOKENS_WITH_THINKING:
        why = "always thinks" if mode == "always" else "thinks (model.thinking is enabled)"
        warning = (
            f"model.max_tokens {max_tokens} is small for {model}, which {why}: its reasoning counts against "
            f"max_tokens, so answers may be cut off with no text; raise it to {MIN_TOKENS_WITH_THINKING} or more"
            + ("" if mode == "always" else " or set model.thinking: {type: disabled}")
        )
    return ThinkingPlan(default, note, warning, thinking)
