"""The tasks of the online loop, one line each: the loop's `task:` setting names one.

A new task is one module that declares `TASK = Task(...)` (cut.tasks.task) plus its line here.
"""

from __future__ import annotations

from cut.tasks import arithmetic, instructions
from cut.tasks.task import Task

TASKS: dict[str, Task] = {
    "arithmetic": arithmetic.TASK,  # word problems; the final number against the reference
    "instructions": instructions.TASK,  # verifiable constraints; IFEval's strict and loose scores
}
