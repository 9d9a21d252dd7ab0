"""Arithmetic word problems with known answers: a pool for the online loop and a real teacher.

    python -m cut.tasks.arithmetic --pool data/arithmetic_pool.json --heldout data/arithmetic_heldout.json

Problems are generated from templates with a seed, so the shipped files can be remade exactly.
`extract_final_answer` reads the last number a response states; `answers_match` compares it
with the reference numerically.
"""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from cut.args import SEED, Options, integer, opt, run_cli
from cut.data.files import write_json_atomic
from cut.errors import DataError
from cut.tasks.task import Task

NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Iris",
    "Jon",
    "Kemi",
    "Liam",
    "Mei",
    "Noah",
]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "coins", "stamps", "shells", "cards"]
# far below the number of distinct problems (millions): make_problems always finishes
MAX_PROBLEMS = 100_000


def _problem(rng: random.Random) -> tuple[str, int]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(8)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if kind == 0:
        return f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b
    if kind == 1:
        a = a + b
        return f"{name} had {a} {item} and gave {b} to {other}. How many {item} does {name} have left?", a - b
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?", a * b
    if kind == 3:
        b = rng.randint(2, 9)
        q = rng.randint(2, 15)
        return (
            f"{name} shares {b * q} {item} equally among {b} friends. How many {item} does each friend get?",
            q,
        )
    if kind == 4:
        c = rng.randint(2, 30)
        return f"What is {a} + {b} - {c}?", a + b - c
    if kind == 5:
        a, b = rng.randint(2, 25), rng.randint(2, 25)
        return f"What is {a} times {b}?", a * b
    if kind == 6:
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 30)
        return f"Compute {a} * {b} + {c}.", a * b + c
    price, n = rng.randint(2, 15), rng.randint(2, 9)
    return f"One {item[:-1]} costs {price} dollars. How many dollars do {n} {item} cost?", price * n


def make_problems(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """n distinct problems {id, instruction, input, reference}; none whose text is in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[dict] = []
    while len(out) < n:
        text, answer = _problem(rng)
        if text in seen:
            continue
        seen.add(text)
        out.append(
            {"id": f"arith-{seed}-{len(out)}", "instruction": text, "input": "", "reference": str(answer)}
        )
    return out


# a minus sign counts only where it cannot be a hyphen or an operator ("10-12" is not "-12")
_NUMBER = r"(?:(?<![\w)])-)?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_ANSWER = re.compile(r"answer\s*(?:is|:|=)?\s*(?:\$\s*)?(" + _NUMBER + ")", re.IGNORECASE)


def extract_final_answer(text: str) -> str | None:
    """The number after the last 'answer is', else the last number stated ('1,234' -> '1234'); None if none."""
    stated = _ANSWER.findall(text or "")
    matches = stated or re.findall(_NUMBER, text or "")
    if not matches:
        return None
    return matches[-1].replace(",", "")


def _value(s: str) -> Fraction | None:
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    p, r = _value(predicted), _value(reference)
    return p is not None and r is not None and p == r


def generate(seed: int = 0, n_pool: int = 600, n_heldout: int = 100) -> dict[str, list[dict]]:
    """The pool and the held-out set; no pool problem is a held-out one."""
    heldout = make_problems(n_heldout, seed=seed + 1)
    pool = make_problems(n_pool, seed=seed, exclude={r["instruction"] for r in heldout})
    return {"pool": pool, "heldout": heldout}


def check_heldout_record(record: dict, source: str, i: int) -> dict:
    """A held-out problem needs a numeric `reference`."""
    if extract_final_answer(str(record.get("reference", ""))) is None:
        raise DataError(f"{source}: record {i}, field 'reference': missing or not a number")
    return record


def score(records: Sequence[dict], outputs: Sequence[str]) -> tuple[list[bool], dict[str, Any]]:
    """Per problem: the final number stated equals the reference (no other figures)."""
    right = [
        answers_match(extract_final_answer(t), str(r["reference"]))
        for t, r in zip(outputs, records, strict=True)
    ]
    return right, {}


TASK = Task(
    generate=generate, judge="reference", check=check_heldout_record, score=score, keep=("reference",)
)


@dataclass
class ArithmeticOptions(Options):
    """Write the arithmetic pool and held-out set."""

    pool: str = opt("data/arithmetic_pool.json", "the pool file written")
    heldout: str = opt("data/arithmetic_heldout.json", "the held-out file written")
    n_pool: int = opt(600, "problems in the pool", parse=integer(1, MAX_PROBLEMS))
    n_heldout: int = opt(100, "problems in the held-out set", parse=integer(1, MAX_PROBLEMS))
    seed: int = opt(0, "the pool's seed (the held-out set's is seed + 1)", lo=0, hi=2**32 - 1, parse=SEED)


def main(argv: list[str] | None = None) -> int:
    args = ArithmeticOptions.parse(argv, prog="cut.tasks.arithmetic")

    def body() -> None:
        made = generate(args.seed, args.n_pool, args.n_heldout)
        pool, heldout = made["pool"], made["heldout"]
        write_json_atomic(args.heldout, heldout)
        write_json_atomic(args.pool, pool)
        print(f"wrote {len(pool)} pool problems to {args.pool}, {len(heldout)} held-out to {args.heldout}")

    return run_cli("cut.tasks.arithmetic", body)


if __name__ == "__main__":
    sys.exit(main())
