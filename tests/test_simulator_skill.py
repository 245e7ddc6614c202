"""The simulator's models of given skill (simulator.model_error, simulator.confidence): wrong on about
the share asked, more on hard rows, and sample agreement that is lower where the model is wrong,
unless its confidence is flat."""

from __future__ import annotations

from statistics import mean

from runner.simulator.answers import lexicon_score
from runner.simulator.skill import skill_variant

PROMPTS = [f"Review {i}: it was {'good' if i % 2 else 'odd'} and the {i % 7} parts fit" for i in range(4000)]


def _rows(error: float, flat: bool, samples: int = 5) -> list[tuple[bool, float, bool]]:
    """Per prompt: is the voted answer wrong, the vote's agreement, is the row hard."""
    out = []
    for prompt in PROMPTS:
        answers = [skill_variant("proxy", prompt, error, flat, 0.15, repeat) for repeat in range(samples)]
        wrong_votes = sum(answers)
        wrong = wrong_votes * 2 > samples
        out.append((wrong, max(wrong_votes, samples - wrong_votes) / samples, lexicon_score(prompt) == 0))
    return out


def test_a_model_is_wrong_on_about_its_error_share_and_more_on_hard_rows() -> None:
    rows = _rows(0.2, flat=False)
    assert 0.15 < mean(w for w, _, _ in rows) < 0.25
    assert mean(w for w, _, hard in rows if hard) > 2 * mean(w for w, _, hard in rows if not hard)
    assert all(skill_variant("oracle", p, 0.0, False, 0.0, None) == 0 for p in PROMPTS[:200])


def test_sample_agreement_is_lower_where_the_model_is_wrong_unless_its_confidence_is_flat() -> None:
    informative = _rows(0.2, flat=False)
    right = mean(a for w, a, _ in informative if not w)
    wrong = mean(a for w, a, _ in informative if w)
    assert right - wrong > 0.1
    flat = _rows(0.2, flat=True)
    assert 0.15 < mean(w for w, _, _ in flat) < 0.25
    assert abs(mean(a for w, a, _ in flat if not w) - mean(a for w, a, _ in flat if w)) < 0.03
