"""Files that ship inside the package, read through importlib.resources so that a wheel install
finds them as the checkout does (pyproject.toml's package-data lists them).

    urial/default.md        cut.urial's default URIAL prompt (three examples, backticks format)
    realign_criteria.yaml   cut.realign's criteria: ReAlign's task names, description and criterion
    judge_prompt.txt        cut.judge's default judge prompt

A path given on the command line is read as before; these are only the defaults.
"""

from __future__ import annotations

import atexit
from contextlib import ExitStack
from importlib.resources import as_file, files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # 3.11+; importlib.abc on 3.10

_extracted = ExitStack()  # files copied out of a zipped install, removed at exit
atexit.register(_extracted.close)


def resource(name: str) -> Traversable:
    """The packaged file `name` ('urial/default.md'), wherever the package lives."""
    ref = files(__name__)
    for part in name.split("/"):
        ref = ref / part
    return ref


def resource_path(name: str) -> Path:
    """The packaged file `name` as a path on disk: in place for an ordinary install or a checkout,
    a copy for the life of the process when the package is imported from a zip."""
    ref = resource(name)
    if isinstance(ref, Path):
        return ref
    return _extracted.enter_context(as_file(ref))


def read_resource(name: str) -> str:
    return resource(name).read_text(encoding="utf-8")
