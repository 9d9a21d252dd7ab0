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
cut.records counts it as failed and never trains on it; when every judgment fails, nothing is
written and the run stops (exit 2), and its rerun asks again. The output and the answer cache are
never the input or the prompt file of the same run. A `score` field in the input belongs to
an earlier judgment and is dropped. Records with an empty response are not written (cut.records
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
import string
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from tqdm.auto import tqdm

from cut.args import Parser, integer, number
from cut.data.files import check_apart, check_writable, decode_json_fields, write_json_atomic
from cut.data.files import same_file as same_file  # moved to cut.io; still importable from here
from cut.data.records import check_object, quoted_spans, read_raw, says_perfect, text_field
from cut.errors import ConfigError, DataError
from cut.llm.client import ClientConfig, LLMClient, number_problems, quiet_http_logs, text_problems
from cut.resources import read_resource
from cut.tasks.arithmetic import answers_match, extract_final_answer

logger = logging.getLogger("cut.judges.judge")

DEFAULT_PROMPT = read_resource("judge_prompt.txt").strip()  # package data (cut/resources)

PROMPT_FIELDS = ("instruction", "input", "response")
NO_INPUT = "(none)"
OWN_FIELDS = {"instruction", "input", "output", "judgment", "judge", "judge_error"}
# an earlier judge's score would override this judgment in cut.records; its spans mark other text
STALE_FIELDS = {"score", "spans"}
NO_MISTAKES = {"none", "no mistakes", "n/a", "nothing"}
JUDGE_KINDS = ("openai", "local", "reference", "verifier")
# the largest value of each numeric judge option; the smallest are JudgeConfig's rules
JUDGE_LIMITS = {
    "concurrency": 1024,
    "timeout": 86400.0,  # seconds
    "max_retries": 100,
    "backoff": 3600.0,  # seconds
    "max_tokens": 1_000_000,
    "batch_size": 4096,
    "max_new_tokens": 1_000_000,
}
# their checked argparse types (cut.options), for every command line that offers them
JUDGE_TYPES = {
    "concurrency": integer(1, JUDGE_LIMITS["concurrency"]),
    "timeout": number(0, JUDGE_LIMITS["timeout"], lo_open=True),
    "max_retries": integer(0, JUDGE_LIMITS["max_retries"]),
    "backoff": number(0, JUDGE_LIMITS["backoff"]),
    "max_tokens": integer(1, JUDGE_LIMITS["max_tokens"]),
    "batch_size": integer(1, JUDGE_LIMITS["batch_size"]),
    "max_new_tokens": integer(1, JUDGE_LIMITS["max_new_tokens"]),
}

Progress = Callable[[int], None]


class Verdict(NamedTuple):
    kind: str  # positive | negative | failed
    judgment: str | None
    error: str | None
    spans: tuple[tuple[int, int], ...] = ()  # the wrong text of the output; () = the quotes decide


class Judge(Protocol):
    name: str

    def judge(self, records: list[dict], progress: Progress | None = None) -> list[Verdict]: ...


# --------------------------------------------------------------------------------------------
# verdicts and prompts
# --------------------------------------------------------------------------------------------


def parse_verdict(text: str) -> Verdict:
    """'Perfect.' -> positive; 'Mistakes: <text>' -> negative with <text>; anything else failed."""
    stripped = (text or "").strip()
    if says_perfect(stripped):
        return Verdict("positive", None, None)
    head, colon, rest = stripped.partition(":")
    rest = rest.strip()
    # "Mistakes: none" or "Mistakes: perfect" breaks the protocol; it is not a critique to train on
    if colon and head.strip().lower() == "mistakes" and rest and not _says_no_mistakes(rest):
        return Verdict("negative", rest, None)
    shown = " ".join(stripped.split())[:60] or "(empty)"
    return Verdict("failed", None, f"unparseable verdict: {shown}")


def _says_no_mistakes(text: str) -> bool:
    return says_perfect(text) or text.lower().rstrip(".!") in NO_MISTAKES


def check_prompt(prompt: str, source: str = "judge prompt") -> None:
    """Raise ValueError unless prompt is a format string with exactly the fields PROMPT_FIELDS."""
    hint = "fields are {instruction}, {input}, {response}; write literal braces as {{ and }}"
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None}
        unknown = sorted(fields - set(PROMPT_FIELDS))
        if not unknown:
            prompt.format(instruction="", input="", response="")
    except (ValueError, KeyError, IndexError, AttributeError) as err:
        raise ValueError(f"{source}: bad format string ({err}); the {hint}") from None
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)}; the {hint}")
    missing = [f"{{{f}}}" for f in PROMPT_FIELDS if f not in fields]
    if missing:
        raise ValueError(f"{source}: the prompt lacks {', '.join(missing)}")


def load_prompt(path: str | None) -> str:
    if path is None:
        return DEFAULT_PROMPT
    try:
        prompt = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the judge prompt: {err}") from None
    check_prompt(prompt, path)
    return prompt


def render_prompt(prompt: str, record: dict) -> str:
    return prompt.format(
        instruction=record["instruction"], input=record.get("input") or NO_INPUT, response=record["output"]
    )


# --------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint
# --------------------------------------------------------------------------------------------


class OpenAIJudge:
    """An OpenAI-compatible chat endpoint as judge (OpenAI, vLLM's server, ...), through cut.llm.

    options: the fields of cut.llm.ClientConfig (api_key_env, concurrency, timeout, max_retries,
    backoff, max_tokens, temperature, cache_file); cache_file None for no cache (the CLI defaults
    it next to the output).
    """

    def __init__(self, base_url: str, model: str, prompt: str = DEFAULT_PROMPT, **options: Any) -> None:
        check_prompt(prompt)
        self.prompt = prompt
        self.client = LLMClient(ClientConfig(base_url, model, **options))
        self.name = f"openai:{model}"

    def cache_key(self, prompt: str) -> str:
        return self.client.cache_key(prompt)

    def judge(self, records: list[dict], progress: Progress | None = None) -> list[Verdict]:
        prompts = [render_prompt(self.prompt, r) for r in records]
        # an unreadable verdict is a failure, not an answer: never cached, asked again on a rerun
        answers = self.client.complete(
            prompts, progress, accept=lambda text: parse_verdict(text).kind != "failed"
        )
        return [_verdict(*a) for a in answers]


def _verdict(content: str | None, error: str | None) -> Verdict:
    return parse_verdict(content) if content is not None else Verdict("failed", None, error)


# --------------------------------------------------------------------------------------------
# local transformers model
# --------------------------------------------------------------------------------------------


class LocalJudge:
    """A transformers causal LM as judge: greedy decoding in left-padded batches (cut.generate's)."""

    def __init__(
        self,
        model: str,
        prompt: str = DEFAULT_PROMPT,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        device: str | None = None,
    ) -> None:
        from cut.modeling.generate import Sampling
        from cut.modeling.loading import check_model_path, load_model, load_tokenizer

        check_prompt(prompt)
        check_model_path(model)
        self.sampling = Sampling(max_new_tokens=max_new_tokens)  # greedy
        self.prompt = prompt
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, device=device or "auto")
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.name = f"local:{model}"

    def text(self, record: dict) -> str:
        prompt = render_prompt(self.prompt, record)
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def judge(self, records: list[dict], progress: Progress | None = None) -> list[Verdict]:
        on_batch = (lambda idx, _texts: progress(len(idx))) if progress else None
        return [parse_verdict(a) for a in self.generate([self.text(r) for r in records], on_batch)]

    def generate(self, texts: list[str], on_batch=None) -> list[str]:
        from cut.modeling.generate import generate_texts

        return generate_texts(
            self.model,
            self.tokenizer,
            texts,
            self.sampling,
            add_special_tokens=not self.chat,  # a chat template writes its BOS
            batch_size=self.batch_size,
            on_batch=on_batch,
            progress=False,
        )


# --------------------------------------------------------------------------------------------
# known answers
# --------------------------------------------------------------------------------------------


class ReferenceJudge:
    """The response's final number against the record's `reference`; deterministic and offline."""

    name = "reference"

    def judge(self, records: list[dict], progress: Progress | None = None) -> list[Verdict]:
        verdicts = [reference_verdict(r) for r in records]
        if progress:
            progress(len(records))
        return verdicts


def reference_verdict(record: dict) -> Verdict:
    ref = record.get("reference")
    if isinstance(ref, (int, float)) and not isinstance(ref, bool):
        ref = str(ref)
    if not isinstance(ref, str) or not ref.strip():
        return Verdict("failed", None, "no reference answer")
    ref = ref.strip()
    if not answers_match(ref, ref):  # only a non-number fails to match itself
        return Verdict("failed", None, "reference answer is not a number")
    got = extract_final_answer(record["output"])
    if answers_match(got, ref):
        return Verdict("positive", None, None)
    if got is None:
        return Verdict(
            "negative", f"The response does not state a final answer; the correct answer is {ref}.", None
        )
    at = record["output"].rfind(got)  # the final answer is the last place the number stands
    spans = ((at, at + len(got)),) if at >= 0 else ()
    return Verdict("negative", f"The final answer {got} is wrong; the correct answer is {ref}.", None, spans)


class VerifierJudge:
    """The record's `constraints` checked by rules (cut.tasks.constraints); deterministic, offline."""

    name = "verifier"

    def judge(self, records: list[dict], progress: Progress | None = None) -> list[Verdict]:
        verdicts = [verifier_verdict(r) for r in records]
        if progress:
            progress(len(records))
        return verdicts


def verifier_verdict(record: dict) -> Verdict:
    """Positive when every constraint holds strictly; else one critique per broken constraint."""
    from cut.data.records import merge_spans
    from cut.tasks.constraints import validate, violations

    raw = record.get("constraints")
    if not isinstance(raw, list) or not raw:
        return Verdict("failed", None, "no constraints to verify")
    try:
        constraints = [validate(c, "constraints") for c in raw]
    except DataError as err:
        return Verdict("failed", None, f"bad constraints: {err}")
    broken = violations(record["output"], constraints)
    if not broken:
        return Verdict("positive", None, None)
    n = len(constraints)
    head = f"the response breaks {len(broken)} of its {n} instructions" if n > 1 else ""
    body = "; ".join(v.message for v in broken)
    judgment = f"Mistakes: {head + ': ' if head else ''}{body}."
    spans = merge_spans(s for v in broken for s in v.spans)
    return Verdict("negative", judgment, None, spans)


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
        raise ValueError(f"{path}: output_file must end in .json (cut.records reads it as a JSON list)")
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


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cut.judge", description=__doc__.split("\n")[0])
    p.add_argument(
        "--input_file", required=True, help="records to judge (JSON list or JSONL), e.g. cut.generate's"
    )
    p.add_argument("--output_file", required=True, help="judged records, a .json list in the training format")
    p.add_argument("--judge", required=True, choices=list(JUDGE_KINDS))
    p.add_argument(
        "--base_url", help="openai: the API root, e.g. https://api.openai.com/v1 or http://host:8000/v1"
    )
    p.add_argument("--model", help="openai: the model name; local: a model folder or hub name")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument(
        "--prompt_file", help="judge prompt with {instruction}, {input}, {response} (default: built in)"
    )
    t = JUDGE_TYPES
    p.add_argument(
        "--concurrency", type=t["concurrency"], default=8, help="openai: requests in flight at most"
    )
    p.add_argument("--timeout", type=t["timeout"], default=60.0, help="openai: seconds per request")
    p.add_argument(
        "--max_retries", type=t["max_retries"], default=5, help="openai: retries of a transient fault"
    )
    p.add_argument(
        "--backoff", type=t["backoff"], default=1.0, help="openai: first retry delay in seconds (doubles)"
    )
    p.add_argument("--max_tokens", type=t["max_tokens"], default=512, help="openai: max_tokens of an answer")
    p.add_argument(
        "--cache_file", help="openai: answer cache (default <output_file>.cache.jsonl; '' for none)"
    )
    p.add_argument("--batch_size", type=t["batch_size"], default=8, help="local: prompts per generate call")
    p.add_argument(
        "--max_new_tokens", type=t["max_new_tokens"], default=256, help="local: tokens per answer at most"
    )
    return p


@dataclass(frozen=True)
class JudgeConfig:
    """Every judge option, checked once; the names are cut.judge's options (kind is --judge).

    cache_file None means the caller's default (make_judge's default_cache_file), '' no cache.
    """

    kind: str = "reference"  # openai | local | reference | verifier
    base_url: str | None = None  # openai
    model: str | None = None  # openai: the model name; local: a model folder or hub name
    api_key_env: str = "OPENAI_API_KEY"
    prompt_file: str | None = None
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 5
    backoff: float = 1.0
    max_tokens: int = 512
    cache_file: str | None = None
    batch_size: int = 8  # local
    max_new_tokens: int = 256  # local

    def __post_init__(self) -> None:
        if self.kind not in JUDGE_KINDS:
            raise ConfigError(f"judge kind must be one of {', '.join(JUDGE_KINDS)}, got {self.kind!r}")
        if self.kind == "openai" and not (self.base_url and self.model):
            raise ConfigError("judge openai needs base_url and model")
        if self.kind == "local" and not self.model:
            raise ConfigError("judge local needs model")
        problems = text_problems(
            self, required=["api_key_env"], optional=["base_url", "model", "prompt_file", "cache_file"]
        )
        positive = ("concurrency", "max_tokens", "batch_size", "max_new_tokens")
        problems += number_problems(
            self,
            {**dict.fromkeys(positive, "int>=1"), "max_retries": "int>=0", "timeout": ">0", "backoff": ">=0"},
        )
        problems += [
            f"{name} must be at most {hi:g}, got {getattr(self, name)!r}"
            for name, hi in JUDGE_LIMITS.items()
            if not any(p.startswith(name + " ") for p in problems) and getattr(self, name) > hi
        ]
        if problems:
            raise ConfigError("; ".join(problems))
        if self.kind == "openai":
            self.client_config()  # checks base_url

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "judge") -> JudgeConfig:
        """From a config file's mapping; ConfigError names source and any unknown key."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a mapping of judge options, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
        try:
            return cls(**d)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> JudgeConfig:
        return cls(
            kind=args.judge, **{f.name: getattr(args, f.name) for f in fields(cls) if f.name != "kind"}
        )

    def client_config(self, cache_file: str | None = None) -> ClientConfig:
        """The cut.llm client's part (kind openai); cache_file as given."""
        return ClientConfig(
            base_url=self.base_url,
            model=self.model,
            api_key_env=self.api_key_env,
            concurrency=self.concurrency,
            timeout=self.timeout,
            max_retries=self.max_retries,
            backoff=self.backoff,
            max_tokens=self.max_tokens,
            cache_file=cache_file,
        )


def make_judge(cfg: JudgeConfig, default_cache_file: str | None = None) -> Judge:
    """The judge cfg describes; an openai judge caches in cfg.cache_file, else default_cache_file."""
    if cfg.kind == "reference":
        return ReferenceJudge()
    if cfg.kind == "verifier":
        return VerifierJudge()
    prompt = load_prompt(cfg.prompt_file)
    if cfg.kind == "local":
        return LocalJudge(cfg.model, prompt, cfg.batch_size, cfg.max_new_tokens)
    cache = default_cache_file if cfg.cache_file is None else cfg.cache_file or None
    return OpenAIJudge(prompt=prompt, **asdict(cfg.client_config(cache)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_http_logs()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = JudgeConfig.from_args(args)
    except ConfigError as err:
        parser.error(str(err))  # exits 2
    try:
        # bad input or options stop before a model is loaded
        cache = args.output_file + ".cache.jsonl" if args.cache_file is None else args.cache_file
        check_apart(
            {"--output_file": args.output_file, "--cache_file": cache if args.judge == "openai" else None},
            {"the --input_file": args.input_file, "the --prompt_file": args.prompt_file},
        )
        _check_output_path(args.output_file)
        read_inputs(args.input_file)
        judge = make_judge(cfg, args.output_file + ".cache.jsonl")
        judge_file(args.input_file, args.output_file, judge)  # logs the summary
    except (ValueError, OSError) as err:  # DataError and ConfigError are ValueErrors
        print(f"cut.judge: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
