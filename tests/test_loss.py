"""Tests for cut.loss: the CUT objective, log1mexp and the chunked label log-probs.

The reference below is written from the method's description, not from cut/loss.py: a batch is a
list of rows, each row a list of per-token probabilities with a role, and every plain (Misalign-N)
row names the row of its judged context. It is evaluated with Python loops and `math.log`.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import nn

from cut.modeling import forward as forward_mod
from cut.modeling.forward import label_logprobs
from cut.training.loss import Role, cut_loss, log1mexp

FLOOR = 1e-5  # 1 - p is floored here before the log

# a row: (role, per-token probabilities, index of the judged row for Role.MISALIGN_N rows else None)
Row = tuple[int, list[float], "int | None"]


# --------------------------------------------------------------------------------------------
# naive reference over rows
# --------------------------------------------------------------------------------------------


def reference_cut(
    rows: list[Row],
    threshold=1.1,
    weight_unlike=1.0,
    combine="mean",
    gamma=0.0,
    marks=None,
    flag_source="ratio",
    weight_unflagged=1.0,
    weight_align_n=1.0,
):
    """Loss terms and d loss / d log p (per row) from the method's description, with loops.

    marks: {row index: [0/1 per token]} for plain rows whose record marks wrong text."""
    marks = marks or {}

    def flagged_token(r: int, t: int, p_x: float, p_j: float) -> bool:
        by_ratio = p_j / p_x > threshold
        if flag_source == "ratio" or r not in marks:
            return by_ratio
        return bool(marks[r][t]) or (flag_source == "both" and by_ratio)

    # each term is a weighted mean: (sum of weight * loss) / (sum of weight); a flagged token
    # weighs 1 (alpha scales its loss), an unflagged plain token weight_unflagged, a judged token
    # weight_align_n, a positive's token 1
    mle_terms, mle_w, ul_terms, ul_w, flags = [], [], [], [], []
    for r, (role, probs, partner) in enumerate(rows):
        if role in (Role.ALIGN_P, Role.ALIGN_N):
            w = weight_align_n if role == Role.ALIGN_N else 1.0
            for p in probs:
                mle_terms.append(-w * math.log(p))
                mle_w.append(w)
        else:
            judged = rows[partner][1]
            assert rows[partner][0] == Role.ALIGN_N and len(judged) == len(probs)
            for t, (p_x, p_j) in enumerate(zip(probs, judged, strict=True)):
                flag = flagged_token(r, t, p_x, p_j)
                flags.append(flag)
                if flag:
                    alpha = weight_unlike * p_j**gamma
                    ul_terms.append(-alpha * math.log(max(1.0 - p_x, FLOOR)))
                    ul_w.append(1.0)
                else:
                    ul_terms.append(-weight_unflagged * math.log(p_x))
                    ul_w.append(weight_unflagged)

    n_mle, n_ul = len(mle_terms), len(ul_terms)
    w_mle, w_ul = sum(mle_w), sum(ul_w)
    mle = sum(mle_terms) / w_mle if w_mle > 0 else 0.0
    ul = sum(ul_terms) / w_ul if w_ul > 0 else 0.0
    flagged = sum(flags) / n_ul if n_ul else 0.0
    if combine == "sum":
        loss, c_mle, c_ul = mle + ul, 1.0, 1.0
    elif w_mle > 0 and w_ul > 0:
        loss, c_mle, c_ul = (mle + ul) / 2, 0.5, 0.5
    else:  # one term (or none) present
        loss, c_mle, c_ul = mle + ul, 1.0, 1.0

    # gradient w.r.t. log p of every token; the ratio (and p_j^gamma) is a constant, so a judged
    # token gets only its MLE share. d/dlogp [-log(1 - p)] = p / (1 - p), 0 where floored.
    grads = []
    for r, (role, probs, partner) in enumerate(rows):
        if role in (Role.ALIGN_P, Role.ALIGN_N):
            w = weight_align_n if role == Role.ALIGN_N else 1.0
            grads.append([-c_mle * w / w_mle if w_mle > 0 else 0.0 for _ in probs])
        else:
            row = []
            for t, (p_x, p_j) in enumerate(zip(probs, rows[partner][1], strict=True)):
                if flagged_token(r, t, p_x, p_j):
                    alpha = weight_unlike * p_j**gamma
                    row.append(c_ul * alpha * p_x / (1.0 - p_x) / w_ul if 1.0 - p_x > FLOOR else 0.0)
                else:
                    row.append(-c_ul * weight_unflagged / w_ul if w_ul > 0 else 0.0)
            grads.append(row)
    return {
        "loss": loss,
        "mle": mle,
        "ul": ul,
        "flagged": flagged,
        "n_mle": n_mle,
        "n_ul": n_ul,
        "grads": grads,
    }


def flatten(rows: list[Row], dtype=torch.float32):
    """Rows -> the flat (logp, role, partner) tensors that cut_loss takes.

    Tokens are laid out row after row; a plain token t of a row whose judged row starts at
    offset o gets partner o + t. Other roles get partner -1 (ignored).
    """
    offsets, n = [], 0
    for _, probs, _ in rows:
        offsets.append(n)
        n += len(probs)
    logp, role, partner = [], [], []
    for r, (rl, probs, prt) in enumerate(rows):
        for t, p in enumerate(probs):
            logp.append(math.log(p))
            role.append(rl)
            partner.append(offsets[prt] + t if rl == Role.MISALIGN_N else -1)
        assert len(logp) == offsets[r] + len(probs)
    return (
        torch.tensor(logp, dtype=dtype).requires_grad_(),
        torch.tensor(role, dtype=torch.long),
        torch.tensor(partner, dtype=torch.long),
    )


def _flat(per_row: list[list[float]]) -> torch.Tensor:
    return torch.tensor([g for row in per_row for g in row], dtype=torch.float64)


def check_against_reference(rows, **kw):
    ref = reference_cut(rows, **kw)
    logp, role, partner = flatten(rows)
    out = cut_loss(logp, role, partner, **kw)
    for name in ("loss", "mle", "ul", "flagged"):
        got = getattr(out, name)
        assert torch.isfinite(got), name
        assert got.item() == pytest.approx(ref[name], rel=1e-5, abs=1e-6), name
    assert int(out.n_mle_tokens) == ref["n_mle"]
    assert int(out.n_ul_tokens) == ref["n_ul"]
    out.loss.backward()
    grad = logp.grad if logp.grad is not None else torch.zeros_like(logp)
    torch.testing.assert_close(grad.double(), _flat(ref["grads"]), rtol=1e-4, atol=1e-6)
    return ref


# --------------------------------------------------------------------------------------------
# 1. cut_loss against the reference
# --------------------------------------------------------------------------------------------

# positive  A: x -> y,      p = [1/2, 1/4]
# negative  J: (x, j) -> y, p = [0.8, 0.5, 0.4]
#           X: x -> y,      p = [0.4, 0.5, 0.5]   ratios J/X = [2.0, 1.0, 0.8]
# laid out X (0..2), A (3..4), J (5..7) so that a partner points forwards.
HAND_ROWS: list[Row] = [
    (Role.MISALIGN_N, [0.4, 0.5, 0.5], 2),
    (Role.ALIGN_P, [0.5, 0.25], None),
    (Role.ALIGN_N, [0.8, 0.5, 0.4], None),
]


def hand_tensors():
    logp = torch.tensor([0.4, 0.5, 0.5, 0.5, 0.25, 0.8, 0.5, 0.4]).log().requires_grad_()
    role = torch.tensor([2, 2, 2, 0, 0, 1, 1, 1])
    partner = torch.tensor([5, 6, 7, -1, -1, -1, -1, -1])
    return logp, role, partner


@pytest.mark.parametrize(
    "kw, loss, mle, ul",
    [
        # MLE over A and J: (ln 2 + ln 4 + ln 1.25 + ln 2 + ln 2.5) / 5 = ln(50) / 5 = 0.78240460
        # threshold 1.1 flags X_0 only (ratio 2.0; 1.0 and 0.8 are not > 1.1):
        # UL = (-ln(1 - 0.4) + ln 2 + ln 2) / 3 = ln(20/3) / 3 = 0.63237333
        # mean: (0.78240460 + 0.63237333) / 2 = 0.70738896;  sum: 1.41477793
        (dict(threshold=1.1), 0.7073889646904614, 0.7824046010856291, 0.6323733282952938),
        (dict(threshold=1.1, combine="sum"), 1.4147779293809228, 0.7824046010856291, 0.6323733282952938),
        # alpha = 0.5, gamma = 2: the flagged term is -0.5 * 0.8^2 * ln 0.6 = 0.16346420
        # UL = (0.16346420 + 2 ln 2) / 3 = 0.51658619; mean: (0.78240460 + 0.51658619) / 2
        (
            dict(threshold=1.1, weight_unlike=0.5, gamma=2.0),
            (0.7824046010856291 + 0.5165861869083359) / 2,
            0.7824046010856291,
            0.5165861869083359,
        ),
    ],
)
def test_hand_built_case(kw, loss, mle, ul):
    logp, role, partner = hand_tensors()
    out = cut_loss(logp, role, partner, **kw)
    assert out.loss.item() == pytest.approx(loss, rel=1e-6)
    assert out.mle.item() == pytest.approx(mle, rel=1e-6)
    assert out.ul.item() == pytest.approx(ul, rel=1e-6)
    assert out.flagged.item() == pytest.approx(1 / 3, rel=1e-6)
    assert int(out.n_mle_tokens) == 5 and int(out.n_ul_tokens) == 3
    # the reference, from rows, agrees on the same numbers
    ref = check_against_reference(HAND_ROWS, **kw)
    assert ref["loss"] == pytest.approx(loss, rel=1e-12)
    assert ref["flagged"] == pytest.approx(1 / 3)


def test_hand_built_threshold_is_strict():
    """At threshold 1.0 the ratio-1.0 token X_1 stays MLE; only X_0 is flagged. At 0.75 all three
    are flagged (ratios 2.0, 1.0, 0.8), and UL = -(ln 0.6 + ln 0.5 + ln 0.5) / 3 = ln(20/3) / 3
    - coincidentally the same numbers as at 1.1, so the flag fraction tells them apart."""
    logp, role, partner = hand_tensors()
    assert cut_loss(logp, role, partner, threshold=1.0).flagged.item() == pytest.approx(1 / 3)
    out = cut_loss(logp, role, partner, threshold=0.75)
    assert out.flagged.item() == pytest.approx(1.0)
    assert out.ul.item() == pytest.approx(math.log(20 / 3) / 3, rel=1e-6)
    check_against_reference(HAND_ROWS, threshold=0.75)


def _rand_p(rng: random.Random) -> float:
    kind = rng.random()
    if kind < 0.6:
        return rng.uniform(1e-3, 0.999)
    if kind < 0.8:
        return 1.0 - 10 ** -rng.uniform(1, 4)  # close to 1
    return 10 ** -rng.uniform(0.5, 4)  # small


def _plain_p(rng: random.Random, p_j: float, threshold: float) -> float:
    """A plain-context probability; ratios are kept away from the threshold (float32 rounding)
    except for exact ties p_x == p_j, whose ratio is exactly 1."""
    while True:
        kind = rng.random()
        if kind < 0.15:
            return p_j  # ratio exactly 1.0: not > 1.0
        if kind < 0.6:
            p_x = min(p_j / rng.uniform(0.3, 4.0), 0.9999)  # around the threshold
        else:
            p_x = _rand_p(rng)
        if abs(p_j / p_x / threshold - 1.0) > 1e-4:
            return p_x


def random_rows(rng: random.Random, threshold: float) -> list[Row]:
    entries = []  # (role, probs, key of judged row); shuffled, then keys become indices
    for _ in range(rng.randint(0, 3)):
        entries.append((Role.ALIGN_P, [_rand_p(rng) for _ in range(rng.randint(0, 5))], None))
    for k in range(rng.choice([0, 0, 1, 2, 3])):
        judged = [_rand_p(rng) for _ in range(rng.randint(0, 5))]  # 0 = an all-masked pair
        entries.append((Role.ALIGN_N, judged, ("j", k)))
        entries.append((Role.MISALIGN_N, [_plain_p(rng, p, threshold) for p in judged], ("x", k)))
    rng.shuffle(entries)
    where = {key: i for i, (_, _, key) in enumerate(entries) if key and key[0] == "j"}
    return [(r, probs, where[("j", key[1])] if r == Role.MISALIGN_N else None) for r, probs, key in entries]


@pytest.mark.parametrize(
    "combine, gamma, threshold, weight_unlike",
    list(itertools.product(["mean", "sum"], [0.0, 2.0], [1.0, 1.1, 2.0], [0.1, 1.0])),
)
def test_random_against_reference(combine, gamma, threshold, weight_unlike):
    rng = random.Random(f"{combine}-{gamma}-{threshold}-{weight_unlike}")
    seen = dict(flagged=0, unflagged=0, empty_row=0, no_neg=0, empty_batch=0)
    for _ in range(60):
        rows = random_rows(rng, threshold)
        ref = check_against_reference(
            rows, threshold=threshold, weight_unlike=weight_unlike, combine=combine, gamma=gamma
        )
        seen["flagged"] += round(ref["flagged"] * ref["n_ul"])
        seen["unflagged"] += ref["n_ul"] - round(ref["flagged"] * ref["n_ul"])
        seen["empty_row"] += any(not probs for _, probs, _ in rows)
        seen["no_neg"] += ref["n_ul"] == 0 and ref["n_mle"] > 0
        seen["empty_batch"] += ref["n_ul"] + ref["n_mle"] == 0
    # the trials did exercise every branch
    assert all(seen[k] > 0 for k in ("flagged", "unflagged", "empty_row", "no_neg")), seen


WEIGHTS = [
    {"weight_unflagged": 0.0},
    {"weight_unflagged": 0.5},
    {"weight_align_n": 0.0},
    {"weight_align_n": 0.5},
    {"weight_unflagged": 0.0, "weight_align_n": 0.0},
]


@pytest.mark.parametrize("combine", ["mean", "sum"])
@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda w: "-".join(f"{k}={v}" for k, v in w.items()))
def test_token_weights_against_reference(combine, weights):
    """A negative's unflagged plain-context tokens and its judged-context tokens weighted inside
    weighted means (0: the tokens are as if absent)."""
    rng = random.Random(f"weights-{combine}-{sorted(weights.items())}")
    for _ in range(40):
        check_against_reference(random_rows(rng, 1.1), combine=combine, **weights)


def test_weight_unflagged_zero_by_hand():
    # hand case: with 0, the plain row's unflagged tokens (ratios 1.0, 0.8) get no gradient at all
    logp, role, partner = flatten(HAND_ROWS)
    out = cut_loss(logp, role, partner, weight_unflagged=0.0)
    out.loss.backward()
    assert logp.grad[1].item() == 0.0 and logp.grad[2].item() == 0.0
    assert logp.grad[0].item() > 0  # the flagged token is pushed down
    # and the UL term is the mean over the flagged token alone: -log(1 - 0.4)
    assert out.ul.item() == pytest.approx(-math.log(0.6), rel=1e-6)


def test_weight_align_n_zero_by_hand():
    # hand case: with 0, no judged token gets a gradient, the plain row's still do
    logp, role, partner = flatten(HAND_ROWS)
    out = cut_loss(logp, role, partner, weight_align_n=0.0)
    out.loss.backward()
    judged = role == Role.ALIGN_N
    assert bool(judged.any()) and bool((logp.grad[judged] == 0).all())
    assert bool((logp.grad[role == Role.MISALIGN_N] != 0).any())
    assert out.flagged.item() > 0  # the ratio still uses the judged row's probabilities
    # a weight-0 token is as if absent: the positive's MLE keeps its own mean (not diluted by the
    # judged row's 3 tokens), and without the positive the loss is the UL term alone, not halved
    assert out.mle.item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
    no_pos = [(Role.MISALIGN_N, [0.4, 0.5, 0.5], 1), (Role.ALIGN_N, [0.8, 0.5, 0.4], None)]
    logp, role, partner = flatten(no_pos)
    out = cut_loss(logp, role, partner, weight_align_n=0.0)
    assert out.loss.item() == pytest.approx(out.ul.item(), rel=1e-6) and out.ul.item() > 0


@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_no_negatives(combine):
    """Two positives, p = [0.5, 0.25] and [0.8]: mean NLL = (ln 2 + ln 4 + ln 1.25) / 3 = ln(10) / 3."""
    rows: list[Row] = [(Role.ALIGN_P, [0.5, 0.25], None), (Role.ALIGN_P, [0.8], None)]
    logp, role, partner = flatten(rows)
    out = cut_loss(logp, role, partner, combine=combine)
    assert out.loss.item() == pytest.approx(math.log(10) / 3, rel=1e-6)
    assert out.loss.item() == out.mle.item()
    assert out.ul.item() == 0.0 and out.flagged.item() == 0.0
    assert int(out.n_ul_tokens) == 0
    # plain mean NLL, i.e. not halved
    torch.testing.assert_close(out.loss, -logp.mean())
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.full((3,), -1 / 3))
    check_against_reference(rows, combine=combine)


@pytest.mark.parametrize("combine", ["mean", "sum"])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_all_masked_batch(combine, gamma):
    """Zero target tokens (directly, and from rows that are all zero-length): finite zeros, and
    backward runs and gives an empty gradient."""
    for logp, role, partner in [
        (
            torch.zeros(0, requires_grad=True),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
        ),
        flatten([(Role.ALIGN_P, [], None), (Role.ALIGN_N, [], None), (Role.MISALIGN_N, [], 1)]),
    ]:
        out = cut_loss(logp, role, partner, combine=combine, gamma=gamma)
        for v in (out.loss, out.mle, out.ul, out.flagged):
            assert not torch.isnan(v) and v.item() == 0.0
        assert int(out.n_mle_tokens) == 0 and int(out.n_ul_tokens) == 0
        out.loss.backward()
        assert logp.grad is not None and logp.grad.shape == (0,)


def test_one_minus_p_floor():
    """A flagged token with p(y|x) = 1 (or 1 - 1e-7) costs -log(1e-5) = 11.5129, not inf, and
    its gradient is 0 (the floor is flat). threshold 0.5 so that a ratio of 1 flags."""
    logp = torch.tensor([0.0, math.log1p(-1e-7), 0.0, 0.0], requires_grad=True)
    role = torch.tensor([Role.MISALIGN_N, Role.MISALIGN_N, Role.ALIGN_N, Role.ALIGN_N])
    partner = torch.tensor([2, 3, -1, -1])
    out = cut_loss(logp, role, partner, threshold=0.5, combine="sum")
    assert out.flagged.item() == 1.0
    assert out.ul.item() == pytest.approx(-math.log(FLOOR), rel=1e-6)
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[:2].abs().max().item() == 0.0


def test_invalid_combine():
    logp, role, partner = hand_tensors()
    with pytest.raises(ValueError, match="combine"):
        cut_loss(logp, role, partner, combine="avg")


# --------------------------------------------------------------------------------------------
# 2. gradient direction and the detached ratio
# --------------------------------------------------------------------------------------------


def _logits_for(probs: list[float], vocab: int = 4) -> torch.Tensor:
    """One row of leaf logits per token; label 0 has probability p, the rest share 1 - p."""
    rows = [[math.log(p)] + [math.log((1 - p) / (vocab - 1))] * (vocab - 1) for p in probs]
    return torch.tensor(rows, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("combine", ["mean", "sum"])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("weight_unlike", [0.1, 1.0])
def test_sgd_step_direction(combine, gamma, weight_unlike):
    """positive [0.3, 0.6] (0, 1), judged [0.7, 0.2, 0.5] (2..4), plain [0.2, 0.4, 0.5] (5..7):
    ratios 3.5, 0.5, 1.0, so at threshold 1.1 only token 5 is flagged. One SGD step must lower
    p of token 5 and raise p of every other token."""
    probs = [0.3, 0.6, 0.7, 0.2, 0.5, 0.2, 0.4, 0.5]
    role = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    partner = torch.tensor([-1, -1, -1, -1, -1, 2, 3, 4])
    logits = _logits_for(probs)
    logp = torch.log_softmax(logits, -1)[:, 0]
    torch.testing.assert_close(logp.exp(), torch.tensor(probs, dtype=torch.float64))
    out = cut_loss(
        logp, role, partner, threshold=1.1, weight_unlike=weight_unlike, combine=combine, gamma=gamma
    )
    assert out.flagged.item() == pytest.approx(1 / 3)
    out.loss.backward()
    with torch.no_grad():
        p_new = torch.softmax(logits - 0.5 * logits.grad, -1)[:, 0]
    p_old = torch.tensor(probs, dtype=torch.float64)
    assert p_new[5] < p_old[5]
    up = [0, 1, 2, 3, 4, 6, 7]
    assert (p_new[up] > p_old[up]).all(), (p_new - p_old).tolist()


@pytest.mark.parametrize("combine", ["mean", "sum"])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_ratio_is_detached(combine, gamma):
    """The judged-context log-probs get gradient only from the MLE term. With gamma = 2 the
    flagged weight p(y|x,j)^2 would otherwise feed gradient into them, which the second half
    shows with an undetached version of the same loss."""
    logp0, role, partner = hand_tensors()
    logp = logp0.detach().requires_grad_()
    (g,) = torch.autograd.grad(cut_loss(logp, role, partner, combine=combine, gamma=gamma).loss, logp)

    mle_mask = role != Role.MISALIGN_N
    c = 1.0 if combine == "sum" else 0.5
    (g_mle,) = torch.autograd.grad(c * -logp[mle_mask].mean(), logp)
    # MLE tokens (positive 3, 4 and judged 5..7): exactly the MLE gradient, -c / 5
    torch.testing.assert_close(g[mle_mask], g_mle[mle_mask])
    torch.testing.assert_close(g[5:], torch.full((3,), -c / 5))
    assert (g[:3] != 0).all()  # the plain tokens do get the UL / MLE gradient

    # an undetached version gives the judged token 5 (partner of flagged token 0) extra gradient
    lp_x, lp_j = logp[:3], logp[partner[:3]]
    flag = (lp_j - lp_x).exp() > 1.1
    per_token = torch.where(flag, -(lp_j.exp() ** gamma) * log1mexp(lp_x), -lp_x)
    (g_und,) = torch.autograd.grad(c * (-logp[mle_mask].mean() + per_token.mean()), logp)
    torch.testing.assert_close(g_und[:3], g[:3])
    if gamma:
        # d/dlp_j [-(p_j^2) ln(0.6)] / 3 * c = -2 * 0.64 * ln(0.6) / 3 * c
        extra = -2 * 0.64 * math.log(0.6) / 3 * c
        assert g_und[5].item() == pytest.approx(g[5].item() + extra, rel=1e-5)
        assert not torch.allclose(g_und[5], g[5])


# --------------------------------------------------------------------------------------------
# 3. log1mexp
# --------------------------------------------------------------------------------------------


def _grid():
    # log-spaced from -30 to -1e-6, plus a linear sweep and the branch point ln(1/2)
    xs = (-torch.logspace(math.log10(30), -6, 600, dtype=torch.float64)).tolist()
    xs += torch.linspace(-30, -1e-6, 301, dtype=torch.float64).tolist()
    return sorted(set(xs + [-math.log(2)]))


def test_log1mexp_values():
    xs = _grid()
    got = log1mexp(torch.tensor(xs, dtype=torch.float64)).tolist()
    for x, y in zip(xs, got, strict=True):
        naive = math.log(max(1 - math.exp(x), FLOOR))  # 1 - p floored at 1e-5
        # math's 1 - exp(x) has ~1e-16 absolute error, which near x = -30 is all of the result
        assert y == pytest.approx(naive, rel=1e-9, abs=1e-14), x
        assert y == pytest.approx(max(math.log1p(-math.exp(x)), math.log(FLOOR)), rel=1e-12, abs=0), x
    # the floor is in effect near 0 only: 1 - p < 1e-5 <=> x > log(1 - 1e-5) ~ -1.000005e-5
    floored = [x for x, y in zip(xs, got, strict=True) if y == pytest.approx(math.log(FLOOR), rel=1e-12)]
    assert floored and min(floored) > math.log1p(-FLOOR) - 1e-12
    assert any(x < -1e-5 and y < math.log(FLOOR) * 0.5 for x, y in zip(xs, got, strict=True))  # not floored


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log1mexp_grad_finite(dtype):
    xs = _grid() + [0.0, -1e-9, -100.0, -1e4]
    x = torch.tensor(xs, dtype=dtype, requires_grad=True)
    y = log1mexp(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[xs.index(0.0)].item() == 0.0  # flat floor at p = 1, not nan
    if dtype == torch.float64:
        for xi, gi in zip(xs, x.grad.tolist(), strict=True):
            if 1 - math.exp(xi) > 2 * FLOOR:  # away from the floor: d/dx = -e^x / (1 - e^x)
                assert gi == pytest.approx(-math.exp(xi) / -math.expm1(xi), rel=1e-8, abs=1e-300), xi
            elif 1 - math.exp(xi) < FLOOR / 2:
                assert gi == 0.0, xi


# --------------------------------------------------------------------------------------------
# 4. label_logprobs
# --------------------------------------------------------------------------------------------

N, H, V = 10, 6, 11


def _softcap(t):
    return 2.0 * torch.tanh(t / 2.0)


class CountingHead(nn.Module):
    """nn.Linear that records how many rows each call sees."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin
        self.rows: list[int] = []

    def forward(self, h):
        self.rows.append(h.shape[0])
        return self.lin(h)


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(H, V)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(V, H, generator=g))
        lin.bias.copy_(torch.randn(V, generator=g))
    hidden = torch.randn(N, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    w_out = torch.randn(N, generator=g)  # random upstream gradient
    return lin, hidden, labels, w_out


def _naive(lin, hidden, labels, transform, dtype):
    W, b, h = lin.weight.to(dtype), lin.bias.to(dtype), hidden.to(dtype)
    logits = h @ W.T + b
    if transform is not None:
        logits = transform(logits)
    return torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, N + 5, 0])
@pytest.mark.parametrize("transform", [None, _softcap], ids=["plain", "softcap"])
def test_label_logprobs_matches_naive(chunk_size, transform):
    lin, hidden, labels, w_out = _setup()
    head = CountingHead(lin)

    h1 = hidden.clone().requires_grad_()
    out = label_logprobs(h1, head, labels, V, chunk_size=chunk_size, transform=transform)
    assert out.shape == (N,) and out.dtype == torch.float32
    (out * w_out).sum().backward()
    g_h, g_w, g_b = h1.grad, lin.weight.grad.clone(), lin.bias.grad.clone()
    lin.zero_grad()
    expected_chunk = chunk_size if chunk_size > 0 else N
    assert max(head.rows) == min(expected_chunk, N)  # forward and recompute in backward

    h2 = hidden.clone().requires_grad_()
    ref = _naive(lin, h2, labels, transform, torch.float32)
    (ref * w_out).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_h, h2.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_w, lin.weight.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_b, lin.bias.grad, rtol=0, atol=1e-5)

    # a float64 evaluation of the same function is within 1e-5 of the float32 chunked one
    ref64 = _naive(lin, hidden, labels, transform, torch.float64)
    torch.testing.assert_close(out.detach().double(), ref64.detach(), rtol=0, atol=1e-5)

    # without grad (no checkpointing) the values are the same
    with torch.no_grad():
        out_ng = label_logprobs(hidden, head, labels, V, chunk_size=chunk_size, transform=transform)
    torch.testing.assert_close(out_ng, out.detach(), rtol=0, atol=1e-6)


def test_label_logprobs_transform_matters():
    """The softcap actually changes the values (so the transform tests above can fail)."""
    lin, hidden, labels, _ = _setup()
    with torch.no_grad():
        a = label_logprobs(hidden, lin, labels, V, chunk_size=3)
        b = label_logprobs(hidden, lin, labels, V, chunk_size=3, transform=_softcap)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("budget, expected_chunk", [(3 * V, 3), (V - 1, 1)])
def test_label_logprobs_automatic_chunk(monkeypatch, budget, expected_chunk):
    """chunk_size=0 takes CHUNK_ELEMENTS // vocab_size rows, at least 1."""
    monkeypatch.setattr(forward_mod, "CHUNK_ELEMENTS", budget)
    lin, hidden, labels, _ = _setup()
    head = CountingHead(lin)
    out = label_logprobs(hidden, head, labels, V, chunk_size=0)
    assert max(head.rows) == expected_chunk
    with torch.no_grad():
        torch.testing.assert_close(out, _naive(lin, hidden, labels, None, torch.float32), rtol=0, atol=1e-5)


def test_label_logprobs_empty():
    lin, _, _, _ = _setup()
    out = label_logprobs(torch.zeros(0, H), lin, torch.zeros(0, dtype=torch.long), V)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("flag_source", ["ratio", "spans", "both"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_span_flags_against_reference(flag_source, seed):
    """Span flags: the marked tokens of records with spans; the ratio for records without."""
    g = torch.Generator().manual_seed(seed)

    def probs(n):
        return (torch.rand(n, generator=g) * 0.9 + 0.05).tolist()

    rows: list[Row] = [(Role.ALIGN_P, probs(3), None)]
    marks, span = {}, [-1] * 3
    for k, n in enumerate((5, 4, 6)):
        rows.append((Role.ALIGN_N, probs(n), None))
        rows.append((Role.MISALIGN_N, probs(n), len(rows) - 1))
        span += [-1] * n
        if k != 1:  # the middle negative marks no span: it falls back to the ratio
            marks[len(rows) - 1] = (torch.rand(n, generator=g) < 0.4).long().tolist()
            span += marks[len(rows) - 1]
        else:
            span += [-1] * n
    ref = reference_cut(rows, 1.1, 1.0, marks=marks, flag_source=flag_source)
    logp, role, partner = flatten(rows)
    out = cut_loss(logp, role, partner, 1.1, 1.0, span=torch.tensor(span), flag_source=flag_source)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref["loss"], rel=1e-5)
    assert out.flagged.item() == pytest.approx(ref["flagged"])
    grads = [g for row in ref["grads"] for g in row]
    torch.testing.assert_close(logp.grad, torch.tensor(grads), rtol=1e-4, atol=1e-6)
    if flag_source == "ratio":  # spans are ignored: the paper's objective
        assert out.loss.item() == pytest.approx(cut_loss(logp, role, partner, 1.1, 1.0).loss.item())


def test_invalid_flag_source():
    logp, role, partner = flatten([(Role.ALIGN_P, [0.5], None)])
    with pytest.raises(ValueError, match="flag_source"):
        cut_loss(logp, role, partner, flag_source="quotes")


# --------------------------------------------------------------------------------------------
# unlikelihood "npo": a per-token negative-preference loss anchored to a reference model
# --------------------------------------------------------------------------------------------


def reference_npo(plain, judged_p, ref_p, positives, marks, weight_unlike, beta, weight_unflagged, threshold):
    """Loss and d loss / d log p with loops, for one negative (plain probs `plain`, judged probs
    `judged_p`, reference probs `ref_p`, `marks` 0/1 per token or None) and one positive row,
    combine "sum", judged tokens at weight_align_n 0 (they only feed the ratio).

    flagged token:   alpha * (2 / beta) * log(1 + (p / p_ref)^beta)
                     d/dlogp = alpha * 2 * (p/p_ref)^beta / (1 + (p/p_ref)^beta)
    unflagged token: -weight_unflagged * log p;  d/dlogp = -weight_unflagged
    each divided by the term's weight (flagged tokens weigh 1)."""
    terms, weights, grads = [], [], []
    for t, (p, pj, pr) in enumerate(zip(plain, judged_p, ref_p, strict=True)):
        flag = bool(marks[t]) if marks is not None else pj / p > threshold
        if flag:
            q = (p / pr) ** beta
            terms.append(weight_unlike * (2 / beta) * math.log(1 + q))
            grads.append(weight_unlike * 2 * q / (1 + q))
            weights.append(1.0)
        else:
            terms.append(-weight_unflagged * math.log(p))
            grads.append(-weight_unflagged)
            weights.append(weight_unflagged)
    w = sum(weights)
    ul = sum(terms) / w if w else 0.0
    mle = -sum(math.log(p) for p in positives) / len(positives)
    return mle + ul, [g / w if w else 0.0 for g in grads], [-1 / len(positives)] * len(positives)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("use_marks", [False, True])
def test_npo_against_reference(seed, beta, use_marks):
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    plain = [rng.uniform(0.001, 0.99) for _ in range(n)]
    judged = [min(0.999, p * rng.choice([0.5, 1.0, 1.5, 3.0])) for p in plain]
    ref = [rng.uniform(0.001, 0.99) for _ in range(n)]
    positives = [rng.uniform(0.05, 0.95) for _ in range(3)]
    marks = [rng.randint(0, 1) for _ in range(n)] if use_marks else None
    weight_unlike, weight_unflagged = rng.choice([0.5, 1.0, 2.0]), rng.choice([0.0, 1.0])
    want, g_plain, g_pos = reference_npo(
        plain, judged, ref, positives, marks, weight_unlike, beta, weight_unflagged, 1.1
    )
    # layout: plain (0..n-1), positive (n..n+2), judged (n+3..)
    logp = torch.tensor([math.log(p) for p in plain + positives + judged], requires_grad=True)
    role = torch.tensor([Role.MISALIGN_N] * n + [Role.ALIGN_P] * 3 + [Role.ALIGN_N] * n)
    partner = torch.tensor([n + 3 + t for t in range(n)] + [-1] * (3 + n))
    ref_logp = torch.tensor([math.log(p) for p in ref] + [0.0] * (3 + n))
    span = torch.tensor((marks or [-1] * n) + [-1] * (3 + n)) if use_marks else None
    out = cut_loss(
        logp,
        role,
        partner,
        threshold=1.1,
        weight_unlike=weight_unlike,
        combine="sum",
        span=span,
        flag_source="spans" if use_marks else "ratio",
        weight_unflagged=weight_unflagged,
        weight_align_n=0.0,
        unlikelihood="npo",
        ref_logp=ref_logp,
        npo_beta=beta,
    )
    assert out.loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    out.loss.backward()
    expect = torch.tensor(g_plain + g_pos + [0.0] * n, dtype=torch.float64)
    torch.testing.assert_close(logp.grad.double(), expect, rtol=1e-4, atol=1e-6)


def test_npo_by_hand():
    """One flagged token at p = p_ref: loss (2/beta) log 2, gradient in log p = 1 whatever p is
    (the paper's -log(1 - p) would give p / (1 - p): 0.0101 at p = 0.01)."""
    for p in (0.01, 0.5):
        logp = torch.tensor([math.log(p), math.log(0.3)], requires_grad=True)
        role = torch.tensor([Role.MISALIGN_N, Role.ALIGN_N])
        out = cut_loss(
            logp,
            role,
            torch.tensor([1, -1]),
            threshold=1.1,  # ratio 0.3 / p: flagged at p = 0.01 only
            span=torch.tensor([1, -1]),
            flag_source="spans",
            weight_align_n=0.0,
            unlikelihood="npo",
            ref_logp=torch.tensor([math.log(p), 0.0]),
            npo_beta=2.0,
        )
        assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
        out.loss.backward()
        assert logp.grad[0].item() == pytest.approx(1.0, rel=1e-6)
        assert logp.grad[1].item() == 0.0


def test_npo_fades_below_reference_and_needs_ref():
    """Once the token is 5 nats under the reference (beta 1) its push is 2 sigmoid(-5) = 0.013."""
    logp = torch.tensor([math.log(0.2) - 5.0, math.log(0.5)], requires_grad=True)
    kw = dict(span=torch.tensor([1, -1]), flag_source="spans", weight_align_n=0.0, unlikelihood="npo")
    out = cut_loss(
        logp, torch.tensor([2, 1]), torch.tensor([1, -1]), ref_logp=torch.tensor([math.log(0.2), 0.0]), **kw
    )
    out.loss.backward()
    assert logp.grad[0].item() == pytest.approx(2 / (1 + math.exp(5)), rel=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        cut_loss(logp, torch.tensor([2, 1]), torch.tensor([1, -1]), **kw)


def test_unpaired_negative_uses_spans_only():
    """partner -1 (the judged sequence left out): the spans decide, no ratio is read."""
    logp = torch.tensor([math.log(0.4), math.log(0.5), math.log(0.5)], requires_grad=True)
    role = torch.tensor([Role.MISALIGN_N] * 3)
    out = cut_loss(
        logp,
        role,
        torch.tensor([-1, -1, -1]),
        span=torch.tensor([1, 0, 1]),
        flag_source="spans",
        weight_unflagged=0.0,
        weight_align_n=0.0,
    )
    want = -(math.log(0.6) + math.log(0.5)) / 2
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert out.flagged.item() == pytest.approx(2 / 3)


def test_loss_config_is_cut_loss_with_its_settings_and_reads_train_config():
    """CUTLossConfig binds cut_loss's settings once: calling it is cut_loss with those settings;
    from_train takes every one from the TrainConfig field of the same name."""
    import dataclasses

    from cut.training.config import TrainConfig
    from cut.training.loss import CUTLossConfig

    logp = torch.log(torch.tensor([0.5, 0.4, 0.2, 0.3]))
    role, partner = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 0, 1, 1])
    settings = dict(threshold=1.2, weight_unlike=0.5, combine="sum", gamma=1.0, weight_unflagged=0.5)
    got = CUTLossConfig(**settings)(logp, role, partner)
    assert got.loss.item() == pytest.approx(cut_loss(logp, role, partner, **settings).loss.item())
    cfg = TrainConfig(threshold=2.0, weight_unlike=0.3, unlikelihood="npo", npo_beta=2.0, misalign=False)
    loss = CUTLossConfig.from_train(cfg)
    assert {f.name: getattr(loss, f.name) for f in dataclasses.fields(loss)} == {
        f.name: getattr(cfg, f.name) for f in dataclasses.fields(loss)
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        loss.threshold = 1.0  # type: ignore[misc]
