"""The cascade's statistics, against the BARGAIN paper's description: the betting test keeps its error
rate, and the threshold it picks meets the target with the stated probability, keeping many proxy
answers when the proxy's confidence is informative and few when it is not."""

from __future__ import annotations

import itertools
import random

import pytest

from runner.cascade.bounds import above, below, share_above, share_below
from runner.cascade.estimate import perfect_proxy_share
from runner.cascade.threshold import Settings, choose


def test_the_betting_test_sees_a_clear_difference_and_not_a_missing_one() -> None:
    ones = [1.0] * 40
    assert above(ones, 0.7, 0.05, 1000)
    assert not below(ones, 0.7, 0.05, 1000)
    zeros_and_ones = [float(i % 2) for i in range(40)]  # mean 0.5
    assert below(zeros_and_ones, 0.9, 0.05, 1000)
    assert not above(zeros_and_ones, 0.5, 0.05, 1000)
    # Without replacement: having drawn every item, the mean is known exactly.
    assert above([1.0] * 9 + [0.0], 0.85, 0.05, 10)


def test_the_betting_test_wrongly_says_above_at_most_alpha_of_the_time() -> None:
    """Draws without replacement from 300 items whose mean is exactly m, looked at every 10 draws as
    the method does: 'above m' must be claimed in at most alpha of the trials."""
    alpha, m, n = 0.1, 0.8, 300
    population = [1.0] * int(m * n) + [0.0] * (n - int(m * n))
    rng = random.Random(5)
    wrong = 0
    trials = 300
    for _ in range(trials):
        rng.shuffle(population)
        for drawn in range(10, 201, 10):
            if above(population[:drawn], m, alpha, n):
                wrong += 1
                break
    assert wrong / trials <= alpha


def _weighted_trials(flagged_low: int, flagged_high: int, claim: str, trials: int = 300) -> int:
    """Trials (of `trials`) in which weighted draws from a population of 600 items of weight 0.2 and
    400 of weight 1.2 (flagged_low and flagged_high of them flagged), looked at every 10 draws up to
    300, claim its flagged share is below (or above) 0.15."""
    population = [(i < flagged_low, 0.2) for i in range(600)] + [(i < flagged_high, 1.2) for i in range(400)]
    weights = [w for _, w in population]
    mean_weight = sum(weights) / len(weights)
    test = share_below if claim == "below" else share_above
    rng = random.Random(11)
    claimed = 0
    for _ in range(trials):
        draws = rng.choices(population, weights=weights, k=300)
        if any(test(draws[:k], 0.15, 0.1, mean_weight, 0.2) for k in range(10, 301, 10)):
            claimed += 1
    return claimed


def test_the_weighted_test_wrongly_says_below_at_most_alpha_of_the_time() -> None:
    """Draws with chances in proportion to weight, from a population whose flagged share is exactly
    0.15, every flagged item among the rarely drawn ones (where a test that forgot the weights would
    see a share near 0.05, and claim it in nearly every trial): 'below 0.15' must be claimed in at most
    alpha (0.1) of the 300 trials, give or take two binomial standard errors (10 trials); and the same
    for 'above' when the flagged items are the often drawn ones."""
    assert _weighted_trials(150, 0, "below") <= 30 + 10
    assert _weighted_trials(0, 150, "above") <= 30 + 10


def test_the_weighted_test_sees_a_clear_difference() -> None:
    assert _weighted_trials(30, 0, "below", trials=50) >= 45  # share 0.03
    assert _weighted_trials(0, 60, "below", trials=50) >= 45  # 0.06, on the often drawn items
    assert _weighted_trials(0, 300, "above", trials=50) >= 45  # 0.30


def _synthetic(rows: int, seed: int, informative: bool, accuracy: float = 0.8) -> tuple[list[float | None], list[bool]]:
    """A proxy's confidence per row and whether it agrees with the oracle: with an informative
    confidence, agreement falls as confidence falls; otherwise the two are unrelated."""
    rng = random.Random(seed)
    scores: list[float | None] = []
    agree: list[bool] = []
    for _ in range(rows):
        score = rng.random()
        scores.append(round(score * 5) / 5)  # coarse, as k samples' agreement is
        chance = min(1.0, 0.45 + 0.6 * score) if informative else accuracy
        agree.append(rng.random() < chance)
    return scores, agree


def _run(scores: list[float | None], agree: list[bool], target: float, delta: float, seed: int) -> tuple[float, int]:
    step = choose(scores, lambda pos: agree[pos], target=target, delta=delta, seed=seed)
    assert not step.need  # every answer was known
    agreeing = sum(1 for pos in range(len(scores)) if pos not in step.keep or agree[pos])
    return agreeing / len(scores), len(step.keep)


def test_the_threshold_meets_the_target_with_probability_one_minus_delta_and_keeps_most_rows() -> None:
    target, delta, runs = 0.9, 0.1, 60
    outcomes = [_run(*_synthetic(1000, seed, informative=True), target, delta, seed) for seed in range(runs)]

    met = sum(agreement >= target for agreement, _ in outcomes)
    assert met >= (1 - delta) * runs
    kept = sorted(k for _, k in outcomes)
    assert kept[runs // 2] >= 400  # an informative proxy keeps a good share of its answers


def test_an_uninformative_confidence_falls_back_to_the_oracle_and_still_meets_the_target() -> None:
    target, delta, runs = 0.95, 0.05, 40
    outcomes = [
        _run(*_synthetic(1000, seed, informative=False, accuracy=0.8), target, delta, seed) for seed in range(runs)
    ]

    assert sum(agreement >= target for agreement, _ in outcomes) >= (1 - delta) * runs
    # At 80% agreement the proxy may answer about a quarter of the rows (more only where the rows it
    # keeps happen to agree more); the median run leaves it under half of that.
    kept = sorted(k for _, k in outcomes)
    assert kept[runs // 2] <= 125


def test_the_guarantee_holds_when_the_sure_rows_disagree_more_than_the_unsure_ones() -> None:
    """The draws favour unsure rows; the guarantee must not rest on their being the wrong ones. Here
    the confident 60% of rows disagree with the oracle on 12% and the rest on 8%."""
    target, delta, runs = 0.9, 0.1, 60
    met = 0
    for seed in range(runs):
        rng = random.Random(seed)
        scores: list[float | None] = [1.0 if i < 600 else 0.6 for i in range(1000)]
        agree = [rng.random() >= (0.12 if i < 600 else 0.08) for i in range(1000)]
        agreement, _ = _run(scores, agree, target, delta, seed)
        met += agreement >= target
    assert met >= (1 - delta) * runs


def test_every_row_keeps_a_chance_to_be_drawn() -> None:
    """The weighted test is exact only if no row's chance is zero (nor negative): a floor of 0 is
    refused, and confidences outside 0..1 still meet the target."""
    with pytest.raises(ValueError, match="weight_floor"):
        Settings(weight_floor=0.0)
    scores, agree = _synthetic(1000, 2, informative=True)
    stretched: list[float | None] = [None if s is None else 3 * s - 1 for s in scores]  # -1 to 2
    agreement, kept = _run(stretched, agree, 0.9, 0.1, 2)
    assert agreement >= 0.9 and kept > 0


def test_rows_the_proxy_could_not_answer_always_go_to_the_oracle() -> None:
    scores: list[float | None] = [1.0] * 500 + [None] * 100
    step = choose(scores, lambda pos: True, target=0.9, delta=0.1, seed=3)

    assert step.keep and not step.keep & set(range(500, 600))


def test_the_method_asks_for_oracle_answers_it_lacks_and_replays_the_same_draws() -> None:
    scores, agree = _synthetic(500, 1, informative=True)
    known: dict[int, bool] = {}
    rounds = 0
    while True:
        step = choose(scores, known.get, target=0.9, delta=0.1, seed=4)
        if not step.need:
            break
        rounds += 1
        assert len(step.need) <= 10 and not set(step.need) & set(known)
        known.update({pos: agree[pos] for pos in step.need})
    assert rounds > 1
    # Replayed with every answer known at once, the same decision and the same sample.
    again = choose(scores, lambda pos: agree[pos], target=0.9, delta=0.1, seed=4)
    assert (again.keep, again.sampled) == (step.keep, step.sampled)
    assert step.sampled == set(known)


def test_a_proxy_that_always_agrees_leaves_the_oracle_only_the_calibration_sample() -> None:
    share = perfect_proxy_share(2000, 0.95, 0.05, 0)
    assert 0 < share < 0.15


def test_a_threshold_still_worth_showing_is_not_given_up_after_50_draws() -> None:
    """A proxy that agrees with the oracle on 95% of rows, at a target of 90%: it could keep almost
    every row. The package's give-up rule (past 50 draws, mean minus one standard deviation under the
    share needed) stops at the first threshold the test has not decided by then, near half the rows;
    the method draws on while the evidence is good and the rows it would gain are worth the draws."""
    kept, met = [], 0
    for seed in range(20):
        rng = random.Random(seed)
        agree = [rng.random() < 0.95 for _ in range(2000)]
        step = choose([1.0] * 2000, agree.__getitem__, target=0.9, delta=0.1, seed=seed)
        kept.append(len(step.keep))
        met += sum(1 for pos in range(2000) if pos not in step.keep or agree[pos]) >= 1800
    assert met >= 18
    assert sorted(kept)[10] >= 1500


def test_the_thresholds_tested_are_n_over_50_rows_apart() -> None:
    step = choose([1.0] * 1000, lambda pos: True, target=0.9, delta=0.1, seed=0)

    kept = [t.kept for t in step.tested]
    assert kept[0] == 120  # the first 100 rows need no test: the other 900 alone reach 90%
    assert all(b - a == 20 for a, b in itertools.pairwise(kept)) and kept[-1] == 1000
