"""Statistics of an evaluation: sampling estimators and confidence intervals.

    pass@k     unbiased estimate of "at least one of k samples is correct" from n >= k samples
               (Chen et al. 2021, eq. 1)
    maj@k      expected accuracy of a majority vote over k of the n samples, exact
    Wilson     score interval of a proportion (Wilson 1927); right at 0/n and n/n, where the
               normal ("Wald") interval collapses to a point
    bootstrap  percentile interval of a mean (Efron 1979), seeded
    breakdown  a rate and its Wilson interval per category

Every interval is an ``Interval`` whose ``to_dict()`` is what ``eval.json`` stores for a rate,
``{"value", "low", "high", "n", "method"}``, and what ``posttrain gate`` reads.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction

from posttrain.errors import PosttrainError


class StatsError(PosttrainError, ValueError):
    """A statistic asked of data that cannot give it (no items, more correct than samples)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval over ``n`` items."""

    value: float
    low: float
    high: float
    n: int
    method: str

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1):

        pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)

    The product never builds the binomials (C(200, 100) overflows a float). When n - c < k
    every k-subset holds a correct sample, so pass@k = 1. Average over problems for a suite.
    Example: n=5, c=2 -> pass@1 = 0.4, pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7.
    """
    if not 0 <= c <= n:
        raise StatsError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise StatsError(f"pass@k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_k(answers: Sequence[Hashable | None], correct: Hashable, k: int) -> float:
    """maj@k for one problem: the probability that a majority vote over a uniformly random
    k-subset of the ``n`` sampled ``answers`` (without replacement) equals ``correct``.

    A vote is won by the answer drawn most often; a tie among t answers is broken uniformly
    at random (the correct one wins it with probability 1/t). ``None`` (no answer could be
    parsed) takes a draw but never votes. Exactly, with x the draws of the correct answer:

        maj@k = sum_x sum_t P(x correct draws, every other answer drawn <= x times,
                              t of them exactly x times) / (t + 1),   x >= 1

    counted by a dynamic programme over the other answers' draw counts, so it is the
    unbiased estimate of maj@k from n >= k samples, as pass@k is of pass@k (using only the
    first k samples would throw the rest away). maj@1 is the plain accuracy c/n.
    """
    n = len(answers)
    if not 1 <= k <= n:
        raise StatsError(f"maj@k needs 1 <= k <= n, got n={n}, k={k}")
    counts = Counter(a for a in answers if a is not None)
    c = counts.pop(correct, 0)
    others = list(counts.values())
    abstain = n - c - sum(others)
    won = Fraction(0)
    for x in range(1, min(c, k) + 1):
        for t, ways in _tied_ways(others, abstain, x, k - x).items():
            won += Fraction(math.comb(c, x) * ways, t + 1)
    return float(won / math.comb(n, k))


def _tied_ways(others: list[int], abstain: int, x: int, draws: int) -> dict[int, int]:
    """Ways to take ``draws`` items from the other answers (sizes ``others``) and the
    abstentions, every answer drawn at most ``x`` times; keyed by how many are drawn
    exactly ``x`` times (the ties). ways[s][t]: s draws so far, t ties so far."""
    ways: list[dict[int, int]] = [{} for _ in range(draws + 1)]
    for j in range(min(abstain, draws) + 1):  # abstentions never vote: any count is allowed
        ways[j][0] = math.comb(abstain, j)
    for m in others:
        nxt: list[dict[int, int]] = [{} for _ in range(draws + 1)]
        for s, by_t in enumerate(ways):
            for t, w in by_t.items():
                for j in range(min(m, x, draws - s) + 1):
                    t2 = t + (j == x)
                    nxt[s + j][t2] = nxt[s + j].get(t2, 0) + w * math.comb(m, j)
        ways = nxt
    return ways[draws]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> Interval:
    """Wilson score interval of a proportion p = successes / n (z = 1.96: 95%):

        center = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    The interval is [center - half, center + half]; ``value`` is p itself. Unlike the Wald
    interval p +- z sqrt(p(1-p)/n) it keeps a width at p = 0 or 1 and stays inside [0, 1].
    Example: 8/10 -> (0.490, 0.943).
    """
    if n <= 0:
        raise StatsError(f"a rate needs at least one item, got n={n}")
    if not 0 <= successes <= n:
        raise StatsError(f"a rate needs 0 <= successes <= n, got {successes}/{n}")
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # clamp: at p = 0 or 1 the bound equals 0 or 1 up to rounding
    return Interval(p, max(0.0, center - half), min(1.0, center + half), n, "wilson")


def bootstrap_interval(values: Sequence[float], *, confidence: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of ``values`` (Efron 1979): draw
    ``resamples`` resamples of size n with replacement, take each one's mean, and report the
    (1-confidence)/2 and (1+confidence)/2 quantiles of those means. Seeded, so the same
    values and seed give the same interval. For non-binary scores (RM scores, judge grades);
    a 0/1 rate should use ``wilson_interval``."""
    import numpy as np

    if len(values) == 0:
        raise StatsError("a bootstrap interval needs at least one value, got none")
    if not 0 < confidence < 1 or resamples < 1:
        raise StatsError(f"bootstrap needs 0 < confidence < 1 and resamples >= 1, got "
                         f"confidence={confidence}, resamples={resamples}")
    x = np.asarray(values, dtype=np.float64)  # (n,)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[idx].mean(axis=1)  # (resamples,)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(float(x.mean()), float(low), float(high), len(x), "bootstrap")


def breakdown(categories: Sequence[str], successes: Sequence[bool], *, z: float = 1.96,
              expected: Sequence[str] | None = None) -> dict[str, Interval]:
    """The rate of ``successes`` per category (item i is in ``categories[i]``), each with its
    Wilson interval, sorted by category name. Every name in ``expected`` must have items: an
    empty category would otherwise vanish from the table instead of showing as missing."""
    if len(categories) != len(successes):
        raise StatsError(f"breakdown needs one category per item, got {len(categories)} "
                         f"categories for {len(successes)} items")
    n, k = Counter(categories), Counter(c for c, ok in zip(categories, successes, strict=True)
                                           if ok)
    empty = [c for c in expected or () if n[c] == 0]
    if empty:
        raise StatsError(f"category {empty[0]!r} has no items")
    return {c: wilson_interval(k[c], n[c], z) for c in sorted(n)}
