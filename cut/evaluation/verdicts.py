"""Verdicts read from a local judge's next-token probabilities instead of its generated text.

A small model rarely writes the rubric's JSON (the 135M judge of the README's demo gave readable
replies for 2 of 24 answers), but it still has a distribution over what comes next. For each aspect
the judge's reply is started for it, as if it had begun writing the JSON the rubric asks for:

    score / safety:  ... <the rubric prompt> ... {"helpfulness": {"score": _     -> "1".."5"
    pairwise:        ... <the rubric prompt> ... {"helpfulness": {"winner": "_   -> "A" | "B" | "tie"

and the probability of each option's tokens after it is read (most options are one token). A
score is the probability-weighted mean of 1..5 (G-Eval's form, Liu et al. 2023); a pairwise winner is the most
probable of A, B and tie. The reason records the distribution and the share of the judge's
probability mass that fell on the options, so a reader sees how sure, and how on-topic, it was.

The rubric prompt is encoded once per record (one forward over the batch, KV cache kept); each
aspect adds only its few prefill tokens to a copy of that cache, so five aspects cost about one
forward over the prompts, not five.

A served judge (an OpenAI-compatible endpoint that returns `top_logprobs`, as vLLM's server does)
is read from the alternatives the server lists for each token of its reply (ServedProbabilityAsker,
through cut.llm's ApiCompleter.top_logprobs: the same cache, retries and concurrency as its
answers). A chat API cannot be handed the start of the reply, so by default the judge writes its
own greedy reply and each aspect is read at the token where that reply reaches the aspect's verdict
(after `"helpfulness": {` ... `"score":`, whatever it wrote before, a reason say); a reply that
never gets there gives no verdict. With continue_reply (vLLM's `continue_final_message`), the
reply is started for each aspect as above, `{"helpfulness": {"score":`, and read at the first
token the judge adds, as the local reading is. An alternative counts for an option when the text
it makes, after the key's colon, is the option (spaces and a quote before it allowed, any
non-alphanumeric after it) or the start of one option only ("t" of "tie"): the server gives one
token's alternatives, so an option split over tokens is read from its first. Options missing from
the server's top K count 0, and the mass says how much of the judge's probability the listed
options held.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence

import torch

from cut.errors import ConfigError
from cut.evaluation.aspects import SCALE, Rubric
from cut.llm.completer import NO_LOGPROBS, TOP_LOGPROBS, ApiCompleter, Token, reply_tokens
from cut.modeling.generate import context_length, left_pad, prefill_cache

Message = dict[str, str]
WINNERS = ("A", "B", "tie")


def prefill(mode: str, aspect: str) -> str:
    """The start of the judge's reply for one aspect, up to where its verdict goes."""
    if mode == "pairwise":
        return f'{{"{aspect}": {{"winner": "'
    return f'{{"{aspect}": {{"score": '


def options(mode: str) -> tuple[str, ...]:
    if mode == "pairwise":
        return WINNERS
    return tuple(str(s) for s in range(SCALE[0], SCALE[1] + 1))


def option_tokens(tokenizer, suffix: str, names: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(the prefill's token ids, each option's token ids after them).

    Each option is tokenised together with the prefill and the longest token prefix that all of
    them share is what the judge is fed; the rest is the option's, so a tokenizer that joins the
    prefill's trailing space to a digit (" 3" as one token) or splits an option in two is followed.
    Two options with the same tokens raise ConfigError."""
    joint = [tokenizer.encode(suffix + name, add_special_tokens=False) for name in names]
    shared = 0
    while all(len(j) > shared for j in joint) and len({j[shared] for j in joint}) == 1:
        shared += 1
    rests = [j[shared:] for j in joint]
    if not shared or any(not r for r in rests) or len({tuple(r) for r in rests}) != len(rests):
        raise ConfigError(
            f"the judge's tokenizer does not tell {list(names)} apart after {suffix!r}: "
            "probability verdicts cannot be read with it; use --verdict generate"
        )
    return joint[0][:shared], rests


def _extend(model, cache, mask, ids: list[int], keep: int):
    """Feed the same `ids` after every row of `cache` (which grows); the last `keep` positions'
    log-softmax (rows, keep, V) and the mask that now covers them."""
    device = mask.device
    extra = torch.tensor(ids, device=device).expand(mask.shape[0], -1)
    start = mask.sum(-1, keepdim=True)
    mask = torch.cat([mask, mask.new_ones(extra.shape)], dim=1)
    logits = model(
        input_ids=extra,
        attention_mask=mask,
        position_ids=start + torch.arange(len(ids), device=device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep,
    ).logits
    return logits.float().log_softmax(-1), mask


@torch.inference_mode()
def option_probabilities(
    model, rows: list[list[int]], readings: list[tuple[list[int], list[list[int]]]], pad_id: int
) -> list[list[tuple[list[float], float]]]:
    """For each prompt row and each reading (prefill ids, options' ids): the options' probabilities
    after row + prefill, renormalised over the options, and the raw probability mass on them."""
    device = next(model.parameters()).device
    ids, mask = left_pad(rows, pad_id)
    mask = mask.to(device)
    cache, _ = prefill_cache(model, ids.to(device), mask)  # the prompts once; the cache is what counts
    out: list[list[tuple[list[float], float]]] = [[] for _ in rows]
    for shared, rests in readings:
        after = copy.deepcopy(cache)
        first, after_mask = _extend(model, after, mask, shared, 1)
        logps = []
        for rest in rests:
            logp = first[:, -1, rest[0]]
            if len(rest) > 1:  # the option's later tokens, each given the ones before
                more, _ = _extend(model, copy.deepcopy(after), after_mask, rest[:-1], len(rest) - 1)
                logp = logp + more.gather(
                    2, torch.tensor(rest[1:], device=device).expand(len(rows), -1)[..., None]
                ).sum((1, 2))
            logps.append(logp)
        picked = torch.stack(logps, -1).double().exp()  # (rows, options)
        mass = picked.sum(-1)
        probs = picked / mass.clamp_min(1e-300)[:, None]
        for r in range(len(rows)):
            out[r].append((probs[r].tolist(), float(mass[r])))
    return out


def reply(mode: str, aspects: Sequence[str], readings: list[tuple[list[float], float]]) -> str:
    """The JSON reply the rubric asks for, written from the readings of each aspect."""
    names = options(mode)
    entries = {}
    for aspect, (probs, mass) in zip(aspects, readings, strict=True):
        shown = ", ".join(f"{n} {p:.2f}" for n, p in zip(names, probs, strict=True))
        reason = f"next-token probabilities: {shown} ({mass:.2f} of the judge's mass on these)"
        if mode == "pairwise":
            best = max(range(len(names)), key=lambda i: probs[i])
            entries[aspect] = {"reason": reason, "winner": names[best]}
        else:
            expected = sum(int(n) * p for n, p in zip(names, probs, strict=True))
            entries[aspect] = {"reason": reason, "score": round(expected, 2)}
    return json.dumps(entries)


class ProbabilityAsker:
    """A local judge (cut.llm's LocalCompleter) read through its next-token probabilities (see the
    module docstring). Every reply parses, so the evaluation never re-asks; the batch size is the judge's."""

    def __init__(self, judge, rubric: Rubric) -> None:
        self.judge, self.rubric, self.text = judge, rubric, judge.text
        self.name = f"{judge.name}/probabilities"
        tok = judge.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        # the prefill follows the prompt on its own line when there is no chat template
        lead = "" if judge.chat else "\n\n"
        self.readings = [
            option_tokens(tok, lead + prefill(rubric.mode, aspect), options(rubric.mode))
            for aspect in rubric.aspects
        ]

    def ask(self, prompts: list[list[Message]], progress=None) -> list[tuple[str | None, str | None]]:
        tok = self.judge.tokenizer
        rows = [tok.encode(self.text(p), add_special_tokens=not self.judge.chat) for p in prompts]
        answers: list[tuple[str | None, str | None]] = [(None, "not asked")] * len(rows)
        limit = context_length(self.judge.model.config, tok)
        longest = max(len(shared) + max(map(len, rests)) for shared, rests in self.readings)
        fits = []
        for i, row in enumerate(rows):
            if limit is not None and len(row) + longest > limit:
                answers[i] = (
                    None,
                    f"prompt too long: {len(row)} tokens; it does not fit the judge's context of {limit}",
                )
            else:
                fits.append(i)
        if progress and len(fits) < len(rows):
            progress(len(rows) - len(fits))
        # longest first, so similar lengths share a batch
        order = sorted(fits, key=lambda i: (-len(rows[i]), i))
        size = max(1, self.judge.batch_size)
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            readings = option_probabilities(
                self.judge.model, [rows[i] for i in idx], self.readings, self.pad_id
            )
            for i, r in zip(idx, readings, strict=True):
                answers[i] = (reply(self.rubric.mode, self.rubric.aspects, r), None)
            if progress:
                progress(len(idx))
        return answers


# --------------------------------------------------------------------------------------------
# a served judge: the top_logprobs of its reply
# --------------------------------------------------------------------------------------------

Reading = tuple[list[float], float]  # the options' probabilities (renormalised), the mass on them


def slot(text: str, mode: str, aspect: str) -> tuple[int, int] | None:
    """(where the verdict's key ends, where its value starts) in a reply: the first `"score":`
    (pairwise `"winner":`) after `"<aspect>": {`, its value after spaces and an opening quote."""
    head = re.search(rf'"{re.escape(aspect)}"\s*:\s*\{{', text)
    field = "winner" if mode == "pairwise" else "score"
    key = re.compile(rf'"{field}"\s*:').search(text, head.end()) if head else None
    if key is None:
        return None
    return key.end(), re.compile(r'\s*"?').match(text, key.end()).end()


def option_of(value: str, names: Sequence[str]) -> str | None:
    """The option a reply's text after the key's colon says: the option, after spaces and a
    quote, followed by nothing or a non-alphanumeric character; or the start of one option only."""
    v = value.lstrip()
    v = v[1:] if v.startswith('"') else v
    for name in names:
        rest = v[len(name) :]
        if v.startswith(name) and not (rest and rest[0].isalnum()):
            return name
    starts = [name for name in names if v and name.startswith(v)]
    return starts[0] if len(starts) == 1 else None


def served_reading(tokens: Sequence[Token], mode: str, aspect: str, before: str = "") -> Reading | str:
    """One aspect's reading from a reply's tokens with their alternatives (the reply continues
    `before`, a started reply), or why there is none."""
    text = before + "".join(t for t, _ in tokens)
    found = slot(text, mode, aspect)
    if found is None:
        return f"the reply never reached {aspect}'s verdict: {text[-80:]!r}"
    key_end, value = found
    starts = list(itertools.accumulate((len(t) for t, _ in tokens), initial=len(before)))
    at = [j for j in range(len(tokens)) if starts[j] <= value < starts[j + 1]]  # the value's token
    if not at:
        return f"the reply ended at {aspect}'s verdict: {text[-80:]!r}"
    start, alternatives = starts[at[0]], tokens[at[0]][1]
    names = options(mode)
    picked = [0.0] * len(names)
    for alternative, logprob in alternatives:
        made = text[:start] + alternative
        name = option_of(made[key_end:], names) if made.startswith(text[:key_end]) else None
        if name is not None:
            picked[names.index(name)] += math.exp(logprob)
    mass = sum(picked)
    if mass == 0:
        return f"no option of {aspect}'s verdict among the server's top {len(alternatives)} tokens"
    return [p / mass for p in picked], mass


def started_reply(mode: str, aspect: str) -> str:
    """The start of the reply a continued request sends: prefill()'s, up to the key's colon, so
    the judge writes the space and quote before the option as its tokenizer likes."""
    return prefill(mode, aspect).rstrip(' "')


class ServedProbabilityAsker:
    """A served judge (cut.llm's ApiCompleter) read through the top_logprobs of its reply (the
    module docstring); with continue_reply, one request per record and aspect (vLLM's
    continue_final_message), else one per record. Every reply it writes parses."""

    def __init__(self, judge: ApiCompleter, rubric: Rubric, continue_reply: bool = False) -> None:
        self.judge, self.rubric, self.continue_reply = judge, rubric, continue_reply
        self.name = f"{judge.name}/probabilities" + ("-continued" if continue_reply else "")

    def ask(self, prompts: list[list[Message]], progress=None) -> list[tuple[str | None, str | None]]:
        aspects, mode = self.rubric.aspects, self.rubric.mode
        if not self.continue_reply:
            got = self.judge.top_logprobs(prompts, TOP_LOGPROBS, progress=progress)
            per = [[(a, "")] * len(aspects) for a in got]
        else:
            leads = [started_reply(mode, aspect) for aspect in aspects]
            asked = [[*p, {"role": "assistant", "content": lead}] for p in prompts for lead in leads]
            tick = per_record(progress, len(aspects)) if progress else None
            got = self.judge.top_logprobs(asked, TOP_LOGPROBS, 4, True, tick)
            n = len(aspects)
            per = [list(zip(got[i : i + n], leads, strict=True)) for i in range(0, len(got), n)]
        if any(answer == (None, NO_LOGPROBS) for answer in got):
            c = self.judge.client.config
            raise ConfigError(
                f"--verdict probabilities: the server at {c.base_url} sent no logprobs for model "
                f"{c.model!r}; use --verdict generate, a server that returns top_logprobs (vLLM's "
                "OpenAI server does, transformers serve does not), or --judge local with the model"
            )
        return [self._answer(answers) for answers in per]

    def _answer(
        self, answers: list[tuple[tuple[str | None, str | None], str]]
    ) -> tuple[str | None, str | None]:
        """One record's reply from its answers (the same one per aspect, or one each) and the
        started reply each continues."""
        readings = []
        for aspect, ((text, reason), before) in zip(self.rubric.aspects, answers, strict=True):
            if text is None:
                return None, reason
            reading = served_reading(reply_tokens(text), self.rubric.mode, aspect, before)
            if isinstance(reading, str):
                return None, reading
            readings.append(reading)
        return reply(self.rubric.mode, self.rubric.aspects, readings), None


def per_record(progress: Callable[[int], None], n: int) -> Callable[[int], None]:
    """A progress callback of requests that ticks `progress` once per n of them (a record)."""
    done = [0]

    def tick(k: int) -> None:
        before = done[0] // n
        done[0] += k
        progress(done[0] // n - before)

    return tick
