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
QUERY, ANSWER, FENCE = "# Query:", "# Answer:", "```"
STOP = ("# Query",)  # URIAL's stop string: the model has begun the next block
SAMPLED_TEMPERATURE = 0.3  # the paper's setting when sampling
PENALTY_RANGE = (1.0, 1.15)  # repetition penalties the paper uses


# ---------------------------------------------------------------- the prompt


@dataclass(frozen=True)
class UrialPrompt:
    """A preamble and K (query, answer) examples; `name` says where they came from."""

    preamble: str
    examples: tuple[tuple[str, str], ...]
    name: str = "default"

    @property
    def text(self) -> str:
        """Preamble and examples as they open every prompt."""
        head = self.preamble + "\n" if self.preamble else ""
        body = _turns(self.examples)
        return head + body if head else body.removeprefix("\n")

    @property
    def tag(self) -> str:
        """'urial:<name>@<hash>', written into every answer: an edited prompt stops a resume."""
        return f"urial:{self.name}@{hashlib.sha256(self.text.encode('utf-8')).hexdigest()[:8]}"


def _block(header: str, text: str) -> str:
    return f"\n{header}\n{FENCE}\n{text}\n{FENCE}\n"


def _turns(turns: Sequence[tuple[str, str]]) -> str:
    return "".join(_block(QUERY, q) + _block(ANSWER, a) for q, a in turns)


def urial_prompt(
    instruction: str, history: list[tuple[str, str]] | None = None, prompt: UrialPrompt | None = None
) -> str:
    """The full URIAL prompt for `instruction` after the (query, answer) turns of `history`."""
    prompt = prompt or default_prompt()
    open_answer = f"\n{ANSWER}\n{FENCE}\n"
    rest = _turns(history or []) + _block(QUERY, instruction) + open_answer
    return prompt.text + rest if prompt.text else rest.removeprefix("\n")


def load_urial_prompt(path: str | None = None) -> UrialPrompt:
    """The prompt of a file in URIAL's layout; None: the project's data/urial/default.md."""
    if path is None:
        return default_prompt()
    return _read_prompt(Path(path), Path(path).name)


@lru_cache(maxsize=1)
def default_prompt() -> UrialPrompt:
    return _read_prompt(DEFAULT_PROMPT, "default")


def _read_prompt(path: Path, name: str) -> UrialPrompt:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the URIAL prompt: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: URIAL prompt is not UTF-8 text: {err.reason} at byte {err.start}"
        ) from None
    return parse_urial_prompt(text, str(path), name)


def parse_urial_prompt(text: str, source: str = "<prompt>", name: str = "prompt") -> UrialPrompt:
    """A preamble, then `# Query:` / `# Answer:` blocks with ```-fenced texts; ConfigError naming
    `source`, the example and the line where the text leaves that layout."""
    lines = text.replace("\r\n", "\n").split("\n")
    first = next((i for i, line in enumerate(lines) if line.rstrip() == QUERY), None)
    if first is None:
        raise ConfigError(
            f"{source}: no '{QUERY}' line: a URIAL prompt is a preamble, then example blocks "
            f"'{QUERY}' + a ```-fenced query and '{ANSWER}' + a ```-fenced answer"
        )
    examples: list[tuple[str, str]] = []
    i = first
    while (i := _skip_blank(lines, i)) < len(lines):
        where = f"{source}: example {len(examples) + 1}"
        query, i = _fenced(lines, i, QUERY, where)
        answer, i = _fenced(lines, _skip_blank(lines, i), ANSWER, where)
        examples.append((query, answer))
    return UrialPrompt("\n".join(lines[:first]).rstrip(), tuple(examples), name)


def _skip_blank(lines: list[str], i: int) -> int:
    while i < len(lines) and not lines[i].strip():
        i += 1
    return i


def _fenced(lines: list[str], i: int, header: str, where: str) -> tuple[str, int]:
    """The text of the block whose header is at line i, and the line after its closing fence."""
    if i >= len(lines):
        raise ConfigError(f"{where}: the file ends before its '{header}' block")
    if lines[i].rstrip() != header:
        raise ConfigError(f"{where}: line {i + 1}: expected '{header}', found {lines[i]!r}")
    where = f"{where}, '{header}' block"
    start = _skip_blank(lines, i + 1)
    if start >= len(lines) or lines[start].strip() != FENCE:
        found = repr(lines[start]) if start < len(lines) else "the end of the file"
        raise ConfigError(f"{where}: line {start + 1}: expected a line ``` opening its text, found {found}")
    depth = 0  # code blocks inside the text: ```lang opens one, a bare ``` closes it
    for k in range(start + 1, len(lines)):
        fence = lines[k].strip()
        if fence == FENCE and depth == 0:
            body = "\n".join(lines[start + 1 : k])
            if not body.strip():
                raise ConfigError(f"{where}: line {start + 1}: empty text")
            return body, k + 1
        if fence.startswith(FENCE):
            depth += 1 if fence != FENCE else -1
    raise ConfigError(f"{where}: the ``` opened on line {start + 1} is never closed")


def clean_answer(text: str) -> str:
    """The answer without its block markup: a trailing (cut-off) `# Query:` header, the answer's
    closing fence, surrounding whitespace. A code block the answer ends with keeps its fence."""
    text = text.strip()
    head, _, last = text.rpartition("\n")
    if last.strip() and QUERY.startswith(last.strip()):  # max_new_tokens ended inside the header
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
