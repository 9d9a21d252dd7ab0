"""ReAlign: rewrite each response to a format criterion chosen by its task; keep only sound rewrites.

    python -m cut.realign --input_file data.json --output_file realigned.json --rewriter openai \\
        --base_url http://localhost:8000/v1 --model NAME [--task_field category] [--tokenizer DIR]
    python -m cut.realign --input_file data.json --output_file realigned.json --rewriter local --model DIR

Fan et al., "Reformatted Alignment" (ReAlign; code: GAIR-NLP/ReAlign): an LLM rewrites each response
of the training data so that it follows a format criterion picked by the task type (a procedure as
numbered steps, an email ready to send, ...), and rule filters keep only the rewrites that are
sound. Per record, as released unless said otherwise (README "cut realign" has the table):

1. the task: the record's own field (--task_field: labels from any classifier, ReAlign's included),
   or one greedy LLM call (CLASSIFY_PROMPT) that lists the tasks of the criteria file. A label is
   read tolerantly (parse_task) and through the file's aliases; one that names no task, or several,
   gives the file's fallback task (`default` in the shipped file) and is kept in `task_label`.
2. the criterion: the task's entry in a YAML file (the packaged cut/resources/realign_criteria.yaml:
   the 46 task names of the release, our own text; --criteria FILE for another). A task marked
   `rewrite: false` is passed through untouched and never sent (as released: 11 tasks, `default` among them).
3. the rewrite: `samples` calls (2 at temperature 0.3, as released) of REWRITE_PROMPT with the
   request, the evidence passages (--evidence_field), the criterion and the response. The prompt
   first asks whether the format fits the request at all and, when it does not, to keep the
   response (the adaptive gate; --no_gate drops it, the paper's ablation). The reply is
   "Reasoning: ..." [+ "Decision: REWRITE|KEEP"] + "Revised response: ...". Of the candidates the
   longest (in tokens with --tokenizer, as released; else characters) is chosen; a chosen KEEP, or a
   copy of the response, keeps the original and says why (`rewrite_declined`).
4. the filters on the chosen candidate (check_rewrite): as released, no code where the original has
   none and none dropped where it has some, and more than min_length_ratio of the original's
   length; with --filters all (the default) also ours: not empty, no looping lines, no leaked prompt
   markup or talk about the rewrite, a short original kept word for word, and for a task marked
   `final_number` the same final number. A rejected rewrite keeps the original and records why.

The rewriter is cut.llm's completer (cut.llm.completer): kind openai, any OpenAI-compatible
endpoint with its retries and answer cache (default <output_file>.cache.jsonl), or kind local, a
transformers model decoded in batches; its options are cut.llm.completer.LLMOptions'.

Input: a .json list, .jsonl or datasets folder of training records ({instruction, input?, output,
...}, README "Data format"), checked before any work: errors name the file, the record and the
field. Output: a .json list in the same format, one row per input record in input order, the
record's fields as they were except `output` (the rewrite, when one was kept), plus
  rewritten         true / false
  task              the task used (null when the classifying call failed; a skipped record keeps its own)
  task_label        the classifier's answer or the field's value, when it named no task
  original_output   the response before the rewrite (rewritten records only)
  rewrite_declined  the rewriter kept the response: the format does not fit (its reasoning)
  rewrite_rejected  why a filter refused the rewrite, e.g. "too short: 40 of 200 tokens (<= 0.5 x)"
  rewrite_error     why a call failed, e.g. "rewrite: http 500 after 5 retries"; never training text
  rewrite_skipped   why the record was not sent: a pass-through task, or a judgment that critiques
                    this very response (a negative, a failed judgment, or one with `spans`)
  realign           the settings that made the row: rewriter, criteria file@hash, gate, sampling, filters

Resumable: the output is rewritten (temp file + rename) after each chunk of records; a rerun keeps
the rows made with the same settings and asks only for the rest, and for rows whose call failed.
So the output is never the input (refused, also when the input is an earlier realign output): it
holds only the rows done so far, and a kill would lose the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import yaml
from tqdm.auto import tqdm

from cut.args import FLOAT_MAX, INT_MAX, Options, group, integer, number, opt, run_cli
from cut.data.files import check_writable, same_file, write_json_atomic
from cut.data.records import FAILED_JUDGMENTS, check_object, read_raw, says_perfect, text_field
from cut.errors import ConfigError, DataError
from cut.llm.client import Answer, number_problems, quiet_http_logs, text_problems
from cut.llm.completer import TYPES, Completer, LLMOptions, make_completer
from cut.resources import resource_path
from cut.tasks.arithmetic import answers_match, extract_final_answer

logger = logging.getLogger("cut.methods.realign")

DEFAULT_CRITERIA = resource_path("realign_criteria.yaml")  # package data (cut/resources)
DEFAULT_TASK = "general"  # the fallback task of a criteria file that names none
TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
TASK_KEYS = ("description", "criterion", "rewrite", "final_number", "aliases")
TOP_KEYS = ("tasks", "fallback")
REWRITERS = ("openai", "local")
FILTER_SETS = ("all", "released")  # released: ReAlign's code and length filters only
SCORE_THRESHOLD = 7.0  # cut.data.records' default: a score at or above it makes a positive
OWN_FIELDS = (
    "rewritten",
    "task",
    "task_label",
    "original_output",
    "rewrite_declined",
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

    criteria: str = str(DEFAULT_CRITERIA)  # YAML: task -> description, criterion, rewrite, ...
    task_field: str | None = None  # a record field that names the task; None: the rewriter classifies
    evidence_field: str = "evidence"  # a record field with a list of evidence passages (optional)
    gate: bool = True  # the prompt asks first whether the format fits (ReAlign's adaptive rewriting)
    samples: int = 2  # candidates per record; the longest is kept (code/reformat.py: top_k 2)
    temperature: float = 0.3  # of the rewrite calls (released: 0.3); classifying is greedy
    tokenizer: str | None = None  # lengths in this tokenizer's tokens (released); None: characters
    filters: str = "all"  # all: ReAlign's filters and ours; released: ReAlign's only
    min_length_ratio: float = 0.5  # a rewrite of at most this share of the original's length is refused
    short_answer_words: int = 6  # an original of at most this many words must survive word for word
    chunk_size: int = 64  # records per round of calls; the output is written after each

    def __post_init__(self) -> None:
        problems = text_problems(
            self, required=("criteria", "evidence_field"), optional=("task_field", "tokenizer")
        )
        for name in ("task_field", "tokenizer"):
            if isinstance(getattr(self, name), str) and not getattr(self, name).strip():
                problems.append(f"{name} must be a name, got ''")
        problems += number_problems(
            self,
            {
                "min_length_ratio": ">=0",
                "short_answer_words": "int>=0",
                "chunk_size": "int>=1",
                "samples": "int>=1",
                "temperature": ">=0",
            },
        )
        if not isinstance(self.gate, bool):
            problems.append(f"gate must be true or false, got {self.gate!r}")
        if self.filters not in FILTER_SETS:
            problems.append(f"filters must be one of {', '.join(FILTER_SETS)}, got {self.filters!r}")
        if self.samples != 1 and self.temperature == 0:
            problems.append(
                f"samples {self.samples} at temperature 0 would draw one greedy answer {self.samples} "
                "times; use samples 1 for a greedy rewrite"
            )
        if self.task_field is not None and self.task_field in (self.evidence_field, "instruction", "input"):
            problems.append(f"task_field {self.task_field!r} is another field's name")
        if problems:
            raise ConfigError("; ".join(problems))

    def settings(self) -> dict[str, Any]:
        """What shapes a row besides the rewriter and the criteria (a resumed row must match)."""
        names = (
            "task_field",
            "evidence_field",
            "gate",
            "samples",
            "temperature",
            "tokenizer",
            "filters",
            "min_length_ratio",
            "short_answer_words",
        )
        return {n: getattr(self, n) for n in names}


# --------------------------------------------------------------------------------------------
# criteria
# --------------------------------------------------------------------------------------------


class Criterion(NamedTuple):
    task: str
    description: str  # one line the classifier reads
    text: str  # the format guidance the rewriter follows ("" for a task that is not rewritten)
    rewrite: bool = True  # False: the task's records pass through untouched (never sent)
    final_number: bool = False  # a rewrite must state the original's final number
    aliases: tuple[str, ...] = ()  # other labels for this task


class Criteria(NamedTuple):
    tasks: dict[str, Criterion]
    source: str  # "<file name>@<sha256 of its text, 8 hex digits>"
    fallback: str = DEFAULT_TASK  # the task of a label that names none

    def labels(self) -> dict[str, str]:
        """Every label a task answers to (its name and its aliases) -> the task."""
        return {label: c.task for c in self.tasks.values() for label in (c.task, *c.aliases)}


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
    fallback = _fallback(path, data, tasks)
    _check_aliases(path, tasks)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return Criteria(tasks, f"{Path(path).name}@{digest}", fallback)


def _task_entries(path: str, data: Any) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with the key 'tasks', got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)}; known: {', '.join(TOP_KEYS)}"
        )
    tasks = data.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        got = "nothing" if tasks is None else type(tasks).__name__
        raise ConfigError(f"{path}: tasks: expected a mapping of task name -> entry, got {got}")
    return tasks


def _fallback(path: str, data: dict, tasks: dict[str, Criterion]) -> str:
    if "fallback" not in data:
        if DEFAULT_TASK not in tasks:
            raise ConfigError(
                f"{path}: tasks.{DEFAULT_TASK}: missing; it is required (the fallback task) "
                "unless the file names another with the key 'fallback'"
            )
        return DEFAULT_TASK
    name = data["fallback"]
    if not isinstance(name, str) or name not in tasks:
        raise ConfigError(f"{path}: fallback: {name!r} names no task of the file")
    return name


def _criterion(path: str, name: Any, entry: Any) -> Criterion:
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise ConfigError(
            f"{path}: tasks.{name}: a task name is lower-case letters, digits and _, starting with a letter"
        )
    where = f"{path}: tasks.{name}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with a description and a criterion")
    unknown = sorted(str(k) for k in entry if k not in TASK_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(TASK_KEYS)}")
    for key in ("rewrite", "final_number"):
        if not isinstance(entry.get(key, False), bool):
            raise ConfigError(f"{where}.{key}: must be true or false, got {entry[key]!r:.40}")
    rewrite = entry.get("rewrite", True)
    for key in ("description", "criterion") if rewrite else ("description",):
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if key not in entry else f"got {value!r:.40}"
            why = "; a task that is rewritten needs one" if key == "criterion" else ""
            raise ConfigError(f"{where}.{key}: must be a non-empty string ({got}){why}")
    text = entry.get("criterion", "")
    if not isinstance(text, str):
        raise ConfigError(f"{where}.criterion: must be a string, got {text!r:.40}")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and TASK_NAME.match(a) for a in aliases):
        raise ConfigError(
            f"{where}.aliases: must be a list of labels written as task names (lower-case letters, "
            f"digits and _), got {aliases!r:.60}"
        )
    description = " ".join(entry["description"].split())
    return Criterion(
        name, description, text.strip(), rewrite, entry.get("final_number", False), tuple(aliases)
    )


def _check_aliases(path: str, tasks: dict[str, Criterion]) -> None:
    """A label names one task: an alias is no other task's name or alias."""
    owner: dict[str, str] = {name: name for name in tasks}
    for c in tasks.values():
        for alias in c.aliases:
            if alias in owner and owner[alias] != c.task:
                raise ConfigError(
                    f"{path}: tasks.{c.task}.aliases: {alias!r} already names task {owner[alias]}"
                )
            owner[alias] = c.task


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

# Our wording of ReAlign's rewrite instruction (code/constant.py: the rewriting prompts): the same
# steps and reply shape, not its text. {gate} is the adaptive step; without it, the paper's ablation.
REWRITE_PROMPT = """\
You are given a user's request to an AI assistant, the assistant's response, and a format for \
this kind of task. Your job is to change how the response is laid out, not what it says.
{gate}
When you reformat the response:
- keep every fact, number, step, piece of code and final answer of the original;{evidence_note}
- make sure the result still answers the request correctly;
- write fluent text and add no headings of your own;
- do not mention the format or that the response was reformatted.

[Request]
{request}
{evidence}
[Format for this kind of task ({task})]
{criterion}

[Response]
{response}

Reply in exactly this shape, with nothing after the revised response:
Reasoning: <one or two sentences on {reasoning}>
{decision}Revised response:
<the reformatted response{after_keep}>"""

GATE = """
First decide whether the format suits this particular request. It does not when following it \
would distort the answer: the request asks for a shape of its own (one word, a fixed template, a \
given length or style), or the format's parts do not match what was asked. If the format does not \
suit the request, keep the response as it is; if it does, reformat the response to follow it.
"""
GATE_REPLY = {
    "reasoning": "whether the format suits the request and how you applied it",
    "decision": "Decision: REWRITE or KEEP\n",
    "after_keep": "; leave this empty after KEEP",
}
NO_GATE_REPLY = {"reasoning": "how you applied the format", "decision": "", "after_keep": ""}
EVIDENCE_NOTE = "\n- where the evidence passages bear on the response, use them to correct or support it;"


def render_request(record: dict) -> str:
    extra = record.get("input") or ""
    return record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")


def classify_prompt(record: dict, criteria: Criteria) -> str:
    tasks = "\n".join(f"- {c.task}: {c.description}" for c in criteria.tasks.values())
    others = [n for n in criteria.tasks if n != criteria.fallback]
    example = others[0] if others else criteria.fallback
    return CLASSIFY_PROMPT.format(tasks=tasks, request=render_request(record), example=example)


def rewrite_prompt(
    record: dict, criterion: Criterion, evidence_field: str = "evidence", gate: bool = True
) -> str:
    passages = [p.strip() for p in record.get(evidence_field) or [] if p.strip()]
    evidence = "".join(f"{k}. {p}\n" for k, p in enumerate(passages, start=1))
    return REWRITE_PROMPT.format(
        gate=GATE if gate else "",
        request=render_request(record),
        evidence=f"\n[Evidence]\n{evidence}" if passages else "",
        evidence_note=EVIDENCE_NOTE if passages else "",
        task=criterion.task,
        criterion=criterion.text,
        response=record["output"],
        **(GATE_REPLY if gate else NO_GATE_REPLY),
    )


THINKING = re.compile(r"<think>.*?</think>", re.S | re.I)
# the reply's parts; markdown bold or a heading mark around a label is tolerated
REVISED = re.compile(r"[#*_]*revised response[ \t*_]*:[ \t*_]*", re.I)  # first one, anywhere (as released)
REASONING = re.compile(r"\A[\s#*_]*reasoning[ \t*_]*:[ \t*_]*", re.I)
DECISION = re.compile(r"^[ \t#*_]*decision[ \t*_]*:[ \t*_]*(rewrite|keep|copy)\b.*$", re.I | re.M)


class Reply(NamedTuple):
    reasoning: str
    keep: bool  # the gate said the format does not fit: keep the response
    response: str  # the revised response ("" after KEEP)


def parse_reply(answer: str) -> Reply | None:
    """The parts of a rewrite answer (Reasoning, Decision, Revised response); None when it has no
    revised response and no KEEP decision, which is no answer (code/reformat.py retries it)."""
    text = THINKING.sub("", answer or "")
    marker = REVISED.search(text)
    head = text[: marker.start()] if marker else text
    decision = DECISION.search(head)
    keep = bool(decision) and decision.group(1).lower() in ("keep", "copy")
    if marker is None and not keep:
        return None
    reasoning = DECISION.sub("", REASONING.sub("", head.strip())).strip()
    return Reply(" ".join(reasoning.split()), keep, text[marker.end() :].strip() if marker else "")


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

PROMPT_HEADERS = ("[Request]", "[Evidence]", "[Format for this kind of task", "[Response]", "[User request]")
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
    # the reply's own labels inside the response: "Reasoning:", "Decision: KEEP"
    re.compile(r"^[\s#*]*(?:reasoning\s*:|decision\s*:\s*(?:rewrite|keep|copy)\b)", re.I | re.M),
    # a preamble about the rewrite: "Sure! Here is the revised response:"
    re.compile(
        r"\A\W*(?:(?:sure|certainly|okay|ok|of course)\W+)?here(?:'s|\u2019s| is) (?:the|a|an|your|my) "
        r"(?:revised|rewritten|improved|reformatted|updated|new)\b",
        re.I,
    ),
)
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


class Length(NamedTuple):
    """How the length filter and best-of-n measure a text."""

    count: Callable[[str], int]
    unit: str  # "tokens" or "characters"


CHARACTERS = Length(len, "characters")


def token_length(tokenizer: Any) -> Length:
    """Tokens without special ones: ReAlign's count (len(input_ids) - 1, its tokenizer's BOS left out:
    code/rewrite_data_selection.py, length_selection) for a tokenizer that adds one, as LLaMA's does."""
    return Length(lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]), "tokens")


def load_length(tokenizer: str | None) -> Length:
    """The Length of --tokenizer (a model folder or hub name); characters without one."""
    if tokenizer is None:
        return CHARACTERS
    from cut.modeling.loading import load_tokenizer

    try:
        return token_length(load_tokenizer(tokenizer))
    except (OSError, ValueError) as err:
        raise ConfigError(f"--tokenizer {tokenizer}: cannot load a tokenizer from it: {err}") from None


def too_short(original: str, rewrite: str, min_ratio: float, length: Length = CHARACTERS) -> str | None:
    """Refused at or below min_ratio x the original's length (code/rewrite_data_selection.py,
    length_selection: `rewrite_length <= threshold * original_length`; the rewrite stripped, the
    original as it is)."""
    new, old = length.count(rewrite.strip()), length.count(original)
    if new <= min_ratio * old:
        return f"too short: {new} of {old} {length.unit} (<= {min_ratio:g} x)"
    return None


CODE_BLOCK = re.compile(r"```[\s\S]*?```")


def has_code(text: str) -> bool:
    """ReAlign's test for code (code/rewrite_data_selection.py, code_selection): a fenced block with
    both fences, or a function definition ('def ' and 'return ' anywhere in the text)."""
    return bool(CODE_BLOCK.search(text)) or ("def " in text and "return " in text)


def code_changed(original: str, rewrite: str) -> str | None:
    """Both ways, as released: code the original has must stay, and none may appear where it had none."""
    before, after = has_code(original), has_code(rewrite)
    if before and not after:
        return "code block dropped"
    if after and not before:
        return "code added"
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


def same_text(original: str, rewrite: str) -> bool:
    """The rewriter handed the original back (up to whitespace): ReAlign's gate copies the response."""
    return " ".join(rewrite.split()) == " ".join(original.split())


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


def check_rewrite(
    original: str,
    rewrite: str,
    cfg: RealignConfig,
    *,
    final_number: bool = False,
    length: Length = CHARACTERS,
) -> str | None:
    """None when the rewrite may replace the original; else the first filter's reason.

    filters released: ReAlign's two (code/rewrite_data_selection.py, alpaca_overall_selection: code
    both ways, then length); all: ours around them."""
    if cfg.filters == "released":
        return code_changed(original, rewrite) or too_short(original, rewrite, cfg.min_length_ratio, length)
    if not rewrite.strip():
        return "empty"
    return (
        looping(original, rewrite)
        or leaked_markup(original, rewrite)
        or meta_commentary(original, rewrite)
        or code_changed(original, rewrite)
        or too_short(original, rewrite, cfg.min_length_ratio, length)
        or short_answer_dropped(original, rewrite, cfg.short_answer_words)
        or (final_answer_changed(original, rewrite) if final_number else None)
    )


def longest(texts: Sequence[str], length: Length = CHARACTERS) -> int:
    """The index of the longest text, the first of equals (code/reformat.py, select_optimal_response)."""
    best, best_len = 0, -1
    for i, text in enumerate(texts):
        n = length.count(text)
        if n > best_len:
            best, best_len = i, n
    return best


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

    def complete(
        self, prompts: Sequence[str], progress: Progress | None = None, sample: int | None = None
    ) -> list[Answer]:
        """Greedy answers (sample None: the classifier's calls), or the sample-th candidate of each
        rewrite at the rewrite temperature (0, 1, ...: one independent draw each)."""
        ...


def readable_reply(answer: str) -> bool:
    """Whether a rewrite answer can be read (parse_reply): one that cannot is a failed call."""
    return parse_reply(answer) is not None


class CompleterRewriter:
    """A cut.llm Completer as realign asks it: greedy to classify (sample None); the sample-th
    independent draw at the completer's temperature to rewrite (an API backend: its own request and
    cache entry; local: seeded with the sample), where an answer without a revised response is a
    failure an API backend neither caches nor takes from its cache."""

    def __init__(self, completer: Completer) -> None:
        self.completer, self.name = completer, completer.name

    def complete(
        self, prompts: Sequence[str], progress: Progress | None = None, sample: int | None = None
    ) -> list[Answer]:
        if sample is None:
            return self.completer.complete(list(prompts), progress, temperature=0.0)
        return self.completer.complete(list(prompts), progress, readable_reply, sample=sample)


def make_rewriter(
    kind: str, opts: LLMOptions, default_cache_file: str | None = None, temperature: float = 0.0
) -> Rewriter:
    """The rewriter of kind openai or local with the backend options opts, drawing rewrites at
    `temperature`; openai caches in opts.cache_file, else default_cache_file ('' for none)."""
    if kind not in REWRITERS:
        raise ConfigError(f"rewriter must be one of {', '.join(REWRITERS)}, got {kind!r}")
    cache = default_cache_file if opts.cache_file is None else opts.cache_file or None
    return CompleterRewriter(make_completer(kind, opts, cache, temperature))


# --------------------------------------------------------------------------------------------
# one chunk of records: task, rewrite, filters
# --------------------------------------------------------------------------------------------


class TaskChoice(NamedTuple):
    task: str | None  # None: the classifying call failed
    label: str | None = None  # the answer / field value when it named no task (task is then the fallback)
    error: str | None = None


class Outcome(NamedTuple):
    task: str | None
    text: str | None = None  # the rewrite that was kept
    label: str | None = None
    rejected: str | None = None
    error: str | None = None
    skipped: str | None = None
    declined: str | None = None  # the rewriter kept the response (the gate's KEEP, or a copy)


def task_choice(label: str, criteria: Criteria) -> TaskChoice:
    labels = criteria.labels()
    name = parse_task(label, labels)
    if name:
        return TaskChoice(labels[name])
    return TaskChoice(criteria.fallback, " ".join(label.split())[:60] or "(empty)")


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
    records: list[dict],
    rewriter: Rewriter,
    criteria: Criteria,
    cfg: RealignConfig,
    length: Length = CHARACTERS,
) -> list[Outcome]:
    """One outcome per record: classify, rewrite (cfg.samples draws) and filter."""
    skip = [judged_against(r) for r in records]
    todo = [i for i, why in enumerate(skip) if why is None]
    choices = assign_tasks([records[i] for i in todo], rewriter, criteria, cfg.task_field)
    outcomes: list[Outcome] = [Outcome(None, skipped=why) for why in skip]
    ready = []
    for i, c in zip(todo, choices, strict=True):
        if c.task is None:
            outcomes[i] = Outcome(None, error=f"classify: {c.error}")
        elif not criteria.tasks[c.task].rewrite:  # code/reformat.py: a task not in REWRITE_TASK
            outcomes[i] = Outcome(
                c.task, label=c.label, skipped=f"pass-through task: {c.task} is not rewritten"
            )
        else:
            ready.append((i, c))
    if not ready:
        return outcomes
    prompts = [
        rewrite_prompt(records[i], criteria.tasks[c.task], cfg.evidence_field, cfg.gate) for i, c in ready
    ]
    drawn = [rewriter.complete(prompts, sample=k) for k in range(cfg.samples)]  # (samples, records)
    for j, (i, c) in enumerate(ready):
        candidates = [answers[j] for answers in drawn]
        outcomes[i] = choose(records[i]["output"], c, criteria.tasks[c.task], candidates, cfg, length)
    return outcomes


def choose(
    original: str,
    c: TaskChoice,
    criterion: Criterion,
    candidates: Sequence[Answer],
    cfg: RealignConfig,
    length: Length = CHARACTERS,
) -> Outcome:
    """The longest candidate (a KEEP or a copy counts as the original), then the filters on it alone,
    as released (code/reformat.py select_optimal_response, then rewrite_data_selection.py)."""
    failed = [err for text, err in candidates if text is None]
    if failed:  # a failed call is never training text, nor a candidate fewer
        return Outcome(c.task, label=c.label, error=f"rewrite: {failed[0]}")
    replies = [parse_reply(text) for text, _ in candidates]
    if any(r is None for r in replies):
        return Outcome(c.task, label=c.label, error="rewrite: no 'Revised response:' in the answer")
    kept = [r.keep or same_text(original, r.response) for r in replies]
    texts = [original if k else r.response for k, r in zip(kept, replies, strict=True)]
    best = longest(texts, length)
    if kept[best]:
        why = replies[best].reasoning[:200] or "the response came back unchanged"
        return Outcome(c.task, label=c.label, declined=why)
    why = check_rewrite(original, texts[best], cfg, final_number=criterion.final_number, length=length)
    return Outcome(c.task, label=c.label, rejected=why) if why else Outcome(c.task, texts[best], c.label)


def output_row(record: dict, o: Outcome, tag: dict[str, Any]) -> dict[str, Any]:
    """The input record with `output` replaced by a kept rewrite, plus the flags (OWN_FIELDS)."""
    row = {k: v for k, v in record.items() if k not in OWN_FIELDS}
    if o.text is not None:
        row["output"], row["original_output"] = o.text, record["output"]
    row["rewritten"] = o.text is not None
    # a record without a task used (judged against, or its classifying call failed) keeps its own
    row["task"] = record["task"] if o.task is None and "task" in record else o.task
    flags = {
        "task_label": o.label,
        "rewrite_declined": o.declined,
        "rewrite_rejected": o.rejected,
        "rewrite_error": o.error,
        "rewrite_skipped": o.skipped,
    }
    row.update({k: v for k, v in flags.items() if v is not None})
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
        raise ConfigError(f"{path}: output_file must end in .json (cut.data.records reads it as a JSON list)")
    if input_file is not None and same_file(path, input_file):
        raise ConfigError(
            f"--output_file {path} is the --input_file: realign rewrites its output after each chunk and "
            "would lose the records not yet done; choose another --output_file"
        )
    check_writable(path, "output_file")


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


def realign_file(
    input_file: str, output_file: str, rewriter: Rewriter, cfg: RealignConfig, length: Length | None = None
) -> dict[str, Any]:
    """Realign every record of input_file into output_file (resumed, written after each chunk);
    returns the counts (see count()). length: cfg.tokenizer's, loaded here when not given."""
    from cut.modeling.generate import log_resume  # torch, loaded when a run starts

    check_output_path(output_file, input_file)
    criteria = load_criteria(cfg.criteria)
    records = read_inputs(input_file, cfg)
    length = length or load_length(cfg.tokenizer)
    tag = {"rewriter": rewriter.name, "criteria": criteria.source, **cfg.settings()}
    rows = match_earlier(records, read_earlier(output_file), tag)
    pending = [i for i, row in enumerate(rows) if row is None]
    tasks = "tasks from field " + repr(cfg.task_field) if cfg.task_field else "tasks by the rewriter"
    log_resume(
        logger, len(records), len(pending), output_file, "already done in %s", "to realign (%s)", tasks
    )
    logger.info(
        "gate %s; %d sample(s) at temperature %g, the longest kept; %s filters; lengths in %s",
        "on" if cfg.gate else "off (the paper's ablation)",
        cfg.samples,
        cfg.temperature,
        cfg.filters,
        length.unit if cfg.tokenizer is None else f"{length.unit} of {cfg.tokenizer}",
    )
    with tqdm(total=len(pending), desc=f"realigning ({rewriter.name})", unit="record", disable=None) as bar:
        for start in range(0, len(pending), cfg.chunk_size):
            chunk = pending[start : start + cfg.chunk_size]
            outcomes = realign_records([records[i] for i in chunk], rewriter, criteria, cfg, length)
            for i, o in zip(chunk, outcomes, strict=True):
                rows[i] = output_row(records[i], o, tag)
            write_json_atomic(output_file, [r for r in rows if r is not None])
            bar.update(len(chunk))
    write_json_atomic(output_file, rows)  # also when nothing was pending: stale rows go
    counts = count(rows, resumed=len(records) - len(pending))
    logger.info("%s; written to %s", summary(counts), output_file)
    return counts


def count(rows: list[dict], resumed: int = 0) -> dict[str, Any]:
    """records, rewritten, declined, rejected, failed, skipped (and per reason), tasks, unknown task labels."""
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
        "declined": sum("rewrite_declined" in r for r in rows),
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
        f"{counts['declined']} kept by the rewriter, "
        f"{counts['rejected']} rejected{reasons('rejected')}, {counts['failed']} failed{reasons('failed')}, "
        f"{counts['skipped']} skipped{reasons('skipped')}; {counts['unknown_task_labels']} unknown task "
        f"label(s) -> the fallback task; {counts['resumed']} from an earlier run"
    )


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


PROG = "cut.realign"


@dataclass
class RewriterOptions(LLMOptions):
    """The rewriter: an OpenAI-compatible endpoint or a local model, and its backend options."""

    rewriter: str = opt(
        "", "an OpenAI-compatible endpoint or a local model", choices=REWRITERS, required=True
    )
    timeout: float = opt(120.0, "openai: seconds per request", parse=TYPES["timeout"])
    max_tokens: int = opt(2048, "openai: max_tokens of an answer", parse=TYPES["max_tokens"])
    cache_file: str | None = opt(None, "openai: answer cache (None: <output_file>.cache.jsonl; '' for none)")
    max_new_tokens: int = opt(1024, "local: tokens per answer at most", parse=TYPES["max_new_tokens"])


@dataclass
class RealignOptions(Options):
    """ReAlign: rewrite each response to a format criterion chosen by its task; keep only sound rewrites."""

    input_file: str = opt("", "training records (JSON list, JSONL or datasets folder)", required=True)
    output_file: str = opt(
        "", "the realigned records, a .json list; an existing one is resumed", required=True
    )
    criteria: str = opt(str(DEFAULT_CRITERIA), "YAML of tasks: description and criterion")
    task_field: str | None = opt(None, "a record field naming the task (None: the rewriter classifies)")
    evidence_field: str = opt("evidence", "a record field with evidence passages")
    no_gate: bool = opt(False, "no adaptive gate: every response is reformatted (the paper's ablation)")
    samples: int = opt(
        2, "rewrites drawn per record; the longest is kept (released: 2)", parse=integer(1, INT_MAX)
    )
    temperature: float = opt(
        0.3, "of the rewrite calls (released: 0.3); classifying is greedy", parse=number(0, FLOAT_MAX)
    )
    tokenizer: str | None = opt(
        None,
        "count lengths in this tokenizer's tokens, as released (a model folder or name); None: characters",
    )
    filters: str = opt(
        "all", "released: ReAlign's code and length filters only; all: ours as well", choices=FILTER_SETS
    )
    min_length_ratio: float = opt(
        0.5, "refuse rewrites of at most this x the original's length", parse=number(0, FLOAT_MAX)
    )
    short_answer_words: int = opt(
        6, "an original this short must survive word for word", parse=integer(0, INT_MAX)
    )
    chunk_size: int = opt(
        64, "records per round of calls; output written after each", parse=integer(1, INT_MAX)
    )
    rewriter: RewriterOptions = group(RewriterOptions)

    def validate(self) -> None:
        r = self.rewriter
        if r.rewriter == "openai" and not (r.base_url and r.model):
            raise ConfigError("--rewriter openai needs --base_url and --model")
        if r.rewriter == "local" and not r.model:
            raise ConfigError("--rewriter local needs --model")
        problems = r.backend_problems()
        if problems:
            raise ConfigError("; ".join(problems))
        if r.rewriter == "openai":
            r.client_config()  # checks base_url
        self.config()

    def config(self) -> RealignConfig:
        """What is rewritten and which rewrites are kept (RealignConfig), checked."""
        names = {f.name for f in fields(RealignConfig)} - {"gate"}
        return RealignConfig(gate=not self.no_gate, **{k: v for k, v in self.flat().items() if k in names})


def main(argv: list[str] | None = None) -> int:
    opts = RealignOptions.parse(argv, prog=PROG)
    return run_cli(PROG, lambda: realign(opts))


def realign(opts: RealignOptions) -> int:
    """A run of the command line: bad criteria, input or output stop before a model is loaded or a
    request is sent; the counts are printed as JSON."""
    quiet_http_logs()
    cfg = opts.config()
    check_output_path(opts.output_file, opts.input_file)
    load_criteria(cfg.criteria)
    read_inputs(opts.input_file, cfg)
    read_earlier(opts.output_file)
    length = load_length(cfg.tokenizer)
    rewriter = make_rewriter(
        opts.rewriter.rewriter, opts.rewriter, opts.output_file + ".cache.jsonl", cfg.temperature
    )
    counts = realign_file(opts.input_file, opts.output_file, rewriter, cfg, length)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
