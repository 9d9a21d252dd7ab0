"""Judgment records: load, validate, classify, downsample.

A record is {instruction, input?, output, judgment?, score?}. Which records are positives:
  - judgment null / missing, or
  - a 'score' >= score_threshold (7, as in the released code), or
  - a judgment that only says the response is perfect: after lower-casing and dropping
    surrounding spaces and final punctuation it reads "perfect", or "the/this response/answer/
    output is perfect" (the verdict the judge prompt asks for).
A judgment that failed ('$ERROR$', an empty string, or a truthy 'judge_error' field) is never
training text: such records are dropped, or trained as positives if asked, and counted.

Two other shapes are read as the same records (TRL's dataset formats):
  - chat: {"messages": [{"role": "system"?, ...}, {"role": "user", ...}, ..., {"role": "assistant",
    "content": the judged response}]}: the last turn is the output, the last user turn the
    instruction, and any turns before it (system included) the record's `history`, (role, content)
    pairs. The chat template renders the history as the conversation it is; `input` holds the same
    turns flattened, one "role: content" a line, for the templates that have no turns (alpaca,
    alpaca_input, .json files). The judgment and the other fields sit beside `messages`.
  - prompt / completion (TRL's prompt-completion and unpaired-preference files): prompt is the
    instruction (a string, or chat turns read as above), completion the output (a string or one
    assistant turn). A `label` (TRL's KTO format) true is a positive (a judgment beside it is
    refused as contradictory); false is a negative and needs its critique in `judgment`: CUT
    trains a negative against what was wrong with it, so a bare "bad" label is refused by name
    (judge the file with `cut judge` first).

Files: a .json list, a .jsonl file (one record a line), or a `datasets` folder / name (with a
config and split, for a name with several). A .json
object that wraps the list under one key of WRAPPER_KEYS ({"train": [...]}, {"data": [...]},
{"records": [...]}) is read as that list, and says so; any other object is refused, so a
{"test": [...]} file never trains silently. Exact duplicate records are kept (they weigh twice)
and counted in a warning. JSON nested deeper than cut.data.files.MAX_JSON_DEPTH levels is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cut.data.files import parse_json
from cut.errors import DataError

logger = logging.getLogger(__name__)

FAILED_JUDGMENTS = {"$ERROR$"}
WRAPPER_KEYS = ("train", "data", "records")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")  # what `datasets` reads as records
PERFECT = re.compile(r"^(?:(?:the|this) (?:response|answer|output) is )?perfect$")
Turns = tuple[tuple[str, str], ...]  # chat turns as (role, content)


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str
    judgment: str | None
    score: float | None = None
    index: int = -1  # position in the source file
    judge_error: str | None = None  # why the judge failed (cut.judge writes it); never training text
    spans: tuple[tuple[int, int], ...] = ()  # character ranges [start, end) of the output that are wrong
    # chat records: the (role, content) turns before the last user turn, system first; `input` holds
    # them flattened for the templates without turns
    history: Turns = ()


@dataclass(frozen=True)
class Example:
    """A record ready for training: judgment is None for positives."""

    record: Record
    judgment: str | None

    @property
    def is_negative(self) -> bool:
        return self.judgment is not None


def read_raw(path: str, config: str = "", split: str = "train") -> tuple[list[Any], str]:
    """The raw records of a .json list, a .jsonl file, or a `datasets` folder / name (config and
    split choose among a dataset's; a file has neither)."""
    p = Path(path)
    if p.suffix in (".json", ".jsonl") and (config or split != "train"):
        raise DataError(
            f"{path}: dataset_config / dataset_split choose within a datasets folder or hub name, "
            "not a .json/.jsonl file: leave them unset"
        )
    if p.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(_read_text(p).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(parse_json(line, f"{path}: line {lineno} (record {len(rows)})"))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: line {lineno} (record {len(rows)}): not valid JSON: {err.msg}"
                ) from None
        return rows, path
    if p.suffix == ".json":
        try:
            data = parse_json(_read_text(p), path)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
            ) from None
        if isinstance(data, dict):
            data = _unwrap(path, data)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data, path
    if p.suffix and not p.is_dir():
        raise DataError(
            f"{path}: unknown data file type {p.suffix!r}: use .json, .jsonl or a datasets folder"
        )
    return _read_datasets(path, config, split), path


def _unwrap(path: str, data: dict) -> Any:
    """{"train": [...]} -> the list, for the keys in WRAPPER_KEYS only (named in the log)."""
    keys = [k for k, v in data.items() if isinstance(v, list)]
    if len(keys) != 1:
        raise DataError(f"{path}: expected a JSON list of records")
    if keys[0] not in WRAPPER_KEYS:
        raise DataError(
            f"{path}: expected a JSON list of records, got an object whose key {keys[0]!r} holds a list; "
            f"only a list under {' / '.join(WRAPPER_KEYS)} is read: save the records as a list"
        )
    logger.info("%s: reading the %d records under key %r", path, len(data[keys[0]]), keys[0])
    return data[keys[0]]


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"{p}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{p}: not UTF-8 text: {err.reason} at byte {err.start}") from None


def _read_datasets(path: str, config: str = "", split: str = "train") -> list[dict[str, Any]]:
    import datasets

    folder = Path(path)
    saved = any((folder / f).exists() for f in ("dataset_info.json", "dataset_dict.json"))
    if folder.is_dir() and not saved:
        files = [f for f in folder.rglob("*") if f.is_file() and not f.name.startswith(".")]
        if not any(set(f.suffixes) & set(DATA_SUFFIXES) for f in files):  # .json.gz too
            kinds = sorted({f.suffix or f.name for f in files})
            raise DataError(
                f"{path}: no .json/.jsonl records in folder (nor {', '.join(DATA_SUFFIXES[2:])}); "
                f"it holds {len(files)} file(s){': ' + ', '.join(kinds[:5]) if kinds else ''}"
            )
    try:
        if Path(path).is_dir() and any(
            (Path(path) / f).exists() for f in ("dataset_info.json", "dataset_dict.json")
        ):
            if config:
                raise DataError(f"{path}: a saved datasets folder has no configs: leave dataset_config unset")
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path, config or None)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types; name the path
        what = f" (config {config!r})" if config else ""
        raise DataError(f"{path}{what}: cannot load as a datasets folder or name: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{path}: dataset has no {split!r} split (splits: {', '.join(ds)}): set dataset_split"
            )
        ds = ds[split]
    elif split != "train":
        raise DataError(f"{path}: a single dataset has no splits: leave dataset_split unset")
    return ds.to_list()


def check_object(source: str, i: int, raw: Any) -> dict:
    if not isinstance(raw, dict):
        raise DataError(f"{source}: record {i}: expected an object, got {type(raw).__name__}")
    return raw


def text_field(source: str, i: int, raw: dict, name: str, required: bool) -> str | None:
    """A string field: missing, wrongly typed or (when required) blank values name file, record, field."""
    value = raw.get(name)
    if value is None:
        if required:
            raise DataError(f"{source}: record {i}, field '{name}': missing")
        return None
    if not isinstance(value, str):
        raise DataError(
            f"{source}: record {i}, field '{name}': expected a string, got {type(value).__name__}"
        )
    if required and not value.strip():
        raise DataError(f"{source}: record {i}, field '{name}': empty")
    return value


def _turns(source: str, i: int, name: str, value: Any) -> list[tuple[str, str]]:
    """A chat field: a list of {"role", "content"} with roles system / user / assistant."""
    where = f"{source}: record {i}, field '{name}'"
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of {{'role', 'content'}} turns")
    out = []
    for k, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise DataError(f"{where}, turn {k}: expected {{'role': ..., 'content': a string}}")
        if turn.get("role") not in ("system", "user", "assistant"):
            raise DataError(
                f"{where}, turn {k}: role must be system, user or assistant, got {turn.get('role')!r}"
            )
        if turn["role"] == "system" and k:
            raise DataError(f"{where}, turn {k}: a system turn comes first only")
        out.append((turn["role"], turn["content"]))
    return out


def _prompt_of(source: str, i: int, name: str, turns: list[tuple[str, str]]) -> tuple[str, str, Turns]:
    """(instruction, input, history) of chat turns that end with a user turn: the last user turn,
    the turns before it one "role: content" a line, and those turns as they are."""
    if turns[-1][0] != "user":
        raise DataError(f"{source}: record {i}, field '{name}': the prompt must end with a user turn")
    history = tuple(turns[:-1])
    return turns[-1][1], "\n".join(f"{role}: {text}" for role, text in history), history


def normalise(source: str, i: int, raw: dict) -> tuple[dict, Turns]:
    """A chat or prompt/completion record as an instruction/input/output one (see the module doc),
    and the turns before its last user turn (none for a record without turns)."""
    shape = (
        "messages" if "messages" in raw else "prompt" if ("prompt" in raw or "completion" in raw) else None
    )
    if shape is None:
        return raw, ()
    clash = [k for k in ("instruction", "input", "output") if k in raw]
    if clash:
        raise DataError(
            f"{source}: record {i}, field '{clash[0]}': not with '{shape}' (one record format at a time)"
        )
    out = {k: v for k, v in raw.items() if k not in ("messages", "prompt", "completion", "label")}
    if shape == "messages":
        turns = _turns(source, i, "messages", raw["messages"])
        if turns[-1][0] != "assistant" or len(turns) < 2:
            raise DataError(
                f"{source}: record {i}, field 'messages': the last turn must be the assistant's "
                "(the judged response), after a user turn"
            )
        out["instruction"], out["input"], history = _prompt_of(source, i, "messages", turns[:-1])
        out["output"] = turns[-1][1]
        return out, history
    prompt, completion = raw.get("prompt"), raw.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise DataError(f"{source}: record {i}, field '{name}': missing")
    history: Turns = ()
    if isinstance(prompt, list):
        out["instruction"], out["input"], history = _prompt_of(
            source, i, "prompt", _turns(source, i, "prompt", prompt)
        )
    else:
        out["instruction"] = prompt
    if isinstance(completion, list):
        turns = _turns(source, i, "completion", completion)
        if [r for r, _ in turns] != ["assistant"]:
            raise DataError(f"{source}: record {i}, field 'completion': expected one assistant turn")
        out["output"] = turns[0][1]
    else:
        out["output"] = completion
    if "label" in raw:
        label = raw["label"]
        if not isinstance(label, bool):
            raise DataError(f"{source}: record {i}, field 'label': expected true or false, got {label!r}")
        judgment = raw.get("judgment")
        if label and judgment is not None:
            raise DataError(
                f"{source}: record {i}, field 'judgment': label true marks a positive; a judgment beside it "
                "contradicts it (drop one)"
            )
        if not label and (not isinstance(judgment, str) or not judgment.strip()):
            raise DataError(
                f"{source}: record {i}, field 'judgment': label false needs the critique of the completion "
                "(CUT trains a negative against what was wrong with it); judge the file with `cut judge` first"
            )
    return out, history


def validate(rows: Iterable[Any], source: str) -> list[Record]:
    records = []
    for i, raw in enumerate(rows):
        raw, history = normalise(source, i, check_object(source, i, raw))
        score = raw.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise DataError(
                f"{source}: record {i}, field 'score': expected a number, got {type(score).__name__}"
            )
        if score is not None and not math.isfinite(score):  # NaN would make a negative, inf a positive
            raise DataError(f"{source}: record {i}, field 'score': not a finite number ({score})")
        records.append(
            Record(
                instruction=text_field(source, i, raw, "instruction", True),
                input=text_field(source, i, raw, "input", False) or "",
                output=text_field(source, i, raw, "output", True),
                judgment=text_field(source, i, raw, "judgment", False),
                score=None if score is None else float(score),
                index=i,
                judge_error=str(raw["judge_error"]) if raw.get("judge_error") else None,
                spans=span_field(source, i, raw),
                history=history,
            )
        )
    if not records:
        raise DataError(f"{source}: no records")
    return records


def span_field(source: str, i: int, raw: dict) -> tuple[tuple[int, int], ...]:
    """The optional `spans` field: the wrong text of the output, as [start, end) character offsets
    or as quoted substrings; a substring marks every place it occurs. Sorted, overlaps merged."""
    value = raw.get("spans")
    if value is None:
        return ()
    where = f"{source}: record {i}, field 'spans'"
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of [start, end] pairs or quoted strings")
    output = raw.get("output") if isinstance(raw.get("output"), str) else ""
    found: list[tuple[int, int]] = []
    for k, item in enumerate(value):
        if isinstance(item, str):
            hits = quote_offsets(item, output)
            if not hits:
                raise DataError(f"{where}, item {k}: the quote {item[:60]!r} is not in the output")
            found += hits
        elif (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            and 0 <= item[0] < item[1] <= len(output)
        ):
            found.append((item[0], item[1]))
        else:
            raise DataError(
                f"{where}, item {k}: expected a quoted string or [start, end] with "
                f"0 <= start < end <= {len(output)} (the output's length), got {item!r}"
            )
    return merge_spans(found)


def quote_offsets(quote: str, text: str) -> list[tuple[int, int]]:
    """Every [start, end) where `quote` occurs in `text` (none for an empty quote)."""
    out, start = [], text.find(quote) if quote else -1
    while start >= 0:
        out.append((start, start + len(quote)))
        start = text.find(quote, start + len(quote))
    return out


def merge_spans(spans: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return tuple(merged)


QUOTES = re.compile(
    r"(?<![A-Za-z])'([^\n]+?)'(?![A-Za-z])|\"([^\"\n]+)\"|\u201c([^\u201d\n]+)\u201d|\u2018([^\u2019\n]+)\u2019|`([^`\n]+)`"
)


def quoted_spans(judgment: str, output: str) -> tuple[tuple[int, int], ...]:
    """Spans of the output that a judgment quotes word for word ('...', "...", curly quotes, `...`);
    quotes not found verbatim in the output are ignored (they may be the correction)."""
    quotes = {next(g for g in m.groups() if g) for m in QUOTES.finditer(judgment)}
    return merge_spans(s for q in quotes if q.strip() for s in quote_offsets(q, output))


def load_records(path: str, config: str = "", split: str = "train") -> list[Record]:
    rows, source = read_raw(path, config, split)
    records = validate(rows, source)
    repeats = duplicates(records)
    if repeats:
        first = repeats[0]
        logger.warning(
            "%s: %d exact duplicate record(s), kept (each trains again), e.g. record %d repeats record %d",
            source,
            len(repeats),
            first[1],
            first[0],
        )
    return records


def duplicates(records: list[Record]) -> list[tuple[int, int]]:
    """(earlier, later) index pairs of records equal in every field but their position."""
    seen: dict[Record, int] = {}
    out = []
    for r in records:
        key = dataclasses.replace(r, index=-1)
        if key in seen:
            out.append((seen[key], r.index))
        else:
            seen[key] = r.index
    return out


def says_perfect(judgment: str) -> bool:
    text = re.sub(r"\s+", " ", judgment.strip().lower()).rstrip(".!")
    return bool(PERFECT.match(text))


def classify(record: Record, score_threshold: float = 7.0) -> str:
    """'positive', 'negative' or 'failed'."""
    j = record.judgment
    if record.judge_error or (j is not None and (j.strip() in FAILED_JUDGMENTS or not j.strip())):
        return "failed"
    if record.judgment is None or says_perfect(record.judgment):
        return "positive"
    if record.score is not None and record.score >= score_threshold:
        return "positive"
    return "negative"


def build_examples(
    records: list[Record],
    score_threshold: float = 7.0,
    on_failed_judgment: str = "drop",
    downsample: float = -1,
    seed: int = 42,
) -> tuple[list[Example], dict[str, int]]:
    """Classify records into training examples; counts say what was kept, turned or dropped."""
    counts = {
        "records": len(records),
        "positive": 0,
        "negative": 0,
        "failed_judgment": 0,
        "downsampled_away": 0,
    }
    examples = []
    for r in records:
        kind = classify(r, score_threshold)
        if kind == "failed":
            counts["failed_judgment"] += 1
            if on_failed_judgment == "positive":
                examples.append(Example(r, None))
            continue
        examples.append(Example(r, r.judgment if kind == "negative" else None))
    counts["positive"] = sum(not e.is_negative for e in examples)
    counts["negative"] = sum(e.is_negative for e in examples)
    if downsample != -1:
        n_keep = int(counts["negative"] * downsample)
        positives = [i for i, e in enumerate(examples) if not e.is_negative]
        if n_keep < len(positives):
            keep = set(random.Random(seed).sample(positives, n_keep))
            drop = set(positives) - keep
            examples = [e for i, e in enumerate(examples) if i not in drop]
            counts["downsampled_away"] = len(drop)
            counts["positive"] -= len(drop)
    return examples, counts
