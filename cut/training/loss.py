"""The CUT objective as pure functions of per-token log-probs (Xu et al., arXiv 2312.14591).

The model never appears here: the trainer runs one forward over all sequences of a micro-batch,
gathers the hidden state that predicts each target token, and hands this module a flat vector of
target tokens. Each target token has a role:

    ALIGN_P     x -> y for a positive record              MLE
    ALIGN_N     (x, j) -> y for a negative record          MLE
    MISALIGN_N  x -> y for a negative record               UL where the judgment explains the token,
                                                           MLE elsewhere

and every MISALIGN_N token names its `partner`: the index of the same response token in the
judged context, so p(y_t|x,j) / p(y_t|x) is one subtraction of log-probs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

from cut.data.pairs import Role  # the roles the collator assigns (see the module docstring)

COMBINES = ("mean", "sum")
FLAG_SOURCES = ("ratio", "spans", "both")
UNLIKELIHOODS = ("ul", "npo")

# 1 - p is floored here before the log, as the released code nudges exact zeros by 1e-5
ONE_MINUS_P_FLOOR = 1e-5


class CUTLoss(NamedTuple):
    loss: Tensor  # scalar, carries the gradient
    mle: Tensor  # mean -log p over Role.ALIGN_P and Role.ALIGN_N tokens (detached)
    ul: Tensor  # mean Misalign-N term over Role.MISALIGN_N tokens (detached); 0 without negatives
    flagged: Tensor  # fraction of Role.MISALIGN_N tokens flagged as inappropriate (detached)
    n_mle_tokens: Tensor
    n_ul_tokens: Tensor


@dataclass(frozen=True)
class CUTLossConfig:
    """The objective's settings, bound once (cut.train builds it from TrainConfig with
    `from_train`): the trainer hands it tensors only. A new loss setting is a field here and the
    TrainConfig field of the same name. misalign is read by the collator (it drops the Misalign-N
    sequences), the rest by `cut_loss`. Defaults are `cut_loss`'s."""

    threshold: float = 1.1
    weight_unlike: float = 1.0
    combine: str = "mean"
    gamma: float = 0.0
    flag_source: str = "ratio"
    weight_unflagged: float = 1.0
    weight_align_n: float = 1.0
    unlikelihood: str = "ul"
    npo_beta: float = 1.0
    misalign: bool = True

    @classmethod
    def from_train(cls, cfg: Any) -> CUTLossConfig:
        """The loss settings of a TrainConfig (its fields of the same names)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    def __call__(
        self,
        logp: Tensor,
        role: Tensor,
        partner: Tensor,
        span: Tensor | None = None,
        ref_logp: Tensor | None = None,
    ) -> CUTLoss:
        """`cut_loss` with these settings."""
        settings = asdict(self)
        del settings["misalign"]  # the collator's: no Misalign-N token reaches the loss without it
        return cut_loss(logp, role, partner, span=span, ref_logp=ref_logp, **settings)


def log1mexp(logp: Tensor) -> Tensor:
    """log(1 - exp(logp)) for logp <= 0, accurate at both ends (Maechler 2012), 1-p floored."""
    ln_half = -0.6931471805599453
    near_one = (-torch.expm1(logp)).clamp_min(ONE_MINUS_P_FLOOR).log()  # p > 1/2
    small = torch.log1p(-torch.exp(logp.clamp_max(ln_half)))  # p <= 1/2; clamped so no nan grad
    return torch.where(logp > ln_half, near_one, small)


def cut_loss(
    logp: Tensor,
    role: Tensor,
    partner: Tensor,
    threshold: float = 1.1,
    weight_unlike: float = 1.0,
    combine: str = "mean",
    gamma: float = 0.0,
    span: Tensor | None = None,
    flag_source: str = "ratio",
    weight_unflagged: float = 1.0,
    weight_align_n: float = 1.0,
    unlikelihood: str = "ul",
    ref_logp: Tensor | None = None,
    npo_beta: float = 1.0,
) -> CUTLoss:
    """CUT loss over a flat vector of target tokens.

    logp:    (N,) float, log p(y_t | context) of each target token
    role:    (N,) long, Role.ALIGN_P / Role.ALIGN_N / Role.MISALIGN_N
    partner: (N,) long, for Role.MISALIGN_N tokens the index of the same token in the judged context
             (ignored for other roles)
    combine: "mean" reproduces the released code: (MLE + UL) / 2 when the micro-batch holds a
             negative, MLE alone otherwise. "sum" is the paper's objective, MLE + UL.
    gamma:   weights the unlikelihood of a flagged token by p(y_t|x,j)^gamma (detached); 0 = off.
    span:    (N,) long, for MISALIGN_N tokens 1 inside the record's marked wrong text, 0 outside,
             -1 when the record marks none; None = no record marks any.
    flag_source: which tokens get the unlikelihood: "ratio" (the paper: ratio > threshold),
             "spans" (the tokens inside the marked text; the ratio for records without spans),
             "both" (either).
    weight_unflagged: weight of the MLE on a negative's unflagged plain-context tokens (Eq. 6's
             "-log p elsewhere"); 1 = the paper, 0 = a negative's plain context trains its flagged
             tokens only.
    weight_align_n: weight of the MLE on a negative's judged-context tokens (Align-N); 1 = the
             paper, 0 = the judged context only supplies p(y_t|x,j) for the ratio.
    unlikelihood: what a flagged token gets. "ul" is the paper's -alpha * log(1 - p(y_t|x)), whose
             gradient in log p is alpha * p / (1 - p): it vanishes on tokens the model already finds
             unlikely. "npo" is a per-token negative-preference loss anchored to a reference model
             (Zhang et al. 2024, NPO, Eq. 3 applied per token):
             alpha * (2 / beta) * log(1 + (p(y_t|x) / p_ref(y_t|x))^beta); its gradient in log p is
             alpha * 2 * sigmoid(beta * log(p / p_ref)), 1 at the start whatever p is, and it fades
             once the token has fallen a few 1/beta nats below the reference.
    ref_logp: (N,) float, log p_ref(y_t|x) of each target token under the reference model (only
             read on Role.MISALIGN_N tokens; required for "npo").
    npo_beta: beta of "npo".
    Both weight tokens in a weighted mean: a token of weight w counts w times in its term's sum
    and in its count, so at 0 it is as if it were not there (the other tokens keep the scale they
    have in a batch without it) and at 1 the paper's means are unchanged. A flagged token counts
    once; alpha scales its loss only.
    """
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if flag_source not in FLAG_SOURCES:
        raise ValueError(f"flag_source must be one of {FLAG_SOURCES}, got {flag_source!r}")
    if unlikelihood not in UNLIKELIHOODS:
        raise ValueError(f"unlikelihood must be one of {UNLIKELIHOODS}, got {unlikelihood!r}")
    if unlikelihood == "npo" and ref_logp is None:
        raise ValueError("unlikelihood 'npo' needs ref_logp, the reference model's log-probs")
    logp = logp.float()
    mle_mask = role != Role.MISALIGN_N
    ul_mask = role == Role.MISALIGN_N
    zero = logp.sum() * 0.0  # keeps the graph connected when a part is empty

    n_mle = mle_mask.sum()
    has_mle = has_ul = False  # a term whose tokens all weigh 0 is absent, as if it had none
    if bool(n_mle):  # Eq. 4 / Eq. 5
        weight = torch.where(role[mle_mask] == Role.ALIGN_N, weight_align_n, 1.0).to(logp.dtype)
        mle = -(logp[mle_mask] * weight).sum() / weight.sum().clamp_min(1e-12)
        has_mle = bool(weight.sum() > 0)
    else:
        mle = zero

    n_ul = ul_mask.sum()
    if bool(n_ul):
        lp_plain = logp[ul_mask]  # log p(y_t | x)
        # partner -1: the record's judged context was left out (its spans decide, see CUTCollator)
        paired = partner[ul_mask] >= 0
        lp_judged = torch.where(paired, logp[partner[ul_mask].clamp_min(0)], lp_plain)  # log p(y_t | x, j)
        ratio = (lp_judged - lp_plain).detach().exp()
        flag = (ratio > threshold) & paired  # the judgment explains the token: it is the inappropriate one
        if span is not None and flag_source != "ratio":
            marked, has_spans = span[ul_mask] == 1, span[ul_mask] >= 0
            flag = flag | marked if flag_source == "both" else torch.where(has_spans, marked, flag)
        scale = weight_unlike * (lp_judged.detach().exp() ** gamma if gamma else 1.0)
        if unlikelihood == "npo":  # NPO per token: (2 / beta) * softplus(beta * log(p / p_ref))
            log_ratio = lp_plain - ref_logp[ul_mask].float().detach()
            push = (2.0 / npo_beta) * torch.nn.functional.softplus(npo_beta * log_ratio)
        else:  # Eq. 6: -log(1 - p(y_t|x))
            push = -log1mexp(lp_plain)
        # Eq. 6: alpha * push on flagged tokens, -log p(y_t|x) elsewhere
        per_token = torch.where(flag, scale * push, -weight_unflagged * lp_plain)
        count = torch.where(flag, 1.0, weight_unflagged).to(logp.dtype)
        ul = per_token.sum() / count.sum().clamp_min(1e-12)
        has_ul = bool(count.sum() > 0)
        flagged = flag.float().mean()
    else:
        ul, flagged = zero, zero.detach()

    if combine == "sum":
        loss = mle + ul
    else:  # the released code's mean of the two terms where both are present
        loss = (mle + ul) / 2 if has_mle and has_ul else mle + ul
    return CUTLoss(loss, mle.detach(), ul.detach(), flagged.detach(), n_mle, n_ul)
