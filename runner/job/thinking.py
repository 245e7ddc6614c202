"""Which GLM models think, and whether they can be told not to: one rule for the runner and the simulator.

    thinking_mode("glm-4.6")     # "default": thinks unless the request says thinking disabled
    thinking_mode("glm-4.7")     # "always": thinks whatever the request says
    thinking_mode("glm-4-plus")  # "never": a model without reasoning

From Zhipu's docs (shared/reference/real-wire.md): the native API's `thinking` defaults to enabled;
GLM-4.5 and 4.6 decide dynamically and can be switched off, GLM-4.7 and GLM-4.5V always think, the
GLM-4 family (glm-4, glm-4-plus, glm-4-air-250414, glm-4-flash...) has no reasoning. Models this rule
does not name (GLM-5.x and later) are taken to think by default and to accept `disabled`.
Reasoning is billed as output and counts against max_tokens.
"""

from __future__ import annotations

from typing import Literal

ThinkingMode = Literal["never", "default", "always"]

_ALWAYS = ("glm-4.7", "glm-4.5v", "glm-z1")
_NEVER = ("glm-4-", "glm-3")

# A label or a small record is a few tokens; reasoning before it is typically hundreds. A budget below
# this, with thinking on, risks answers cut off inside their reasoning (finish_reason length, no text).
MIN_TOKENS_WITH_THINKING = 1024


def thinking_mode(model: str) -> ThinkingMode:
    """Whether `model` never thinks, thinks unless told not to, or always thinks."""
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
