"""Convert the released offline judgment data into cut records, as the CUT release does it.

    cut convert --format summarization --input critiques.train.jsonl[.gz] --output_file train.json
    cut convert --format shepherd --input human_data_raw.jsonl --feedback human_data_for_model.jsonl \
        --output_file data/Shepherd/train-alpaca.json

What wwxu21/CUT `scripts/convert2alpaca.py` computes, field for field:

summarization (OpenAI's critiques release, one {"data": {...}} object a line): for every question
of every passage, the instruction is `passage + "\\n" + question`; the answer is the one with the
highest ranking (the first of equal ones); it is skipped when its feedback says `skip` or its
text is empty. No critiques (null or []) -> a positive (judgment null; the release requires
rating 7 then, and so does cut); otherwise the judgment is the critiques' texts joined by spaces,
`i_ans` the last critique's refinement, `score` 1, and an empty refinement skips the answer.

shepherd (two JSONL files read side by side, line i with line i): the instruction is the feedback
file's `question`, the output its `answer`, the judgment its `feedback`, `i_ans` the raw file's
`metadata.output_correct`, `score` 1; the raw file's `metadata.context` and
`metadata.output_candidate` must equal that question and answer.

Each output record is {instruction, input: "", output, judgment, score, i_ans}: the release's
`input`, `reason` and `ref` were always null and are left out; `i_ans` (the corrected answer) is
kept, and training ignores it. Everything is read and checked before anything is written; a bad
record stops the run with the file, the record (its line) and the field; the output is written
to a temporary file and renamed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cut.args import Options, opt, run_cli
from cut.data.files import check_writable, parse_json, write_json_atomic
from cut.errors import DataError

logger = logging.getLogger("cut.convert")

FORMATS = ("summarization", "shepherd")
PERFECT_RATING = 7  # the rating of an uncritiqued answer in the Summarization release


# ---------------------------------------------------------------- reading


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(record index, parsed object) of each non-blank line of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise DataError(f"{path}: cannot be read ({err})") from None
    i = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield i, parse_json(line, f"{path}: record {i} (line {n})")
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: record {i} (line {n}): not valid JSON ({err.msg})") from None
        i += 1


class Fields:
    """Typed access into one record; every error names the file, the record and the field path."""

    def __init__(self, source: str, index: int, record: Any):
        self.where = f"{source}: record {index}"
        self.record = record

    def fail(self, path: str, why: str) -> DataError:
        return DataError(f"{self.where}, field '{path}': {why}")

    def get(self, path: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
        """The value at a dotted path ('data.passage.text', 'answers[2].feedback'), of type `kind`."""
        value: Any = self.record
        walked = ""
        for part in _split(path):
            if isinstance(part, int):
                if not isinstance(value, list) or part >= len(value):
                    raise self.fail(walked, f"expected a list with an item {part}")
                value = value[part]
                walked = f"{walked}[{part}]"
            else:
                if not isinstance(value, dict):
                    raise self.fail(walked or "(record)", f"expected an object, got {_kind(value)}")
                walked = f"{walked}.{part}" if walked else part
                if part not in value:
                    if required:
                        raise self.fail(walked, "missing")
                    return None
                value = value[part]
        if value is None and not required:
            return None
        if isinstance(value, bool) and bool not in _tuple(kind):
            raise self.fail(path, f"expected {_names(kind)}, got bool")
        if not isinstance(value, kind):
            raise self.fail(path, f"expected {_names(kind)}, got {_kind(value)}")
        return value


def _split(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in path.split("."):
        name, *indices = piece.split("[")
        if name:
            parts.append(name)
        parts.extend(int(i.rstrip("]")) for i in indices)
    return parts


def _tuple(kind) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind) -> str:
    return " or ".join(
        {"str": "a string", "list": "a list", "dict": "an object"}.get(k.__name__, k.__name__)
        for k in _tuple(kind)
    )


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def record(instruction: str, output: str, judgment: str | None, score: int | None, i_ans: str | None) -> dict:
    """One cut record in the order of the Data format table; `score` and `i_ans` as the release."""
    return {
        "instruction": instruction,
        "input": "",
        "output": output,
        "judgment": judgment,
        "score": score,
        "i_ans": i_ans,
    }


# ---------------------------------------------------------------- the two formats


def convert_summarization(path: str | Path) -> tuple[list[dict], Counter]:
    """Records from one Summarization critiques file (see the module docstring); and counts."""
    out: list[dict] = []
    counts: Counter = Counter()
    for i, raw in read_jsonl(path):
        f = Fields(str(path), i, raw)
        passage = f.get("data.passage.text", str)
        questions = f.get("data.questions", list)
        for q in range(len(questions)):
            at = f"data.questions[{q}]"
            counts["questions"] += 1
            instruction = f"{passage}\n{f.get(f'{at}.question', str)}"
            rankings = f.get(f"{at}.rankings", list)
            answers = f.get(f"{at}.answers", list)
            if not rankings:
                raise f.fail(f"{at}.rankings", "empty")
            for r, value in enumerate(rankings):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise f.fail(f"{at}.rankings[{r}]", f"expected a number, got {_kind(value)}")
            best = rankings.index(max(rankings))  # the first of the highest, as list.index finds it
            if best >= len(answers):
                raise f.fail(f"{at}.answers", f"has {len(answers)} answers; rankings point at answer {best}")
            ans = f"{at}.answers[{best}]"
            output = f.get(f"{ans}.answer", str)
            feedback = f.get(f"{ans}.feedback", dict)
            # `== True` as the release compares (a skip of 1 skips too)
            if feedback.get("skip", False) == True or output == "":  # noqa: E712
                counts["skipped (skip or empty answer)"] += 1
                continue
            if "critiques" not in feedback:
                raise f.fail(f"{ans}.feedback.critiques", "missing (null or [] for an uncritiqued answer)")
            critiques = f.get(f"{ans}.feedback.critiques", list, required=False)
            if not critiques:
                rating = f.get(f"{ans}.feedback.rating", (int, float), required=False)
                if rating != PERFECT_RATING:
                    raise f.fail(
                        f"{ans}.feedback.rating",
                        f"no critiques, so the answer counts as perfect, but its rating is {rating!r}, "
                        f"not {PERFECT_RATING} (the release refuses such a record too)",
                    )
                out.append(record(instruction, output, None, None, None))
                counts["positives"] += 1
                continue
            texts = [f.get(f"{ans}.feedback.critiques[{c}].text", str) for c in range(len(critiques))]
            # the release keeps the refinement of the last critique
            refinement = f.get(f"{ans}.feedback.critiques[{len(critiques) - 1}].refinement", str)
            if refinement == "":
                counts["skipped (empty refinement)"] += 1
                continue
            out.append(record(instruction, output, " ".join(texts).strip(), 1, refinement))
            counts["negatives"] += 1
    return out, counts


def convert_shepherd(raw_path: str | Path, feedback_path: str | Path) -> tuple[list[dict], Counter]:
    """Records from Shepherd's raw file and its feedback file, line i with line i."""
    raws = list(read_jsonl(raw_path))
    feedback = list(read_jsonl(feedback_path))
    if len(raws) != len(feedback):
        raise DataError(
            f"{raw_path} has {len(raws)} records but {feedback_path} has {len(feedback)}: "
            "the two Shepherd files are read line by line together"
        )
    out: list[dict] = []
    for (i, raw), (_, fb) in zip(raws, feedback, strict=True):
        r, f = Fields(str(raw_path), i, raw), Fields(str(feedback_path), i, fb)
        question, answer = f.get("question", str), f.get("answer", str)
        for name, other in (("context", question), ("output_candidate", answer)):
            if r.get(f"metadata.{name}", str) != other:
                what = "question" if name == "context" else "answer"
                raise r.fail(
                    f"metadata.{name}", f"differs from field '{what}' of record {i} of {feedback_path}"
                )
        judgment = f.get("feedback", str)
        out.append(record(question, answer, judgment, 1, r.get("metadata.output_correct", str)))
    return out, Counter(negatives=len(out))


def check_records(rows: list[dict], source: str) -> None:
    """What cut.train will insist on, found now: a non-empty instruction and output."""
    for i, row in enumerate(rows):
        for name in ("instruction", "output"):
            if not row[name].strip():
                raise DataError(f"{source}: output record {i}, field '{name}': empty")
    if not rows:
        raise DataError(f"{source}: no records to write (every answer was skipped)")


def convert(
    fmt: str, input: str, output_file: str, feedback: str | None = None
) -> tuple[list[dict], Counter]:
    """Read, convert and check everything, then write output_file atomically."""
    if fmt not in FORMATS:
        raise DataError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if (fmt == "shepherd") != (feedback is not None):
        raise DataError(
            "--feedback (human_data_for_model.jsonl) is needed with --format shepherd, and only there"
        )
    check_writable(output_file, "output_file")
    if fmt == "summarization":
        rows, counts = convert_summarization(input)
    else:
        rows, counts = convert_shepherd(input, feedback)
    check_records(rows, input)
    write_json_atomic(output_file, rows)
    return rows, counts


@dataclass
class ConvertOptions(Options):
    """The CUT paper's offline data (Summarization, Shepherd releases) -> cut records."""

    format: str = opt("", "the released file format", choices=FORMATS, required=True)
    input: str = opt(
        "",
        "summarization: critiques.{train,test}.jsonl (or .jsonl.gz); shepherd: human_data_raw.jsonl",
        required=True,
    )
    feedback: str | None = opt(None, "shepherd only: human_data_for_model.jsonl")
    output_file: str = opt("", "the records, a JSON list (written atomically)", required=True)


def build_parser() -> argparse.ArgumentParser:
    return ConvertOptions.build_parser("cut.convert")


def main(argv: list[str] | None = None) -> int:
    opts = ConvertOptions.parse(argv, prog="cut.convert")

    def body() -> None:
        rows, counts = convert(opts.format, opts.input, opts.output_file, opts.feedback)
        summary = ", ".join(f"{v} {k}" for k, v in counts.items())
        print(f"wrote {len(rows)} records to {opts.output_file} ({summary})")

    return run_cli("cut.convert", body)


if __name__ == "__main__":
    sys.exit(main())
