"""What a task is to the online loop: its prompts, how its answers are judged and scored.

A task module declares one `Task` (`TASK = Task(...)`) and gets one line in cut.tasks.registry.TASKS;
the loop's `task:` setting names it. The declaration says

    generate  seed -> {"pool": [...], "heldout": [...]}: the prompt pool and the held-out set, remade
              exactly from the seed (what the task's command writes)
    judge     the judge kind (cut.judges.JUDGES) that checks an answer offline from the record's own
              fields (arithmetic: `reference`, the final number; instructions: `verifier`, the
              record's `constraints`)
    check     one held-out record checked (and normalised) before any round starts; a DataError names
              the file, record and field
    score     the held-out answers scored: (per prompt: passed, the task's other figures)
    keep      the record fields an evaluation's answers carry beside instruction, input and output
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# (held-out records, model outputs) -> (per prompt: passed, the task's figures besides accuracy)
Score = Callable[[Sequence[dict], Sequence[str]], tuple[list[bool], dict[str, Any]]]


@dataclass(frozen=True)
class Task:
    """One task of the online loop (see the module's docstring for each part)."""

    generate: Callable[[int], dict[str, list[dict]]]
    judge: str
    check: Callable[[dict, str, int], dict]  # (record, source, index) -> the checked record
    score: Score
    keep: tuple[str, ...] = ()

    def check_heldout(self, rows: list[dict], source: str) -> list[dict]:
        """Every held-out record checked, in order; the first bad one raises a DataError."""
        return [self.check(r, source, i) for i, r in enumerate(rows)]

    def score_answers(self, records: Sequence[dict], texts: Sequence[str]) -> dict[str, Any]:
        """accuracy, the task's other figures, and one answer per prompt with its `correct`."""
        right, extra = self.score(records, texts)
        return {
            "accuracy": sum(right) / len(right),
            "correct": sum(right),
            "total": len(right),
            **extra,
            "answers": [
                {
                    "instruction": r["instruction"],
                    "input": r.get("input") or "",
                    "output": t,
                    **{k: r[k] for k in self.keep if k in r},
                    "correct": bool(ok),
                }
                for r, t, ok in zip(records, texts, right, strict=True)
            ],
        }
