"""ReAlign: rewrite each response to a format criterion chosen by its task; keep only sound rewrites.

    python -m cut.realign --input_file data.json --output_file realigned.json --rewriter openai \\
        --base_url http://localhost:8000/v1 --model NAME [--task_field task] [--criteria FILE]
    python -m cut.realign --input_file data.json --output_file realigned.json --rewriter local --model DIR

Fan et al., "Reformatted Alignment" (ReAlign): an LLM rewrites each response of the training data
so that it follows a format criterion picked by the task type (a procedure as numbered steps, an
email ready to send, ...), and rule filters keep only the rewrites that are sound. Per record:

1. the task: the record's own field (--task_field), or one LLM call (CLASSIFY_PROMPT) that lists
   the task names and their descriptions from the criteria file and asks for one name. The answer
   is read tolerantly (parse_task); a label that names no task, or names several, gives the task
   `general` and is kept in `task_label`.
2. the criterion: the task's entry in a YAML file (data/realign_criteria.yaml, our own text;
   --criteria FILE for another), checked with errors that name the file and the key.
3. the rewrite: one LLM call (REWRITE_PROMPT) with the instruction, its input, the original
   response, the criterion and the record's evidence passages (--evidence_field, a list of
   strings; optional).
4. the filters (check_rewrite): not empty; not the original handed back (up to whitespace); no
   line repeated 3 or more times unless the original repeats it as often; no leaked prompt markup (our section headers, chat role
   markers, "Original response:", a "Here is the revised response" preamble) that the original did
   not have; at least min_length_ratio of the original's length; a code block kept when the
   original had one; a short original (a number, a word, a short phrase) kept word for word; for
   math, the same final number. A rejected rewrite keeps the original and records why.

The rewriter is cut.llm's client (kind openai: any OpenAI-compatible endpoint, with its retries and
answer cache, default <output_file>.cache.jsonl) or a local transformers model (kind local: the
loader and batched greedy decoding of cut.judge.LocalJudge); its options are cut.judge.JudgeConfig's.

Input: a .json list, .jsonl or datasets folder of training records ({instruction, input?, output,
...}, README "Data format"), checked before any work: errors name the file, the record and the
field. Output: a .json list in the same format, one row per input record in input order, the
record's fields as they were except `output` (the rewrite, when one was kept), plus
  rewritten         true / false
  task              the task used (null when the classifying call failed; a skipped record keeps its own)
  task_label        the classifier's answer or the field's value, when it named no task
  original_output   the response before the rewrite (rewritten records only)
  rewrite_rejected  why a filter refused the rewrite, e.g. "too short: 40 of 200 characters"
  rewrite_error     why a call failed, e.g. "rewrite: http 500 after 5 retries"; never training text
  rewrite_skipped   why the record was not sent: its judgment critiques this very response
  realign           the settings that made the row: rewriter, criteria file@hash and the filters
A record whose judgment critiques its response (a negative, a failed judgment, or one with
`spans`) is passed through unchanged: its judgment is about that very response text.

Resumable: the output is rewritten (temp file + rename) after each chunk of records; a rerun keeps
the rows made with the same settings and asks only for the rest, and for rows whose call failed.
So the output is never the input (refused, also when the input is an earlier realign output): it
holds only the rows done so far, and a kill would lose the others.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import yaml
from tqdm.auto import tqdm

from .errors import ConfigError, DataError
from .io import check_writable, write_json_atomic
from .judge import JudgeConfig
from .llm import Answer, LLMClient, number_problems, quiet_http_logs, text_problems
from .options import Parser, integer, number
from .records import FAILED_JUDGMENTS, check_object, read_raw, says_perfect, text_field
from .tasks.arithmetic import answers_match, extract_final_answer

logger = logging.getLogger("cut.realign")

DEFAULT_CRITERIA = Path(__file__).resolve().parent.parent / "data" / "realign_criteria.yaml"
DEFAULT_TASK = "general"
TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
TASK_KEYS = ("description", "criterion")
REWRITERS = ("openai", "local")
SCORE_THRESHOLD = 7.0  # cut.records' default: a score at or above it makes a positive
OWN_FIELDS = (
    "rewritten",
    "task",
    "task_label",
    "original_output",
    "rewrite_rejected",
    "rewrite_error",
    "rewrite_skipped",
    "realign",
)

Progress = Callable[[int], None]


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RealignConfig:
    """What is rewritten and which rewrites are kept; the names are cut.realign's options."""

    criteria: str = str(DEFAULT_CRITERIA)  # YAML: task -> description and format criterion
    task_field: str | None = None  # a record field that names the task; None: the rewriter classifies
    evidence_field: str = "evidence"  # a record field with a list of evidence passages (optional)
    min_length_ratio: float = 0.5  # a rewrite shorter than this share of the original is refused
    short_answer_words: int = 6  # an original of at most this many words must survive word for word
    chunk_size: int = 64  # records per round of calls; the output is written after each

    def __post_init__(self) -> None:
        problems = text_problems(self, required=("criteria", "evidence_field"), optional=("task_field",))
        if self.task_field is not None and not self.task_field.strip():
            problems.append("task_field must be a field name, got ''")
        problems += number_problems(
            self, {"min_length_ratio": ">=0", "short_answer_words": "int>=0", "chunk_size": "int>=1"}
        )
        if self.task_field is not None and self.task_field in (self.evidence_field, "instruction", "input"):
            problems.append(f"task_field {self.task_field!r} is another field's name")
        if problems:
            raise ConfigError("; ".join(problems))

    def settings(self) -> dict[str, Any]:
        """What shapes a row besides the rewriter and the criteria (a resumed row must match)."""
        names = ("task_field", "evidence_field", "min_length_ratio", "short_answer_words")
        return {n: getattr(self, n) for n in names}


# --------------------------------------------------------------------------------------------
# criteria
# --------------------------------------------------------------------------------------------


class Criterion(NamedTuple):
    task: str
    description: str  # one line the classifier reads
    text: str  # the format guidance the rewriter follows


class Criteria(NamedTuple):
    tasks: dict[str, Criterion]
    source: str  # "<file name>@<sha256 of its text, 8 hex digits>"


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error, not the last wins."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"key {key!r} appears twice in one mapping (line {line})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_criteria(path: str) -> Criteria:
    """The tasks of a criteria YAML; ConfigError names the file and the key of anything wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the criteria file: {err}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    tasks = {name: _criterion(path, name, entry) for name, entry in _task_entries(path, data).items()}
    if DEFAULT_TASK not in tasks:
        raise ConfigError(f"{path}: tasks.{DEFAULT_TASK}: missing; it is required (the fallback task)")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return Criteria(tasks, f"{Path(path).name}@{digest}")


def _task_entries(path: str, data: Any) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with the key 'tasks', got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k != "tasks")
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; the only key is 'tasks'")
    tasks = data.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        got = "nothing" if tasks is None else type(tasks).__name__
        raise ConfigError(f"{path}: tasks: expected a mapping of task name -> entry, got {got}")
    return tasks


def _criterion(path: str, name: Any, entry: Any) -> Criterion:
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise ConfigError(
            f"{path}: tasks.{name}: a task name is lower-case letters, digits and _, starting with a letter"
        )
    where = f"{path}: tasks.{name}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with {' and '.join(TASK_KEYS)}")
    unknown = sorted(str(k) for k in entry if k not in TASK_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(TASK_KEYS)}")
    for key in TASK_KEYS:
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if key not in entry else f"got {value!r:.40}"
            raise ConfigError(f"{where}.{key}: must be a non-empty string ({got})")
    description = " ".join(entry["description"].split())
    return Criterion(name, description, entry["criterion"].strip())


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------

CLASSIFY_PROMPT = """\
Decide which kind of task the user request below is. The kinds:

{tasks}

[User request]
{request}

Reply with the name of the one kind that fits best, written exactly as in the list \
(for example: {example}), and nothing else."""

REWRITE_PROMPT = """\
Below are a user's request to an AI assistant and the assistant's response. Rewrite the response \
so that it follows the format guidance. Keep everything the original gets right: every fact, \
number, step, piece of code and final answer.{evidence_note} Do not add claims you cannot \
support, and do not mention the guidance or that the response was rewritten.

[Request]
{request}
{evidence}
[Format guidance for this kind of task ({task})]
{criterion}

[Original response]
{response}

Write only the revised response: no heading, no preamble, no notes."""

EVIDENCE_NOTE = " Where the evidence passages bear on the response, use them to correct or support it."


def render_request(record: dict) -> str:
    extra = record.get("input") or ""
    return record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")


def classify_prompt(record: dict, criteria: Criteria) -> str:
    tasks = "\n".join(f"- {c.task}: {c.description}" for c in criteria.tasks.values())
    example = (
        next(n for n in criteria.tasks if n != DEFAULT_TASK) if len(criteria.tasks) > 1 else DEFAULT_TASK
    )
    return CLASSIFY_PROMPT.format(tasks=tasks, request=render_request(record), example=example)


def rewrite_prompt(record: dict, criterion: Criterion, evidence_field: str = "evidence") -> str:
    passages = [p.strip() for p in record.get(evidence_field) or [] if p.strip()]
    evidence = "".join(f"{k}. {p}\n" for k, p in enumerate(passages, start=1))
    return REWRITE_PROMPT.format(
        request=render_request(record),
        evidence=f"\n[Evidence]\n{evidence}" if passages else "",
        evidence_note=EVIDENCE_NOTE if passages else "",
        task=criterion.task,
        criterion=criterion.text,
        response=record["output"],
    )


THINKING = re.compile(r"<think>.*?</think>", re.S | re.I)


def parse_task(answer: str, names: Iterable[str]) -> str | None:
    """The task name an answer gives, read tolerantly ('Code.', '`open_qa`', 'Task: how to',
    'The best fit is math.'); None when it names none of `names`, or several."""
    names = list(names)
    text = THINKING.sub("", answer or "").strip().lower()
    first = text.splitlines()[0].strip() if text else ""
    first = re.sub(r"^(?:task|kind|category|label|answer)\s*[:=-]\s*", "", first)
    whole = re.sub(r"[^a-z0-9]+", "_", first).strip("_")
    if whole in names:
        return whole
    # a name inside a sentence; "open qa" reads as open_qa
    flat = "_" + re.sub(r"[^a-z0-9]+", "_", text) + "_"
    found = [n for n in names if f"_{n}_" in flat]
    found = [n for n in found if not any(n != m and f"_{n}_" in f"_{m}_" for m in found)]  # qa in open_qa
    return found[0] if len(found) == 1 else None


# --------------------------------------------------------------------------------------------
# filters: each returns None when the rewrite passes, else the reason it does not
# --------------------------------------------------------------------------------------------

PROMPT_HEADERS = ("[Request]", "[Evidence]", "[Format guidance", "[Original response]", "[User request]")
ROLE_MARKERS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "[INST]",
    "[/INST]",
    "<</SYS>>",
    "### Instruction",
    "### Input",
    "### Response",
)
LEAK_PATTERNS = (
    # a label for the text: "Original response:", "Revised answer:", "Assistant:"
    re.compile(
        r"^[\s#*]*(?:original|revised|rewritten|improved|reformatted|new) (?:response|answer)\s*:",
        re.I | re.M,
    ),
    re.compile(r"\A\W*(?:user|assistant|system)\s*:", re.I),  # a role label opening the text
    # a preamble about the rewrite: "Sure! Here is the revised response:"
    re.compile(
        r"\A\W*(?:(?:sure|certainly|okay|ok|of course)\W+)?here(?:'s|\u2019s| is) (?:the|a|an|your|my) "
        r"(?:revised|rewritten|improved|reformatted|updated|new)\b",
        re.I,
    ),
)
FENCE = re.compile(r"^\s*(?:```|~~~)", re.M)
WORD = re.compile(r"\d[\d,]*(?:\.\d+)?|[^\W_]+")


def leaked_markup(original: str, rewrite: str) -> str | None:
    """Our prompt's headers, a chat role marker or a label/preamble the original did not have."""
    low_orig, low_new = original.lower(), rewrite.lower()
    for marker in PROMPT_HEADERS + ROLE_MARKERS:
        if marker.lower() in low_new and marker.lower() not in low_orig:
            return f"leaked prompt markup: {marker!r}"
    for pattern in LEAK_PATTERNS:
        m = pattern.search(rewrite)
        if m and not pattern.search(original):
            return f"leaked prompt markup: {m.group(0).strip()[:40]!r}"
    return None


def too_short(original: str, rewrite: str, min_ratio: float) -> str | None:
    new, old = len(rewrite.strip()), len(original.strip())
    if new < min_ratio * old:
        return f"too short: {new} of {old} characters (< {min_ratio:g} x)"
    return None


def code_dropped(original: str, rewrite: str) -> str | None:
    if FENCE.search(original) and not FENCE.search(rewrite):
        return "code block dropped"
    return None


def words(text: str) -> list[str]:
    """Lower-case words and numbers ('1,000' -> '1000'); markdown and punctuation fall away."""
    return [w.replace(",", "") if w[0].isdigit() else w for w in WORD.findall(text.casefold())]


def short_answer_dropped(original: str, rewrite: str, max_words: int) -> str | None:
    """An original of at most max_words words (a number, a name, a short phrase) is the answer:
    each of its words must still be in the rewrite."""
    old = words(original)
    if not old or len(old) > max_words:
        return None
    have = set(words(rewrite))
    missing = [w for w in old if w not in have]
    return f"short answer dropped: {' '.join(missing)!r} of {original.strip()[:60]!r}" if missing else None


def final_answer_changed(original: str, rewrite: str) -> str | None:
    """Math: the rewrite's final number (cut.tasks.arithmetic's reading) equals the original's."""
    old = extract_final_answer(original)
    if old is None:
        return None
    new = extract_final_answer(rewrite)
    return None if answers_match(new, old) else f"final answer changed: {old} -> {new}"


def unchanged(original: str, rewrite: str) -> str | None:
    """The rewriter handed the original back (up to whitespace): nothing was rewritten."""
    return "unchanged" if " ".join(rewrite.split()) == " ".join(original.split()) else None


def looping(original: str, rewrite: str, times: int = 3) -> str | None:
    """A line (16+ characters) the rewrite repeats `times` times or more, more often than the original: a
    small rewriter's loop, not a format."""

    def counts(text: str) -> Counter:
        return Counter(line.strip() for line in text.splitlines() if len(line.strip()) >= 16)

    before, after = counts(original), counts(rewrite)
    for line, n in after.most_common():
        if n < times:
            break
        if n > before[line]:
            return f"repeats a line {n} times: {line[:40]!r}"
    return None


# the rewriter talking about its task instead of answering ("The original response was rewritten to ...")
META = re.compile(
    r"\b(the )?(original|revised|rewritten|previous) (response|answer)\b|\bformat criterion\b|\bi have rewritten\b",
    re.IGNORECASE,
)


def meta_commentary(original: str, rewrite: str) -> str | None:
    """The rewrite speaks of the rewriting (the original response, the criterion) where the original did not."""
    hit = META.search(rewrite)
    if hit and not META.search(original):
        return f"talks about the rewrite: {hit.group(0)!r}"
    return None


def check_rewrite(original: str, rewrite: str, task: str, cfg: RealignConfig) -> str | None:
    """None when the rewrite may replace the original; else the first filter's reason."""
    if not rewrite.strip():
        return "empty"
    return (
        unchanged(original, rewrite)
        or looping(original, rewrite)
        or leaked_markup(original, rewrite)
        or meta_commentary(original, rewrite)
        or too_short(original, rewrite, cfg.min_length_ratio)
        or code_dropped(original, rewrite)
        or short_answer_dropped(original, rewrite, cfg.short_answer_words)
        or (final_answer_changed(original, rewrite) if task == "math" else None)
    )


def judged_against(record: dict) -> str | None:
    """Why a record keeps its response unsent: a judgment (or spans) about that very text."""
    j = record.get("judgment")
    if record.get("judge_error") or (isinstance(j, str) and (not j.strip() or j.strip() in FAILED_JUDGMENTS)):
        return "failed judgment of this response"
    score = record.get("score")
    scored = isinstance(score, (int, float)) and not isinstance(score, bool) and score >= SCORE_THRESHOLD
    if not (j is None or says_perfect(j) or scored):
        return "judged negative: the judgment critiques this response"
    if record.get("spans"):
        return "spans mark this response's text"
    return None


# --------------------------------------------------------------------------------------------
# the rewriter: an OpenAI-compatible endpoint or a local model, prompts in, answers out
# --------------------------------------------------------------------------------------------


class Rewriter(Protocol):
    name: str

    def complete(self, prompts: Sequence[str], progress: Progress | None = None) -> list[Answer]: ...


class ClientRewriter:
    """cut.llm's client: retries, bounded concurrency and the answer cache."""

    def __init__(self, client: LLMClient) -> None:
        self.client = client
        self.name = f"openai:{client.config.model}"

    def complete(self, prompts: Sequence[str], progress: Progress | None = None) -> list[Answer]:
        return self.client.complete(list(prompts), progress)


class LocalRewriter:
    """A transformers causal LM through cut.judge.LocalJudge's loader and greedy batched decoding;
    a prompt is one user turn of the model's chat template, or plain text when it has none."""

    def __init__(
        self, model: str, batch_size: int = 8, max_new_tokens: int = 1024, device: str | None = None
    ):
        from .judge import LocalJudge

        self.local = LocalJudge(model, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device)
        self.name = f"local:{model}"

    def text(self, prompt: str) -> str:
        if not self.local.chat:
            return prompt
        turn = [{"role": "user", "content": prompt}]
        return self.local.tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)

    def complete(self, prompts: Sequence[str], progress: Progress | None = None) -> list[Answer]:
        on_batch = (lambda idx, _texts: progress(len(idx))) if progress else None
        return [(t, None) for t in self.local.generate([self.text(p) for p in prompts], on_batch)]


def make_rewriter(cfg: JudgeConfig, default_cache_file: str | None = None) -> Rewriter:
    """The rewriter cfg describes (kind openai or local); openai caches in cfg.cache_file, else
    default_cache_file ('' for none)."""
    if cfg.kind == "local":
        return LocalRewriter(cfg.model, cfg.batch_size, cfg.max_new_tokens)
    if cfg.kind != "openai":
        raise ConfigError(f"rewriter must be one of {', '.join(REWRITERS)}, got {cfg.kind!r}")
    cache = default_cache_file if cfg.cache_file is None else cfg.cache_file or None
    return ClientRewriter(LLMClient(cfg.client_config(cache)))


# --------------------------------------------------------------------------------------------
# one chunk of records: task, rewrite, filters
# --------------------------------------------------------------------------------------------


class TaskChoice(NamedTuple):
    task: str | None  # None: the classifying call failed
    label: str | None = None  # the answer / field value when it named no task (task is then general)
    error: str | None = None


class Outcome(NamedTuple):
    task: str | None
    text: str | None = None  # the rewrite that was kept
    label: str | None = None
    rejected: str | None = None
    error: str | None = None
    skipped: str | None = None


def task_choice(label: str, criteria: Criteria) -> TaskChoice:
    task = parse_task(label, criteria.tasks)
    return TaskChoice(task) if task else TaskChoice(DEFAULT_TASK, " ".join(label.split())[:60] or "(empty)")


def assign_tasks(
    records: list[dict], rewriter: Rewriter, criteria: Criteria, task_field: str | None
) -> list[TaskChoice]:
    if task_field:
        return [task_choice(r[task_field], criteria) for r in records]
    if not records:
        return []
    answers = rewriter.complete([classify_prompt(r, criteria) for r in records])
    return [
        task_choice(text, criteria) if err is None else TaskChoice(None, None, err) for text, err in answers
    ]


def realign_records(
    records: list[dict], rewriter: Rewriter, criteria: Criteria, cfg: RealignConfig
) -> list[Outcome]:
    """One outcome per record: classify, rewrite and filter (two rounds of calls at most)."""
    skip = [judged_against(r) for r in records]
    todo = [i for i, why in enumerate(skip) if why is None]
    choices = assign_tasks([records[i] for i in todo], rewriter, criteria, cfg.task_field)
    outcomes: list[Outcome] = [Outcome(None, skipped=why) for why in skip]
    ready = []
    for i, c in zip(todo, choices, strict=True):
        if c.task is None:
            outcomes[i] = Outcome(None, error=f"classify: {c.error}")
        else:
            ready.append((i, c))
    prompts = [rewrite_prompt(records[i], criteria.tasks[c.task], cfg.evidence_field) for i, c in ready]
    answers = rewriter.complete(prompts) if prompts else []
    for (i, c), (text, err) in zip(ready, answers, strict=True):
        outcomes[i] = filter_rewrite(records[i]["output"], c, text, err, cfg)
    return outcomes


def filter_rewrite(
    original: str, c: TaskChoice, text: str | None, err: str | None, cfg: RealignConfig
) -> Outcome:
    if text is None:  # a failed call is never training text
        return Outcome(c.task, label=c.label, error=f"rewrite: {err}")
    rewrite = text.strip()
    why = check_rewrite(original, rewrite, c.task, cfg)
    return Outcome(c.task, label=c.label, rejected=why) if why else Outcome(c.task, rewrite, c.label)


def output_row(record: dict, o: Outcome, tag: dict[str, Any]) -> dict[str, Any]:
    """The input record with `output` replaced by a kept rewrite, plus the flags (OWN_FIELDS)."""
    row = {k: v for k, v in record.items() if k not in OWN_FIELDS}
    if o.text is not None:
        row["output"], row["original_output"] = o.text, record["output"]
    row["rewritten"] = o.text is not None
    # a skipped record keeps a task field of its own; any other gets the task used
    row["task"] = record["task"] if o.skipped and "task" in record else o.task
    flags = {"task_label": o.label, "rewrite_rejected": o.rejected, "rewrite_error": o.error}
    row.update({k: v for k, v in {**flags, "rewrite_skipped": o.skipped}.items() if v is not None})
    row["realign"] = tag
    return row


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def read_inputs(path: str, cfg: RealignConfig) -> list[dict[str, Any]]:
    """The records to realign; DataError names the file, record and field of anything wrong."""
    rows, source = read_raw(path)
    if not rows:
        raise DataError(f"{source}: no records")
    for i, row in enumerate(rows):
        _check_input(source, i, row, cfg)
    return rows


def _check_input(source: str, i: int, row: Any, cfg: RealignConfig) -> None:
    check_object(source, i, row)
    text_field(source, i, row, "instruction", True)
    text_field(source, i, row, "input", False)
    text_field(source, i, row, "output", True)
    text_field(source, i, row, "judgment", False)
    if cfg.task_field and judged_against(row) is None:  # a record that is sent needs its task
        text_field(source, i, row, cfg.task_field, True)
    evidence = row.get(cfg.evidence_field)
    if evidence is not None and not (
        isinstance(evidence, list) and all(isinstance(p, str) for p in evidence)
    ):
        raise DataError(
            f"{source}: record {i}, field '{cfg.evidence_field}': expected a list of strings, "
            f"got {type(evidence).__name__}{'' if not isinstance(evidence, list) else ' with a non-string'}"
        )


def check_output_path(path: str, input_file: str | None = None) -> None:
    """A .json file that can be written, and not the input: the output is rewritten after each chunk
    with the rows done so far, so the input's other records would be gone after a kill."""
    if Path(path).suffix != ".json":
        raise ConfigError(f"{path}: output_file must end in .json (cut.records reads it as a JSON list)")
    if input_file is not None and same_file(path, input_file):
        raise ConfigError(
            f"--output_file {path} is the --input_file: realign rewrites its output after each chunk and "
            "would lose the records not yet done; choose another --output_file"
        )
    check_writable(path, "output_file")


def same_file(a: str, b: str) -> bool:
    """One file under two names (the same path, a symlink or a hard link)."""
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.samefile(pb)
    return pa.resolve() == pb.resolve()


def read_earlier(path: str) -> list[dict]:
    """An earlier run's rows in output_file ([] when there is none); refuses a file that is not one."""
    p = Path(path)
    if not p.exists():
        return []
    hint = "move it away or choose another --output_file"
    try:
        rows = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: exists but cannot be read as JSON ({err}); {hint}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "rewritten" in r for r in rows):
        raise DataError(f"{path}: exists but is not cut.realign's output; {hint}")
    return rows


def _key(row: dict) -> tuple:
    original = row.get("original_output") if row.get("rewritten") else row.get("output")
    return row.get("instruction"), row.get("input") or "", original


def match_earlier(records: list[dict], earlier: list[dict], tag: dict) -> list[dict | None]:
    """Per record, an earlier row for it made with the same settings whose calls did not fail."""
    pool: dict[tuple, list[dict]] = defaultdict(list)
    for row in earlier:
        if row.get("realign") == tag and "rewrite_error" not in row:
            pool[_key(row)].append(row)
    done = [pool[_key(r)].pop(0) if pool.get(_key(r)) else None for r in records]
    redone = len(earlier) - sum(d is not None for d in done)
    if redone:
        logger.info(
            "%d earlier row(s) not kept: a failed call, other settings, or no matching input record", redone
        )
    return done


def realign_file(input_file: str, output_file: str, rewriter: Rewriter, cfg: RealignConfig) -> dict[str, Any]:
    """Realign every record of input_file into output_file (resumed, written after each chunk);
    returns the counts (see count())."""
    check_output_path(output_file, input_file)
    criteria = load_criteria(cfg.criteria)
    records = read_inputs(input_file, cfg)
    tag = {"rewriter": rewriter.name, "criteria": criteria.source, **cfg.settings()}
    rows = match_earlier(records, read_earlier(output_file), tag)
    pending = [i for i, row in enumerate(rows) if row is None]
    logger.info(
        "%d of %d records already done in %s; %d to realign (%s)",
        len(records) - len(pending),
        len(records),
        output_file,
        len(pending),
        "tasks from field " + repr(cfg.task_field) if cfg.task_field else "tasks by the rewriter",
    )
    with tqdm(total=len(pending), desc=f"realigning ({rewriter.name})", unit="record", disable=None) as bar:
        for start in range(0, len(pending), cfg.chunk_size):
            chunk = pending[start : start + cfg.chunk_size]
            outcomes = realign_records([records[i] for i in chunk], rewriter, criteria, cfg)
            for i, o in zip(chunk, outcomes, strict=True):
                rows[i] = output_row(records[i], o, tag)
            write_json_atomic(output_file, [r for r in rows if r is not None])
            bar.update(len(chunk))
    write_json_atomic(output_file, rows)  # also when nothing was pending: stale rows go
    counts = count(rows, resumed=len(records) - len(pending))
    logger.info("%s; written to %s", summary(counts), output_file)
    return counts


def count(rows: list[dict], resumed: int = 0) -> dict[str, Any]:
    """records, rewritten, rejected, failed, skipped (and per reason), tasks, unknown task labels."""
    # the kind of each reason: its text before ':' with counts left out ("repeats a line N times")
    rejected = Counter(
        re.sub(r" \d+ times$", "", r["rewrite_rejected"].split(":")[0])
        for r in rows
        if "rewrite_rejected" in r
    )
    failed = Counter(
        re.sub(r" after \d+ retries$", "", r["rewrite_error"]) for r in rows if "rewrite_error" in r
    )
    skipped = Counter(r["rewrite_skipped"].split(":")[0] for r in rows if "rewrite_skipped" in r)
    return {
        "records": len(rows),
        "rewritten": sum(bool(r["rewritten"]) for r in rows),
        "rejected": sum(rejected.values()),
        "failed": sum(failed.values()),
        "skipped": sum(skipped.values()),
        "rejected_reasons": dict(rejected.most_common()),
        "failed_reasons": dict(failed.most_common()),
        "skipped_reasons": dict(skipped.most_common()),
        "tasks": dict(Counter(r["task"] for r in rows if r["task"]).most_common()),
        "unknown_task_labels": sum("task_label" in r for r in rows),
        "resumed": resumed,
    }


def summary(counts: dict[str, Any]) -> str:
    def reasons(kind: str) -> str:
        items = counts[f"{kind}_reasons"]
        return " (" + ", ".join(f"{r}: {n}" for r, n in items.items()) + ")" if items else ""

    return (
        f"realigned {counts['records']} record(s): {counts['rewritten']} rewritten, "
        f"{counts['rejected']} rejected{reasons('rejected')}, {counts['failed']} failed{reasons('failed')}, "
        f"{counts['skipped']} skipped{reasons('skipped')}; {counts['unknown_task_labels']} unknown task "
        f"label(s) -> {DEFAULT_TASK}; {counts['resumed']} from an earlier run"
    )


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


# cut.config's INT_MAX / FLOAT_MAX, the largest count / real any option takes (not imported from
# there: cut.config loads torch, which the openai rewriter never needs)
INT_MAX, FLOAT_MAX = 2**31 - 1, 1e6
MAX_RETRIES = 100  # the backoff doubles per retry: 2**1024 seconds is no float


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cut.realign", description=__doc__.split("\n")[0])
    p.add_argument(
        "--input_file", required=True, help="training records (JSON list, JSONL or datasets folder)"
    )
    p.add_argument(
        "--output_file", required=True, help="the realigned records, a .json list; an existing one is resumed"
    )
    p.add_argument(
        "--rewriter", required=True, choices=REWRITERS, help="an OpenAI-compatible endpoint or a local model"
    )
    p.add_argument("--base_url", help="openai: the API root, e.g. http://host:8000/v1")
    p.add_argument("--model", help="openai: the model name; local: a model folder or hub name")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument(
        "--criteria", default=str(DEFAULT_CRITERIA), help="YAML of tasks: description and criterion"
    )
    p.add_argument("--task_field", help="a record field naming the task (default: the rewriter classifies)")
    p.add_argument("--evidence_field", default="evidence", help="a record field with evidence passages")
    p.add_argument(
        "--min_length_ratio",
        type=number(0, FLOAT_MAX),
        default=0.5,
        help="refuse rewrites shorter than this x the original",
    )
    p.add_argument(
        "--short_answer_words",
        type=integer(0, INT_MAX),
        default=6,
        help="an original this short must survive word for word",
    )
    p.add_argument(
        "--chunk_size",
        type=integer(1, INT_MAX),
        default=64,
        help="records per round of calls; output written after each",
    )
    p.add_argument(
        "--concurrency", type=integer(1, INT_MAX), default=8, help="openai: requests in flight at most"
    )
    p.add_argument(
        "--timeout",
        type=number(0, FLOAT_MAX, lo_open=True),
        default=120.0,
        help="openai: seconds per request",
    )
    p.add_argument(
        "--max_retries", type=integer(0, MAX_RETRIES), default=5, help="openai: retries of a transient fault"
    )
    p.add_argument(
        "--backoff",
        type=number(0, FLOAT_MAX),
        default=1.0,
        help="openai: first retry delay in seconds (doubles)",
    )
    p.add_argument(
        "--max_tokens", type=integer(1, INT_MAX), default=2048, help="openai: max_tokens of an answer"
    )
    p.add_argument(
        "--cache_file", help="openai: answer cache (default <output_file>.cache.jsonl; '' for none)"
    )
    p.add_argument(
        "--batch_size", type=integer(1, INT_MAX), default=8, help="local: prompts per generate call"
    )
    p.add_argument(
        "--max_new_tokens", type=integer(1, INT_MAX), default=1024, help="local: tokens per answer at most"
    )
    return p


def configs_from_args(args: argparse.Namespace) -> tuple[RealignConfig, JudgeConfig]:
    if args.rewriter == "openai" and not (args.base_url and args.model):
        raise ConfigError("--rewriter openai needs --base_url and --model")
    if args.rewriter == "local" and not args.model:
        raise ConfigError("--rewriter local needs --model")
    cfg = RealignConfig(**{k: getattr(args, k) for k in asdict(RealignConfig())})
    rewriter = JudgeConfig(
        kind=args.rewriter,
        **{k: getattr(args, k) for k in asdict(JudgeConfig()) if k not in ("kind", "prompt_file")},
    )
    return cfg, rewriter


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_http_logs()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg, rewriter_cfg = configs_from_args(args)
    except ConfigError as err:
        parser.error(str(err))  # exits 2
    try:
        # bad criteria, input or output stop before a model is loaded or a request is sent
        check_output_path(args.output_file, args.input_file)
        load_criteria(cfg.criteria)
        read_inputs(args.input_file, cfg)
        read_earlier(args.output_file)
        rewriter = make_rewriter(rewriter_cfg, args.output_file + ".cache.jsonl")
        counts = realign_file(args.input_file, args.output_file, rewriter, cfg)
    except (ValueError, OSError) as err:  # DataError and ConfigError are ValueErrors
        print(f"cut.realign: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
