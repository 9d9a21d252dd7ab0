"""cut.evaluation.stats against a separately written reference: the two-sided binomial test."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction
from math import comb

import pytest

from cut.evaluation.stats import mcnemar_exact


def binomial_two_sided(k: int, n: int) -> float:
    """Sum the probabilities of every outcome no more likely than k (Binomial(n, 1/2)), exactly."""
    probs = [Fraction(comb(n, i), 2**n) for i in range(n + 1)]
    return float(min(Fraction(1), sum(p for p in probs if p <= probs[k])))


@pytest.mark.parametrize("only_a,only_b", list(itertools.product(range(9), range(9))))
def test_mcnemar_matches_the_binomial_test(only_a, only_b):
    a = [True] * only_a + [False] * only_b + [True] * 5 + [False] * 3
    b = [False] * only_a + [True] * only_b + [True] * 5 + [False] * 3
    rng = random.Random(only_a * 31 + only_b)
    order = list(range(len(a)))
    rng.shuffle(order)
    res = mcnemar_exact([a[i] for i in order], [b[i] for i in order])
    assert (res["only_a"], res["only_b"]) == (only_a, only_b)
    expected = 1.0 if only_a + only_b == 0 else binomial_two_sided(only_a, only_a + only_b)
    assert res["p_value"] == pytest.approx(expected, rel=1e-12)


def test_known_values_and_errors():
    # 11 lost, 6 gained (the arithmetic loop's README figure): p = 0.332
    res = mcnemar_exact([True] * 6 + [False] * 11, [False] * 6 + [True] * 11)
    assert res["p_value"] == pytest.approx(0.3323, abs=1e-4)
    assert mcnemar_exact([True] * 10, [False] * 10)["p_value"] == pytest.approx(2 / 1024)
    with pytest.raises(ValueError, match="pair up"):
        mcnemar_exact([True], [True, False])
