"""cut.analysis.tds: ranks, classes and KL against a float64 reference written apart, the chunked
path against the unchunked one, two tiny models against their own full forwards, the same model
twice (all unshifted, KL 0), the report by hand, named errors, the CLI's files, the page in a real
browser, and peak memory flat in the vocabulary size (measured in a subprocess)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cut.analysis import tds
from cut.errors import ConfigError, DataError
from cut.modeling.tiny import build_tiny_model

from conftest import REPO
from helpers import dump_dom, needs_chromium

# ---------------------------------------------------------------- a reference written apart


def reference_shift(zb: torch.Tensor, za: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Per row, from full log-softmaxes in float64: ranks by sorting, KL as an explicit sum."""
    out = []
    for b, a, y in zip(zb.double(), za.double(), labels.tolist(), strict=True):
        lb, la = torch.log_softmax(b, 0).tolist(), torch.log_softmax(a, 0).tolist()
        by_base = sorted(range(len(b)), key=lambda v: -float(b[v]))
        by_aligned = sorted(range(len(a)), key=lambda v: -float(a[v]))
        kl = sum(math.exp(la[v]) * (la[v] - lb[v]) for v in range(len(a)))
        out.append(
            {
                "base_rank": by_base.index(y) + 1,
                "aligned_rank": by_aligned.index(y) + 1,
                "base_logp": lb[y],
                "aligned_logp": la[y],
                "kl": kl,
                "base_top": by_base[0],
            }
        )
    return out


def assert_matches_reference(shift: tds.Shift, ref: list[dict], tol: float = 1e-5) -> None:
    for name in ("base_rank", "aligned_rank", "base_top"):
        assert getattr(shift, name).tolist() == [r[name] for r in ref], name
    for name in ("base_logp", "aligned_logp", "kl"):
        expect = torch.tensor([r[name] for r in ref], dtype=torch.float64)
        torch.testing.assert_close(getattr(shift, name).double(), expect, rtol=tol, atol=tol, msg=name)


# ---------------------------------------------------------------- the core on hand-built logits


def test_shift_stats_by_hand():
    """Row 0: base uniform over 2 of the tokens, aligned 3:1 on token 0, label 0.
        base rank of 0: 1 (a tie counts for the label); p_base = 1/2 (the other two tokens ~0);
        KL = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 0.75 ln 1.5 - 0.25 ln 2 = 0.130812.
    Rows 1..4: base logits 4, 3, 2, 1, 0 over tokens 0..4 and label k: base rank k + 1, so the
    classes unshifted, marginal, marginal, shifted; aligned = base: KL 0."""
    neg = -1e4
    zb = torch.tensor([[0.0, 0.0, neg, neg, neg]] + [[4.0, 3.0, 2.0, 1.0, 0.0]] * 4)
    za = torch.tensor([[math.log(3), 0.0, neg, neg, neg]] + [[4.0, 3.0, 2.0, 1.0, 0.0]] * 4)
    labels = torch.tensor([0, 1, 2, 3, 4])
    s = tds.shift_stats(zb, za, labels)
    assert s.base_rank.tolist() == [1, 2, 3, 4, 5]
    assert s.aligned_rank.tolist() == [1, 2, 3, 4, 5]
    assert tds.classify(s.base_rank).tolist() == [0, 1, 1, 2, 2]
    assert s.kl[0].item() == pytest.approx(0.75 * math.log(1.5) - 0.25 * math.log(2), abs=1e-6)
    assert s.kl[0].item() == pytest.approx(0.130812, abs=1e-6)
    assert s.kl[1:].abs().max().item() < 1e-6
    assert s.base_logp[0].item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert s.aligned_logp[0].item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert_matches_reference(s, reference_shift(zb, za, labels))


def test_shift_stats_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    zb, za = torch.randn(40, 97, generator=g) * 3, torch.randn(40, 97, generator=g) * 3
    labels = torch.randint(0, 97, (40,), generator=g)
    before = (zb.clone(), za.clone())
    s = tds.shift_stats(zb, za, labels)
    assert_matches_reference(s, reference_shift(zb, za, labels))
    assert torch.equal(zb, before[0]) and torch.equal(za, before[1])  # the inputs are left alone
    assert set(tds.classify(s.base_rank).tolist()) == {0, 1, 2}  # every class occurs: the test is not void


# ---------------------------------------------------------------- AlignTDS's KL, a reference written apart


def reference_released_kl(
    zb: torch.Tensor, za: torch.Tensor, texts: list[str], top_k: int, window: int
) -> list[float]:
    """AlignTDS's "KL" as its code reads, with loops: per row, each model's top_k (token text,
    logit) entries, probabilities by a softmax over those entries; the first `window` texts of each
    list; over the texts in both, p_base * log(p_base / p_aligned) with the probability of a text's
    first entry in each list, a pair with a zero probability skipped."""
    out = []
    for b, a in zip(zb.double().tolist(), za.double().tolist(), strict=True):
        lists = []
        for row in (b, a):
            ids = sorted(range(len(row)), key=lambda v: -row[v])[:top_k]
            top = max(row[v] for v in ids)
            total = sum(math.exp(row[v] - top) for v in ids)
            lists.append([(texts[v], math.exp(row[v] - top) / total) for v in ids])
        base, aligned = lists
        names_b, names_a = [t for t, _ in base[:window]], [t for t, _ in aligned[:window]]
        kl = 0.0
        for t in set(names_b) | set(names_a):
            w1 = base[names_b.index(t)][1] if t in names_b else 0.0
            w2 = aligned[names_a.index(t)][1] if t in names_a else 0.0
            if w1 > 0 and w2 > 0:
                kl += w1 * math.log(w1 / w2)
        out.append(kl)
    return out


def test_topk_kl_by_hand():
    """5 tokens, lists of 3, windows 3 and 2. Base: tokens 0, 1, 2 with p 0.6, 0.3, 0.1 (logits ln 6,
    ln 3, ln 1; tokens 3, 4 far below). Aligned: tokens 1, 3, 0 with p 0.5, 0.4, 0.1.
        window 3: shared 0 and 1: 0.6 ln(0.6 / 0.1) + 0.3 ln(0.3 / 0.5) = 1.075056 - 0.153248 = 0.921808
        window 2: base {0, 1}, aligned {1, 3}: shared 1 only: 0.3 ln(0.3 / 0.5) = -0.153248 (below 0:
                  a partial sum, not a divergence); the probabilities stay those of the lists of 3
    If tokens 3 and 0 decode to the same text, the aligned list reads 1, 0, 0 and text 0 takes its first
    entry's p = 0.4: both windows 0.6 ln(0.6 / 0.4) + 0.3 ln(0.3 / 0.5) = 0.243279 - 0.153248 = 0.090031."""
    far = -100.0
    zb = torch.tensor([[math.log(6), math.log(3), 0.0, far, far]])
    za = torch.tensor([[0.0, math.log(5), far, math.log(4), far]])
    kl3, kl2 = tds.topk_kl(zb, za, top_k=3, windows=(3, 2))
    assert kl3.item() == pytest.approx(0.921808, abs=1e-6) and kl2.item() == pytest.approx(
        -0.153248, abs=1e-6
    )
    same = torch.tensor([0, 1, 2, 0, 4])
    kl3, kl2 = tds.topk_kl(zb, za, top_k=3, windows=(3, 2), same_text=same)
    assert kl3.item() == pytest.approx(0.090031, abs=1e-6) and kl2.item() == pytest.approx(0.090031, abs=1e-6)
    assert tds.topk_kl(za, za, top_k=3, windows=(3,))[0].item() == 0.0  # a model against itself


def test_topk_kl_matches_the_loop_reference():
    """Random logits, AlignTDS's settings (lists of 30, windows 30 and 10), and a vocabulary where
    tokens 0..39 share their text with token id + 40 (so lists hold repeated texts)."""
    g = torch.Generator().manual_seed(5)
    vocab = 97
    zb, za = torch.randn(25, vocab, generator=g) * 2, torch.randn(25, vocab, generator=g) * 2
    za[:5] = zb[:5] + 0.3 * torch.randn(5, vocab, generator=g)  # close rows: large overlaps
    texts = [f"t{v % 40}" if v < 80 else f"t{v}" for v in range(vocab)]
    same = torch.tensor([v % 40 if v < 80 else v for v in range(vocab)])
    for same_text, names in ((None, [f"t{v}" for v in range(vocab)]), (same, texts)):
        got = tds.topk_kl(zb, za, same_text=same_text)
        for window, kl in zip(tds.RELEASED_WINDOWS, got, strict=True):
            ref = reference_released_kl(zb, za, names, tds.RELEASED_TOP_K, window)
            torch.testing.assert_close(
                kl.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6
            )
    plain, merged = tds.topk_kl(zb, za)[0], tds.topk_kl(zb, za, same_text=same)[0]
    assert not torch.allclose(plain, merged)  # matching by text changes the figure: the test is not void
    assert (tds.topk_kl(zb, za)[1] < 0).any()  # and a partial sum does go below 0


def test_decoded_token_ids(models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["base"])
    same = tds.decoded_token_ids(tok, len(tok) + 3)
    texts = [tok.decode([i]) for i in range(len(tok))]
    assert same.tolist()[len(tok) :] == [len(tok), len(tok) + 1, len(tok) + 2]  # past the tokenizer: itself
    for i, t in enumerate(texts):
        assert texts[int(same[i])] == t and int(same[i]) == texts.index(t)


def test_classify_boundaries():
    assert tds.classify(torch.tensor([1, 2, 3, 4, 100])).tolist() == [0, 1, 1, 2, 2]


def test_chunked_equals_unchunked():
    """Heads on hidden states, chunk by chunk (with a softcap on the base head, as Gemma 2 has)
    equal shift_stats on the full logits, for chunks that do and do not divide N."""
    torch.manual_seed(0)
    n, hidden, vocab = 37, 16, 300
    head_b, head_a = torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)
    hb, ha = torch.randn(n, hidden) * 4, torch.randn(n, hidden) * 4
    labels = torch.randint(0, vocab, (n,))

    def softcap(z):
        return 30.0 * torch.tanh(z / 30.0)

    with torch.no_grad():
        full = tds.shift_stats(softcap(head_b(hb)), head_a(ha), labels)
        for chunk in (1, 5, 36, 37, 100, 0):
            got = tds.chunked_shift(hb, head_b, ha, head_a, labels, vocab, chunk, softcap, None)
            for name, a, b in zip(tds.Shift._fields, got, full, strict=True):
                if a.dtype == torch.long:
                    assert torch.equal(a, b), (chunk, name)
                else:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{chunk} {name}")
        empty = tds.chunked_shift(hb[:0], head_b, ha[:0], head_a, labels[:0], vocab)
        assert all(t.numel() == 0 for t in empty)


# ---------------------------------------------------------------- tiny models


def sharp_model(folder: Path, seed: int, chat: bool = False, perturb_from: Path | None = None) -> Path:
    """A tiny model whose output head is scaled up (a random tiny model's distributions are nearly
    flat, every token a near-tie). With perturb_from: that model's weights plus noise on the decoder,
    so it agrees with it on some positions and not on others."""
    from transformers import AutoModelForCausalLM

    build_tiny_model(folder, seed=seed, chat=chat)
    lm = AutoModelForCausalLM.from_pretrained(perturb_from or folder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if perturb_from is None:
            lm.lm_head.weight.mul_(40)
        else:
            for name, p in lm.named_parameters():
                if ".layers." in name and p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=g) * 0.006)  # init std 0.02
    lm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tds-models")
    base = sharp_model(root / "base", 0)
    return {
        "base": base,
        "aligned": sharp_model(root / "aligned", 1, perturb_from=base),
        "chat": sharp_model(root / "chat", 2, chat=True, perturb_from=base),  # same vocabulary
    }


def _lm(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def greedy(lm, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, one full forward per token (no cache, no padding)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(lm(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@torch.no_grad()
def answer_logits(lm, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """(len(answer), V): the model's own full forward on prompt + answer alone, at the answer."""
    z = lm(torch.tensor([prompt + answer])).logits[0].float()  # (T, V)
    return z[len(prompt) - 1 : len(prompt) + len(answer) - 1]


def reference_for(base, aligned, prompt_b: list[int], prompt_a: list[int], answer: list[int]) -> list[dict]:
    """The reference numbers of one answer from each model's own full forward on it alone."""
    zb, za = answer_logits(base, prompt_b, answer), answer_logits(aligned, prompt_a, answer)
    return reference_shift(zb, za, torch.tensor(answer))


def assert_released_kl(shift: tds.Shift, zb: torch.Tensor, za: torch.Tensor, texts: list[str]) -> None:
    for name, window in zip(("kl_top30", "kl_top10"), tds.RELEASED_WINDOWS, strict=True):
        ref = reference_released_kl(zb, za, texts, tds.RELEASED_TOP_K, window)
        torch.testing.assert_close(getattr(shift, name).double(), torch.tensor(ref, dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5, msg=name)  # fmt: skip


PROMPTS = [[1, 40, 41, 42], [1, 50], [1, 60, 61, 62, 63, 64, 65], [1, 70, 71]]


def test_same_model_twice_greedy_is_unshifted_kl_zero(models):
    lm = _lm(models["base"])
    answers = [greedy(lm, p, n) for p, n in zip(PROMPTS, (6, 3, 9, 1), strict=True)]
    shifts = tds.score_ids(lm, lm, PROMPTS, PROMPTS, answers, batch_size=3)  # padded batches of mixed length
    for s, a in zip(shifts, answers, strict=True):
        assert s.base_rank.tolist() == [1] * len(a) and s.aligned_rank.tolist() == [1] * len(a)
        assert s.base_top.tolist() == a
        assert s.kl.abs().max().item() == 0.0  # the same arithmetic on both sides
        torch.testing.assert_close(s.base_logp, s.aligned_logp, rtol=0, atol=0)
    assert min(s.base_logp.min().item() for s in shifts) < math.log(0.99)  # not all trivially certain


def test_two_models_match_their_own_forwards(models):
    base, aligned = _lm(models["base"]), _lm(models["aligned"])
    g = torch.Generator().manual_seed(3)
    answers = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 12, 1, 8)]
    answers[:2] = greedy(aligned, PROMPTS[0], 5), greedy(aligned, PROMPTS[1], 12)
    prompts_b = PROMPTS[:2] + [p[:1] + [90, 91] + p[1:] for p in PROMPTS[2:]]  # other contexts too
    shifts = tds.score_ids(base, aligned, prompts_b, PROMPTS, answers, batch_size=3, chunk_size=4)
    classes = set()
    ids = [str(v) for v in range(tds._vocab_size(base))]  # no same_text: tokens matched by id
    for s, pb, pa, a in zip(shifts, prompts_b, PROMPTS, answers, strict=True):
        assert_matches_reference(s, reference_for(base, aligned, pb, pa, a), tol=1e-4)
        assert_released_kl(s, answer_logits(base, pb, a), answer_logits(aligned, pa, a), ids)
        classes |= set(tds.classify(s.base_rank).tolist())
    assert (
        shifts[0].aligned_rank.tolist() == [1] * 5 and shifts[1].aligned_rank.tolist() == [1] * 12
    )  # greedy
    assert classes == {0, 1, 2}, "the two models should agree on some tokens and not on others"


def test_tds_score_texts_prompts_and_cutoff(models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["base"])
    base, aligned = _lm(models["base"]), _lm(models["aligned"])
    answers = ["The capital of France is Paris.", "The sum is 7.", "Red is a primary colour."]
    prompts = ["What is the capital of France?\n", "Add 3 and 4.\n", "x " * 80]
    n_prompt = [len(tok(p)["input_ids"]) for p in prompts]
    cutoff = max(n_prompt[:2]) + 3  # room for 3 answer tokens or more; record 2's prompt does not fit
    assert cutoff < n_prompt[2]
    out = tds.tds_score(base, aligned, tok, prompts, prompts, answers, cutoff_len=cutoff)
    assert out[2] is None and out[0].truncated  # record 0 loses the end of its answer
    for s, p, a in zip(out[:2], prompts[:2], answers[:2], strict=True):
        room = cutoff - len(tok(p)["input_ids"])
        full = tok(p + a)["input_ids"][len(tok(p)["input_ids"]) :]
        assert s.ids == full[:room] and s.truncated == (len(full) > room)
        assert len(s.text) == len(s.ids) == len(s.shift.kl)
        assert a.startswith("".join(s.text))
    whole = tds.tds_score(base, aligned, tok, prompts, prompts, answers)
    assert all("".join(s.text) == a and not s.truncated for s, a in zip(whole, answers, strict=True))
    texts = [tok.decode([v]) for v in range(tds._vocab_size(base))]  # tds_score matches tokens by text
    for s, p in zip(whole, prompts, strict=True):
        pids = tok(p)["input_ids"]
        assert_released_kl(
            s.shift, answer_logits(base, pids, s.ids), answer_logits(aligned, pids, s.ids), texts
        )


# ---------------------------------------------------------------- the report by hand


class _Tok:
    def decode(self, ids):
        return f"<{ids[0]}>"


def _scored(
    ids: list[int],
    ranks: list[int],
    kl: list[float],
    kl30: list[float] | None = None,
    kl10: list[float] | None = None,
) -> tds.Scored:
    n = len(ids)
    shift = tds.Shift(
        torch.tensor(ranks), torch.ones(n, dtype=torch.long), torch.full((n,), math.log(0.5)),
        torch.full((n,), math.log(0.8)), torch.tensor(kl), torch.tensor(ids),
        torch.tensor(kl30 or [0.0] * n), torch.tensor(kl10 or [0.0] * n),
    )  # fmt: skip
    return tds.Scored(ids, [f"<{t}>" for t in ids], False, shift)


def test_summarise_by_hand():
    """Answer A: 4 tokens, ranks 1, 5, 2, 1 (bins of 2: tokens 0-1 in bin 0, 2-3 in bin 1).
    Answer B: 2 tokens, ranks 9, 1 (token 0 in bin 0, token 1 in bin 1). None: a dropped answer.
    Classes: A = u, s, m, u; B = s, u. 6 tokens: 3 unshifted, 1 marginal, 2 shifted.
    Bin 0: A0 u, A1 s, B0 s -> 1/3 unshifted, 2/3 shifted; bin 1: A2 m, A3 u, B1 u.
    Token 7 occurs at A1 (shifted) and A3 (unshifted): 1 of 2 shifted; token 9 at B0: 1 of 1.
    Mean KL (0 + 1 + .5 + 0 + 2 + 0) / 6 = 0.5833."""
    a = _scored([5, 7, 8, 7], [1, 5, 2, 1], [0.0, 1.0, 0.5, 0.0])
    b = _scored([9, 6], [9, 1], [2.0, 0.0])
    r = tds.summarise([a, None, b], _Tok(), bins=2)
    assert r["tokens"] == 6
    assert r["counts"] == {"unshifted": 3, "marginal": 1, "shifted": 2}
    assert r["fractions"] == pytest.approx({"unshifted": 0.5, "marginal": 1 / 6, "shifted": 1 / 3})
    assert sum(r["fractions"].values()) == pytest.approx(1.0)
    assert r["mean_kl"] == pytest.approx(3.5 / 6)
    assert r["mean_kl_by_class"] == pytest.approx({"unshifted": 0.0, "marginal": 0.5, "shifted": 1.5})
    b0, b1 = r["by_position"]
    assert (b0["tokens"], b0["unshifted"], b0["marginal"], b0["shifted"]) == (3, 1 / 3, 0.0, 2 / 3)
    assert (b1["tokens"], b1["unshifted"], b1["marginal"], b1["shifted"]) == (3, 2 / 3, 1 / 3, 0.0)
    assert b0["mean_kl"] == pytest.approx(1.0) and b1["mean_kl"] == pytest.approx(0.5 / 3)
    assert r["top_shifted"] == [
        {"token": "<9>", "id": 9, "shifted": 1, "occurrences": 1, "shifted_share": 1.0},
        {"token": "<7>", "id": 7, "shifted": 1, "occurrences": 2, "shifted_share": 0.5},
    ]
    assert r["mean_base_p"] == pytest.approx(0.5) and r["aligned_top1"] == 1.0
    assert tds.position_bins(3, 10).tolist() == [0, 3, 6] and tds.position_bins(20, 10).tolist()[-2:] == [
        9,
        9,
    ]
    assert tds.summarise([None], _Tok())["tokens"] == 0


def test_top5_share_and_absolute_positions_by_hand():
    """Answer A: base ranks 1, 6, 2, 5; B: 9, 1; C: 4. AlignTDS KL (top-30) per token: A .1 .5 .2 .4,
    B .3 .0, C .8; (top-10): A 0 1 0 1, B 2 0, C 3.
    Top 5 (rank <= 5): A 1, 2, 5; B 1; C 4: 5 of 7 tokens = 0.714286 (shifted are 6, 9, 5, 4: the
    top-5 share counts ranks 4 and 5 that the classes call shifted).
    Absolute positions: t0 = A1, B9, C4: u, s, s; top 5: 2 of 3; KL30 (.1 + .3 + .8) / 3 = .4;
    KL10 (0 + 2 + 3) / 3 = 5/3. t1 = A6, B1: s, u; top 5 1 of 2; KL30 .25; KL10 .5. t2 = A2: m;
    top 5 1; KL30 .2. t3 = A5: s; top 5 1; KL30 .4, KL10 1. Mean KL30 2.3 / 7, KL10 7 / 7 = 1."""
    a = _scored([5, 6, 7, 8], [1, 6, 2, 5], [0.0] * 4, [0.1, 0.5, 0.2, 0.4], [0.0, 1.0, 0.0, 1.0])
    b = _scored([9, 5], [9, 1], [0.0] * 2, [0.3, 0.0], [2.0, 0.0])
    c = _scored([4], [4], [0.0], [0.8], [3.0])
    r = tds.summarise([a, b, None, c], _Tok())
    assert r["top5_share"] == pytest.approx(5 / 7)
    assert r["topk_kl_base_aligned"] == pytest.approx({"top30": 2.3 / 7, "top10": 1.0})
    t = r["by_token_position"]
    assert [p["position"] for p in t] == [0, 1, 2, 3] and [p["tokens"] for p in t] == [3, 2, 1, 1]
    shares = [x for p in t for x in (p["unshifted"], p["marginal"], p["shifted"])]
    assert shares == pytest.approx([1 / 3, 0, 2 / 3, 0.5, 0, 0.5, 0, 1, 0, 0, 0, 1])
    assert [p["top5"] for p in t] == pytest.approx([2 / 3, 0.5, 1.0, 1.0])
    assert [p["kl_top30"] for p in t] == pytest.approx([0.4, 0.25, 0.2, 0.4])
    assert [p["kl_top10"] for p in t] == pytest.approx([5 / 3, 0.5, 0.0, 1.0])
    empty = tds.summarise([None], _Tok())
    assert empty["by_token_position"] == [] and empty["top5_share"] is None


# ---------------------------------------------------------------- the CLI

RECORDS = [
    {"instruction": "What is the capital of France?", "output": "The capital of France is Paris."},
    {"instruction": "Add the numbers.", "input": "3 and 4", "output": "The sum is 7."},
    {"instruction": "Name a primary colour."},  # answered by the aligned model
    {"instruction": "Add the numbers 3 and 4.", "output": "  "},  # blank: answered too
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tds-data") / "answers.json"
    path.write_text(json.dumps(RECORDS))
    return path


FAST = ["--max_new_tokens", "8", "--batch_size", "2", "--no_progress"]


@pytest.fixture(scope="module")
def run(models, data, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("tds-out") / "out"
    argv = ["--base_model", str(models["base"]), "--aligned_model", str(models["aligned"])]
    argv += ["--data_path", str(data), "--output_dir", str(out), "--prompt_template_name", "alpaca", *FAST]
    assert tds.main(argv) == 0
    return json.loads((out / "tds.json").read_text()), out


def test_cli_writes_the_report(run):
    result, out = run
    assert sorted(p.name for p in out.iterdir()) == ["tds.html", "tds.json", "tds.png"]
    assert (out / "tds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s, c = result["summary"], result["counts"]
    assert c == {"records": 4, "generated": 2, "scored": 4, "dropped_too_long": 0, "truncated": 0}
    assert sum(s["fractions"].values()) == pytest.approx(1.0, abs=1e-4)
    assert sum(s["counts"].values()) == s["tokens"] == sum(r["n_tokens"] for r in result["records"])
    assert sum(b["tokens"] for b in s["by_position"]) == s["tokens"] and len(s["by_position"]) == 10
    assert [r["generated"] for r in result["records"]] == [False, False, True, True]
    assert result["records"][0]["output"] == RECORDS[0]["output"]
    assert result["base_prompt"] == "alpaca" and result["prompt_template"] == "alpaca"
    for r in result["records"]:
        assert r["class"] == tds.classify(torch.tensor(r["base_rank"])).tolist()
        assert "".join(r["tokens"]) == r["output"]
    assert s["top_shifted"] and all(t["shifted"] <= t["occurrences"] for t in s["top_shifted"])
    assert 0 < s["mean_kl"] and all(k >= 0 for r in result["records"] for k in r["kl"])
    aligned_top1 = [a == 1 for r in result["records"] for a in r["aligned_rank"]]
    assert s["aligned_top1"] == pytest.approx(sum(aligned_top1) / len(aligned_top1), abs=1e-4)
    # AlignTDS's definitions beside the exact ones
    ranks = [k for r in result["records"] for k in r["base_rank"]]
    assert s["top5_share"] == pytest.approx(sum(k <= 5 for k in ranks) / len(ranks), abs=1e-4)
    for name in ("top30", "top10"):
        per_token = [k for r in result["records"] for k in r[f"kl_{name}"]]
        assert s["topk_kl_base_aligned"][name] == pytest.approx(sum(per_token) / len(per_token), abs=1e-4)
    curve = s["by_token_position"]
    assert len(curve) == max(r["n_tokens"] for r in result["records"]) and curve[0]["tokens"] == c["scored"]
    assert sum(p["tokens"] for p in curve) == s["tokens"]
    assert all(sum(p[n] for n in tds.CLASSES) == pytest.approx(1.0, abs=1e-3) for p in curve)


def test_cli_answers_are_the_aligned_models_greedy_answers(run, models):
    from cut.data.templates import load_template
    from cut.modeling.generate import Sampling, generate_texts

    result, _ = run
    aligned = _lm(models["aligned"])
    template = load_template("alpaca")
    prompts = [template.plain(r["instruction"], r.get("input", "")) for r in RECORDS[2:]]
    texts = generate_texts(aligned, tds.load_tokenizer(str(models["aligned"])), prompts, Sampling(max_new_tokens=8),
                           progress=False)  # fmt: skip
    assert [r["output"] for r in result["records"][2:]] == texts and all(texts)


def test_cli_same_model_twice(models, data, tmp_path):
    argv = ["--base_model", str(models["base"]), "--aligned_model", str(models["base"])]
    argv += [
        "--data_path",
        str(data),
        "--output_dir",
        str(tmp_path),
        "--prompt_template_name",
        "alpaca",
        *FAST,
    ]
    assert tds.main(argv) == 0
    result = json.loads((tmp_path / "tds.json").read_text())
    assert result["summary"]["mean_kl"] == 0.0
    for r in result["records"]:
        assert r["base_rank"] == r["aligned_rank"] and set(r["kl"]) == {0.0}


def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(tds, "load_model", refuse)


def test_errors_named_before_any_model_loads(models, data, tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    other_vocab = build_tiny_model(tmp_path / "other", vocab_size=300)
    ok = {
        "base_model": str(models["base"]),
        "aligned_model": str(models["aligned"]),
        "data_path": str(data),
        "output_dir": str(tmp_path / "o"),
        "progress": False,
    }
    cases = [
        ({"base_model": str(other_vocab)}, "the tokenizers differ"),
        ({"base_prompt": "fancy"}, "base_prompt must be one of"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"aligned_model": str(tmp_path / "no" / "model")}, "model folder not found"),
        ({"prompt_template_name": "chat"}, "needs a tokenizer that has a chat template"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            tds.tds_records(**{**ok, **change})
    monkeypatch.setitem(sys.modules, "cut.urial", None)  # as if cut.urial were not there
    import cut

    monkeypatch.delattr(cut, "urial", raising=False)  # imported earlier in the same run: the attribute stays
    with pytest.raises(ConfigError, match="urial needs cut.urial"):
        tds.tds_records(**{**ok, "base_prompt": "urial"})
    rc = tds.main(["--base_model", str(other_vocab), "--aligned_model", str(models["base"]),
                   "--data_path", str(data), "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2


def test_base_prompts(models):
    """plain: a chat-templated aligned model's base without a chat template gets alpaca; same: the
    aligned text itself."""
    from transformers import AutoTokenizer

    tok_chat, tok_plain = (
        AutoTokenizer.from_pretrained(models["chat"]),
        AutoTokenizer.from_pretrained(models["base"]),
    )
    chat = tds.load_template("chat", tok_chat)
    recs = [{"instruction": "Add the numbers.", "input": "3 and 4"}]
    opts = dict(
        base_model=str(models["base"]), aligned_model=str(models["chat"]), data_path="x", output_dir="y"
    )
    texts, special, name = tds.build_prompts(tds.TDSOptions(**opts), recs, chat, tok_plain)
    assert name == "alpaca" and special and texts[0].endswith("### Response:\n") and "3 and 4" in texts[0]
    texts, special, name = tds.build_prompts(tds.TDSOptions(**opts), recs, chat, tok_chat)
    assert name == "chat" and not special and texts[0] == chat.plain("Add the numbers.", "3 and 4")
    texts, special, name = tds.build_prompts(
        tds.TDSOptions(**opts, base_prompt="same"), recs, chat, tok_plain
    )
    assert name == "same" and not special and texts[0] == chat.plain("Add the numbers.", "3 and 4")


def test_zero_shot_prompt_is_the_released_text(models):
    """AlignTDS's i2b context with --enable_template (src/logit_analysis.py), worked out by hand for
    one query: '# Query: ' newline, space, fence, the query, fence, space, newline, newline, space,
    newline, '# Answer: ' newline, space, fence; the answer follows with no newline."""
    from transformers import AutoTokenizer

    assert tds.zero_shot_prompt("What is 2+2?") == "# Query: \n ```What is 2+2?``` \n\n \n# Answer: \n ```"
    assert tds.zero_shot_prompt("Add the numbers.", "3 and 4") == (
        "# Query: \n ```Add the numbers.\n\n3 and 4``` \n\n \n# Answer: \n ```"
    )
    tok = AutoTokenizer.from_pretrained(models["base"])
    opts = tds.TDSOptions(base_model=str(models["base"]), aligned_model=str(models["base"]), data_path="x",
                          output_dir="y", base_prompt="zeroshot")  # fmt: skip
    recs = [{"instruction": "What is 2+2?", "input": ""}]
    texts, special, name = tds.build_prompts(opts, recs, tds.load_template("alpaca"), tok)
    assert texts == [tds.zero_shot_prompt("What is 2+2?")] and special and name == "zeroshot"


PREAMBLE = "# Instruction\n\nBelow are chats between a user and a helper.\n\n\n# Query:\n```Name a fruit.```\n\n# Answer:\n```\nA pear.\n```\n"


def test_urial_prompt_file_is_the_base_context(models, tmp_path):
    """A prompt file of our own is used verbatim; the query follows it as URIAL writes it (its rule:
    a name with inst_help_v6 gets v6 turns, any other backticks; --urial_turn_format overrides):
        backticks  file + '\n# Query:\n```\n' + q + '\n```\n' + '\n# Answer:\n```\n'
        v6         file + '\n\n# User:\n' + q + '\n' + '\n\n# Assistant:\n'
        v5         file + '\n# User:\n\n' + q + '\n\n' + '\n# Assistant:\n\n'"""
    from transformers import AutoTokenizer

    pytest.importorskip("cut.urial")
    tok = AutoTokenizer.from_pretrained(models["base"])
    plain, v6 = tmp_path / "mine.txt", tmp_path / "inst_help_v6_mine.txt"
    plain.write_text(PREAMBLE)
    v6.write_text(PREAMBLE.replace("# Query:", "# User:").replace("# Answer:", "# Assistant:"))
    recs = [{"instruction": "Add the numbers.", "input": "3 and 4"}]
    q = "Add the numbers.\n\n3 and 4"
    cases = [
        (plain, "auto", PREAMBLE + f"\n# Query:\n```\n{q}\n```\n\n# Answer:\n```\n", "backticks"),
        (v6, "auto", v6.read_text() + f"\n\n# User:\n{q}\n\n\n# Assistant:\n", "v6"),
        (plain, "v5", PREAMBLE + f"\n# User:\n\n{q}\n\n\n# Assistant:\n\n", "v5"),
    ]
    for path, fmt, expect, fmt_name in cases:
        opts = tds.TDSOptions(base_model=str(models["base"]), aligned_model=str(models["base"]), data_path="x",
                              output_dir="y", base_prompt=str(path), urial_turn_format=fmt)  # fmt: skip
        texts, special, name = tds.build_prompts(opts, recs, tds.load_template("alpaca"), tok)
        assert texts == [expect] and special, (path.name, fmt)
        assert name.startswith(f"urial:{path.name}:{fmt_name}@")


def test_base_prompt_errors_before_any_model_loads(models, data, tmp_path, monkeypatch, capsys):
    no_model_loads(monkeypatch)
    ok = {"base_model": str(models["base"]), "aligned_model": str(models["aligned"]), "data_path": str(data),
          "output_dir": str(tmp_path / "o"), "progress": False}  # fmt: skip
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    prompt = tmp_path / "p.txt"
    prompt.write_text(PREAMBLE)
    cases = [
        ({"base_prompt": str(tmp_path / "nope.txt")}, r"or a URIAL prompt file; '.*nope.txt' is neither"),
        ({"base_prompt": str(tmp_path)}, "is a folder"),
        ({"base_prompt": str(prompt), "urial_turn_format": "v7"}, "turn_format must be auto or one of"),
        ({"base_prompt": "zeroshot", "urial_turn_format": "v5"}, "applies to a URIAL context only"),
        ({"base_prompt": str(empty)}, f"{empty}: the URIAL prompt file is empty"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            tds.tds_records(**{**ok, **change})
    argv = [
        "--base_model",
        ok["base_model"],
        "--aligned_model",
        ok["aligned_model"],
        "--data_path",
        str(data),
    ]
    with pytest.raises(SystemExit) as exit_:
        tds.main([*argv, "--output_dir", ok["output_dir"], "--base_prompt", str(tmp_path / "nope.txt")])
    assert exit_.value.code == 2 and "argument --base_prompt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_zeroshot_and_prompt_file_contexts(models, data, tmp_path):
    pytest.importorskip("cut.urial")
    prompt = tmp_path / "mine.txt"
    prompt.write_text(PREAMBLE)
    argv = ["--base_model", str(models["base"]), "--aligned_model", str(models["aligned"])]
    argv += ["--data_path", str(data), *FAST, "--prompt_template_name", "alpaca"]
    for context in ("zeroshot", str(prompt)):
        out = tmp_path / f"out-{Path(context).name}"
        assert tds.main([*argv, "--output_dir", str(out), "--base_prompt", context]) == 0
        result = json.loads((out / "tds.json").read_text())
        assert result["counts"]["scored"] == 4 and result["summary"]["tokens"] > 0
        assert (
            result["base_prompt"] == "zeroshot"
            if context == "zeroshot"
            else result["base_prompt"].startswith("urial:mine.txt:backticks@")
        )


def test_urial_aligned_side_scores_given_answers(models, tmp_path):
    """--prompt_template_name urial: the base model in the URIAL context as the aligned side; with the
    same context for the base (--base_prompt urial) both sides are one model on one prompt: KL 0."""
    urial = pytest.importorskip("cut.urial")
    given = tmp_path / "given.json"
    given.write_text(
        json.dumps([{**r, "output": (r.get("output") or "").strip() or "A short answer."} for r in RECORDS])
    )
    model = str(models["base"])
    argv = ["--base_model", model, "--aligned_model", model, "--data_path", str(given), *FAST]
    argv += ["--prompt_template_name", "urial"]
    assert tds.main([*argv, "--output_dir", str(tmp_path / "same"), "--base_prompt", "urial"]) == 0
    same = json.loads((tmp_path / "same" / "tds.json").read_text())
    assert same["prompt_template"] == urial.default_prompt().tag and same["counts"]["scored"] == len(RECORDS)
    for r in same["records"]:
        assert max(r["kl"]) == pytest.approx(0.0, abs=1e-5)
        assert r["base_logp"] == pytest.approx(r["aligned_logp"], abs=1e-5)
    assert tds.main([*argv, "--output_dir", str(tmp_path / "plain"), "--base_prompt", "plain"]) == 0
    plain = json.loads((tmp_path / "plain" / "tds.json").read_text())
    assert plain["base_prompt"] == "alpaca" and plain["summary"]["mean_kl"] > 1e-3
    assert [r["tokens"] for r in plain["records"]] == [r["tokens"] for r in same["records"]]
    # answers are not generated under the URIAL prefix: records without one are refused up front
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"instruction": "Say hi.", "input": ""}]))
    with pytest.raises(DataError, match="cut urial"):
        tds.tds_records(
            base_model=model,
            aligned_model=model,
            data_path=str(missing),
            output_dir=str(tmp_path / "bad"),
            prompt_template_name="urial",
            progress=False,
        )
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- memory, in a subprocess

MEMORY_SCRIPT = r"""
import json, sys, torch
from transformers import LlamaForCausalLM
from cut.analysis.tds import score_ids, shift_stats
from cut.modeling.tiny import llama_config

def kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))

vocab, mode = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
lm = LlamaForCausalLM(llama_config(vocab, max_position_embeddings=512)).eval()
rows = torch.randint(0, vocab, (4, 256)).tolist()
prompts, answers = [r[:1] for r in rows], [r[1:] for r in rows]  # 4 x 255 answer tokens
score_ids(lm, lm, prompts, prompts, [a[:4] for a in answers])  # warm up: lazy imports, first calls
with torch.no_grad():
    lm(torch.tensor(rows)[:, :8])
before = kb("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
if mode == "chunked":
    score_ids(lm, lm, prompts, prompts, answers, batch_size=4)
else:  # the unchunked reference: full (B, T, V) logits of both forwards
    with torch.no_grad():
        z = lm(torch.tensor(rows)).logits[:, :-1].flatten(0, 1).float()
        shift_stats(z, lm(torch.tensor(rows)).logits[:, :-1].flatten(0, 1).float(), torch.tensor(rows)[:, 1:].flatten())
print(json.dumps({"peak_extra": (kb("VmHWM") - before) * 1024, "tokens": sum(map(len, answers))}))
"""


def peak_extra_bytes(vocab: int, mode: str, live: bool = True) -> tuple[int, int]:
    """Peak resident memory a call adds, in a fresh process: /proc/self/clear_refs resets the
    kernel's high-water mark (VmHWM) to the current RSS just before it; VmHWM after, minus the RSS
    before, is what the process held at the call's peak. live=True runs the process with glibc's
    mmap threshold fixed at 64 KiB: every tensor bigger than that is its own mapping, returned to
    the kernel when freed, so the number is the peak of live tensor bytes (deterministic). With
    glibc's default (live=False) the dynamic threshold rises to 32 MiB and freed blocks below it stay
    in the heap, so RSS also holds the allocator's leftovers (they vary from run to run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(vocab), mode],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["peak_extra"], out["tokens"]


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.slow  # four subprocesses, ~1 minute on 2 cores
@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux /proc/self/clear_refs to reset the RSS peak")
def test_peak_memory_flat_in_vocabulary(capsys):
    """score_ids on 4 x 256 tokens (1,020 answer tokens) of a hidden-size-64 Llama, at V = 32,000
    and V = 262,144 (Gemma 3): the peak stays the same while one (T, V) float32 tensor grows 8x."""
    MiB = 2**20
    small, tokens = peak_extra_bytes(32_000, "chunked")
    gemma, _ = peak_extra_bytes(262_144, "chunked")
    gemma_rss, _ = peak_extra_bytes(262_144, "chunked", live=False)
    naive, _ = peak_extra_bytes(32_000, "naive")
    tv_small, tv_gemma = tokens * 32_000 * 4, tokens * 262_144 * 4  # (T, V) float32
    with capsys.disabled():
        print(
            f"\n[tds memory] {tokens} answer tokens; peak of live tensors: {small / MiB:.0f} MiB at V=32,000 "
            f"((T, V) fp32 {tv_small / MiB:.0f} MiB; unchunked reference {naive / MiB:.0f} MiB), "
            f"{gemma / MiB:.0f} MiB at V=262,144 ((T, V) fp32 {tv_gemma / MiB:.0f} MiB); "
            f"RSS peak under glibc's default allocator at V=262,144: {gemma_rss / MiB:.0f} MiB"
        )
    assert naive > 2 * tv_small  # the measurement sees full logits when they exist
    assert gemma < tv_gemma / 8  # well under one (T, V) float32 tensor
    assert gemma < small * 1.25  # flat: 8x the vocabulary, no more memory
    assert gemma_rss < tv_gemma / 3  # and no heap fragmentation that outgrows it (it did: 2.9 GB)


# ---------------------------------------------------------------- the page in a real browser


@needs_chromium
def test_browser_colours_tokens_by_class(run, tmp_path):
    result, out = run
    dom = dump_dom(out / "tds.html", "", tmp_path / "profile")
    classes = re.findall(r'<span class="t(?: (c\d))?(?: e)?" data-i=', dom)
    assert len(classes) == result["summary"]["tokens"]
    counts = result["summary"]["counts"]
    assert [classes.count(f"c{k}") for k in range(3)] == [counts[n] for n in tds.CLASSES]
    assert dom.count('class="card"') == 4 and dom.count("answer generated greedily") == 2
    dom = dump_dom(out / "tds.html", "colour=kl&sort=kl", tmp_path / "profile")
    assert (
        len(re.findall(r'<span class="t(?: e)?" data-i="\d+" style="background:', dom))
        == result["summary"]["tokens"]
    )
