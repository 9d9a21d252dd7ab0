"""Tests for cut.pairs: tokenised pairs (tokenize_example, fit_prompt) and the CUTCollator layout.

Expected ids are built by hand here: the prompt strings come from the template and are tokenised
directly, the response is `tokenizer(output, add_special_tokens=False)` plus EOS. The collated
layout is checked against those lists by plain Python loops.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors
from transformers import AutoTokenizer

from cut.data.pairs import CUTCollator, fit_prompt, padding_ratio, sequence_lengths, tokenize_example, unpack
from cut.data.records import Example, Record
from cut.data.templates import load_template
from cut.training.loss import Role

# (instruction, input, output, judgment or None)
ROWS = [
    ("What is the capital of France?", "", "The capital of France is Lyon.", "Wrong city: it is Paris."),
    ("Add the numbers.", "3 and 4", "The sum is 7.", None),
    ("Add the numbers.", "3 and 4", "The sum is 8.", "The answer 8 is wrong; the correct answer is 7."),
    ("Name a primary colour.", "", "Red is a primary colour.", None),
    ("Name a primary colour.", "", "Green is a primary colour.", "Green is not a primary colour in paint."),
    ("What is the capital of France?", "", "Paris.", None),
    ("Add the numbers.", "3 and 4", "7", "Too terse."),
]
LONG_CUTOFF = 4096


def make_example(instruction: str, input: str, output: str, judgment: str | None) -> Example:
    return Example(Record(instruction=instruction, input=input, output=output, judgment=judgment), judgment)


EXAMPLES = [make_example(*row) for row in ROWS]
N_POS = sum(not e.is_negative for e in EXAMPLES)
N_NEG = sum(e.is_negative for e in EXAMPLES)


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_model):
    return AutoTokenizer.from_pretrained(tiny_chat_model)


@pytest.fixture(scope="module")
def bos_tok(tiny_model):
    """The tiny tokenizer, made to add a BOS when add_special_tokens=True (as Llama's does)."""
    t = AutoTokenizer.from_pretrained(tiny_model)
    t._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", t.bos_token_id)]
    )
    assert t("Hello")["input_ids"][0] == t.bos_token_id
    assert t("Hello", add_special_tokens=False)["input_ids"][0] != t.bos_token_id
    return t


@pytest.fixture(params=["alpaca", "alpaca_bos", "chat"])
def setup(request, tok, chat_tok, bos_tok):
    """(template, tokenizer) for each template flavour."""
    if request.param == "alpaca":
        return load_template("alpaca"), tok
    if request.param == "alpaca_bos":
        return load_template("alpaca"), bos_tok
    return load_template("chat", chat_tok), chat_tok


# --------------------------------------------------------------------------------------------
# hand-built references
# --------------------------------------------------------------------------------------------


def hand_response(tokenizer, output: str, add_eos: bool = True) -> list[int]:
    ids = list(tokenizer(output, add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def hand_prompts(template, tokenizer, ex: Example) -> tuple[list[int], list[int] | None]:
    """Untruncated (plain, judged) prompt ids, straight from the template strings."""
    r = ex.record
    special = template.name != "chat"
    plain = tokenizer(template.plain(r.instruction, r.input), add_special_tokens=special)["input_ids"]
    judged = None
    if ex.judgment is not None:
        text = template.judged(r.instruction, r.input, ex.judgment)
        judged = tokenizer(text, add_special_tokens=special)["input_ids"]
    return list(plain), None if judged is None else list(judged)


def hand_sequences(template, tokenizer, examples, train_on_inputs: bool):
    """Per sequence (in collator order): (role, full ids, expected target ids)."""
    out = []
    for ex in examples:
        plain, judged = hand_prompts(template, tokenizer, ex)
        resp = hand_response(tokenizer, ex.record.output)
        if judged is None:
            prompt_tgts = plain[1:] if train_on_inputs else []
            out.append((Role.ALIGN_P, plain + resp, prompt_tgts + resp))
        else:
            prompt_tgts = judged[1:] if train_on_inputs else []
            out.append((Role.ALIGN_N, judged + resp, prompt_tgts + resp))
            out.append((Role.MISALIGN_N, plain + resp, list(resp)))
    return out


def seq_lengths(batch) -> list[int]:
    return batch["attention_mask"].sum(1).tolist()


def features_for(template, tokenizer, examples=EXAMPLES, cutoff=LONG_CUTOFF):
    feats = [tokenize_example(e, template, tokenizer, cutoff) for e in examples]
    assert all(f is not None for f in feats)
    return feats


def collate_twice(setup, first: dict, second: dict) -> tuple[list[dict], dict, dict]:
    """The examples' features for `setup` (template, tokenizer), and their batches from a CUTCollator
    with the settings `first` and from one with `second`."""
    template, tokenizer = setup
    feats = features_for(template, tokenizer)
    return (
        feats,
        CUTCollator(tokenizer.pad_token_id, **first)(feats),
        CUTCollator(tokenizer.pad_token_id, **second)(feats),
    )


# --------------------------------------------------------------------------------------------
# tokenize_example: response ids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_eos", [True, False])
@pytest.mark.parametrize("with_input", [True, False])
def test_response_ids_identical_in_both_contexts(setup, with_input, add_eos):
    template, tokenizer = setup
    ex = make_example(
        "Add the numbers.", "3 and 4" if with_input else "", "The sum is 8.", "The answer 8 is wrong."
    )
    feat = tokenize_example(ex, template, tokenizer, LONG_CUTOFF, add_eos_token=add_eos)
    assert feat is not None
    resp = hand_response(tokenizer, "The sum is 8.", add_eos)
    assert feat["response_ids"] == resp
    assert (feat["response_ids"][-1] == tokenizer.eos_token_id) == add_eos

    plain, judged = hand_prompts(template, tokenizer, ex)
    assert feat["prompt_ids"] == plain
    assert feat["judged_ids"] == judged
    assert feat["judged_ids"] != feat["prompt_ids"]
    assert feat["length"] == len(plain) + len(judged) + 2 * len(resp)
    if with_input:
        assert "3 and 4" in tokenizer.decode(feat["prompt_ids"])

    # both collated sequences end with the very same response ids
    batch = CUTCollator(tokenizer.pad_token_id)([feat])
    lens = seq_lengths(batch)
    ids = batch["input_ids"]
    assert batch["seq_role"].tolist() == [Role.ALIGN_N, Role.MISALIGN_N]
    judged_resp = ids[0, lens[0] - len(resp) : lens[0]].tolist()
    plain_resp = ids[1, lens[1] - len(resp) : lens[1]].tolist()
    assert judged_resp == plain_resp == resp
    assert ids[0, : lens[0] - len(resp)].tolist() == judged
    assert ids[1, : lens[1] - len(resp)].tolist() == plain


@pytest.mark.parametrize("add_eos", [True, False])
def test_positive_has_no_judged_ids(setup, add_eos):
    template, tokenizer = setup
    ex = make_example("Name a primary colour.", "", "Red is a primary colour.", None)
    feat = tokenize_example(ex, template, tokenizer, LONG_CUTOFF, add_eos_token=add_eos)
    plain, judged = hand_prompts(template, tokenizer, ex)
    resp = hand_response(tokenizer, ex.record.output, add_eos)
    assert judged is None
    assert feat["judged_ids"] == []
    assert feat["prompt_ids"] == plain
    assert feat["response_ids"] == resp
    assert feat["length"] == len(plain) + len(resp)


def test_eos_not_doubled_when_output_ends_with_it(tok):
    template = load_template("alpaca")
    ex = make_example("Name a primary colour.", "", "Red." + tok.eos_token, None)
    feat = tokenize_example(ex, template, tok, LONG_CUTOFF)
    assert feat["response_ids"] == tok("Red." + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert feat["response_ids"][-1] == tok.eos_token_id
    assert feat["response_ids"][-2] != tok.eos_token_id


def test_chat_prompt_starts_with_bos_and_alpaca_bos_toggle(tok, chat_tok, bos_tok):
    ex = EXAMPLES[0]
    plain_chat = tokenize_example(ex, load_template("chat", chat_tok), chat_tok, LONG_CUTOFF)
    assert plain_chat["prompt_ids"][0] == chat_tok.bos_token_id
    assert plain_chat["prompt_ids"][1] != chat_tok.bos_token_id  # template's <s>, not a second one
    assert tokenize_example(ex, load_template("alpaca"), bos_tok, LONG_CUTOFF)["prompt_ids"][0] == (
        bos_tok.bos_token_id
    )
    assert tokenize_example(ex, load_template("alpaca"), tok, LONG_CUTOFF)["prompt_ids"][0] != (
        tok.bos_token_id
    )


# --------------------------------------------------------------------------------------------
# truncation
# --------------------------------------------------------------------------------------------


def expected_fit(full: list[int], room: int, bos_id: int) -> list[int]:
    """Left truncation to `room` tokens, the leading BOS kept when there is room for it and one more."""
    if len(full) <= room:
        return full
    if full[0] == bos_id and room >= 2:
        return [full[0]] + full[len(full) - (room - 1) :]
    return full[len(full) - room :]


def test_truncation_small_cutoff(setup):
    template, tokenizer = setup
    ex = EXAMPLES[2]  # negative, with input
    plain, judged = hand_prompts(template, tokenizer, ex)
    resp = hand_response(tokenizer, ex.record.output)
    cutoff = len(resp) + 6
    assert len(plain) > 6 and len(judged) > 6

    feat = tokenize_example(ex, template, tokenizer, cutoff)
    assert feat["response_ids"] == resp  # whole
    for got, full in ((feat["prompt_ids"], plain), (feat["judged_ids"], judged)):
        assert len(got) + len(resp) == cutoff
        if full[0] == tokenizer.bos_token_id:
            assert got[0] == tokenizer.bos_token_id
            assert got[1:] == full[-5:]
        else:
            assert got == full[-6:]
    assert feat["length"] == 2 * cutoff


def test_truncation_every_cutoff(setup):
    template, tokenizer = setup
    bos = tokenizer.bos_token_id
    for ex in EXAMPLES:
        plain, judged = hand_prompts(template, tokenizer, ex)
        resp = hand_response(tokenizer, ex.record.output)
        longest = max(len(plain), len(judged or []))
        for cutoff in range(len(resp) + 1, longest + len(resp) + 3):
            feat = tokenize_example(ex, template, tokenizer, cutoff)
            assert feat is not None, (ex, cutoff)
            assert feat["response_ids"] == resp
            room = cutoff - len(resp)
            assert feat["prompt_ids"] == expected_fit(plain, room, bos)
            assert len(feat["prompt_ids"]) + len(resp) <= cutoff
            assert len(feat["prompt_ids"]) + len(resp) == min(cutoff, len(plain) + len(resp))
            if plain[0] == bos and room >= 2:
                assert feat["prompt_ids"][0] == bos
            if judged is None:
                assert feat["judged_ids"] == []
            else:
                assert feat["judged_ids"] == expected_fit(judged, room, bos)
                assert len(feat["judged_ids"]) + len(resp) <= cutoff
                assert len(feat["judged_ids"]) + len(resp) == min(cutoff, len(judged) + len(resp))
            # collated sequences fit as well
            batch = CUTCollator(tokenizer.pad_token_id)([feat])
            assert max(seq_lengths(batch)) <= cutoff


def test_response_that_cannot_fit_returns_none(setup):
    template, tokenizer = setup
    for ex in (EXAMPLES[0], EXAMPLES[1]):  # a negative and a positive
        resp = hand_response(tokenizer, ex.record.output)
        plain, _ = hand_prompts(template, tokenizer, ex)
        for cutoff in (1, len(resp) - 1, len(resp)):
            assert tokenize_example(ex, template, tokenizer, cutoff) is None
        feat = tokenize_example(ex, template, tokenizer, len(resp) + 1)  # one prompt token: fits
        assert feat is not None
        assert feat["prompt_ids"] == plain[-1:]  # the token right before the response
        if ex.is_negative:
            assert len(feat["judged_ids"]) == 1
        feat = tokenize_example(ex, template, tokenizer, len(resp) + 2)
        if plain[0] == tokenizer.bos_token_id:
            assert feat["prompt_ids"] == [tokenizer.bos_token_id, plain[-1]]
        else:
            assert feat["prompt_ids"] == plain[-2:]


def test_fit_directly(tok):
    bos = tok.bos_token_id
    prompt = [bos, 10, 11, 12, 13]
    assert fit_prompt(prompt, 3, 8, tok) == prompt  # fits exactly
    assert fit_prompt(prompt, 3, 7, tok) == [bos, 11, 12, 13]
    assert fit_prompt(prompt, 3, 6, tok) == [bos, 12, 13]
    assert fit_prompt(prompt, 3, 5, tok) == [bos, 13]
    assert fit_prompt(prompt, 3, 4, tok) == [13]
    assert fit_prompt(prompt, 3, 3, tok) is None
    assert fit_prompt([10, 11, 12, 13], 3, 5, tok) == [12, 13]
    assert fit_prompt([], 3, 10, tok) is None


# --------------------------------------------------------------------------------------------
# collator
# --------------------------------------------------------------------------------------------


def check_layout(batch, feats, pad_id, train_on_inputs, multiple=8):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos, tgt, role, partner = batch["tgt_pos"], batch["tgt_ids"], batch["tgt_role"], batch["tgt_partner"]
    n_pos = sum(not f["judged_ids"] for f in feats)
    n_neg = len(feats) - n_pos
    S, T = ids.shape
    for t in batch.values():
        assert t.dtype == torch.long

    # sequences and their roles
    assert S == n_pos + 2 * n_neg
    assert mask.shape == (S, T)
    expected_roles = []
    for f in feats:
        expected_roles += [Role.ALIGN_N, Role.MISALIGN_N] if f["judged_ids"] else [Role.ALIGN_P]
    assert batch["seq_role"].tolist() == expected_roles
    assert (batch["seq_role"] == Role.ALIGN_P).sum() == n_pos
    assert (batch["seq_role"] == Role.ALIGN_N).sum() == n_neg
    assert (batch["seq_role"] == Role.MISALIGN_N).sum() == n_neg

    # padding
    lens = []
    for f in feats:
        if f["judged_ids"]:
            lens.append(len(f["judged_ids"]) + len(f["response_ids"]))
        lens.append(len(f["prompt_ids"]) + len(f["response_ids"]))
    assert T % multiple == 0
    assert max(lens) <= T < max(lens) + multiple
    for s, n in enumerate(lens):
        assert mask[s, :n].tolist() == [1] * n
        assert mask[s, n:].tolist() == [0] * (T - n)
        assert ids[s, n:].tolist() == [pad_id] * (T - n)

    # targets: the token right after the predicting position, never on padding
    n = len(tgt)
    assert pos.shape == role.shape == partner.shape == (n,)
    assert torch.equal(ids.view(-1)[pos + 1], tgt)
    assert (pos % T < T - 1).all()  # pos + 1 stays in the same row
    assert mask.view(-1)[pos].all() and mask.view(-1)[pos + 1].all()
    row_role = batch["seq_role"][pos // T]
    assert torch.equal(row_role, role)

    # per-role counts
    def count(r):
        return int((role == r).sum())

    resp_p = sum(len(f["response_ids"]) for f in feats if not f["judged_ids"])
    resp_n = sum(len(f["response_ids"]) for f in feats if f["judged_ids"])
    extra_p = sum(len(f["prompt_ids"]) - 1 for f in feats if not f["judged_ids"]) if train_on_inputs else 0
    extra_n = sum(len(f["judged_ids"]) - 1 for f in feats if f["judged_ids"]) if train_on_inputs else 0
    assert count(Role.ALIGN_P) == resp_p + extra_p
    assert count(Role.ALIGN_N) == resp_n + extra_n
    assert count(Role.MISALIGN_N) == resp_n

    # partners: Role.MISALIGN_N -> Role.ALIGN_N target of the same token at the same response offset
    seq_len = mask.sum(1)
    mis = (role == Role.MISALIGN_N).nonzero().flatten()
    assert (partner[role != Role.MISALIGN_N] == -1).all()
    assert (partner[mis] >= 0).all()
    p = partner[mis]
    assert (role[p] == Role.ALIGN_N).all()
    assert torch.equal(tgt[p], tgt[mis])
    # offset from the end of the sequence (responses end each sequence and are the same length)
    from_end_mis = seq_len[pos[mis] // T] - (pos[mis] % T)
    from_end_p = seq_len[pos[p] // T] - (pos[p] % T)
    assert torch.equal(from_end_mis, from_end_p)
    assert torch.equal(pos[p] // T, pos[mis] // T - 1)  # the judged sequence comes right before
    assert len(set(p.tolist())) == len(p)  # one-to-one
    # the partners are exactly the response targets of the judged sequences
    resp_align_n = [
        i
        for i in range(n)
        if role[i] == Role.ALIGN_N
        and pos[i] % T >= seq_len[pos[i] // T] - 1 - len_resp_of(pos[i] // T, feats)
    ]
    assert sorted(p.tolist()) == resp_align_n


def len_resp_of(s: int, feats) -> int:
    k = 0
    for f in feats:
        for _ in range(2 if f["judged_ids"] else 1):
            if k == s:
                return len(f["response_ids"])
            k += 1
    raise IndexError(s)


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_collator_layout(setup, train_on_inputs):
    template, tokenizer = setup
    feats = features_for(template, tokenizer)
    assert N_POS >= 2 and N_NEG >= 2
    batch = CUTCollator(tokenizer.pad_token_id, train_on_inputs=train_on_inputs)(feats)
    check_layout(batch, feats, tokenizer.pad_token_id, train_on_inputs)


@pytest.mark.parametrize("order", ["neg_first", "pos_first", "only_neg", "only_pos", "single_neg"])
def test_collator_layout_batches(tok, order):
    template = load_template("alpaca")
    feats = features_for(template, tok)
    negs = [f for f in feats if f["judged_ids"]]
    poss = [f for f in feats if not f["judged_ids"]]
    batch_feats = {
        "neg_first": negs + poss,
        "pos_first": poss + negs,
        "only_neg": negs,
        "only_pos": poss,
        "single_neg": negs[:1],
    }[order]
    for train_on_inputs in (False, True):
        batch = CUTCollator(tok.pad_token_id, train_on_inputs=train_on_inputs)(batch_feats)
        check_layout(batch, batch_feats, tok.pad_token_id, train_on_inputs)


@pytest.mark.parametrize("packing", [False, True])
def test_collator_without_misalign_drops_only_the_plain_context_of_negatives(setup, packing):
    """misalign=False (the hindsight ablation): Align-P and Align-N exactly as with CUT, no Misalign-N."""
    feats, full, hind = collate_twice(setup, {"packing": packing}, {"packing": packing, "misalign": False})
    assert hind["seq_role"].tolist() == [r for r in full["seq_role"].tolist() if r != Role.MISALIGN_N]
    assert len(hind["seq_role"]) == len(feats) and Role.MISALIGN_N not in hind["tgt_role"].tolist()
    keep = full["tgt_role"] != Role.MISALIGN_N
    assert torch.equal(hind["tgt_ids"], full["tgt_ids"][keep])
    assert torch.equal(hind["tgt_role"], full["tgt_role"][keep])
    assert (hind["tgt_partner"] == -1).all()


def test_collator_pad_to_multiple(tok):
    feats = features_for(load_template("alpaca"), tok)
    longest = max(max(len(f["prompt_ids"]), len(f["judged_ids"])) + len(f["response_ids"]) for f in feats)
    for m in (1, 3, 8, 64):
        batch = CUTCollator(tok.pad_token_id, pad_to_multiple_of=m)(feats)
        T = batch["input_ids"].shape[1]
        assert T == -(-longest // m) * m
        check_layout(batch, feats, tok.pad_token_id, False, multiple=m)
    # a width already a multiple of 8 gets no extra padding
    cut = 8 * (longest // 8)
    trimmed = [tokenize_example(e, load_template("alpaca"), tok, cut) for e in EXAMPLES]
    assert CUTCollator(tok.pad_token_id)(trimmed)["input_ids"].shape[1] == cut


def test_collator_pad_id_is_used(tok):
    feats = features_for(load_template("alpaca"), tok)
    batch = CUTCollator(pad_token_id=7)(feats)
    mask = batch["attention_mask"].bool()
    assert (batch["input_ids"][~mask] == 7).all()
    assert (~mask).any()


def test_train_on_inputs_adds_prompt_targets_only_for_align(setup):
    feats, off, on = collate_twice(setup, {"train_on_inputs": False}, {"train_on_inputs": True})
    assert torch.equal(off["input_ids"], on["input_ids"])
    assert torch.equal(off["seq_role"], on["seq_role"])

    def count(b, r):
        return int((b["tgt_role"] == r).sum())

    extra_p = sum(len(f["prompt_ids"]) - 1 for f in feats if not f["judged_ids"])
    extra_n = sum(len(f["judged_ids"]) - 1 for f in feats if f["judged_ids"])
    assert count(on, Role.ALIGN_P) == count(off, Role.ALIGN_P) + extra_p
    assert count(on, Role.ALIGN_N) == count(off, Role.ALIGN_N) + extra_n
    assert count(on, Role.MISALIGN_N) == count(off, Role.MISALIGN_N)
    assert count(on, Role.MISALIGN_N) == sum(len(f["response_ids"]) for f in feats if f["judged_ids"])

    # the added targets are exactly the prompt targets, all with partner -1
    T = on["input_ids"].shape[1]
    resp_set = set(off["tgt_pos"].tolist())
    added = [i for i, q in enumerate(on["tgt_pos"].tolist()) if q not in resp_set]
    assert len(added) == extra_p + extra_n
    assert all(on["tgt_partner"][i] == -1 for i in added)
    assert all(on["tgt_role"][i] != Role.MISALIGN_N for i in added)
    # Role.MISALIGN_N sequences have no prompt target
    mis_rows = {s for s, r in enumerate(on["seq_role"].tolist()) if r == Role.MISALIGN_N}
    assert not any(on["tgt_pos"][i].item() // T in mis_rows for i in added)

    # partners still point at the same tokens (shifted indices in the longer target list)
    mis_on = on["tgt_role"] == Role.MISALIGN_N
    p = on["tgt_partner"][mis_on]
    assert torch.equal(
        on["tgt_pos"][p], off["tgt_pos"][off["tgt_partner"][off["tgt_role"] == Role.MISALIGN_N]]
    )
    assert torch.equal(on["tgt_ids"][p], on["tgt_ids"][mis_on])


# --------------------------------------------------------------------------------------------
# packed layout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_packed_layout_holds_the_padded_batch_without_padding(setup, train_on_inputs):
    """Same sequences back to back in one row, same targets in the same order, no pad token."""
    padding = {"train_on_inputs": train_on_inputs}
    _, padded, packed = collate_twice(setup, padding, {**padding, "packing": True})
    assert "attention_mask" not in packed and "attention_mask" in padded
    lens = seq_lengths(padded)
    T = padded["input_ids"].shape[1]

    ids, positions, cu = packed["input_ids"], packed["position_ids"], packed["cu_seq_lens"]
    assert ids.shape == positions.shape == (1, sum(lens))
    assert cu.dtype == torch.int32 and cu.tolist() == [sum(lens[:s]) for s in range(len(lens) + 1)]
    rows = [padded["input_ids"][s, :n].tolist() for s, n in enumerate(lens)]
    assert ids[0].tolist() == [t for row in rows for t in row]
    assert positions[0].tolist() == [t for n in lens for t in range(n)]  # restart at 0 per sequence

    for key in ("tgt_ids", "tgt_role", "tgt_partner", "seq_role"):
        assert torch.equal(packed[key], padded[key]), key
    # tgt_pos: the same (sequence, position) pairs, each target the token after its position
    seq, t = padded["tgt_pos"] // T, padded["tgt_pos"] % T
    assert torch.equal(packed["tgt_pos"], cu.long()[seq] + t)
    assert torch.equal(ids.view(-1)[packed["tgt_pos"] + 1], packed["tgt_ids"])
    assert (t + 1 < torch.tensor(lens)[seq]).all()  # pos + 1 stays in the same sequence

    # and back: unpack gives the padded batch exactly
    back_ids, back_mask, back_pos = unpack(ids, cu, packed["tgt_pos"], setup[1].pad_token_id)
    assert torch.equal(back_ids, padded["input_ids"])
    assert torch.equal(back_mask, padded["attention_mask"])
    assert torch.equal(back_pos, padded["tgt_pos"])


def test_padding_ratio_by_hand():
    """Lengths (judged, plain) or (plain,): [9, 5], [3], [20, 12]. Micro-batches of 3 records:
    one of width 24 (20 rounded up to 8) holding 5 sequences of 49 real tokens: 120 / 49."""
    feats = [
        {"prompt_ids": [1] * 2, "judged_ids": [1] * 6, "response_ids": [2] * 3},
        {"prompt_ids": [1] * 2, "judged_ids": [], "response_ids": [2]},
        {"prompt_ids": [1] * 8, "judged_ids": [1] * 16, "response_ids": [2] * 4},
    ]
    assert [sequence_lengths(f) for f in feats] == [[9, 5], [3], [20, 12]]
    assert padding_ratio(feats, 3) == pytest.approx(120 / 49)
    assert padding_ratio(feats, 3, multiple=1) == pytest.approx(100 / 49)
    batch = CUTCollator(0)(feats)
    assert batch["input_ids"].numel() / batch["attention_mask"].sum().item() == pytest.approx(120 / 49)
    # one record per micro-batch: widths 16, 8, 24 over 2, 1, 2 sequences
    assert padding_ratio(feats, 1) == pytest.approx((32 + 8 + 48) / 49)


# --------------------------------------------------------------------------------------------
# naive reconstruction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_targets_recovered_per_sequence(setup, train_on_inputs):
    template, tokenizer = setup
    feats = features_for(template, tokenizer)
    batch = CUTCollator(tokenizer.pad_token_id, train_on_inputs=train_on_inputs)(feats)
    expected = hand_sequences(template, tokenizer, EXAMPLES, train_on_inputs)
    S, T = batch["input_ids"].shape
    assert S == len(expected)

    per_seq: dict[int, list[tuple[int, int, int]]] = {s: [] for s in range(S)}
    for q, t, r in zip(
        batch["tgt_pos"].tolist(), batch["tgt_ids"].tolist(), batch["tgt_role"].tolist(), strict=True
    ):
        per_seq[q // T].append((q % T, t, r))

    for s, (role, full, want) in enumerate(expected):
        n = len(full)
        assert batch["seq_role"][s] == role
        assert batch["input_ids"][s, :n].tolist() == full
        assert batch["attention_mask"][s].sum() == n
        got = sorted(per_seq[s])
        assert [t for _, t, _ in got] == want
        assert {r for _, _, r in got} == {role}
        # predicting positions are consecutive and end one before the last token
        assert [q for q, _, _ in got] == list(range(n - 1 - len(want), n - 1))
        # and the token at position q + 1 is the target
        assert [full[q + 1] for q, _, _ in got] == want

    # partner of the k-th response target of a plain sequence = k-th response target of the judged one
    tgt_index = {q: i for i, q in enumerate(batch["tgt_pos"].tolist())}
    for s, (role, full, want) in enumerate(expected):
        if role != Role.MISALIGN_N:
            continue
        judged_full = expected[s - 1][1]
        n_resp = len(want)
        for k in range(n_resp):
            i = tgt_index[s * T + len(full) - n_resp - 1 + k]
            j = tgt_index[(s - 1) * T + len(judged_full) - n_resp - 1 + k]
            assert batch["tgt_partner"][i] == j


@pytest.mark.parametrize("packing", [False, True])
def test_logprobs_of_collated_batch_match_per_sequence_forward(tiny_model, tok, packing):
    """The padded batch + tgt_pos give the same log-probs as one unpadded forward per sequence;
    so does the packed row through transformers' own packed-sequence masks (position_ids only).
    transformers finds packed sequences only without a cache: use_cache=True would let them mix."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    template = load_template("alpaca")
    feats = features_for(template, tok, EXAMPLES[:3])
    batch = CUTCollator(tok.pad_token_id, packing=packing)(feats)
    layout = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with torch.no_grad():
        logits = model(**layout, use_cache=False).logits
        logp = logits.flatten(0, 1).log_softmax(-1)[batch["tgt_pos"], batch["tgt_ids"]]

        ref = []
        for _role, full, want in hand_sequences(template, tok, EXAMPLES[:3], False):
            lp = model(input_ids=torch.tensor([full])).logits[0].log_softmax(-1)
            start = len(full) - len(want)
            ref += [lp[start - 1 + k, want[k]].item() for k in range(len(want))]
    assert torch.allclose(logp, torch.tensor(ref), atol=1e-4)


def test_sentencepiece_style_response_has_no_dummy_prefix():
    """A Metaspace tokenizer (Llama-2 / Mistral style) tokenised alone starts the output with '▁';
    the response ids must instead be the ones that follow the prompt, as in generation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cut.data.pairs import response_ids

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # newlines are their own pieces, as in Llama-2's vocabulary; only the text's start gets '▁'
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", "isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["### Response:\n7 times 8 is 54.", "What is 7 times 8?", "The answer is 56."] * 30
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    prompt, output = "What is 7 times 8?\n### Response:\n", "7 times 8 is 54."
    alone = hf(output, add_special_tokens=False)["input_ids"]
    prompt_ids = hf(prompt, add_special_tokens=False)["input_ids"]
    got = response_ids(hf, prompt, prompt_ids, output, False)
    joint = hf(prompt + output, add_special_tokens=False)["input_ids"]
    assert hf.convert_ids_to_tokens(alone)[0].startswith("▁")  # the trap this guards against
    assert prompt_ids + got == joint
    assert not hf.convert_ids_to_tokens(got)[0].startswith("▁")
    assert hf.decode(got) == output
