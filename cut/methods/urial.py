"""URIAL: answer instructions with a *base* model, aligned by its prompt alone (no training).

    python -m cut.urial --model DIR --data_path questions.json --output_file out.json \
        [--urial_prompt FILE] [--turn_format auto|backticks|v5|v6] [--stop TEXT ...] [--keep_fences] \
        [--engine auto|hf|vllm] [--print_prompt] [--batch_size 8] [--max_new_tokens 2048] \
        [--temperature 0 | --sample] [--top_p 1.0] [--repetition_penalty 1.1] [--seed 42] [--limit N]

Lin et al., "The Unlocking Spell on Base LLMs: Rethinking Alignment via In-Context Learning"
(ICLR 2024): a preamble plus K stylistic examples is enough for a base model to answer like a chat
model. The prompt is built as URIAL's released code builds it (Re-Align/URIAL,
src/unified_utils.py apply_template, src/fastchat_conversation.py): the prompt file's text
*verbatim* (read as its loader reads it: UTF-8, universal newlines), then the record's earlier turns
(`history`), the query and the open answer turn, each written in one of URIAL's three turn formats:

    backticks (urial_backticks)  "\n# Query:\n```\n" + query + "\n```\n"   ... "\n# Answer:\n```\n"
    v5 (urial_v5)                "\n# User:\n\n" + query + "\n\n"       ... "\n# Assistant:\n\n"
    v6 (urial_v6)                "\n\n# User:\n" + query.strip("\n") + "\n" ... "\n\n# Assistant:\n"

--turn_format auto applies URIAL's rule, which reads the file's name: one holding "inst_help_v5"
gets v5, "inst_help_v6" v6, any other backticks (a warning says when the file's own headers
disagree, as for URIAL's inst_help_v3). Any file works, K = 0 ones (a preamble alone) included;
nothing in it is parsed. render(prompt_text, instruction, turn_format) is the same assembly as a
function. --print_prompt prints the first record's prompt and exits without loading a model.

Decoding, URIAL's runs: greedy (or temperature 0.3 with --sample), top_p 1, repetition penalty 1.1,
up to 2,048 new tokens; an answer ends before the first of URIAL's stop strings "# Query" and
"# User" (--stop replaces them), each row of a batch on its own; the prompt is never cut: a row
whose prompt leaves less room in the model's context ends there, as under vLLM. The answer is
cleaned as URIAL cleans it: every ``` removed, "<|endoftext|>" made a space, whitespace stripped
(--keep_fences removes only the answer block's own closing fence and a cut-off turn header). A base
model has no chat template: the prompt is plain text, and the tokenizer adds its own special tokens
(its BOS, once). --engine vllm generates with vLLM as URIAL does (token ids in, stop strings out),
with cut generate's engine options (--enforce_eager, --max_model_len, --gpu_memory_utilization,
--kv_cache_gb: one EngineOptions declaration for both tools).

Input: a .json list, .jsonl or datasets folder of records with a non-empty string `instruction`, an
optional string `input` (after the instruction and a blank line) and an optional `history`: a list
of {"query": ..., "answer": ...} turns before this one (MT-bench's second turn, as URIAL writes
it). Output: the AlpacaEval file of cut.generate (one string `output` per record; URIAL's own code
writes a list, which alpaca_eval rejects), with generator "<model>+urial", prompt_template
"urial:<file>:<format>@<hash>", and the stop strings and fence setting; resumed and rewritten
atomically after each batch as cut.generate does. Everything is checked before a model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from cut.args import SEED, Options, coerce_value, group, opt, run_cli
from cut.data.files import check_writable
from cut.errors import ConfigError, DataError
from cut.modeling.generate import (
    LIMIT,
    NEW_TOKENS,
    REPETITION_PENALTY,
    TEMPERATURE,
    TOP_P,
    VLLM_CHUNK,
    EngineOptions,
    OnBatch,
    Sampling,
    answer_meta,
    check_engine,
    context_length,
    cut_at_stop,
    generate_texts,
    load_vllm,
    read_instructions,
    request_seeds,
    require_vllm,
    resolve_engine,
    run_batches,
    tokenize_prompts,
    validate_instructions,
    vllm_context,
    write_answers,
)
from cut.modeling.loading import (
    check_model_path,
    load_model,
    load_tokenizer,
    model_name,
)
from cut.resources import resource_path

logger = logging.getLogger("cut.methods.urial")

DEFAULT_PROMPT = resource_path("urial/default.md")  # package data (cut/resources)
STOP = ("# Query", "# User")  # URIAL's stop strings for every format (unified_infer.py)
SAMPLED_TEMPERATURE = 0.3  # the paper's setting when sampling
PENALTY_RANGE = (1.0, 1.15)  # repetition penalties the paper uses


# ---------------------------------------------------------------- the prompt, as URIAL assembles it

# URIAL's three turn formats (its fastchat_conversation.py templates urial_backticks, urial_v5,
# urial_v6): the query and answer headers, and how a turn is written after the file's text
TURN_FORMATS = ("backticks", "v5", "v6")
HEADERS = {
    "backticks": ("# Query:", "# Answer:"),
    "v5": ("# User:", "# Assistant:"),
    "v6": ("# User:", "# Assistant:"),
}
FENCE = "```"
QUERY, ANSWER = HEADERS["backticks"]


def detect_turn_format(prompt_text: str, name: str | None = None) -> str:
    """The turn format URIAL pairs with a prompt file.

    URIAL's rule (src/unified_utils.py, apply_template) reads the file's *name*: one holding
    "inst_help_v5" gets urial_v5, "inst_help_v6" urial_v6, every other urial_backticks, whatever
    headers the file uses. With `name` that rule is applied exactly. Without one (a text with no
    file behind it) the format is read from the headers: '# User:' lines followed by a blank line
    are v5, by text v6; anything else, a K = 0 file included, is backticks."""
    if name is not None:
        stem = Path(name).name
        if "inst_help_v5" in stem:
            return "v5"
        if "inst_help_v6" in stem:
            return "v6"
        return "backticks"
    return headers_format(prompt_text) or "backticks"


def headers_format(prompt_text: str) -> str | None:
    """The format the file's own example headers are written in (None: no '# User:' or '# Query:'
    header line, as in a K = 0 file)."""
    lines = prompt_text.split("\n")
    user = [i for i, line in enumerate(lines) if line.rstrip() == "# User:"]
    if user:
        after = lines[user[-1] + 1] if user[-1] + 1 < len(lines) else ""
        return "v5" if not after.strip() else "v6"
    return "backticks" if any(line.rstrip() == QUERY for line in lines) else None


def check_turn_format(turn_format: str | None) -> str | None:
    """None / 'auto' (choose from the file) or one of TURN_FORMATS; ConfigError otherwise."""
    if turn_format in (None, "auto"):
        return None
    if turn_format not in TURN_FORMATS:
        raise ConfigError(
            f"turn_format must be auto or one of {', '.join(TURN_FORMATS)}, got {turn_format!r}"
        )
    return turn_format


def _turn(turn_format: str, header: str, message: str | None) -> str:
    """One turn as URIAL's Conversation.get_prompt writes it; None: the open turn the model fills."""
    if turn_format == "v6":  # SeparatorStyle.URIAL_V6
        return f"\n\n{header}\n" + (f"{message.strip(chr(10))}\n" if message is not None else "")
    fence = FENCE if turn_format == "backticks" else ""  # SeparatorStyle.URIAL, sep = sep2 = fence
    return f"\n{header}\n{fence}\n" + (f"{message}\n{fence}\n" if message is not None else "")


def render(
    prompt_text: str,
    instruction: str,
    turn_format: str | None = None,
    *,
    history: Sequence[tuple[str, str]] = (),
    name: str | None = None,
) -> str:
    """Exactly the text URIAL feeds the model for one query: the prompt file verbatim (URIAL's
    system message), the (query, answer) turns of `history`, the query, and the open answer turn,
    each written in `turn_format` (None: detect_turn_format(prompt_text, name), URIAL's rule when
    the file's name is given)."""
    fmt = check_turn_format(turn_format) or detect_turn_format(prompt_text, name)
    user, assistant = HEADERS[fmt]
    turns = [_turn(fmt, user, q) + _turn(fmt, assistant, a) for q, a in history]
    return prompt_text + "".join(turns) + _turn(fmt, user, instruction) + _turn(fmt, assistant, None)


def read_prompt_file(path: str | Path) -> str:
    """A prompt file's text as URIAL's loader reads it (datasets' "text" builder, sample_by
    "document": UTF-8, universal newlines, nothing else changed); ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")  # text mode: \r\n and \r become \n, as there
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the URIAL prompt: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: URIAL prompt is not UTF-8 text: {err.reason} at byte {err.start}"
        ) from None
    if not text.strip():
        raise ConfigError(f"{path}: the URIAL prompt file is empty")
    return text


@dataclass(frozen=True)
class UrialPrompt:
    """A prompt file's text (used verbatim) and the turn format its queries are written in."""

    text: str
    turn_format: str = "backticks"
    name: str = "default"

    def __post_init__(self) -> None:
        if self.turn_format not in TURN_FORMATS:
            raise ConfigError(
                f"turn_format must be one of {', '.join(TURN_FORMATS)}, got {self.turn_format!r}"
            )

    def render(self, instruction: str, history: Sequence[tuple[str, str]] = ()) -> str:
        return render(self.text, instruction, self.turn_format, history=history)

    @property
    def tag(self) -> str:
        """'urial:<name>:<format>@<hash>', written into every answer: an edit stops a resume."""
        digest = hashlib.sha256(f"{self.turn_format}\0{self.text}".encode()).hexdigest()[:8]
        return f"urial:{self.name}:{self.turn_format}@{digest}"


def load_urial_prompt(path: str | None = None, turn_format: str | None = None) -> UrialPrompt:
    """The prompt of a URIAL prompt file (None: the packaged cut/resources/urial/default.md), in
    `turn_format` (None / 'auto': URIAL's rule on the file's name, detect_turn_format)."""
    chosen = check_turn_format(turn_format)
    if path is None and chosen is None:
        return default_prompt()
    file = Path(path) if path is not None else DEFAULT_PROMPT
    text = read_prompt_file(file)
    fmt = chosen or detect_turn_format(text, file.name)
    own = headers_format(text)
    if own is not None and HEADERS[own][0] != HEADERS[fmt][0]:
        how = "--turn_format (given)" if chosen else "URIAL's rule, which reads the file name"
        logger.warning(
            "%s: its examples use '%s' headers but the queries are written with '%s' (%s); "
            "--turn_format %s writes them in the file's own headers",
            file, HEADERS[own][0], HEADERS[fmt][0], how, own,
        )  # fmt: skip
    return UrialPrompt(text, fmt, "default" if path is None else file.name)


@lru_cache(maxsize=1)
def default_prompt() -> UrialPrompt:
    return UrialPrompt(read_prompt_file(DEFAULT_PROMPT), "backticks", "default")


def urial_prompt(
    instruction: str, history: list[tuple[str, str]] | None = None, prompt: UrialPrompt | None = None
) -> str:
    """The full URIAL prompt for `instruction` after the (query, answer) turns of `history`."""
    return (prompt or default_prompt()).render(instruction, history or ())


def parse_urial_prompt(*args: Any, **kwargs: Any) -> UrialPrompt:
    """Gone: a prompt file is no longer split into examples (URIAL uses it verbatim)."""
    raise ConfigError(
        "parse_urial_prompt is gone: URIAL prompt files are used verbatim; "
        "use load_urial_prompt(path, turn_format) or render(prompt_text, instruction)"
    )


def clean_answer(text: str, keep_fences: bool = False) -> str:
    """An answer (already cut before its stop string) as URIAL writes it (clear_output in
    src/unified_utils.py): every ``` removed, '<|endoftext|>' made a space, whitespace stripped.

    keep_fences: only the block's own markup goes (a trailing, cut-off turn header, the unpaired
    fence that closes a backticks answer); code blocks the answer holds keep their fences."""
    if not keep_fences:
        return text.rstrip().replace(FENCE, "").replace("<|endoftext|>", " ").strip()
    text = text.strip()
    head, _, last = text.rpartition("\n")
    tail = last.strip()
    if tail and any(h.startswith(tail) for h in (QUERY, "# User:")):  # max_new_tokens ended in a header
        text = head.rstrip()
    if text.endswith(FENCE) and text.count(FENCE) % 2 == 1:  # an unpaired fence closes the block
        text = text[: -len(FENCE)]
    return text.strip()


def query_text(instruction: str, input: str = "") -> str:
    return f"{instruction}\n\n{input}" if input else instruction


def adds_special_tokens(tokenizer, prompt: str) -> bool:
    """Let the tokenizer add its special tokens, unless the prompt already starts with its BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and prompt.startswith(bos))


def check_stop(stop: Sequence[str]) -> tuple[str, ...]:
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not stop or any(not isinstance(s, str) or not s for s in stop):
        raise ConfigError(f"stop strings must be one or more non-empty strings, got {list(stop)!r}")
    return stop


def _rooms(
    lengths: Sequence[int], context: int | None, max_new_tokens: int, where: Callable[[int], str]
) -> list[int]:
    """New tokens each prompt may have: max_new_tokens, or what the model's context leaves after
    the prompt. The prompt is never cut (its preamble is the method): a row ends at the context,
    as in vLLM, URIAL's engine. ConfigError naming the record whose prompt fills the context."""
    if context is None:
        return [max_new_tokens] * len(lengths)
    rooms = []
    for i, n in enumerate(lengths):
        if context - n < 1:
            raise ConfigError(
                f"{where(i)}: its URIAL prompt is {n} tokens, the model's context {context}: "
                "use a shorter prompt file (fewer examples) or a model with a longer context"
            )
        rooms.append(min(max_new_tokens, context - n))
    return rooms


def _bucket(room: int, max_new_tokens: int) -> int:
    # rows with less room share a batch when their room rounds down to the same 64 tokens
    return room if room == max_new_tokens or room < 64 else room // 64 * 64


def _prompts(queries, histories, prompt: UrialPrompt) -> list[str]:
    histories = histories if histories is not None else [None] * len(queries)
    if len(histories) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(histories)} histories")
    return [prompt.render(q, h or ()) for q, h in zip(queries, histories, strict=True)]


def generate_urial_texts(
    model,
    tokenizer,
    queries: list[str],
    histories: Sequence[list[tuple[str, str]] | None] | None = None,
    prompt: UrialPrompt | None = None,
    sampling: Sampling | None = None,
    *,
    batch_size: int = 8,
    on_batch: OnBatch | None = None,
    progress: bool = True,
    stop: Sequence[str] = STOP,
    keep_fences: bool = False,
    where: Callable[[int], str] = lambda i: f"query {i}",
    engine: str = "hf",
) -> list[str]:
    """URIAL answers of a loaded model, in query order, each cleaned as URIAL cleans (`on_batch`
    sees the cleaned texts). engine hf: a transformers model; each row stops at its first stop
    string on its own (URIAL's HF engine waits for the whole batch; its vLLM engine, the one its
    runs used, does not). engine vllm: a vllm.LLM, as URIAL runs it (generate_urial_texts_vllm)."""
    vllm = require_vllm() if engine == "vllm" else None
    sampling = sampling or _urial_sampling()
    stop = check_stop(stop)
    texts = _prompts(queries, histories, prompt or default_prompt())
    if not texts:
        return []
    special = adds_special_tokens(tokenizer, texts[0])
    rows = tokenize_prompts(tokenizer, texts, special)
    context = vllm_context(model) if vllm else context_length(model.config, tokenizer)
    rooms = _rooms([len(r) for r in rows], context, sampling.max_new_tokens, where)
    batches = dict(batch_size=batch_size, on_batch=on_batch, progress=progress)
    if vllm:
        return _vllm_answers(vllm, model, texts, rows, rooms, sampling, stop, keep_fences, **batches)
    return _hf_answers(model, tokenizer, texts, special, rooms, sampling, stop, keep_fences, **batches)


def generate_urial_texts_vllm(llm, tokenizer, queries: list[str], *args: Any, **kwargs: Any) -> list[str]:
    """generate_urial_texts with a vllm.LLM, as URIAL runs it: its stop strings left out of the
    text, each request with its own seed and its own room in the context. Token ids go in, as in
    cut.generate's vllm engine, so the prompt's tokens are exactly the transformers path's."""
    return generate_urial_texts(llm, tokenizer, queries, *args, engine="vllm", **kwargs)


def _hf_answers(
    model, tokenizer, texts, special, rooms, sampling, stop, keep_fences, *, batch_size, on_batch, progress
) -> list[str]:
    groups: dict[int, list[int]] = {}
    for i, room in enumerate(rooms):
        groups.setdefault(_bucket(room, sampling.max_new_tokens), []).append(i)
    if len(groups) > 1:
        short = sum(room < sampling.max_new_tokens for room in rooms)
        logger.warning(
            "%d of %d prompts leave fewer than max_new_tokens=%d tokens in the model's context: "
            "their answers may end early (the prompt is not cut)", short, len(rooms), sampling.max_new_tokens,
        )  # fmt: skip
    out: dict[int, str] = {}
    for room, idx in sorted(groups.items(), reverse=True):

        def cleaned(local: list[int], answers: list[str], idx: list[int] = idx) -> None:
            texts_ = [clean_answer(a, keep_fences) for a in answers]
            out.update(zip([idx[j] for j in local], texts_, strict=True))
            if on_batch is not None:
                on_batch([idx[j] for j in local], texts_)

        generate_texts(
            model, tokenizer, [texts[i] for i in idx], dataclasses.replace(sampling, max_new_tokens=room),
            add_special_tokens=special, batch_size=batch_size, on_batch=cleaned, progress=progress, stop=stop,
        )  # fmt: skip
    return [out[i] for i in range(len(texts))]


def _vllm_answers(
    vllm, llm, texts, rows, rooms, sampling, stop, keep_fences, *, batch_size, on_batch, progress
) -> list[str]:
    seeds = request_seeds(sampling.seed, texts)

    def params(i: int):
        return vllm.SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            repetition_penalty=sampling.repetition_penalty,
            max_tokens=rooms[i],
            seed=seeds[i],
            stop=list(stop),
            include_stop_str_in_output=False,
            skip_special_tokens=True,
        )

    def run(idx: list[int]) -> list[str]:
        outs = llm.generate(
            [{"prompt_token_ids": rows[i]} for i in idx], [params(i) for i in idx], use_tqdm=False
        )
        return [clean_answer(cut_at_stop(o.outputs[0].text, stop), keep_fences) for o in outs]

    done = run_batches(list(range(len(rows))), max(batch_size, VLLM_CHUNK), run, on_batch, progress)
    return [done[i] for i in range(len(texts))]


# ---------------------------------------------------------------- settings and records


def _urial_sampling() -> Sampling:
    # URIAL's runs: greedy (unified_infer.py's default), top_p 1, up to 2,048 new tokens (every
    # run script); repetition penalty 1.1 as in its README's example (its scripts use 1 to 1.15)
    return Sampling(max_new_tokens=2048, temperature=0.0, top_p=1.0, repetition_penalty=1.1)


@dataclass(frozen=True)
class UrialConfig:
    """Everything `cut.urial` can set; the defaults are URIAL's."""

    urial_prompt: str | None = None  # a URIAL prompt file, verbatim (default: resources/urial/default.md)
    turn_format: str = "auto"  # auto: URIAL's rule (by the file's name) | backticks | v5 | v6
    stop: tuple[str, ...] = STOP  # an answer ends before the first of these
    keep_fences: bool = False  # False: every ``` removed from the answer, as URIAL does
    engine: str = "auto"  # auto (vllm where it imports, else hf) | hf | vllm
    batch_size: int = 8
    generator: str | None = None  # name in the output (default: "<model folder>+urial")
    dataset: str | None = None  # dataset name in the output (default: the input file's stem)
    limit: int | None = None  # answer only the first N records
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    # vllm engine only, as for cut.generate (passed to vllm.LLM; None = vLLM's own default, but
    # enforce_eager None is eager on a CPU)
    enforce_eager: bool | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_gb: float | None = None
    sampling: Sampling = field(default_factory=_urial_sampling)

    def __post_init__(self) -> None:
        check_engine(self)
        if self.engine == "continuous":
            raise ConfigError(
                "cut urial: engine continuous (transformers' continuous batching) cannot stop at "
                "URIAL's stop strings nor apply its repetition penalty; use --engine hf or vllm"
            )
        check_turn_format(self.turn_format)
        object.__setattr__(self, "stop", check_stop(self.stop))
        low, high = PENALTY_RANGE
        if not low <= self.sampling.repetition_penalty <= high:
            logger.warning(
                "repetition_penalty=%s is outside the range URIAL's runs use, %s to %s",
                self.sampling.repetition_penalty, low, high,
            )  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "urial") -> UrialConfig:
        """Flat keys (sampling ones included); unknown keys are errors; unset sampling keys take
        URIAL's values."""
        own = {f.name for f in dataclasses.fields(cls)} - {"sampling"}
        samp = {f.name for f in dataclasses.fields(Sampling)}
        unknown = sorted(set(values) - own - samp)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s): {', '.join(unknown)}")
        try:
            base = dataclasses.asdict(_urial_sampling())
            sampling = Sampling(**{**base, **{k: v for k, v in values.items() if k in samp}})
            return cls(**{k: v for k, v in values.items() if k in own}, sampling=sampling)
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None


def history_turns(source: str, i: int, raw: dict[str, Any]) -> list[tuple[str, str]]:
    """A record's `history` as (query, answer) pairs; DataError naming file, record and field."""
    history = raw.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise DataError(
            f"{source}: record {i}, field 'history': expected a list of "
            f'{{"query": ..., "answer": ...}} objects, got {type(history).__name__}'
        )
    turns = []
    for j, turn in enumerate(history):
        name = f"history[{j}]"
        if not isinstance(turn, dict):
            raise DataError(
                f"{source}: record {i}, field '{name}': expected an object "
                f'{{"query": ..., "answer": ...}}, got {type(turn).__name__}'
            )
        extra = sorted(set(turn) - {"query", "answer"})
        if extra:
            raise DataError(f"{source}: record {i}, field '{name}': unknown key(s) {', '.join(extra)}")
        pair = []
        for key in ("query", "answer"):
            value = turn.get(key)
            if not isinstance(value, str) or not value.strip():
                got = type(value).__name__ if not isinstance(value, str) else "empty"
                got = "missing" if value is None else got
                raise DataError(
                    f"{source}: record {i}, field '{name}.{key}': {got}, expected a non-empty string"
                )
            pair.append(value)
        turns.append((pair[0], pair[1]))
    return turns


def validate_urial_records(rows: Sequence[Any], source: str) -> list[dict[str, Any]]:
    """cut.generate's checks (instruction, input) plus the optional `history`."""
    records = validate_instructions(rows, source)
    for i, rec in enumerate(records):
        history_turns(source, i, rec)
    return records


# ---------------------------------------------------------------- the answer file


def _inputs(data_path: str | None, records: list[dict] | None, cfg: UrialConfig) -> tuple[list[dict], str]:
    inputs, source = read_instructions(data_path, records, validate_urial_records)
    return inputs[: cfg.limit], source


def _query(rec: dict[str, Any], source: str) -> tuple[str, list[tuple[str, str]]]:
    return query_text(rec["instruction"], rec["input"]), history_turns(source, 0, rec)  # checked: cannot fail


def first_prompt(
    data_path: str | None,
    cfg: UrialConfig | None = None,
    *,
    records: list[dict] | None = None,
    **options: Any,
) -> str:
    """The exact text the model is given for the first record (what --print_prompt prints); the
    records and the prompt file are checked, no model or tokenizer is loaded."""
    cfg = cfg or UrialConfig.from_dict(options)
    inputs, source = _inputs(data_path, records, cfg)
    if not inputs:
        raise ConfigError("--limit 0: no record to print")
    query, history = _query(inputs[0], source)
    return load_urial_prompt(cfg.urial_prompt, cfg.turn_format).render(query, history)


def urial_file(
    model: str,
    data_path: str | None,
    output_file: str,
    cfg: UrialConfig | None = None,
    *,
    records: list[dict] | None = None,
    progress: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """Answer every record of data_path (or `records`) with URIAL into output_file (AlpacaEval
    format, resumable); returns its records. Settings, records, the prompt file, an existing
    output file and the engine are all checked before the model loads."""
    cfg = cfg or UrialConfig.from_dict(options)
    check_model_path(model)
    cfg = dataclasses.replace(cfg, engine=resolve_engine(cfg.engine, model))
    inputs, source = _inputs(data_path, records, cfg)
    prompt = load_urial_prompt(cfg.urial_prompt, cfg.turn_format)
    check_writable(output_file, "output_file")
    if cfg.engine == "vllm":
        require_vllm()
    generator = cfg.generator or f"{model_name(model)}+urial"
    meta = answer_meta(generator, cfg.dataset, data_path, cfg.sampling, prompt.tag)
    meta.update(stop=list(cfg.stop), keep_fences=cfg.keep_fences)
    position = {id(rec): i for i, rec in enumerate(inputs)}

    def run(pending: list[dict[str, Any]], on_batch: OnBatch) -> None:
        queries, histories = zip(*(_query(rec, source) for rec in pending), strict=True)
        tokenizer = load_tokenizer(model, cfg.trust_remote_code)
        if cfg.engine == "vllm":
            lm = load_vllm(model, cfg)  # cut.generate's: dtype, seed and the engine options
        else:
            lm = load_model(model, cfg.dtype, cfg.device, cfg.trust_remote_code)
        generate_urial_texts(
            lm, tokenizer, list(queries), list(histories), prompt, cfg.sampling,
            batch_size=cfg.batch_size, on_batch=on_batch, progress=progress, stop=cfg.stop,
            keep_fences=cfg.keep_fences, where=lambda i: f"{source}: record {position[id(pending[i])]}",
            engine=cfg.engine,
        )  # fmt: skip

    return write_answers(inputs, output_file, meta, run)


# ---------------------------------------------------------------- command line

RUN_ONLY = ("model", "data_path", "output_file", "sample", "print_prompt")
_D = _urial_sampling()


@dataclass
class UrialOptions(Options):
    """URIAL: answer instructions with a *base* model, aligned by its prompt alone (no training)."""

    model: str | None = opt(
        None, "a base model folder or name (a LoRA adapter folder works with --engine hf)"
    )
    data_path: str = opt(
        "", "instructions (+ optional input, history): .json, .jsonl or datasets folder", required=True
    )
    output_file: str | None = opt(None, "AlpacaEval JSON list; an existing one is resumed")
    urial_prompt: str | None = opt(
        None,
        "a URIAL prompt file (any of URIAL's urial_prompts/*.txt, or your own), used verbatim "
        "(unset: the packaged cut/resources/urial/default.md)",
    )
    turn_format: str = opt(
        "auto",
        "how the queries are written after the file: auto = URIAL's rule (a file named "
        "*inst_help_v5* gets v5, *inst_help_v6* v6, any other backticks) | backticks ('# Query:' / "
        "'# Answer:' between ``` lines) | v5 / v6 ('# User:' / '# Assistant:')",
        choices=("auto", *TURN_FORMATS),
    )
    stop: list[str] | None = opt(
        None,
        f"an answer ends before this text; repeat for more (unset: URIAL's {' and '.join(map(repr, STOP))})",
        append=True,
        metavar="TEXT",
    )
    keep_fences: bool = opt(
        False,
        "keep the code fences of an answer (URIAL removes every ```; this removes only the "
        "answer block's closing fence)",
    )
    print_prompt: bool = opt(
        False,
        "print the exact prompt of the first record and exit (no model is loaded; --model and "
        "--output_file are not needed)",
    )
    max_new_tokens: int = opt(_D.max_new_tokens, "URIAL's runs: 2048", parse=NEW_TOKENS)
    temperature: float | None = opt(None, "0 = greedy (unset: greedy)", parse=TEMPERATURE)
    sample: bool = opt(False, f"sample at URIAL's temperature {SAMPLED_TEMPERATURE}")
    top_p: float = opt(_D.top_p, "URIAL's runs: 1.0", parse=TOP_P)
    repetition_penalty: float = opt(
        _D.repetition_penalty,
        "URIAL's runs use 1.0 to 1.15 (its README's example: 1.1)",
        parse=REPETITION_PENALTY,
    )
    seed: int = opt(_D.seed, "sampling seed; a rerun reproduces the outputs", parse=SEED)
    generator: str | None = opt(None, "name in the output (unset: '<model folder>+urial')")
    dataset: str | None = opt(None, "dataset name in the output (unset: input file stem)")
    limit: int | None = opt(None, "answer only the first N records", parse=LIMIT)
    engine_options: EngineOptions = group(EngineOptions)  # cut generate's: hf | vllm, and their settings

    def validate(self) -> None:
        if not self.print_prompt:
            missing = [f"--{k}" for k in ("model", "output_file") if self.get(k) is None]
            if missing:
                raise ConfigError(
                    f"the following arguments are required: {', '.join(missing)} (or --print_prompt)"
                )


def build_parser() -> argparse.ArgumentParser:
    """cut urial's parser (UrialOptions'); every option not given holds its default."""
    parser = UrialOptions.build_parser("cut.urial")
    parser.set_defaults(**UrialOptions().flat())
    return parser


def config_from_args(args: dict[str, Any]) -> UrialConfig:
    """The UrialConfig of parsed options (UrialOptions' names; a flag's raw text coerced)."""
    fields = UrialOptions.option_fields()
    args = {
        k: coerce_value(fields[k][1], k, v) if isinstance(v, str) and k in fields else v
        for k, v in args.items()
    }
    values = {k: v for k, v in args.items() if k not in RUN_ONLY}
    if args.get("sample"):
        if values.get("temperature") == 0:
            raise ConfigError("--sample samples; --temperature 0 is greedy: give one of them")
        values["temperature"] = values["temperature"] or SAMPLED_TEMPERATURE
    if values.get("temperature") is None:
        values["temperature"] = 0.0
    if values.get("stop") is None:
        values.pop("stop", None)
    return UrialConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    opts = UrialOptions.parse(argv, prog="cut.urial")

    def body() -> None:
        cfg = config_from_args(opts.flat())
        if opts.print_prompt:
            sys.stdout.write(first_prompt(opts.data_path, cfg))
            sys.stdout.flush()
            return
        urial_file(opts.model, opts.data_path, opts.output_file, cfg)

    return run_cli("cut.urial", body)


if __name__ == "__main__":
    sys.exit(main())
