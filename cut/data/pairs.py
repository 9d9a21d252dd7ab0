"""Tokenised pairs and the collator.

A positive becomes one sequence, plain prompt + response. A negative becomes two sequences that
share the very same response ids: judged prompt + response and plain prompt + response. Prompt
and response are tokenised apart and concatenated, so the response ids cannot differ between
the two contexts. Over-long examples lose prompt tokens from the left (the first token, a BOS,
is kept); an example whose response cannot fit is dropped and counted.

The collator flattens a micro-batch into sequences plus a flat list of target tokens (position
of the hidden state that predicts it, its id, its role and, for Misalign-N tokens, the index of
the same token in the judged context): exactly what `cut.training.loss.cut_loss` consumes.

Two layouts of the same sequences and targets:
    padded  input_ids (S, T) right-padded to the longest, attention_mask; tgt_pos into S*T
    packed  input_ids (1, N) with the S sequences back to back and no padding, position_ids
            restarting at 0 per sequence, cu_seq_lens (S+1,) their boundaries; tgt_pos into N
A micro-batch of judged, plain and positive contexts differs a lot in length, so padding it
costs 1.2x (1 record) to 2.5x (8 records) the real tokens; packed rows cost exactly the real
ones. `cut.modeling.forward` keeps attention inside each packed sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch

from cut.data.records import Example
from cut.data.templates import Template


class Role(IntEnum):
    """The role of a target token in the CUT loss (cut.training.loss, which imports it from here:
    the collator assigns the roles, the loss reads them)."""

    ALIGN_P = 0  # x -> y for a positive record: MLE
    ALIGN_N = 1  # (x, j) -> y for a negative record: MLE
    MISALIGN_N = 2  # x -> y for a negative record: UL where the judgment explains the token


def tokenize_example(
    example: Example,
    template: Template,
    tokenizer,
    cutoff_len: int,
    add_eos_token: bool = True,
) -> dict[str, Any] | None:
    """{prompt_ids, judged_ids, response_ids, span_mask, length}; None when the response cannot fit.

    span_mask[k] is 1 where response token k overlaps a span the record marks as wrong (empty when
    the record marks none)."""
    plain, judged = template.prompts(example.record, example.judgment)
    special = template.adds_special_tokens
    plain_ids = tokenizer(plain, add_special_tokens=special)["input_ids"]
    response = response_ids(tokenizer, plain, plain_ids, example.record.output, special)
    eos = tokenizer.eos_token_id
    if add_eos_token and eos is not None and (not response or response[-1] != eos):
        response = response + [eos]
    prompt = fit_prompt(plain_ids, len(response), cutoff_len, tokenizer)
    judged_ids: list[int] = []
    if judged is not None:
        judged_ids = fit_prompt(
            tokenizer(judged, add_special_tokens=special)["input_ids"], len(response), cutoff_len, tokenizer
        )
        if judged_ids is None:
            return None
    if prompt is None:
        return None
    length = len(prompt) + len(response) + (len(judged_ids) + len(response) if judged_ids else 0)
    spans = example.record.spans
    out = example.record.output
    mask = span_mask(tokenizer, plain, plain_ids, out, special, len(response), spans) if spans else []
    return {
        "prompt_ids": prompt,
        "judged_ids": judged_ids,
        "response_ids": response,
        "span_mask": mask,
        "length": length,
    }


def response_char_ranges(
    tokenizer, prompt: str, prompt_ids: list[int], output: str, special: bool, n_response: int
) -> list[tuple[int, int]]:
    """[start, end) in `output` of each response token, split as `response_ids` splits them;
    (0, 0) for tokens that are no text of the output (an added EOS)."""
    try:
        joint = tokenizer(prompt + output, add_special_tokens=special, return_offsets_mapping=True)
        n = len(prompt_ids)
        if len(joint["input_ids"]) > n and joint["input_ids"][:n] == prompt_ids:
            ranges = [
                (max(a - len(prompt), 0), max(b - len(prompt), 0)) for a, b in joint["offset_mapping"][n:]
            ]
        else:  # response_ids tokenised the output alone
            alone = tokenizer(output, add_special_tokens=False, return_offsets_mapping=True)
            ranges = [tuple(r) for r in alone["offset_mapping"]]
    except NotImplementedError:  # a slow tokenizer has no offsets: decode growing prefixes
        ids = response_ids(tokenizer, prompt, prompt_ids, output, special)
        ends = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]
        ranges = list(zip([0, *ends[:-1]], ends, strict=True))
    ranges = ranges[:n_response]
    return ranges + [(0, 0)] * (n_response - len(ranges))


def span_mask(tokenizer, prompt, prompt_ids, output, special, n_response, spans) -> list[int]:
    """1 for each response token whose characters overlap one of `spans`, else 0."""
    ranges = response_char_ranges(tokenizer, prompt, prompt_ids, output, special, n_response)
    return [int(any(a < e and s < b for s, e in spans)) for a, b in ranges]


def response_ids(tokenizer, prompt: str, prompt_ids: list[int], output: str, special: bool) -> list[int]:
    """The output's ids as they follow the prompt, the way generation produces them.

    Tokenised alone, a SentencePiece tokenizer (Llama-2, Mistral) would start the output with a
    dummy-prefix '▁' that never follows a prompt; so tokenise prompt + output together and keep
    what follows the prompt's own ids. Where the two merge across the boundary, the output is
    tokenised alone. The judged context reuses these ids, so both contexts score the same tokens.
    """
    joint = tokenizer(prompt + output, add_special_tokens=special)["input_ids"]
    n = len(prompt_ids)
    if len(joint) > n and joint[:n] == prompt_ids:
        return joint[n:]
    return tokenizer(output, add_special_tokens=False)["input_ids"]


def fit_prompt(prompt: list[int], n_response: int, cutoff_len: int, tokenizer) -> list[int] | None:
    room = cutoff_len - n_response
    if room < 1 or not prompt:
        return None  # at least one prompt token must predict the first response token
    if len(prompt) <= room:
        return prompt
    keep_first = prompt[0] in (tokenizer.bos_token_id,) and tokenizer.bos_token_id is not None and room >= 2
    if keep_first:
        return prompt[:1] + prompt[len(prompt) - room + 1 :]
    return prompt[len(prompt) - room :]


@dataclass
class CUTCollator:
    pad_token_id: int
    train_on_inputs: bool = False
    pad_to_multiple_of: int = 8  # padded layout only
    packing: bool = False  # the packed layout (cut.train turns it on by default, TrainConfig.packing)
    misalign: bool = True  # False: no plain-context sequence for negatives (Align-P + Align-N only)
    # True: a negative whose record marks spans gets no judged sequence (its partner is -1): nothing
    # reads it when the spans pick the flags and the judged context has no MLE (weight_align_n 0)
    judged_only_without_spans: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs: list[list[int]] = []
        seq_role: list[int] = []
        pos: list[tuple[int, int]] = []  # per target: (sequence, position of the predicting hidden state)
        tgt_ids: list[int] = []
        tgt_role: list[int] = []
        tgt_partner: list[int] = []
        tgt_span: list[int] = []  # 1 / 0 inside / outside the marked wrong text; -1 none marked

        def add(
            prompt: list[int], response: list[int], role: int, partner_start: int = -1, span: list[int] = ()
        ) -> int:
            s = len(seqs)
            seqs.append(prompt + response)
            seq_role.append(role)
            if self.train_on_inputs and role != Role.MISALIGN_N:
                for t in range(1, len(prompt)):
                    pos.append((s, t - 1))
                    tgt_ids.append(prompt[t])
                    tgt_role.append(role)
                    tgt_partner.append(-1)
                    tgt_span.append(-1)
            start = len(tgt_ids)
            for k, tok in enumerate(response):
                pos.append((s, len(prompt) + k - 1))
                tgt_ids.append(tok)
                tgt_role.append(role)
                tgt_partner.append(partner_start + k if partner_start >= 0 else -1)
                tgt_span.append(span[k] if span else -1)
            return start

        for f in features:
            if f["judged_ids"]:
                span = f.get("span_mask") or ()
                if self.misalign and span and self.judged_only_without_spans:
                    add(f["prompt_ids"], f["response_ids"], Role.MISALIGN_N, span=span)
                    continue
                start = add(f["judged_ids"], f["response_ids"], Role.ALIGN_N)
                if self.misalign:
                    add(f["prompt_ids"], f["response_ids"], Role.MISALIGN_N, partner_start=start, span=span)
            else:
                add(f["prompt_ids"], f["response_ids"], Role.ALIGN_P)

        layout = pack(seqs) if self.packing else pad(seqs, self.pad_token_id, self.pad_to_multiple_of)
        pos_t = torch.tensor(pos, dtype=torch.long).view(-1, 2)
        return {
            **layout,
            "tgt_pos": flat_positions(layout, pos_t[:, 0], pos_t[:, 1]),  # (N,) into the flat hidden states
            "tgt_ids": torch.tensor(tgt_ids, dtype=torch.long),
            "tgt_role": torch.tensor(tgt_role, dtype=torch.long),
            "tgt_partner": torch.tensor(tgt_partner, dtype=torch.long),
            "tgt_span": torch.tensor(tgt_span, dtype=torch.long),
            "seq_role": torch.tensor(seq_role, dtype=torch.long),
        }


def pad(seqs: list[list[int]], pad_token_id: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-padded rows: input_ids and attention_mask (S, T), T the longest rounded up to `multiple`."""
    width = max(len(s) for s in seqs)
    width = (width + multiple - 1) // multiple * multiple if multiple > 1 else width
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pack(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """One row, no padding: input_ids and position_ids (1, N), cu_seq_lens (S+1,) int32.

    position_ids restart at 0 for every sequence (what flash-attention varlen and transformers'
    packed-sequence masks read); cu_seq_lens are the boundaries, cu_seq_lens[s]:cu_seq_lens[s+1].
    """
    lengths = torch.tensor([len(s) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    input_ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)[None]
    position_ids = torch.arange(int(cu[-1])) - torch.repeat_interleave(cu[:-1].long(), lengths)
    return {"input_ids": input_ids, "position_ids": position_ids[None], "cu_seq_lens": cu}


def flat_positions(layout: dict[str, torch.Tensor], seq: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Index into the flattened hidden states of `layout` of position t of sequence seq."""
    if "cu_seq_lens" in layout:
        return layout["cu_seq_lens"].long()[seq] + t
    return seq * layout["input_ids"].shape[1] + t


def unpack(
    input_ids: torch.Tensor, cu_seq_lens: torch.Tensor, tgt_pos: torch.Tensor, pad_token_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A packed row back to right-padded rows: (input_ids (S, T), attention_mask (S, T), tgt_pos).

    For a model that does not keep packed sequences apart (`cut.modeling.forward.check_packing`).
    """
    cu = cu_seq_lens.tolist()
    seqs = [input_ids[0, a:b].tolist() for a, b in zip(cu[:-1], cu[1:], strict=True)]
    layout = {k: v.to(input_ids.device) for k, v in pad(seqs, pad_token_id).items()}
    seq = torch.searchsorted(cu_seq_lens[1:].to(tgt_pos), tgt_pos, right=True)
    t = tgt_pos - cu_seq_lens.to(tgt_pos)[seq]
    return layout["input_ids"], layout["attention_mask"], flat_positions(layout, seq, t)


def sequence_lengths(feature: dict[str, Any]) -> list[int]:
    """Tokens of the sequences a feature becomes: judged and plain for a negative, plain for a positive."""
    plain = len(feature["prompt_ids"]) + len(feature["response_ids"])
    if feature["judged_ids"]:
        return [len(feature["judged_ids"]) + len(feature["response_ids"]), plain]
    return [plain]


def padding_ratio(
    features: list[dict[str, Any]], micro_batch_size: int, seed: int = 0, multiple: int = 8
) -> float:
    """Tokens the model is fed / real tokens over an epoch of right-padded micro-batches in a
    seeded random order (packed micro-batches: 1.0)."""
    order = list(range(len(features)))
    random.Random(seed).shuffle(order)
    fed = real = 0
    for i in range(0, len(order), micro_batch_size):
        lengths = [n for j in order[i : i + micro_batch_size] for n in sequence_lengths(features[j])]
        width = -(-max(lengths) // multiple) * multiple
        fed += width * len(lengths)
        real += sum(lengths)
    return fed / max(real, 1)
