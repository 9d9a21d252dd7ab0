"""What every judge shares: the Verdict, the Judge interface, the judge prompt and its reader.

The judge answers `Perfect.` or `Mistakes: <every mistake, quoted and corrected>` (DEFAULT_PROMPT,
the packaged cut/resources/judge_prompt.txt); a prompt file replaces it: a text with the fields
{instruction}, {input} ("(none)" when a record has no input) and {response}.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from cut.data.records import says_perfect
from cut.resources import read_resource

DEFAULT_PROMPT = read_resource("judge_prompt.txt").strip()  # package data (cut/resources)

PROMPT_FIELDS = ("instruction", "input", "response")
NO_INPUT = "(none)"
NO_MISTAKES = {"none", "no mistakes", "n/a", "nothing"}

Progress = Callable[[int], None]


class Verdict(NamedTuple):
    kind: str  # positive | negative | failed
    judgment: str | None
    error: str | None
    spans: tuple[tuple[int, int], ...] = ()  # the wrong text of the output; () = the quotes decide


class Judge(Protocol):
    """A judge: one verdict per record, in order; progress(n) ticks as n records are judged.

    A judge kind in cut.judges.JUDGES is a class with `requires` (the JudgeConfig fields it
    cannot do without) and `from_config(cfg, default_cache_file)` that builds it."""

    name: str

    def judge(self, records: list[dict], progress: Progress | None = None) -> list[Verdict]: ...


class RuleJudge:
    """A judge by rules, offline and deterministic: `verdict(record)` for every record; a subclass
    names itself and its verdict (`verdict = staticmethod(fn)`)."""

    name = "rules"
    requires: tuple[str, ...] = ()

    @staticmethod
    def verdict(record: dict) -> Verdict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: Any = None, default_cache_file: str | None = None) -> RuleJudge:
        return cls()

    def judge(self, records: list[dict], progress: Progress | None = None) -> list[Verdict]:
        verdicts = [self.verdict(r) for r in records]
        if progress:
            progress(len(records))
        return verdicts


def parse_verdict(text: str) -> Verdict:
    """'Perfect.' -> positive; 'Mistakes: <text>' -> negative with <text>; anything else failed."""
    stripped = (text or "").strip()
    if says_perfect(stripped):
        return Verdict("positive", None, None)
    head, colon, rest = stripped.partition(":")
    rest = rest.strip()
    # "Mistakes: none" or "Mistakes: perfect" breaks the protocol; it is not a critique to train on
    if colon and head.strip().lower() == "mistakes" and rest and not says_no_mistakes(rest):
        return Verdict("negative", rest, None)
    shown = " ".join(stripped.split())[:60] or "(empty)"
    return Verdict("failed", None, f"unparseable verdict: {shown}")


def says_no_mistakes(text: str) -> bool:
    return says_perfect(text) or text.lower().rstrip(".!") in NO_MISTAKES


def answer_verdict(content: str | None, error: str | None) -> Verdict:
    """An LLM's answer ((text, None) or (None, reason)) as a verdict."""
    return parse_verdict(content) if content is not None else Verdict("failed", None, error)


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
