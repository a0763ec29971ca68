"""evals/stats.py against hand-worked numbers and brute-force enumeration."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from posttrain.errors import PosttrainError
from posttrain.evals.stats import (
    Interval,
    StatsError,
    bootstrap_interval,
    breakdown,
    maj_at_k,
    pass_at_k,
    wilson_interval,
)


def test_pass_at_k_hand_worked():
    # n=5, c=2. k=1: 1 - C(3,1)/C(5,1) = 1 - 3/5 = 0.4.
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-12)
    # k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7.
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)
    # k=3 = n-c: 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9.
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9, abs=1e-12)
    # n-c < k: every 4-subset of 5 holds one of the 2 correct samples.
    assert pass_at_k(5, 2, 4) == 1.0
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0


def test_pass_at_k_equals_binomial_form_and_is_stable():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 1, 10), (7, 6, 1)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    # C(2000, 1000) overflows a float; the product does not. With c=1, pass@k = k/n.
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5, rel=1e-12)
    exact = 1 - math.comb(1970, 1000) / math.comb(2000, 1000)  # exact int / int division
    assert pass_at_k(2000, 30, 1000) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1)])
def test_pass_at_k_rejects_impossible(n, c, k):
    with pytest.raises(StatsError):
        pass_at_k(n, c, k)


def _maj_brute(answers, correct, k):
    """Average over every k-subset of the vote's chance to pick ``correct`` (ties: 1/t)."""
    total = 0.0
    subsets = list(itertools.combinations(range(len(answers)), k))
    for idx in subsets:
        votes = Counter(answers[i] for i in idx if answers[i] is not None)
        if not votes or votes[correct] == 0:
            continue
        top = max(votes.values())
        if votes[correct] == top:
            total += 1 / sum(v == top for v in votes.values())
    return total / len(subsets)


def test_maj_at_k_hand_worked():
    # answers a, a, b with a correct. k=1: 2/3. k=3: a wins 2-1.
    # k=2: subsets {a,a} -> 1, {a,b} twice -> tie -> 1/2 each: (1 + 1/2 + 1/2) / 3 = 2/3.
    assert maj_at_k(["a", "a", "b"], "a", 1) == pytest.approx(2 / 3)
    assert maj_at_k(["a", "a", "b"], "a", 2) == pytest.approx(2 / 3)
    assert maj_at_k(["a", "a", "b"], "a", 3) == 1.0
    # a, b, c with a correct, k=3: three-way tie -> 1/3
    assert maj_at_k(["a", "b", "c"], "a", 3) == pytest.approx(1 / 3)
    # None never votes: {a, None} is won by a
    assert maj_at_k(["a", None], "a", 2) == 1.0
    assert maj_at_k([None, None], "a", 1) == 0.0


def test_maj_at_1_is_accuracy_and_matches_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 8)
        answers = [rng.choice(["x", "y", "z", None]) for _ in range(n)]
        assert maj_at_k(answers, "x", 1) == pytest.approx(answers.count("x") / n)
        for k in range(1, n + 1):
            assert maj_at_k(answers, "x", k) == pytest.approx(_maj_brute(answers, "x", k),
                                                              abs=1e-12), (answers, k)


def test_wilson_hand_worked():
    # 8/10, z=1.96: center = (0.8 + 0.19208) / 1.38416 = 0.71674,
    # half = 1.96 / 1.38416 * sqrt(0.016 + 0.009604) = 0.22658 -> (0.490, 0.943)
    iv = wilson_interval(8, 10)
    assert iv.value == 0.8 and iv.n == 10 and iv.method == "wilson"
    assert iv.low == pytest.approx(0.4902, abs=5e-4)
    assert iv.high == pytest.approx(0.9433, abs=5e-4)


def test_wilson_edges_keep_width_and_stay_in_unit_interval():
    # 0/10: low 0, high = z^2/n / (1 + z^2/n) = 0.38416 / 1.38416 = 0.2775
    zero = wilson_interval(0, 10)
    assert zero.low == 0.0 and zero.high == pytest.approx(0.2775, abs=1e-4)
    full = wilson_interval(10, 10)
    assert full.high == 1.0 and full.low == pytest.approx(1 - 0.2775, abs=1e-4)
    # a wider z gives a wider interval
    assert wilson_interval(8, 10, z=2.576).low < wilson_interval(8, 10).low


def test_wilson_rejects_no_items():
    with pytest.raises(StatsError, match="n=0"):
        wilson_interval(0, 0)
    with pytest.raises(PosttrainError):  # a user-facing error: the CLI prints one line
        wilson_interval(3, 2)


def test_bootstrap_seeded_and_sane():
    values = [0.1, 0.4, 0.35, 0.8, 0.55, 0.2, 0.9, 0.6]
    a = bootstrap_interval(values, seed=3)
    assert a == bootstrap_interval(values, seed=3)
    assert a != bootstrap_interval(values, seed=4)
    assert a.value == pytest.approx(sum(values) / len(values))
    assert min(values) <= a.low < a.value < a.high <= max(values)
    assert a.method == "bootstrap" and a.n == 8
    # no spread, no interval
    flat = bootstrap_interval([2.0] * 5)
    assert flat.low == flat.high == flat.value == 2.0
    # 0/1 values near a Wilson interval for a moderate n (both ~ p +- 1.96 sqrt(p(1-p)/n))
    coins = [1.0] * 60 + [0.0] * 40
    boot, wil = bootstrap_interval(coins, resamples=4000), wilson_interval(60, 100)
    assert boot.low == pytest.approx(wil.low, abs=0.02)
    assert boot.high == pytest.approx(wil.high, abs=0.02)
    with pytest.raises(StatsError):
        bootstrap_interval([])


def test_breakdown_per_category():
    cats = ["weapons", "privacy", "weapons", "privacy", "privacy"]
    ok = [True, False, True, True, False]
    table = breakdown(cats, ok)
    assert list(table) == ["privacy", "weapons"]
    assert table["privacy"] == wilson_interval(1, 3)
    assert table["weapons"].value == 1.0 and table["weapons"].n == 2
    assert table["privacy"].to_dict() == {"value": 1 / 3, "low": table["privacy"].low,
                                          "high": table["privacy"].high, "n": 3,
                                          "method": "wilson"}
    assert isinstance(table["weapons"], Interval)
    with pytest.raises(StatsError, match="'fraud' has no items"):
        breakdown(cats, ok, expected=["weapons", "fraud"])
    with pytest.raises(StatsError, match="one category per item"):
        breakdown(cats, ok[:-1])
