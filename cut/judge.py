"""Judge responses: one judgment per (instruction, response) record, in the training format.

    python -m cut.judge --input_file gen.json --output_file judged.json --judge openai \\
        --base_url http://localhost:8000/v1 --model NAME [--api_key_env OPENAI_API_KEY]
    python -m cut.judge --input_file gen.json --output_file judged.json --judge local --model PATH
    python -m cut.judge --input_file gen.json --output_file judged.json --judge reference

Input: what cut.generate writes, a JSON list or JSONL of {instruction, input?, output, ...}.
Output: a JSON list of {instruction, input, output, judgment, judge, ...pass-through fields},
written to a temporary file and renamed. `judgment` is null for a positive and the critique for a
negative; a failed judgment has a null judgment and a `judge_error` (a short reason), so
cut.records counts it as failed and never trains on it. A `score` field in the input belongs to
an earlier judgment and is dropped. Records with an empty response are not written (cut.records
rejects them) and count as failed ("empty response").

The judge answers `Perfect.` or `Mistakes: <every mistake, quoted and corrected>` (DEFAULT_PROMPT,
also in configs/judge_prompt.txt). --prompt_file replaces it: a text with the fields
{instruction}, {input} ("(none)" when a record has no input) and {response}.

- openai: any OpenAI-compatible /chat/completions endpoint (OpenAI, vLLM's server, ...), standard
  library only: bounded concurrency, retries with backoff and jitter on 429 / 5xx / timeouts /
  connection errors / malformed bodies, and a JSONL cache of answers so a rerun only asks again
  for what failed. The API key is read from the environment and never logged or written.
- local: a transformers causal LM, batched greedy decoding.
- reference: the response's final number against the record's `reference` (offline).
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import http.client
import json
import logging
import os
import random
import string
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TextIO

from tqdm.auto import tqdm

from .arithmetic import answers_match, extract_final_answer
from .errors import DataError
from .io import write_json_atomic
from .records import check_object, read_raw, says_perfect, text_field

logger = logging.getLogger("cut.judge")

DEFAULT_PROMPT = """\
You are checking an AI assistant's response to a task. Read the task and the response closely \
and verify every statement, step and calculation in the response.

[Task]
{instruction}

[Input to the task]
{input}

[Response to check]
{response}

Reply in exactly one of two ways.
- If the response contains no mistake at all, reply with the single word: Perfect.
- Otherwise reply with "Mistakes:" followed by a precise account of every mistake in the \
response: quote the wrong part word for word and say what would be correct instead.

Write nothing before your reply and nothing after it."""

PROMPT_FIELDS = ("instruction", "input", "response")
NO_INPUT = "(none)"
OWN_FIELDS = {"instruction", "input", "output", "judgment", "judge", "judge_error"}
STALE_FIELDS = {"score"}  # an earlier judge's score would override this judgment in cut.records
NO_MISTAKES = {"none", "no mistakes", "n/a", "nothing"}
MAX_DELAY = 60.0  # seconds; caps backoff and Retry-After

Progress = Callable[[int], None]


class Verdict(NamedTuple):
    kind: str  # positive | negative | failed
    judgment: str | None
    error: str | None


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
    """An OpenAI-compatible chat endpoint as judge (OpenAI, vLLM's server, ...).

    cache_file: JSONL of {key, content}; None for no cache (the CLI defaults it next to the output).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        prompt: str = DEFAULT_PROMPT,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        max_tokens: int = 512,
        cache_file: str | None = None,
        backoff: float = 1.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        check_prompt(prompt)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.prompt = prompt
        self.api_key_env = api_key_env  # the key itself stays in the environment, never on this object
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_tokens = max_tokens
        self.cache_file = cache_file
        self.backoff = backoff
        self.name = f"openai:{model}"
        self._opener = urllib.request.build_opener()
        if not os.environ.get(api_key_env):
            logger.info(
                "%s is not set: sending no Authorization header (a vLLM server needs none)", api_key_env
            )

    def cache_key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.base_url, self.model, prompt]).encode()).hexdigest()

    def judge(self, records: list[dict], progress: Progress | None = None) -> list[Verdict]:
        progress = progress or (lambda n: None)
        prompts = [render_prompt(self.prompt, r) for r in records]
        keys = [self.cache_key(p) for p in prompts]
        per_key = Counter(keys)
        cached = read_cache(self.cache_file) if self.cache_file else {}
        answers = {k: (cached[k], None) for k in per_key if k in cached}
        # one request per distinct prompt: repeated responses are asked once
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in answers}
        logger.info("%d prompt(s) answered from the cache, %d to request", len(answers), len(todo))
        progress(sum(per_key[k] for k in answers))
        for key, answer in self._ask_all(todo):
            answers[key] = answer
            progress(per_key[key])
        return [_verdict(*answers[k]) for k in keys]

    def _ask_all(self, todo: dict[str, str]) -> Iterator[tuple[str, tuple[str | None, str | None]]]:
        """(key, answer) as requests finish, at most `concurrency` in flight; answers are cached."""
        pool, stop = ThreadPoolExecutor(max_workers=self.concurrency), threading.Event()
        try:
            with _open_cache(self.cache_file) as cache:
                futures = {pool.submit(self.ask, p, stop): k for k, p in todo.items()}
                for fut in as_completed(futures):
                    answer = fut.result()
                    if cache and answer[0] is not None:
                        cache.write(json.dumps({"key": futures[fut], "content": answer[0]}) + "\n")
                        cache.flush()  # per answer, so a crash keeps what was paid for
                    yield futures[fut], answer
        finally:
            stop.set()  # on ctrl-c, requests in flight give up instead of retrying on
            pool.shutdown(wait=True, cancel_futures=True)

    def ask(self, prompt: str, stop: threading.Event | None = None) -> tuple[str | None, str | None]:
        """(answer, None), or (None, why) once retries are spent or the fault is not transient."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        for attempt in range(self.max_retries + 1):
            content, problem, retry, retry_after = self._attempt(body)
            if content is not None:
                return content, None
            if not retry:
                return None, problem
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            if attempt < self.max_retries and (stop or threading.Event()).wait(delay):
                return None, "interrupted"
        return None, f"{problem} after {self.max_retries} retries"

    def _backoff(self, attempt: int) -> float:
        return min(MAX_DELAY, self.backoff * 2**attempt) * random.uniform(0.5, 1.5)

    def _attempt(self, body: bytes) -> tuple[str | None, str, bool, float | None]:
        """One request: (answer, problem, worth retrying, Retry-After seconds)."""
        request = urllib.request.Request(
            self.base_url + "/chat/completions", data=body, headers=self._headers(), method="POST"
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            # the body is not kept: some APIs echo (part of) the key in their error messages
            err.close()
            transient = err.code == 429 or err.code >= 500
            return None, f"http {err.code}", transient, _retry_after(err.headers.get("Retry-After"))
        except TimeoutError:
            return None, "timeout", True, None
        except urllib.error.URLError as err:
            problem = "timeout" if isinstance(err.reason, TimeoutError) else "connection error"
            return None, problem, True, None
        except (OSError, http.client.HTTPException):
            return None, "connection error", True, None
        content = _content(raw)
        if content is None:
            return None, "malformed response body", True, None
        return content, "", False, None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers


def _verdict(content: str | None, error: str | None) -> Verdict:
    return parse_verdict(content) if content is not None else Verdict("failed", None, error)


def _content(raw: bytes) -> str | None:
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(MAX_DELAY, max(0.0, seconds))


def read_cache(path: str) -> dict[str, str]:
    """key -> answer; unreadable lines (a run killed mid-write) are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    cache, bad = {}, 0
    for line in filter(str.strip, lines):
        try:
            row = json.loads(line)
            key, content = row["key"], row["content"]
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if isinstance(key, str) and isinstance(content, str):
            cache[key] = content
    if bad:
        logger.warning("%s: skipped %d unreadable line(s)", path, bad)
    return cache


class _NoCache:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _open_cache(path: str | None) -> TextIO | _NoCache:
    if not path:
        return _NoCache()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if p.exists() and p.stat().st_size:
        with p.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    f = p.open("a", encoding="utf-8")
    if torn:
        f.write("\n")  # end a torn last line so the next answer gets a line of its own
    return f


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
        from .generate import load_model, load_tokenizer

        check_prompt(prompt)
        if not Path(model).exists() and (Path(model).is_absolute() or model.startswith((".", "~"))):
            raise ValueError(f"{model}: model folder not found")  # not a hub name: say so plainly
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
        from .generate import generate_texts

        return generate_texts(
            self.model,
            self.tokenizer,
            texts,
            add_special_tokens=not self.chat,  # a chat template writes its BOS
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            temperature=0.0,
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
    return Verdict("negative", f"The final answer {got} is wrong; the correct answer is {ref}.", None)


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
    row.update({k: v for k, v in record.items() if k not in OWN_FIELDS | STALE_FIELDS})
    return row


def _check_output_path(path: str) -> None:
    if Path(path).suffix != ".json":
        raise ValueError(f"{path}: output_file must end in .json (cut.records reads it as a JSON list)")


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
    """Judge every record of input_file, write the training-format list to output_file; the counts."""
    _check_output_path(output_file)
    records = read_inputs(input_file)
    todo = [r for r in records if r["output"].strip()]
    if len(todo) < len(records):
        logger.warning(
            "%d record(s) with an empty response are not judged or written", len(records) - len(todo)
        )
    with tqdm(total=len(todo), desc=f"judging ({judge.name})", unit="record", disable=None) as bar:
        verdicts = judge.judge(todo, bar.update)
    write_json_atomic(
        output_file, [judged_record(r, v, judge.name) for r, v in zip(todo, verdicts, strict=True)]
    )
    counts = count(verdicts, empty=len(records) - len(todo))
    logger.info("%s; written to %s", summary(counts), output_file)
    return counts


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cut.judge", description=__doc__.split("\n")[0])
    p.add_argument(
        "--input_file", required=True, help="records to judge (JSON list or JSONL), e.g. cut.generate's"
    )
    p.add_argument("--output_file", required=True, help="judged records, a .json list in the training format")
    p.add_argument("--judge", required=True, choices=["openai", "local", "reference"])
    p.add_argument(
        "--base_url", help="openai: the API root, e.g. https://api.openai.com/v1 or http://host:8000/v1"
    )
    p.add_argument("--model", help="openai: the model name; local: a model folder or hub name")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument(
        "--prompt_file", help="judge prompt with {instruction}, {input}, {response} (default: built in)"
    )
    p.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight at most")
    p.add_argument("--timeout", type=float, default=60.0, help="openai: seconds per request")
    p.add_argument("--max_retries", type=int, default=5, help="openai: retries of a transient fault")
    p.add_argument(
        "--backoff", type=float, default=1.0, help="openai: first retry delay in seconds (doubles)"
    )
    p.add_argument("--max_tokens", type=int, default=512, help="openai: max_tokens of an answer")
    p.add_argument(
        "--cache_file", help="openai: answer cache (default <output_file>.cache.jsonl; '' for none)"
    )
    p.add_argument("--batch_size", type=int, default=8, help="local: prompts per generate call")
    p.add_argument("--max_new_tokens", type=int, default=256, help="local: tokens per answer at most")
    return p


def _option_problem(args: argparse.Namespace) -> str | None:
    if args.judge == "openai" and not (args.base_url and args.model):
        return "--judge openai needs --base_url and --model"
    if args.judge == "local" and not args.model:
        return "--judge local needs --model"
    positive = ["concurrency", "timeout", "max_tokens", "batch_size", "max_new_tokens"]
    bad = [f"--{n}" for n in positive if getattr(args, n) <= 0]
    bad += [f"--{n}" for n in ("max_retries", "backoff") if getattr(args, n) < 0]
    return f"{', '.join(bad)} out of range" if bad else None


def make_judge(args: argparse.Namespace) -> Judge:
    if args.judge == "reference":
        return ReferenceJudge()
    prompt = load_prompt(args.prompt_file)
    if args.judge == "local":
        return LocalJudge(args.model, prompt, args.batch_size, args.max_new_tokens)
    cache = args.output_file + ".cache.jsonl" if args.cache_file is None else args.cache_file or None
    return OpenAIJudge(
        args.base_url,
        args.model,
        prompt,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        timeout=args.timeout,
        max_retries=args.max_retries,
        max_tokens=args.max_tokens,
        cache_file=cache,
        backoff=args.backoff,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _option_problem(args)
    if problem:
        parser.error(problem)  # exits 2
    try:
        # bad input or options stop before a model is loaded
        _check_output_path(args.output_file)
        read_inputs(args.input_file)
        judge_file(args.input_file, args.output_file, make_judge(args))  # logs the summary
    except (ValueError, OSError) as err:  # DataError is a ValueError
        print(f"cut.judge: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
