"""Judge responses: one judgment per (instruction, response) record, in the training format.

    python -m cut.judge --input_file gen.json --output_file judged.json --judge openai \\
        --base_url http://localhost:8000/v1 --model NAME [--api_key_env OPENAI_API_KEY]
    python -m cut.judge --input_file gen.json --output_file judged.json --judge local --model PATH
    python -m cut.judge --input_file gen.json --output_file judged.json --judge reference
    python -m cut.judge --input_file gen.json --output_file judged.json --judge verifier

Input: what cut.generate writes, a JSON list or JSONL of {instruction, input?, output, ...}.
Output: a JSON list of {instruction, input, output, judgment, judge, ...pass-through fields},
written to a temporary file and renamed. `judgment` is null for a positive and the critique for a
negative; a failed judgment has a null judgment and a `judge_error` (a short reason), so
cut.data.records counts it as failed and never trains on it; when every judgment fails, nothing is
written and the run stops (exit 2), and its rerun asks again. The output and the answer cache are
never the input or the prompt file of the same run. A `score` field in the input belongs to
an earlier judgment and is dropped. Records with an empty response are not written (cut.data.records
rejects them) and count as failed ("empty response").

The judge answers `Perfect.` or `Mistakes: <every mistake, quoted and corrected>` (DEFAULT_PROMPT,
the packaged cut/resources/judge_prompt.txt). --prompt_file replaces it: a text with the fields
{instruction}, {input} ("(none)" when a record has no input) and {response}.

- openai: any OpenAI-compatible /chat/completions endpoint (OpenAI, vLLM's server, ...) through
  cut.llm's client (the `openai` package): bounded concurrency, retries with backoff on 408 / 409 /
  429 / 5xx / timeouts / connection errors / malformed bodies, honouring Retry-After, and a JSONL
  cache of answers so a rerun only asks again for what failed (an unreadable verdict included).
  The API key is read from the environment, sent to base_url's origin only, and never logged or
  written.
- local: a transformers causal LM, batched greedy decoding.
- reference: the response's final number against the record's `reference` (offline).
- verifier: the record's verifiable `constraints` (cut.tasks.constraints, e.g. what
  `python -m cut.tasks.instructions` writes), checked by rules: positive when every constraint
  holds (strictly), else `Mistakes:` with one critique per broken constraint that quotes the
  offending text, and `spans` marking it (offline, deterministic).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cut.args import opt, run_cli
from cut.data.files import check_apart, check_writable, decode_json_fields, write_json_atomic
from cut.data.files import same_file as same_file  # moved to cut.data.files; still importable from here
from cut.data.records import check_object, quoted_spans, read_raw, text_field
from cut.errors import ConfigError, DataError
from cut.judges.api import OpenAIJudge as OpenAIJudge
from cut.judges.local import LocalJudge as LocalJudge
from cut.judges.reference import ReferenceJudge as ReferenceJudge
from cut.judges.reference import reference_verdict as reference_verdict
from cut.judges.registry import JUDGE_KINDS as JUDGE_KINDS
from cut.judges.registry import JUDGES, JudgeConfig, make_judge
from cut.judges.verdict import DEFAULT_PROMPT as DEFAULT_PROMPT
from cut.judges.verdict import NO_INPUT as NO_INPUT
from cut.judges.verdict import NO_MISTAKES as NO_MISTAKES
from cut.judges.verdict import PROMPT_FIELDS as PROMPT_FIELDS
from cut.judges.verdict import Judge, Progress, Verdict
from cut.judges.verdict import check_prompt as check_prompt
from cut.judges.verdict import load_prompt as load_prompt
from cut.judges.verdict import parse_verdict as parse_verdict
from cut.judges.verdict import render_prompt as render_prompt
from cut.judges.verifier import VerifierJudge as VerifierJudge
from cut.judges.verifier import verifier_verdict as verifier_verdict
from cut.llm.client import quiet_http_logs
from cut.llm.completer import LIMITS as JUDGE_LIMITS
from cut.llm.completer import TYPES as JUDGE_TYPES
from cut.llm.completer import LLMOptions

logger = logging.getLogger("cut.judges.judge")

OWN_FIELDS = {"instruction", "input", "output", "judgment", "judge", "judge_error"}
# an earlier judge's score would override this judgment in cut.data.records; its spans mark other text
STALE_FIELDS = {"score", "spans"}

__all__ = [
    "JUDGE_LIMITS",
    "JUDGE_TYPES",
    "Judge",
    "JudgeConfig",
    "Progress",
    "Verdict",
    "make_judge",
]


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def read_inputs(path: str) -> list[dict[str, Any]]:
    """The records to judge; DataError names the file, record and field of anything wrong."""
    rows, source = read_raw(path)
    if not rows:
        raise DataError(f"{source}: no records")
    return [_check_input(source, i, row) for i, row in enumerate(rows)]


def _check_input(source: str, i: int, row: Any) -> dict[str, Any]:
    check_object(source, i, row)
    text_field(source, i, row, "instruction", True)
    if text_field(source, i, row, "output", False) is None:  # an empty response is judged as a failure
        raise DataError(f"{source}: record {i}, field 'output': missing")
    # cut.generate's answer files hold lists (a record's `constraints`) as JSON text
    row = decode_json_fields(row, f"{source}: record {i}")
    return {**row, "input": text_field(source, i, row, "input", False) or ""}


def judged_record(record: dict, verdict: Verdict, judge_name: str) -> dict[str, Any]:
    failed = verdict.kind == "failed"
    row = {
        "instruction": record["instruction"],
        "input": record.get("input") or "",
        "output": record["output"],
        "judgment": None if failed else verdict.judgment,  # a failure never carries training text
        "judge": judge_name,
    }
    if failed:
        row["judge_error"] = verdict.error or "unknown failure"
    if verdict.kind == "negative":  # the text the judgment quotes word for word is the wrong text
        spans = verdict.spans or quoted_spans(verdict.judgment or "", record["output"])
        if spans:
            row["spans"] = [list(s) for s in spans]
    row.update({k: v for k, v in record.items() if k not in OWN_FIELDS | STALE_FIELDS})
    return row


def _check_output_path(path: str) -> None:
    """Before anything is judged: a .json name, in a place that can be written."""
    if Path(path).suffix != ".json":
        raise ValueError(f"{path}: output_file must end in .json (cut.data.records reads it as a JSON list)")
    check_writable(path, "output_file")


def count(verdicts: list[Verdict], empty: int = 0) -> dict[str, Any]:
    """records, positive, negative, failed and failed_reasons (reason kind -> count)."""
    kinds = Counter(v.kind for v in verdicts)
    # "unparseable verdict: <text>" counts under "unparseable verdict"
    reasons = Counter((v.error or "unknown failure").split(":")[0] for v in verdicts if v.kind == "failed")
    if empty:
        reasons["empty response"] = empty
    return {
        "records": len(verdicts) + empty,
        "positive": kinds["positive"],
        "negative": kinds["negative"],
        "failed": kinds["failed"] + empty,
        "failed_reasons": dict(reasons.most_common()),
    }


def summary(counts: dict[str, Any]) -> str:
    text = (
        f"judged {counts['records']} record(s): {counts['positive']} positive, "
        f"{counts['negative']} negative, {counts['failed']} failed"
    )
    if counts["failed_reasons"]:
        text += " (" + ", ".join(f"{r}: {n}" for r, n in counts["failed_reasons"].items()) + ")"
    return text


def judge_file(input_file: str, output_file: str, judge: Judge) -> dict[str, Any]:
    """Judge every record of input_file, write the training-format list to output_file; the counts.

    When every judgment fails, nothing is written and DataError says why: a caller that stops
    there (cut.online's judge stage) asks again on its rerun, once the judge is fixed."""
    check_apart({"output_file": output_file}, {"the input_file": input_file})
    _check_output_path(output_file)
    records = read_inputs(input_file)
    todo = [r for r in records if r["output"].strip()]
    if len(todo) < len(records):
        logger.warning(
            "%d record(s) with an empty response are not judged or written", len(records) - len(todo)
        )
    with tqdm(total=len(todo), desc=f"judging ({judge.name})", unit="record", disable=None) as bar:
        verdicts = judge.judge(todo, bar.update)
    counts = count(verdicts, empty=len(records) - len(todo))
    if todo and counts["positive"] + counts["negative"] == 0:
        reasons = ", ".join(f"{r}: {n}" for r, n in counts["failed_reasons"].items())
        raise DataError(
            f"{input_file}: every judgment failed ({reasons}); nothing written to {output_file}; "
            "fix the judge and rerun: failed judgments are asked again"
        )
    write_json_atomic(
        output_file, [judged_record(r, v, judge.name) for r, v in zip(todo, verdicts, strict=True)]
    )
    logger.info("%s; written to %s", summary(counts), output_file)
    return counts


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


@dataclass
class JudgeOptions(LLMOptions):
    """Judge responses: one judgment per (instruction, response) record, in the training format."""

    input_file: str | None = opt(
        None, "records to judge (JSON list or JSONL), e.g. cut.generate's", required=True
    )
    output_file: str | None = opt(None, "judged records, a .json list in the training format", required=True)
    judge: str | None = opt(
        None, "the judge, one of cut.judges.JUDGES", required=True, metavar="{" + ",".join(JUDGES) + "}"
    )
    prompt_file: str | None = opt(
        None, "judge prompt with {instruction}, {input}, {response} (none: the built-in one)"
    )
    cache_file: str | None = opt(
        None, "openai: answer cache (none: <output_file>.cache.jsonl; '' for no cache)"
    )

    def validate(self) -> None:
        if self.judge not in JUDGES:
            raise ConfigError(f"judge must be one of {', '.join(JUDGES)}; got {self.judge!r}")
        self.config()

    def config(self) -> JudgeConfig:
        """The judge's options (cut.judges.JudgeConfig), checked."""
        return JudgeConfig(kind=self.judge, prompt_file=self.prompt_file, **self.backend())

    @property
    def cache(self) -> str:
        """The answer cache an openai judge keeps ('' for none)."""
        return self.output_file + ".cache.jsonl" if self.cache_file is None else self.cache_file


def build_parser() -> argparse.ArgumentParser:
    """cut judge's flags (JudgeOptions'), each parsed to its value or its default."""
    parser = JudgeOptions.build_parser("cut.judge", (__doc__ or "").split("\n")[0])
    parser.set_defaults(**{f.name: f.default for f in fields(JudgeOptions)})
    return parser


def run(opts: JudgeOptions) -> int:
    """Check every input and option before a model loads, then judge the file."""
    quiet_http_logs()
    check_apart(
        {"--output_file": opts.output_file, "--cache_file": opts.cache if opts.judge == "openai" else None},
        {"the --input_file": opts.input_file, "the --prompt_file": opts.prompt_file},
    )
    _check_output_path(opts.output_file)
    read_inputs(opts.input_file)
    judge = make_judge(opts.config(), opts.output_file + ".cache.jsonl")
    judge_file(opts.input_file, opts.output_file, judge)  # logs the summary
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = JudgeOptions.parse(argv, prog="cut.judge")
    return run_cli("cut.judge", lambda: run(opts))


if __name__ == "__main__":
    sys.exit(main())
