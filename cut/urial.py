"""URIAL: answer instructions with a *base* model, aligned by its prompt alone (no training).

    python -m cut.urial --model DIR --data_path questions.json --output_file out.json \
        [--urial_prompt FILE] [--batch_size 8] [--max_new_tokens 512] [--temperature 0 | --sample] \
        [--repetition_penalty 1.1] [--seed 42] [--limit N]

Lin et al., "The Unlocking Spell on Base LLMs: Rethinking Alignment via In-Context Learning"
(ICLR 2024): a preamble plus K=3 stylistic query/answer examples is enough for a base model to
answer like a chat model. The prompt is the preamble, the examples, the record's earlier turns
(`history`) as further blocks, then the query and the opening of its answer:

    {preamble}

    # Query:
    ```
    {example query}
    ```

    # Answer:
    ```
    {example answer}
    ```
    ... (more examples, then the history turns, in the same blocks)

    # Query:
    ```
    {instruction}
    ```

    # Answer:
    ```

Every block is written as URIAL's own code writes a turn (its `urial_backticks` conversation
template, used with the fenced prompts such as inst_1k_v4.help.txt): "\\n" + header + "\\n```\\n" +
text + "\\n```\\n", and the open answer "\\n# Answer:\\n```\\n". The examples of a prompt file are
written the same way, so the blank lines between a file's blocks do not matter; the text inside a
fence is kept as it is. A record's `input`, if any, follows its instruction after a blank line.

Prompt files: data/urial/default.md, the project's own preamble and three examples (a direct
factual answer, a structured one with headings and lists, a refusal of a harmful request with a
helpful alternative), or --urial_prompt FILE in the URIAL repository's layout: a preamble, then
blocks of a line `# Query:` and a ```-fenced query, a line `# Answer:` and a ```-fenced answer. A
code block inside an example needs a language tag (```python) so that its fences nest.

Decoding, the paper's settings: greedy, or temperature 0.3 with --sample; repetition penalty 1.1
(the paper uses 1.0 to 1.15); 512 new tokens. A base model has no chat template: the prompt is plain
text, and the tokenizer adds its own special tokens (its BOS, once, where it adds one). Each answer
stops when it starts a new `# Query` block, each row of a batch on its own (URIAL's transformers
code stops only when every row of the batch has); the answer's closing fence, a cut-off block
header and surrounding whitespace are stripped.

Input: a .json list, .jsonl or datasets folder of records with a non-empty string `instruction`, an
optional string `input` and an optional `history`: a list of {"query": ..., "answer": ...} turns
before this one (MT-bench's second turn, say). Output: the AlpacaEval file of cut.generate (one
string `output` per record; URIAL's own code writes a list, which alpaca_eval rejects), with
generator "<model>+urial" and prompt_template "urial:<prompt file>@<hash of its text>"; resumed and
rewritten atomically after each batch as cut.generate does (answers are matched by instruction and
input, so records that differ only in their history pair in order). Everything is checked before a
model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError, EngineError
from .generate import (
    BATCH_SIZE,
    LIMIT,
    NEW_TOKENS,
    REPETITION_PENALTY,
    TEMPERATURE,
    OnBatch,
    Sampling,
    generate_texts,
    validate_instructions,
    write_answers,
)
from .io import check_writable
from .models import (
    DTYPES,
    check_device,
    check_model_path,
    device_option,
    load_model,
    load_tokenizer,
    model_name,
)
from .options import SEED, Parser
from .records import read_raw

logger = logging.getLogger("cut.urial")

DEFAULT_PROMPT = Path(__file__).resolve().parent.parent / "data" / "urial" / "default.md"
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
    """The prompt of a URIAL prompt file (None: the project's data/urial/default.md), in
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
) -> list[str]:
    """URIAL answers of a loaded model, in query order: each stops at its next `# Query` block and
    is cleaned of the block markup (`on_batch` sees the cleaned texts)."""
    histories = histories if histories is not None else [None] * len(queries)
    if len(histories) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(histories)} histories")
    prompt = prompt or default_prompt()
    texts = [urial_prompt(q, h, prompt) for q, h in zip(queries, histories, strict=True)]

    def cleaned(idx: list[int], answers: list[str]) -> None:
        if on_batch is not None:
            on_batch(idx, [clean_answer(a) for a in answers])

    out = generate_texts(
        model, tokenizer, texts, sampling or _urial_sampling(),
        add_special_tokens=adds_special_tokens(tokenizer, texts[0]) if texts else True,
        batch_size=batch_size, on_batch=cleaned, progress=progress, stop=STOP,
    )  # fmt: skip
    return [clean_answer(a) for a in out]


# ---------------------------------------------------------------- settings and records


def _urial_sampling() -> Sampling:
    return Sampling(max_new_tokens=512, temperature=0.0, repetition_penalty=1.1)


@dataclass(frozen=True)
class UrialConfig:
    """Everything `cut.urial` can set; sampling defaults are the paper's."""

    urial_prompt: str | None = None  # a prompt file in URIAL's layout (default: data/urial/default.md)
    batch_size: int = 8
    generator: str | None = None  # name in the output (default: "<model folder>+urial")
    dataset: str | None = None  # dataset name in the output (default: the input file's stem)
    limit: int | None = None  # answer only the first N records
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    sampling: Sampling = field(default_factory=_urial_sampling)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit must be >= 0, got {self.limit}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_device(self.device)
        low, high = PENALTY_RANGE
        if not low <= self.sampling.repetition_penalty <= high:
            logger.warning(
                "repetition_penalty=%s is outside the paper's range %s to %s",
                self.sampling.repetition_penalty, low, high,
            )  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "urial") -> UrialConfig:
        """Flat keys (sampling ones included); unknown keys are errors; unset sampling keys take
        the paper's values."""
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
    format, resumable); returns its records. Settings, records, the prompt file and an existing
    output file are all checked before the model loads."""
    cfg = cfg or UrialConfig.from_dict(options)
    check_model_path(model)
    if records is None:
        if data_path is None:
            raise ValueError("give data_path or records")
        raw, source = read_raw(data_path)
    else:
        raw, source = records, data_path or "records"
    inputs = validate_urial_records(raw, source)[: cfg.limit]
    prompt = load_urial_prompt(cfg.urial_prompt)
    check_writable(output_file, "output_file")
    meta = {
        "generator": cfg.generator or f"{model_name(model)}+urial",
        "dataset": cfg.dataset or (Path(data_path).stem if data_path else "records"),
        **cfg.sampling.meta(),
        "prompt_template": prompt.tag,
    }

    def run(pending: list[dict[str, Any]], on_batch: OnBatch) -> None:
        tokenizer = load_tokenizer(model, cfg.trust_remote_code)
        lm = load_model(model, cfg.dtype, cfg.device, cfg.trust_remote_code)
        generate_urial_texts(
            lm, tokenizer,
            [query_text(rec["instruction"], rec["input"]) for rec in pending],
            [history_turns(source, 0, rec) for rec in pending],  # checked above: cannot fail
            prompt, cfg.sampling, batch_size=cfg.batch_size, on_batch=on_batch, progress=progress,
        )  # fmt: skip

    return write_answers(inputs, output_file, meta, run)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    d = _urial_sampling()
    p = Parser(prog="cut.urial", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", required=True, help="a base model folder or name (a LoRA adapter folder works too)"
    )
    p.add_argument(
        "--data_path",
        required=True,
        help="instructions (+ optional input, history): .json, .jsonl or datasets folder",
    )
    p.add_argument("--output_file", required=True, help="AlpacaEval JSON list; an existing one is resumed")
    p.add_argument(
        "--urial_prompt", default=None, help="prompt file in URIAL's layout (default: data/urial/default.md)"
    )
    p.add_argument(
        "--batch_size", type=BATCH_SIZE, default=UrialConfig.batch_size, help="prompts generated at once"
    )
    p.add_argument("--max_new_tokens", type=NEW_TOKENS, default=d.max_new_tokens)
    p.add_argument("--temperature", type=TEMPERATURE, default=None, help="0 = greedy (the default)")
    p.add_argument(
        "--sample", action="store_true", help=f"sample at the paper's temperature {SAMPLED_TEMPERATURE}"
    )
    p.add_argument(
        "--repetition_penalty",
        type=REPETITION_PENALTY,
        default=d.repetition_penalty,
        help="the paper uses 1.0 to 1.15",
    )
    p.add_argument("--seed", type=SEED, default=d.seed, help="sampling seed; a rerun reproduces the outputs")
    p.add_argument("--generator", default=None, help="name in the output (default: '<model folder>+urial')")
    p.add_argument("--dataset", default=None, help="dataset name in the output (default: input file stem)")
    p.add_argument("--limit", type=LIMIT, default=None, help="answer only the first N records")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="auto: bf16 on a GPU, else fp32")
    p.add_argument("--device", type=device_option, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the model folder")
    return p


def config_from_args(args: dict[str, Any]) -> UrialConfig:
    values = {k: v for k, v in args.items() if k not in ("model", "data_path", "output_file", "sample")}
    if args.get("sample"):
        if values.get("temperature") == 0:
            raise ConfigError("--sample samples; --temperature 0 is greedy: give one of them")
        values["temperature"] = values["temperature"] or SAMPLED_TEMPERATURE
    if values.get("temperature") is None:
        values["temperature"] = 0.0
    return UrialConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = vars(build_parser().parse_args(argv))
    try:
        urial_file(args["model"], args["data_path"], args["output_file"], config_from_args(args))
    except (ValueError, EngineError) as err:  # ConfigError and DataError are ValueErrors
        print(f"cut.urial: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a model that cannot be loaded, a disk that cannot be written
        print(f"cut.urial: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
