"""Models of different skill for the simulator (`SimConfig.model_error`): a cheap model wrong on some
rows, whose samples disagree more where it is wrong, so a cascade can be tested honestly."""

from __future__ import annotations

from runner.simulator.answers import lexicon_score, share

SURE_WAVER = 0.03  # a sure row's sample answers otherwise this often
WRONG_AGREES = 0.9  # a confidently wrong row's sample gives its wrong label this often


def row_class(model: str, prompt: str, error: float, seed: int = 0) -> str:
    """`wrong`, `unsure` or `sure`: how the model stands on this row (fixed by model, prompt and seed)."""
    scale = 1.5 if lexicon_score(prompt) == 0 else 0.5
    draw = share(f"skill|{seed}|{model}|{prompt}")
    if draw < scale * error / 10:
        return "wrong"
    if draw < scale * error / 10 + scale * 1.8 * error:
        return "unsure"
    return "sure"


def skill_variant(
    model: str, prompt: str, error: float, flat: bool, waver: float, repeat: int | None, seed: int = 0
) -> int:
    """Which answer (0: the usual one, 1: another) the model gives to this ask of the row: `repeat` is
    the sample's number among this model's asks of the prompt, None at temperature 0."""
    if flat:
        wrong = share(f"flat|{seed}|{model}|{prompt}") < error
        if repeat is not None and share(f"flatwaver|{model}|{repeat}|{prompt}") < waver:
            wrong = not wrong
        return int(wrong)
    kind = row_class(model, prompt, error, seed)
    coin = share(f"coin|{model}|{prompt}" if repeat is None else f"coin|{model}|{repeat}|{prompt}")
    if kind == "wrong":
        return int(repeat is None or coin < WRONG_AGREES)
    if kind == "unsure":
        return int(coin < 0.5)
    return int(repeat is not None and coin < SURE_WAVER)


def stated_confidence(model: str, prompt: str, error: float, flat: bool, seed: int = 0) -> float:
    """The confidence the model states in its answer (a `confidence` field, two decimals): high on
    rows it is sure of, lower on rows it is unsure of, and high on its confidently wrong rows too, as a
    real model's stated confidence is over-sure; with `flat`, a value that says nothing about its errors."""
    draw = share(f"stated|{seed}|{model}|{prompt}")
    if flat:
        return round(0.6 + 0.4 * draw, 2)
    low, span = {"sure": (0.85, 0.15), "unsure": (0.45, 0.35), "wrong": (0.7, 0.25)}[
        row_class(model, prompt, error, seed)
    ]
    return round(low + span * draw, 2)
