"""Paired comparisons of two models on the same held-out prompts."""

from __future__ import annotations

from collections.abc import Sequence
from math import comb


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float | int]:
    """Exact (binomial) McNemar test of two models' per-prompt pass/fail on the same prompts.

    only_a: prompts model a passes and b fails; only_b: the reverse. Under the null hypothesis the
    discordant prompts split like a fair coin, so the two-sided p-value is
    min(1, 2 * P(X <= min(only_a, only_b))) for X ~ Binomial(only_a + only_b, 1/2); 1 when none differ.
    """
    if len(a) != len(b):
        raise ValueError(f"mcnemar_exact: {len(a)} and {len(b)} results; they must pair up")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    if n == 0:
        return {"only_a": 0, "only_b": 0, "p_value": 1.0}
    tail = sum(comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return {"only_a": only_a, "only_b": only_b, "p_value": min(1.0, 2 * tail)}
