"""Token distribution shift (TDS): where does an aligned model's answer leave its base model?

    python -m cut.analysis.tds --base_model DIR --aligned_model DIR --data_path FILE \
        --output_dir runs/tds [--prompt_template_name auto] [--base_prompt plain|same|zeroshot|urial|FILE] \
        [--urial_turn_format auto] [--batch_size 8] [--max_new_tokens 256] [--limit N] [--cutoff_len 4096]

Lin et al., "The Unlocking Spell on Base LLMs" (ICLR 2024), Sec. 2: for an instruction q and the
aligned model's answer o, every answer token o_t is looked up in the base model's next-token
distribution given q and o_<t. A position is
    unshifted  o_t is the base model's top-1 token
    marginal   o_t is the base model's 2nd or 3rd token
    shifted    o_t ranks lower under the base model
The paper finds most positions unshifted and the shifted ones mostly stylistic tokens (discourse
markers, politeness, safety phrases), more of them early in the answer.

Per answer token this module records the base rank of o_t, p_base(o_t), p_aligned(o_t), the base's
own top token, the aligned rank of o_t (1 for a greedy answer), and KL(p_aligned || p_base) of the
two next-token distributions: the exact figures. Beside them, the released analysis's definitions
(Re-Align/AlignTDS), each named for what it is:
    kl_top30, kl_top10  AlignTDS's "KL" and "KL@10" (src/compute_dist_diff.py): each model's top 30
                        tokens renormalised by a softmax over their logits alone, then KL(base ||
                        aligned) summed over the tokens both models' first 30 (10) hold, tokens
                        matched by their decoded text (topk_kl); a partial sum, so it can be < 0
    top5_share          how often o_t is within the base's top 5 (the paper's finding 3)
    by_token_position   class shares, top-5 share and the KLs per absolute answer position t,
                        as the paper plots them (the 10 relative bins stay beside them)
The published analysis ran one forward per token; here each model
runs ONE teacher-forced forward per batch of answers, and the two output heads then run on the
answer positions in chunks of C positions (C = CHUNK_ELEMENTS / V), so no (T, V) float32 logits
ever exist: the extra memory is a few (C, V) chunks, flat in the vocabulary size.

Inputs. The project's records (.json list, .jsonl, datasets folder): `instruction`, optional
`input`, optional `output` = the aligned model's answer (e.g. a cut.generate file). A record
without an output (or with a blank one) is answered greedily by the aligned model
(cut.generate.generate_texts, --max_new_tokens) and the text is tokenised like any other answer.
So a greedy answer's tokens are the aligned model's top tokens up to that re-tokenisation (a model
may generate a split the tokenizer would not make, e.g. a character in byte pieces); `aligned_top1`
in the report says how often the answer token is the aligned model's own top token.
--base_model / --aligned_model: model folders (or hub names) or LoRA adapter folders; the two must
share a tokenizer (same vocabulary) and output size.

Prompts. The aligned model sees its plain prompt (cut.data.templates, as in training and cut.generate;
--prompt_template_name alpaca | chat | a .json template | auto; urial: the URIAL prefix, for a
base model aligned in context, scoring given answers such as cut urial's). The answer is tokenised once,
after that prompt (cut.data.pairs.response_ids), and the very same ids are scored under both models; no
EOS is added. The base model's context, --base_prompt:
    plain  the same template rendered for the base: chat where the base's tokenizer has a chat
           template, else alpaca (base models usually have none)
    same   exactly the aligned model's prompt text (chat markup and all)
    zeroshot  AlignTDS's own base context, byte for byte (ZERO_SHOT: '# Query:' / '# Answer:' with
           the query between fences; the tokenizer adds its BOS)
    urial  the project's URIAL prompt (cut/resources/urial/default.md), ending where the answer begins
    FILE   a URIAL prompt file, verbatim, the query after it as URIAL writes it (cut.urial.render;
           --urial_turn_format auto = URIAL's rule on the file's name)
A prompt + answer longer than --cutoff_len keeps its prompt whole and loses answer tokens at the
end (counted); a prompt that leaves no room is dropped (counted).

Outputs in --output_dir, each written whole (temp file + rename):
    tds.json   fractions of unshifted / marginal / shifted positions, their profile over the
               relative position in the answer (10 bins), the tokens most often shifted, mean KL,
               AlignTDS's KLs, the top-5 share, the absolute-position curves, and every record's
               per-token numbers
    tds.png    stacked bars over relative position, class shares over absolute position (with the
               top-5 share) + the top shifted tokens
    tds.html   every answer token coloured by its class (or by KL), numbers on hover
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cut.analysis.page import render_page
from cut.analysis.ratios import Placement, check_matplotlib, check_output_folder, rounded, run_analysis
from cut.args import INT_MAX, integer, opt
from cut.data.files import check_writable, write_bytes_atomic, write_json_atomic, write_text_atomic
from cut.data.pairs import response_char_ranges, response_ids
from cut.data.records import read_raw, text_field
from cut.data.templates import Template, load_template, resolve_template_name
from cut.errors import ConfigError, DataError
from cut.modeling.generate import BATCH_SIZE, NEW_TOKENS, Sampling, generate_texts, validate_instructions
from cut.modeling.loading import check_model_path, load_model, load_tokenizer, model_name

logger = logging.getLogger("cut.analysis.tds")

CLASSES = ("unshifted", "marginal", "shifted")
MARGINAL_MAX_RANK = 3  # base ranks 2..3 are marginal: o_t is in the base's top 3 (Lin et al.)
BASE_PROMPTS = ("plain", "same", "urial", "zeroshot")  # or the path of a URIAL prompt file
# the base model's context in AlignTDS's released analysis (src/logit_analysis.py, --mode i2b with
# --enable_template, as its README runs it), byte for byte; the tokenizer adds its BOS before it
ZERO_SHOT = "# Query: \n ```{query}``` \n\n \n# Answer: \n ```"
# one (C, V) float32 chunk of logits holds at most this many elements (16 MiB); scoring a chunk
# keeps about four such tensors alive (both models' log-probs, their difference, a temporary):
# 69 MiB of live tensors at V = 262,144 for 1,020 answer tokens, as at V = 32,000 (tests/test_tds.py)
CHUNK_ELEMENTS = 1 << 22
BINS = 10  # relative-position bins of the profile
# AlignTDS (Re-Align/AlignTDS): src/logit_analysis.py keeps each model's top 30 tokens (--top_k 30,
# which its README's commands keep); src/compute_dist_diff.py's "KL" reads the first 50 of them (so
# all 30) and its "KL@10" (the web demo's figure) the first 10
RELEASED_TOP_K = 30
RELEASED_WINDOWS = (30, 10)
TOP_N_SHARE = 5  # the paper's finding: the aligned token is mostly within the base's top 5
MIN_CURVE_ANSWERS = 5  # tds.png's absolute-position panel stops where fewer answers remain
TOP_K = 20  # shifted tokens listed in tds.json (the plot shows the first 15)
COLOURS = {"unshifted": "#cbd5e1", "marginal": "#f59e0b", "shifted": "#dc2626"}


@dataclass
class TDSOptions(Placement):
    """Token distribution shift: where an aligned model departs from its base, token by token."""

    base_model: str = opt("", "Base model folder or name, or a LoRA adapter folder.", required=True)
    aligned_model: str = opt("", "Aligned model folder or name, or a LoRA adapter folder.", required=True)
    data_path: str = opt("", "Records with instruction, optional input and optional output.", required=True)
    output_dir: str = opt("", "Folder for tds.json, tds.png and tds.html.", required=True)
    prompt_template_name: str = opt(
        "auto",
        "The aligned model's prompt: alpaca | alpaca_input | chat | a .json template | auto (the "
        "template it was CUT-trained with, else chat if its tokenizer has one, else alpaca) | urial "
        "(the URIAL prefix: a base model aligned in context; answers must be given, e.g. by cut urial).",
    )
    base_prompt: str = opt(
        "plain",
        "The base model's context: plain (the same template, alpaca where the base has no chat "
        "template) | same (the aligned prompt's exact text) | zeroshot (AlignTDS's released '# Query:' / "
        "'# Answer:' template) | urial (the project's URIAL prompt) | the path of a URIAL prompt file "
        "(used verbatim, as URIAL does).",
        parse=lambda text: _base_prompt_choice(text, argparse.ArgumentTypeError),
    )
    urial_turn_format: str = opt(
        "auto",
        "How the query follows a URIAL prompt on the base's side: auto (URIAL's rule: from the file's "
        "name) | backticks | v5 | v6. Only with --base_prompt urial or a prompt file.",
    )
    batch_size: int = opt(
        8, "Answers per forward of each model (and per generation batch).", parse=BATCH_SIZE
    )
    max_new_tokens: int = opt(
        256, "Length limit of the answers generated for records without an output.", parse=NEW_TOKENS
    )
    limit: int = opt(0, "Only the first N records of the file; 0 = all.", parse=integer(0, INT_MAX))
    cutoff_len: int = opt(
        4096, "Maximum tokens of prompt + answer; longer answers lose their end.", parse=integer(2, 2**20)
    )

    def __post_init__(self) -> None:
        for name in ("base_model", "aligned_model", "data_path", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        _base_prompt_choice(self.base_prompt, ConfigError)
        if self.base_prompt not in ("plain", "same", "zeroshot"):
            _urial().check_turn_format(self.urial_turn_format)
        elif self.urial_turn_format != "auto":
            raise ConfigError(
                f"--urial_turn_format {self.urial_turn_format} applies to a URIAL context only (--base_prompt "
                f"urial or a prompt file), not to --base_prompt {self.base_prompt}"
            )
        for name, low in (("batch_size", 1), ("max_new_tokens", 1), ("cutoff_len", 2), ("limit", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        self.check_fields()  # dtype among DTYPES, device usable here, numbers in range

    def check_paths(self) -> None:
        """Both models are there and the output folder can be one (before anything loads)."""
        check_model_path(self.base_model)
        check_model_path(self.aligned_model)
        check_output_folder(self.output_dir)


def _base_prompt_choice(text: str, error: type[Exception]) -> str:
    """--base_prompt: a named context, or a URIAL prompt file that exists."""
    if text in BASE_PROMPTS or Path(text).is_file():
        return text
    raise error(
        f"base_prompt must be one of {', '.join(BASE_PROMPTS)} or a URIAL prompt file; {text!r} is "
        + ("a folder" if Path(text).is_dir() else "neither (no such file)")
    )


# ---------------------------------------------------------------- the core: logits -> shift


class Shift(NamedTuple):
    """Per answer token o_t (every field (N,)): o_t and the aligned distribution under the base."""

    base_rank: Tensor  # long, 1 + the number of tokens the base scores strictly above o_t
    aligned_rank: Tensor  # long, the same under the aligned model (1 when o_t is its greedy token)
    base_logp: Tensor  # float32, log p_base(o_t | q, o_<t)
    aligned_logp: Tensor  # float32, log p_aligned(o_t | q, o_<t)
    kl: Tensor  # float32, KL(p_aligned || p_base) of the next-token distributions, nats
    base_top: Tensor  # long, the base's top-1 token
    kl_top30: Tensor  # float32, AlignTDS's "KL": KL(base || aligned) over the top-30 lists (topk_kl)
    kl_top10: Tensor  # float32, AlignTDS's "KL@10": the same within each list's first 10

    def select(self, index: Tensor | slice) -> Shift:
        return Shift(*(t[index] for t in self))


_long, _float = torch.zeros(0, dtype=torch.long), torch.zeros(0)
_EMPTY = Shift(_long, _long, _float, _float, _float, _long, _float, _float)


def classify(base_rank: Tensor) -> Tensor:
    """0 unshifted (base rank 1), 1 marginal (rank 2..3), 2 shifted (lower); long, like base_rank."""
    return (base_rank > 1).long() + (base_rank > MARGINAL_MAX_RANK).long()


def topk_kl(
    zb: Tensor, za: Tensor, top_k: int = RELEASED_TOP_K, windows: tuple[int, ...] = RELEASED_WINDOWS,
    same_text: Tensor | None = None,
) -> list[Tensor]:  # fmt: skip
    """AlignTDS's KL (src/compute_dist_diff.py, metric "KL"), one (C,) float32 tensor per window.

    zb, za: base and aligned logits (C, V). Each model keeps its top_k tokens (logit_analysis.py's
    --top_k, 30), renormalised by a softmax over those top_k logits alone; within the first `window`
    of each list (capped at top_k), the sum over the tokens both windows hold of
        p_base(v) * log(p_base(v) / p_aligned(v))        # KL(base || aligned), base first
    A token in one window only adds nothing, so the figure is not a divergence (it can be < 0).
    Tokens are matched by their decoded text as AlignTDS matches them (two ids that decode alike
    are one token, the higher-ranked one's probability counts): same_text (V,) maps each id to the
    first id decoding to the same text (decoded_token_ids); None matches ids."""
    k = min(top_k, zb.shape[1])
    vb, ib = zb.topk(k, dim=1)  # (C, k), highest first
    va, ia = za.topk(k, dim=1)
    lb, la = vb.double().log_softmax(1), va.double().log_softmax(1)  # renormalised over the top k
    if same_text is not None:
        ib, ia = same_text[ib], same_text[ia]
    out = []
    for window in windows:
        w = min(window, k)
        tb, ta = ib[:, :w], ia[:, :w]
        earlier = torch.ones(w, w, dtype=torch.bool, device=tb.device).tril(-1)  # (i, j): j < i
        first = ~((tb[:, :, None] == tb[:, None, :]) & earlier).any(2)  # a text's first place in base's list
        match = tb[:, :, None] == ta[:, None, :]  # (C, w, w)
        shared = match.any(2) & first
        la_v = la[:, :w].gather(1, match.byte().argmax(2))  # its first place in the aligned list
        lb_v = lb[:, :w]
        keep = shared & (lb_v.exp() > 0) & (la_v.exp() > 0)  # AlignTDS skips a probability that is 0
        terms = torch.where(keep, lb_v.exp() * (lb_v - la_v), torch.zeros_like(lb_v))
        out.append(terms.sum(1).float())
    return out


def _shift_stats_(zb: Tensor, za: Tensor, labels: Tensor, same_text: Tensor | None = None) -> Shift:
    """shift_stats on float32 logits (C, V) that it overwrites: the chunked path's fresh head outputs."""
    kl_top30, kl_top10 = topk_kl(zb, za, same_text=same_text)  # before the logits are overwritten
    y = labels[:, None]
    zb_y, za_y = zb.gather(1, y), za.gather(1, y)  # (C, 1)
    base_rank = (zb > zb_y).sum(1) + 1  # a tie with o_t counts for o_t
    aligned_rank = (za > za_y).sum(1) + 1
    base_top = zb.argmax(1)
    lse_b, lse_a = torch.logsumexp(zb, 1, keepdim=True), torch.logsumexp(za, 1, keepdim=True)
    lb, la = zb.sub_(lse_b), za.sub_(lse_a)  # log-softmax in place
    diff = la - lb  # log p_aligned - log p_base, (C, V)
    # KL(a || b) = sum_v p_a(v) (log p_a(v) - log p_b(v)); la becomes p_a in place. >= 0 up to rounding
    kl = diff.mul_(la.exp_()).sum(1).clamp_min_(0.0)
    logp_b, logp_a = (zb_y - lse_b)[:, 0], (za_y - lse_a)[:, 0]
    return Shift(base_rank, aligned_rank, logp_b, logp_a, kl, base_top, kl_top30, kl_top10)


def shift_stats(
    logits_base: Tensor, logits_aligned: Tensor, labels: Tensor, same_text: Tensor | None = None
) -> Shift:
    """The per-token numbers from full logits: base (C, V), aligned (C, V), labels (C,) = o_t.

    The reference the chunked path is built from; it materialises whatever it is given, so call
    it on small inputs (tests) and `chunked_shift` on hidden states."""
    if logits_base.shape != logits_aligned.shape:
        raise ValueError(
            f"logits differ in shape: base {tuple(logits_base.shape)}, aligned {tuple(logits_aligned.shape)}"
        )
    return _shift_stats_(logits_base.float().clone(), logits_aligned.float().clone(), labels, same_text)


def _chunk_logits(head, hidden: Tensor, transform) -> Tensor:
    z = head(hidden).float()  # (C, V): one chunk only
    return transform(z) if transform is not None else z


def chunked_shift(
    hidden_base: Tensor,
    head_base,
    hidden_aligned: Tensor,
    head_aligned,
    labels: Tensor,
    vocab_size: int,
    chunk_size: int = 0,
    transform_base=None,
    transform_aligned=None,
    same_text: Tensor | None = None,
) -> Shift:
    """shift_stats from hidden states without (N, V) logits: each head runs on C rows at a time.

    hidden_base, hidden_aligned: (N, H_b), (N, H_a), the states that predict labels (N,);
    head_*: the output heads (called as modules, so LoRA on a head applies); transform_*: a
    model's logit post-processing (cut.modeling.forward.logit_transform: Gemma's softcap ...).
    chunk_size: positions per chunk; 0 = CHUNK_ELEMENTS // vocab_size. same_text: see topk_kl.
    """
    if chunk_size <= 0:
        chunk_size = max(1, CHUNK_ELEMENTS // vocab_size)
    n = labels.shape[0]
    # the outputs exist before the first chunk: nothing small and long-lived is allocated between
    # one chunk's big blocks and the next's, which on CPU would fragment the heap (glibc keeps the
    # freed blocks; RSS grew to several times the unchunked size in our runs)
    out = Shift(*(torch.empty(n, dtype=t.dtype, device=labels.device) for t in _EMPTY))
    for start in range(0, n, chunk_size):
        at = slice(start, start + chunk_size)
        zb = _chunk_logits(head_base, hidden_base[at], transform_base)
        za = _chunk_logits(head_aligned, hidden_aligned[at], transform_aligned)
        if zb.shape[1] != za.shape[1]:
            raise ConfigError(
                f"the base model scores {zb.shape[1]} tokens and the aligned one {za.shape[1]}: the two "
                "next-token distributions cannot be compared"
            )
        for dest, part in zip(out, _shift_stats_(zb, za, labels[at], same_text), strict=True):
            dest[at] = part
        del zb, za
    return out


# ---------------------------------------------------------------- models -> shift


def _padded(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded prompt + answer rows (B, T), their mask, and the flat index into B*T of each
    state that predicts an answer token (the one before it)."""
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pos: list[int] = []
    for r, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        if not p:
            raise ValueError(f"row {r}: an empty prompt; at least one token must predict the answer")
        ids[r, : len(p) + len(a)] = torch.tensor(p + a, dtype=torch.long)
        mask[r, : len(p) + len(a)] = 1
        pos.extend(range(r * width + len(p) - 1, r * width + len(p) + len(a) - 1))
    return ids, mask, torch.tensor(pos, dtype=torch.long)


def _answer_hidden(
    lm, prompts: list[list[int]], answers: list[list[int]], pad_id: int, check: bool
) -> Tensor:
    """(N, H): the decoder states that predict each answer token, from one forward of the batch."""
    from cut.modeling.forward import check_head_path, decoder_hidden  # imports transformers: seconds

    ids, mask, pos = _padded(prompts, answers, pad_id)
    device = lm.get_output_embeddings().weight.device
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    if check:  # the head path (with its logit transform) against the model's own forward, once
        targets = torch.tensor([t for a in answers for t in a], dtype=torch.long, device=device)
        check_head_path(lm, lm.forward, ids, mask, pos, targets)
    return decoder_hidden(lm, ids, mask).flatten(0, 1).index_select(0, pos)


def _vocab_size(lm) -> int:
    return lm.get_output_embeddings().weight.shape[0]


@torch.no_grad()
def score_ids(
    base,
    aligned,
    prompts_base: list[list[int]],
    prompts_aligned: list[list[int]],
    answers: list[list[int]],
    *,
    pad_token_id: int = 0,
    batch_size: int = 8,
    chunk_size: int = 0,
    check: bool = True,
    bar: tqdm | None = None,
    same_text: Tensor | None = None,
) -> list[Shift]:
    """A Shift per answer (token ids): answers[i] after prompts_base[i] under `base` and after
    prompts_aligned[i] under `aligned`; one forward of each model per batch of `batch_size`
    answers (longest first), heads in chunks (see chunked_shift). `base` and `aligned` may be
    the same model object. `check` compares the head path with each model's own forward once.
    same_text: (V,) token ids matched by their text in topk_kl (decoded_token_ids); None: by id."""
    from cut.modeling.forward import logit_transform

    if not len(prompts_base) == len(prompts_aligned) == len(answers):
        raise ValueError("prompts_base, prompts_aligned and answers differ in length")
    if _vocab_size(base) != _vocab_size(aligned):
        raise ConfigError(
            f"the base model's output head has {_vocab_size(base)} tokens and the aligned model's "
            f"{_vocab_size(aligned)}: they must share a vocabulary"
        )
    transforms = [logit_transform(m.config.get_text_config()) for m in (base, aligned)]
    order = sorted(range(len(answers)), key=lambda i: -(len(prompts_aligned[i]) + len(answers[i])))
    device = base.get_output_embeddings().weight.device
    same_text = same_text.to(device) if same_text is not None else None
    out: list[Any] = [None] * len(answers)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ans = [answers[i] for i in idx]
        first = check and start == 0
        hb = _answer_hidden(base, [prompts_base[i] for i in idx], ans, pad_token_id, first)
        ha = _answer_hidden(aligned, [prompts_aligned[i] for i in idx], ans, pad_token_id, first)
        labels = torch.tensor([t for a in ans for t in a], dtype=torch.long, device=hb.device)
        shift = chunked_shift(
            hb,
            base.get_output_embeddings(),
            ha.to(hb.device),
            aligned.get_output_embeddings(),
            labels,
            _vocab_size(base),
            chunk_size,
            *transforms,
            same_text=same_text,
        )
        shift = Shift(*(t.cpu() for t in shift))
        at = 0
        for i, a in zip(idx, ans, strict=True):
            out[i] = shift.select(slice(at, at + len(a)))
            at += len(a)
        if bar is not None:
            bar.update(len(idx))
    return out


def decoded_token_ids(tokenizer, vocab_size: int) -> Tensor:
    """(vocab_size,) long: each id mapped to the first id whose one-token decode is the same text,
    the token identity AlignTDS compares (its lists hold tokenizer.decode(id)). Ids past the
    tokenizer (a head padded beyond it) map to themselves."""
    n = min(len(tokenizer), vocab_size)
    texts = _one_token_texts(tokenizer, n)
    first: dict[str, int] = {}
    same = [first.setdefault(text, i) for i, text in enumerate(texts)]
    return torch.tensor(same + list(range(n, vocab_size)), dtype=torch.long)


def _one_token_texts(tokenizer, n: int) -> list[str]:
    """tokenizer.decode([i]) for i < n. A fast tokenizer's Rust decoder does the whole vocabulary in
    one call (tokenizer.batch_decode took ~0.5 ms a token here: minutes for a 262k vocabulary); it
    is used when it agrees with decode on a sample of ids, else every id goes through decode."""
    ids = [[i] for i in range(n)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        texts = backend.decode_batch(ids, skip_special_tokens=False)
        sample = range(0, n, max(1, n // 256))
        if all(texts[i] == tokenizer.decode(ids[i]) for i in sample):
            return texts
    return tokenizer.batch_decode(ids)


@dataclass
class Scored:
    """One answer, scored: its tokens (as scored, after any cut) and their Shift."""

    ids: list[int]
    text: list[str]  # each token's text in the answer ('' for a piece of a split character)
    truncated: bool  # the answer lost tokens at its end to cutoff_len
    shift: Shift


def token_texts(
    tokenizer, prompt: str, prompt_ids: list[int], answer: str, special: bool, n: int
) -> list[str]:
    """The answer's text cut by each token's character range (gaps go to the next token); the
    texts of all the answer's tokens join to the answer."""
    ranges = response_char_ranges(tokenizer, prompt, prompt_ids, answer, special, n)
    texts, end = [], 0
    for _, b in ranges:
        texts.append(answer[end:b] if b > end else "")
        end = max(end, b)
    return texts


def prepare_answer(
    tokenizer,
    prompt_base: str,
    prompt_aligned: str,
    answer: str,
    special_base: bool,
    special_aligned: bool,
    cutoff_len: int,
) -> tuple[list[int], list[int], list[int], list[str], bool] | None:
    """(base prompt ids, aligned prompt ids, answer ids, token texts, truncated); the answer is
    tokenised after the aligned prompt and cut to fit cutoff_len beside the longer prompt. None
    when a prompt leaves no room for one answer token."""
    pa = tokenizer(prompt_aligned, add_special_tokens=special_aligned)["input_ids"]
    pb = tokenizer(prompt_base, add_special_tokens=special_base)["input_ids"]
    room = cutoff_len - max(len(pa), len(pb))
    if room < 1:
        return None
    ids = response_ids(tokenizer, prompt_aligned, pa, answer, special_aligned)
    texts = token_texts(tokenizer, prompt_aligned, pa, answer, special_aligned, len(ids))
    return pb, pa, ids[:room], texts[:room], len(ids) > room


def tds_score(
    base,
    aligned,
    tokenizer,
    prompts_base: list[str],
    prompts_aligned: list[str],
    answers: list[str],
    *,
    special_base: bool = True,
    special_aligned: bool = True,
    cutoff_len: int = 4096,
    batch_size: int = 8,
    chunk_size: int = 0,
    progress: bool = False,
) -> list[Scored | None]:
    """Score each answer text after its prompts (texts) under both models: a Scored per answer,
    None where a prompt leaves no room in cutoff_len. special_*: whether the tokenizer adds its own
    special tokens (BOS) to that prompt (False for a chat template, which writes its own)."""
    prepared = [
        prepare_answer(tokenizer, pb, pa, ans, special_base, special_aligned, cutoff_len)
        for pb, pa, ans in zip(prompts_base, prompts_aligned, answers, strict=True)
    ]
    kept = [i for i, p in enumerate(prepared) if p is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    same_text = decoded_token_ids(tokenizer, _vocab_size(base))
    with tqdm(total=len(kept), desc="scoring", unit="answer", disable=None if progress else True) as bar:
        shifts = score_ids(
            base,
            aligned,
            [prepared[i][0] for i in kept],
            [prepared[i][1] for i in kept],
            [prepared[i][2] for i in kept],
            pad_token_id=pad,
            batch_size=batch_size,
            chunk_size=chunk_size,
            bar=bar,
            same_text=same_text,
        )
    out: list[Scored | None] = [None] * len(answers)
    for i, shift in zip(kept, shifts, strict=True):
        _, _, ids, texts, truncated = prepared[i]
        out[i] = Scored(ids, texts, truncated, shift)
    return out


# ---------------------------------------------------------------- the report


def position_bins(n: int, bins: int = BINS) -> Tensor:
    """The relative-position bin of each of n answer tokens: token k falls in floor(k * bins / n)."""
    return torch.arange(n) * bins // max(n, 1)


def _mean(x: Tensor) -> float | None:
    return float(x.double().mean()) if x.numel() else None


def _class_fractions(cls: Tensor) -> dict[str, float | None]:
    n = cls.numel()
    return {name: (int((cls == k).sum()) / n if n else None) for k, name in enumerate(CLASSES)}


def token_label(tokenizer, tid: int) -> str:
    """A token's text; its vocabulary entry where it is a piece of a character (decodes to U+FFFD)."""
    text = tokenizer.decode([tid])
    return tokenizer.convert_ids_to_tokens(tid) if "\ufffd" in text else text


def by_token_position(cls: Tensor, position: Tensor, shift: Shift) -> list[dict[str, Any]]:
    """Per absolute answer position t = 0, 1, ... (as the paper plots): how many answers reach it,
    the class shares, the top-5 share and the mean AlignTDS KLs of the tokens at t."""
    if not position.numel():
        return []
    size = int(position.max()) + 1
    tokens = torch.bincount(position, minlength=size).double()  # >= 1 at every t: answers start at 0

    def mean_at(keep: Tensor | None = None, weights: Tensor | None = None) -> list[float]:
        pos = position if keep is None else position[keep]
        w = None if weights is None else weights.double()
        return (torch.bincount(pos, w, minlength=size) / tokens).tolist()

    columns = {name: mean_at(cls == k) for k, name in enumerate(CLASSES)}
    columns[f"top{TOP_N_SHARE}"] = mean_at(shift.base_rank <= TOP_N_SHARE)
    for name in ("kl_top30", "kl_top10"):
        columns[name] = mean_at(weights=getattr(shift, name))
    return [
        {"position": t, "tokens": int(tokens[t]), **{k: v[t] for k, v in columns.items()}}
        for t in range(size)
    ]


def summarise(scored: list[Scored | None], tokenizer, bins: int = BINS, top_k: int = TOP_K) -> dict[str, Any]:
    """The report over every scored answer token: class fractions (they sum to 1), mean KL (and per
    class), mean p_base / p_aligned of o_t, how often o_t is the aligned model's top token, the
    profile over relative position, and the tokens most often shifted; and AlignTDS's definitions:
    its top-k KL(base || aligned), the share of o_t within the base's top 5, and the curves over
    the absolute position in the answer."""
    rows = [s for s in scored if s is not None]
    shift = Shift(*(torch.cat([s.shift[k] for s in rows] + [_EMPTY[k]]) for k in range(len(Shift._fields))))
    n = shift.base_rank.numel()
    cls = classify(shift.base_rank)
    where = torch.cat([position_bins(len(s.ids), bins) for s in rows] + [torch.zeros(0, dtype=torch.long)])
    position = torch.cat([torch.arange(len(s.ids)) for s in rows] + [torch.zeros(0, dtype=torch.long)])
    ids = torch.tensor([t for s in rows for t in s.ids], dtype=torch.long)
    by_position = []
    for b in range(bins):
        at = where == b
        by_position.append(
            {
                "bin": b,
                "from": b / bins,
                "to": (b + 1) / bins,
                "tokens": int(at.sum()),
                **_class_fractions(cls[at]),
                "mean_kl": _mean(shift.kl[at]),
            }
        )
    seen = Counter(ids.tolist())
    shifted = Counter(ids[cls == 2].tolist())
    top = sorted(shifted.items(), key=lambda kv: (-kv[1], -kv[1] / seen[kv[0]], kv[0]))[:top_k]
    return {
        "tokens": n,
        "fractions": _class_fractions(cls),
        "counts": {name: int((cls == k).sum()) for k, name in enumerate(CLASSES)},
        "mean_kl": _mean(shift.kl),
        "mean_kl_by_class": {name: _mean(shift.kl[cls == k]) for k, name in enumerate(CLASSES)},
        "mean_base_p": _mean(shift.base_logp.exp()),
        "mean_aligned_p": _mean(shift.aligned_logp.exp()),
        "aligned_top1": _mean((shift.aligned_rank == 1).float()),
        "by_position": by_position,
        # AlignTDS's definitions (README, "cut tds": as released / differs on purpose)
        "topk_kl_base_aligned": {"top30": _mean(shift.kl_top30), "top10": _mean(shift.kl_top10)},
        f"top{TOP_N_SHARE}_share": _mean((shift.base_rank <= TOP_N_SHARE).float()),
        "by_token_position": by_token_position(cls, position, shift),
        "top_shifted": [
            {
                "token": token_label(tokenizer, tid),
                "id": tid,
                "shifted": count,
                "occurrences": seen[tid],
                "shifted_share": count / seen[tid],
            }
            for tid, count in top
        ],
    }


# ---------------------------------------------------------------- inputs


def load_inputs(opts: TDSOptions) -> list[dict[str, Any]]:
    """{index, instruction, input, output (None: to generate)} of the first `limit` records."""
    rows, source = read_raw(opts.data_path)
    if opts.limit:
        rows = rows[: opts.limit]
    records = validate_instructions(rows, source)
    out = []
    for i, (raw, rec) in enumerate(zip(rows, records, strict=True)):
        answer = text_field(source, i, raw, "output", False)
        out.append(
            {
                "index": i,
                "instruction": rec["instruction"],
                "input": rec["input"],
                "output": answer if answer and answer.strip() else None,
            }
        )
    return out


def load_tokenizers(opts: TDSOptions) -> tuple[Any, Any]:
    """(base tokenizer, aligned tokenizer); ConfigError unless they share a vocabulary."""
    tok_base, tok_aligned = load_tokenizer(opts.base_model), load_tokenizer(opts.aligned_model)
    if tok_base.get_vocab() != tok_aligned.get_vocab():
        raise ConfigError(
            f"{opts.base_model} and {opts.aligned_model}: the tokenizers differ ({len(tok_base)} and "
            f"{len(tok_aligned)} tokens, or the same count mapped differently); TDS compares the two "
            "models on the same token ids, so they must share a tokenizer"
        )
    return tok_base, tok_aligned


def base_template(aligned: Template, tok_base) -> Template:
    """--base_prompt plain: the aligned template for the base; alpaca where the base has no chat template."""
    if aligned.formats is not None:
        return aligned
    if getattr(tok_base, "chat_template", None):
        return load_template("chat", tok_base)
    return load_template("alpaca")


class UrialTemplate:
    """The aligned side as a base model under the URIAL prefix (--prompt_template_name urial)."""

    formats = None  # so that --base_prompt plain renders the base's own template

    def __init__(self, tokenizer):
        self.urial = _urial()
        self.name = self.urial.default_prompt().tag
        self.adds_special_tokens = self.urial.adds_special_tokens(tokenizer, self.plain("?"))

    def plain(self, instruction: str, input: str = "") -> str:
        return self.urial.urial_prompt(self.urial.query_text(instruction, input))


def _urial():
    try:
        from cut import urial  # imported here: TDS without URIAL does not need it
    except ImportError as err:
        raise ConfigError(f"--base_prompt urial needs cut.urial ({err}); use --base_prompt plain") from None
    return urial


def zero_shot_prompt(instruction: str, input: str = "") -> str:
    """AlignTDS's base context for one record (ZERO_SHOT; the query is URIAL's instruction text)."""
    return ZERO_SHOT.format(query=_urial().query_text(instruction, input))


def build_prompts(
    opts: TDSOptions, records: list[dict[str, Any]], aligned: Template, tok_base
) -> tuple[list[str], bool, str]:
    """The base model's prompt texts, whether its tokenizer adds its BOS to them, and a name."""
    if opts.base_prompt == "same":
        return (
            [aligned.plain(r["instruction"], r["input"]) for r in records],
            aligned.adds_special_tokens,
            "same",
        )
    if opts.base_prompt == "zeroshot":  # AlignTDS encodes it with add_special_tokens=True
        return [zero_shot_prompt(r["instruction"], r["input"]) for r in records], True, "zeroshot"
    if opts.base_prompt != "plain":  # a URIAL context: the project's prompt, or a file verbatim
        urial = _urial()
        path = None if opts.base_prompt == "urial" else opts.base_prompt
        prompt = urial.load_urial_prompt(path, opts.urial_turn_format)
        texts = [
            urial.render(prompt.text, urial.query_text(r["instruction"], r["input"]), prompt.turn_format)
            for r in records
        ]
        special = urial.adds_special_tokens(tok_base, texts[0]) if texts else True
        return texts, special, prompt.tag
    template = base_template(aligned, tok_base)
    return (
        [template.plain(r["instruction"], r["input"]) for r in records],
        template.adds_special_tokens,
        template.name,
    )


def _load_lm(path: str, opts: TDSOptions):
    lm = load_model(path, opts.dtype, opts.device)
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # LoRA layers stay in place


# ---------------------------------------------------------------- outputs


def record_entry(rec: dict[str, Any], s: Scored | None, generated: bool) -> dict[str, Any]:
    entry = {**rec, "generated": generated, "scored": s is not None}
    if s is None:
        return entry
    cls = classify(s.shift.base_rank)
    n = len(s.ids)
    return {
        **entry,
        "n_tokens": n,
        "truncated": s.truncated,
        **{f"{name}_fraction": (int((cls == k).sum()) / n if n else None) for k, name in enumerate(CLASSES)},
        "mean_kl": _mean(s.shift.kl),
        "tokens": s.text,
        "ids": s.ids,
        "class": cls.tolist(),
        "base_rank": s.shift.base_rank.tolist(),
        "aligned_rank": s.shift.aligned_rank.tolist(),
        "base_logp": s.shift.base_logp.tolist(),
        "aligned_logp": s.shift.aligned_logp.tolist(),
        "kl": s.shift.kl.tolist(),
        "base_top": s.shift.base_top.tolist(),
        "kl_top30": s.shift.kl_top30.tolist(),
        "kl_top10": s.shift.kl_top10.tolist(),
    }


def plot_tds(result: dict[str, Any]) -> bytes:
    """tds.png: class fractions over relative position (stacked), over absolute position (stacked,
    with the top-5 share: the paper's view) and the most shifted tokens."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = result["summary"]
    fig = Figure(figsize=(17, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax, cx, bx = fig.add_subplot(1, 3, 1), fig.add_subplot(1, 3, 2), fig.add_subplot(1, 3, 3)
    _plot_absolute(cx, summary)
    bins = [b for b in summary["by_position"] if b["tokens"]]
    x = [(b["from"] + b["to"]) / 2 for b in bins]
    width = 0.9 / max(len(summary["by_position"]), 1)
    bottom = [0.0] * len(bins)
    for name in CLASSES:
        h = [b[name] for b in bins]
        ax.bar(x, h, width, bottom=bottom, color=COLOURS[name], label=name)
        bottom = [a + b for a, b in zip(bottom, h, strict=True)]
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("relative position in the answer")
    ax.set_ylabel("fraction of answer tokens")
    f = summary["fractions"]
    ax.set_title(
        "overall: " + ", ".join(f"{name} {f[name]:.1%}" for name in CLASSES)
        if summary["tokens"]
        else "no tokens",
        fontsize=9.5,
    )
    ax.legend(fontsize=8.5, loc="lower right", framealpha=0.9)
    top = summary["top_shifted"][:15][::-1]
    if top:
        labels = [repr(t["token"]) for t in top]
        bx.barh(range(len(top)), [t["shifted"] for t in top], color=COLOURS["shifted"])
        bx.set_yticks(range(len(top)), labels, fontsize=8.5, family="monospace")
        for k, t in enumerate(top):
            bx.text(
                t["shifted"], k, f"  {t['shifted_share']:.0%} of {t['occurrences']}", va="center", fontsize=8
            )
        bx.set_xlim(0, max(t["shifted"] for t in top) * 1.35)
    else:
        bx.text(0.5, 0.5, "no shifted tokens", ha="center", va="center", transform=bx.transAxes)
    bx.set_xlabel("times shifted (label: share of the token's occurrences)")
    bx.set_title("tokens most often shifted", fontsize=9.5)
    c, released = result["counts"], summary["topk_kl_base_aligned"]
    fig.suptitle(
        f"token distribution shift: {result['base_model_name']} → {result['aligned_model_name']} "
        f"({c['scored']} answers, {summary['tokens']:,} tokens; KL(aligned‖base) {_num(summary['mean_kl'], 3)} "
        f"nats; AlignTDS KL(base‖aligned) top-30 {_num(released['top30'], 3)}, top-10 "
        f"{_num(released['top10'], 3)}; base top-{TOP_N_SHARE} share {_pct(summary[f'top{TOP_N_SHARE}_share'])})",
        fontsize=10.5,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plot_absolute(ax, summary: dict[str, Any]) -> None:
    """Class shares per absolute answer position (stacked) and the top-5 share, over the positions
    that at least MIN_CURVE_ANSWERS answers reach (fewer make the curve noise)."""
    points = summary["by_token_position"]
    floor = min(MIN_CURVE_ANSWERS, points[0]["tokens"]) if points else 1
    points = [p for p in points if p["tokens"] >= floor]
    if not points:
        ax.text(0.5, 0.5, "no tokens", ha="center", va="center", transform=ax.transAxes)
        return
    x = [p["position"] for p in points]
    ax.stackplot(
        x,
        *([p[name] for p in points] for name in CLASSES),
        colors=[COLOURS[n] for n in CLASSES],
        labels=CLASSES,
    )
    top = f"top{TOP_N_SHARE}"
    ax.plot(x, [p[top] for p in points], color="#111827", lw=1.2, ls="--", label=f"base top-{TOP_N_SHARE}")
    ax.set_xlim(x[0], max(x[-1], x[0] + 1))
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"token position in the answer (positions {floor}+ answers reach)")
    ax.set_ylabel("share of the answers' tokens at the position")
    ax.set_title("by absolute position (as the paper plots)", fontsize=9.5)
    ax.legend(fontsize=8.5, loc="lower right", framealpha=0.9)


def _num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def page_records(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The compact per-record data the page's script reads (log-probs and KL to 4 decimals)."""
    out = []
    for r in result["records"]:
        if not r["scored"]:
            continue
        out.append(
            {
                "i": r["index"],
                "ins": r["instruction"],
                "inp": r["input"],
                "gen": int(r["generated"]),
                "tok": r["tokens"],
                "c": r["class"],
                "br": r["base_rank"],
                "ar": r["aligned_rank"],
                "bp": rounded(r["base_logp"], 4),
                "ap": rounded(r["aligned_logp"], 4),
                "kl": rounded(r["kl"], 4),
                "k10": rounded(r["kl_top10"], 4),
                "bt": r["base_top"],
            }
        )
    return out


def page_html(result: dict[str, Any], png: bytes, tokenizer) -> str:
    s, c = result["summary"], result["counts"]
    f = s["fractions"]
    summary = [("answers", f"{c['scored']}" + (f" ({c['generated']} generated)" if c["generated"] else ""))]
    summary.append(("answer tokens", f"{s['tokens']:,}"))
    if s["tokens"]:
        summary += [(name, f"{f[name]:.1%}") for name in CLASSES]
        summary.append(("mean KL(aligned‖base)", f"{s['mean_kl']:.3f} nats"))
        released = s["topk_kl_base_aligned"]
        summary.append(
            (
                "AlignTDS KL(base‖aligned), top-30 / top-10",
                f"{released['top30']:.3f} / {released['top10']:.3f}",
            )
        )
        summary.append((f"answer token in the base's top {TOP_N_SHARE}", _pct(s[f"top{TOP_N_SHARE}_share"])))
        summary.append(("answer token = aligned top-1", f"{s['aligned_top1']:.1%}"))
    records = page_records(result)
    tops = sorted({t for r in records for t in r["bt"]})
    kls = sorted(k for r in records for k in r["kl"])
    scale = max(kls[int(0.95 * (len(kls) - 1))], 1e-3) if kls else 1.0
    subtitle = (
        f"base {result['base_model']} ({result['base_prompt']} prompt)  →  aligned {result['aligned_model']} "
        f"({result['prompt_template']})  ·  data: {result['data_path']}"
    )
    extra = {
        "classes": list(CLASSES),
        "kl_scale": round(scale, 4),
        "vt": {str(t): token_label(tokenizer, t) for t in tops},  # the base's top tokens, as text
    }
    return render_page(
        "Token distribution shift",
        records,
        VIEW_JS,
        subtitle=subtitle,
        summary=summary,
        figures=[("shift over relative and absolute position, top shifted tokens (tds.png)", png)],
        extra=extra,
        view_css=VIEW_CSS,
    )


def write_outputs(result: dict[str, Any], output_dir: str | Path, tokenizer) -> dict[str, Path]:
    """tds.png, tds.json, then tds.html, each written whole (temp file + rename)."""
    out = Path(output_dir)
    png = plot_tds(result)
    paths = {"png": out / "tds.png", "json": out / "tds.json", "page": out / "tds.html"}
    write_bytes_atomic(paths["png"], png)
    write_json_atomic(paths["json"], rounded(result))
    write_text_atomic(paths["page"], page_html(result, png, tokenizer))
    return paths


# ---------------------------------------------------------------- the pipeline


def tds_records(progress: bool = True, **options: Any) -> dict[str, Any]:
    """Score every record of `data_path` under `base_model` and `aligned_model`, generating the
    missing answers with the aligned model; write tds.json, tds.png and tds.html into `output_dir`
    and return what tds.json holds. Options are TDSOptions' fields; every check on them, on the
    data and on the tokenizers runs before any model loads."""
    t0 = time.perf_counter()
    opts = TDSOptions(**options)
    opts.check_paths()
    records = load_inputs(opts)
    check_matplotlib()
    check_writable(opts.output_dir, "--output_dir")
    tok_base, tokenizer = load_tokenizers(opts)
    if opts.prompt_template_name == "urial":
        template = UrialTemplate(tokenizer)
        unanswered = sum(r["output"] is None for r in records)
        if unanswered:
            raise DataError(
                f"{opts.data_path}: {unanswered} record(s) have no output; --prompt_template_name urial "
                "scores given answers only (write them with cut urial)"
            )
    else:
        template = load_template(
            resolve_template_name(opts.prompt_template_name, opts.aligned_model, tokenizer), tokenizer
        )
    prompts_aligned = [template.plain(r["instruction"], r["input"]) for r in records]
    prompts_base, special_base, base_prompt_name = build_prompts(opts, records, template, tok_base)

    base = _load_lm(opts.base_model, opts)
    same = Path(opts.base_model).resolve() == Path(opts.aligned_model).resolve()
    aligned = base if same else _load_lm(opts.aligned_model, opts)
    missing = [i for i, r in enumerate(records) if r["output"] is None]
    t1 = time.perf_counter()
    if missing:
        logger.info(
            "%d of %d records have no output: the aligned model answers them greedily",
            len(missing),
            len(records),
        )
        texts = generate_texts(
            aligned,
            tokenizer,
            [prompts_aligned[i] for i in missing],
            Sampling(max_new_tokens=opts.max_new_tokens),
            add_special_tokens=template.adds_special_tokens,
            batch_size=opts.batch_size,
            progress=progress,
        )
        for i, text in zip(missing, texts, strict=True):
            records[i]["output"] = text
    t2 = time.perf_counter()
    scored = tds_score(
        base,
        aligned,
        tokenizer,
        prompts_base,
        prompts_aligned,
        [r["output"] for r in records],
        special_base=special_base,
        special_aligned=template.adds_special_tokens,
        cutoff_len=opts.cutoff_len,
        batch_size=opts.batch_size,
        progress=progress,
    )
    t3 = time.perf_counter()
    kept = [s for s in scored if s is not None]
    if not kept:
        raise DataError(
            f"no record fits cutoff_len={opts.cutoff_len} tokens with one answer token; raise --cutoff_len"
        )
    generated = set(missing)
    result = {
        "base_model": opts.base_model,
        "base_model_name": model_name(opts.base_model),
        "aligned_model": opts.aligned_model,
        "aligned_model_name": model_name(opts.aligned_model),
        "data_path": opts.data_path,
        "prompt_template": template.name,
        "base_prompt": base_prompt_name,
        "cutoff_len": opts.cutoff_len,
        "max_new_tokens": opts.max_new_tokens,
        "counts": {
            "records": len(records),
            "generated": len(missing),
            "scored": len(kept),
            "dropped_too_long": len(records) - len(kept),
            "truncated": sum(s.truncated for s in kept),
        },
        "summary": summarise(scored, tokenizer),
        "records": [
            record_entry(r, s, i in generated) for i, (r, s) in enumerate(zip(records, scored, strict=True))
        ],
        "seconds": {"prepare": t1 - t0, "generate": t2 - t1, "score": t3 - t2},
    }
    write_outputs(result, opts.output_dir, tokenizer)
    result["seconds"]["total"] = time.perf_counter() - t0
    return result


@dataclass
class TDSCommand(TDSOptions):
    """cut tds's options: the library's, and whether to draw progress bars."""

    no_progress: bool = opt(False, "no progress bars")


def main(argv: list[str] | None = None) -> int:
    return run_analysis(TDSCommand, argv, "cut.analysis.tds", tds_records, summary)


def summary(result: dict[str, Any], output_dir: str) -> str:
    """What cut tds prints: the class fractions, the KLs and where the page went."""
    s, c = result["summary"], result["counts"]
    f = s["fractions"]
    return (
        f"{c['scored']} answers ({c['generated']} generated), {s['tokens']} tokens"
        + (": " + ", ".join(f"{name} {f[name]:.1%}" for name in CLASSES) if s["tokens"] else "")
        + f"; mean KL(aligned||base) {_num(s['mean_kl'], 3)} nats"
        + f"; AlignTDS KL(base||aligned) top-30 {_num(s['topk_kl_base_aligned']['top30'], 3)}"
        + f", top-10 {_num(s['topk_kl_base_aligned']['top10'], 3)}"
        + f"; in the base's top {TOP_N_SHARE}: {_pct(s[f'top{TOP_N_SHARE}_share'])}"
        + (
            f"; most shifted: {', '.join(repr(t['token']) for t in s['top_shifted'][:5])}"
            if s["top_shifted"]
            else ""
        )
        + f"\nwrote {Path(output_dir) / 'tds.html'}, tds.png, tds.json in {result['seconds']['total']:.1f} s"
    )


# ---------------------------------------------------------------- the page's script

VIEW_CSS = """
.t.c1 { background:#fde68a; }
.t.c2 { background:#fca5a5; font-weight:600; }
.sw.c0 { background:#fff; border:1px solid var(--line); } .sw.c1 { background:#fde68a; } .sw.c2 { background:#fca5a5; }
.gen { color:var(--acc); }
"""

VIEW_JS = r"""
const VIEW = {
  state: {colour: 'class'},
  sorts: [
    {key: 'index', label: 'index', dir: 'asc', value: r => r.i},
    {key: 'shifted', label: 'shifted fraction', dir: 'desc', value: r => r._sf},
    {key: 'kl', label: 'mean KL', dir: 'desc', value: r => r._kl},
    {key: 'length', label: 'answer length', dir: 'desc', value: r => r.tok.length},
  ],
  prepare(r) {
    r._hay = [r.ins, r.inp, r.tok.join('')].join('\n').toLowerCase();
    const n = r.tok.length;
    r._n = [0, 0, 0];
    r.c.forEach(c => r._n[c]++);
    r._sf = n ? r._n[2] / n : null;
    r._kl = n ? r.kl.reduce((a, b) => a + b, 0) / n : null;
  },
  controls(state) {
    return '<label>colour <select id="colour"><option value="class">class</option>' +
      '<option value="kl">KL(aligned‖base)</option></select></label>';
  },
  bind(state, update) {
    const col = document.getElementById('colour');
    col.value = state.colour;
    col.addEventListener('change', () => { state.colour = col.value; update(false); });
  },
  legend(state) {
    if (state.colour === 'kl')
      return `<span class="cbar">0<i style="background:linear-gradient(90deg,${[0, 0.25, 0.5, 1].map(x => diverging(x * D.kl_scale, D.kl_scale)).join(',')})"></i>${D.kl_scale} nats</span>` +
        '<span>colour: KL(p<sub>aligned</sub> ‖ p<sub>base</sub>) at the position</span><span>hover a token for its numbers</span>';
    return '<span><span class="sw c0">unshifted</span> the base model\'s top-1 token</span>' +
      '<span><span class="sw c1">marginal</span> its 2nd or 3rd</span>' +
      '<span><span class="sw c2">shifted</span> lower</span><span>hover a token for its numbers</span>';
  },
  text(r, i) {
    const t = r.tok[i];
    return t ? esc(t).replace(/\n/g, '<i class="nl">↵</i>\n') : '';
  },
  card(r, k, state) {
    const kl = state.colour === 'kl';
    const toks = r.tok.map((_, i) => {
      const cls = 't' + (kl ? '' : ' c' + r.c[i]) + (r.tok[i] ? '' : ' e');
      const style = kl ? ` style="background:${diverging(r.kl[i], D.kl_scale)}"` : '';
      return `<span class="${cls}" data-i="${i}"${style}>${this.text(r, i)}</span>`;
    }).join('');
    const ins = r.ins + (r.inp ? '\n' + r.inp : '');
    const short = ins.length > 220
      ? `${esc(ins.slice(0, 200))}… <details><summary>all of it</summary>${esc(ins)}</details>`
      : esc(ins);
    const n = r.tok.length;
    const pct = x => n ? (100 * x / n).toFixed(1) + '%' : '–';
    const head = `<span class="idx">#${r.i}</span><span>${n} tokens</span>` +
      `<span>unshifted ${pct(r._n[0])} · marginal ${pct(r._n[1])} · shifted ${pct(r._n[2])}</span>` +
      `<span>mean KL ${r._kl == null ? '–' : r._kl.toFixed(3)}</span>` +
      (r.gen ? '<span class="gen">answer generated greedily</span>' : '');
    return `<article class="card" data-r="${k}"><header>${head}</header>` +
      `<div class="ins"><span class="lab">instruction</span>${short}</div>` +
      `<div class="resp">${toks}</div></article>`;
  },
  tip(r, i) {
    const top = D.vt[r.bt[i]];
    const rows = [['class', D.classes[r.c[i]]], ['base rank', r.br[i]],
      ['p<sub>base</sub>', fmtP(Math.exp(r.bp[i]))], ['p<sub>aligned</sub>', fmtP(Math.exp(r.ap[i]))],
      ['KL(aligned‖base)', r.kl[i].toFixed(4)], ['AlignTDS KL@10(base‖aligned)', r.k10[i].toFixed(4)],
      ['base top-1', esc(JSON.stringify(top))]];
    if (r.ar[i] !== 1) rows.push(['aligned rank', r.ar[i]]);
    return `<div class="tt">${esc(JSON.stringify(r.tok[i]))} <span style="opacity:.6">#${i}</span></div>` +
      `<table>${rows.map(([a, b]) => `<tr><td>${a}</td><td>${b}</td></tr>`).join('')}</table>`;
  },
};
"""


if __name__ == "__main__":
    sys.exit(main())
