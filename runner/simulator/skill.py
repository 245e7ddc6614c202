"""Models of different skill for the simulator (`SimConfig.model_error`), so a cascade can be tested
honestly: a cheap model that is wrong on some rows, more often on hard ones, and whose sampled answers
disagree more where it is wrong, as a real model's self-consistency does.

The reference is the simulator's usual answer (what a model with no error gives). For a model with
error share `e`, each row falls in one of three classes, fixed by the model name and the prompt:
- confidently wrong (share e/10): the model gives another label, and its samples mostly agree on it;
- unsure (share 1.8 e): each sample is a coin flip between the usual label and another, so about
  half of these rows are voted wrong, with low agreement;
- sure (the rest): right, with a sample now and then (3%) answering otherwise.
Hard rows (no sentiment word the lexicon knows) get 1.5 times the shares and easy rows half, so
about `e` of the rows are wrong where half the rows are hard. At temperature 0 a row's answer is
fixed: wrong on confidently wrong rows and on the unsure rows whose coin says so.

With `confidence: flat` the model is wrong on a share `e` of rows and its samples waver at
`sample_disagreement` whether it is right or not: its agreement says nothing about its errors (the
case a cascade must survive by falling back to the oracle).
"""

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
