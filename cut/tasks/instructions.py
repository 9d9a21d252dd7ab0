"""Verifiable-instruction prompts: a base task plus 1-3 constraints a rule can check, and IFEval's scores.

    python -m cut.tasks.instructions [--out data] [--seed 0] [--check]

writes data/instructions_pool.json (2,000 prompts on `base_tasks.TRAIN`) and
data/instructions_heldout.json (320 on `base_tasks.HELDOUT`, whose subjects and constraint wordings
the pool never sees). A record is {id, instruction, input, constraints: [{type, params}, ...]}.
A repeat_request constraint's `request` is the base task's text, which starts the instruction: a
response that repeats the base task, or the whole instruction less that sentence, passes.
`score` judges outputs with `constraints.check` and reports IFEval's four accuracies (prompt /
instruction level, strict / loose) plus per-type and per-prompt results.
"""

from __future__ import annotations

import random
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cut.args import SEED, Options, opt, run_cli
from cut.data.files import write_json_atomic
from cut.data.records import check_object, read_raw, text_field
from cut.errors import DataError
from cut.tasks import constraints
from cut.tasks.base_tasks import HELDOUT, TRAIN
from cut.tasks.task import Task

N_CONSTRAINTS = (1, 2, 3)
N_WEIGHTS = (0.45, 0.35, 0.20)
SLACK = 2  # a type may be picked while its count is within SLACK of the rarest candidate's
FILES = {"train": "instructions_pool.json", "heldout": "instructions_heldout.json"}


def _pick_types(rng: random.Random, k: int, counts: Counter) -> list[str]:
    """k mutually compatible types, each drawn among the least used so far (keeps types balanced)."""
    chosen: list[str] = []
    for _ in range(k):
        candidates = [
            t for t in constraints.TYPES if t not in chosen and constraints.compatible([*chosen, t])
        ]
        if not candidates:  # nothing fits beside what is chosen: settle for fewer constraints
            break
        low = min(counts[t] for t in candidates)
        chosen.append(rng.choice([t for t in candidates if counts[t] <= low + SLACK]))
    return chosen


def compose(n: int, split: str, seed: int) -> list[dict[str, Any]]:
    """n distinct prompts on the split's base tasks, each with 1-3 compatible constraints; seeded."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    tasks = TRAIN if split == "train" else HELDOUT
    rng = random.Random(f"instructions-{split}-{seed}")
    counts: Counter = Counter()
    seen: set[tuple[str, str]] = set()
    order: list[dict] = []
    out: list[dict[str, Any]] = []
    while len(out) < n:
        if not order:  # every base task once per pass, so each is used about n / len(tasks) times
            order = list(tasks)
            rng.shuffle(order)
        base = order.pop()
        k = rng.choices(N_CONSTRAINTS, weights=N_WEIGHTS)[0]
        types = _pick_types(rng, k, counts)
        cons = [{"type": t, "params": constraints.TYPES[t].sample(rng)} for t in types]
        for c in cons:  # the request to repeat is this prompt's own task, not a sampled stand-in
            if c["type"] == "repeat_request":
                c["params"]["request"] = base["task"]
        sentences = [constraints.TYPES[c["type"]].describe(c["params"], rng, split) for c in cons]
        instruction = " ".join([base["task"], *sentences])
        if (instruction, base["input"]) in seen:
            continue
        seen.add((instruction, base["input"]))
        counts.update(types)
        out.append(
            {
                "id": f"{split}-{len(out) + 1:05d}",
                "instruction": instruction,
                "input": base["input"],
                "constraints": cons,
            }
        )
    return out


def make_pool(seed: int = 0) -> list[dict[str, Any]]:
    return compose(2000, "train", seed)


def make_heldout(seed: int = 0) -> list[dict[str, Any]]:
    return compose(320, "heldout", seed)


def type_counts(records: Sequence[dict]) -> dict[str, int]:
    """How many prompts carry each constraint type, every type listed (0 if absent)."""
    counts = Counter(c["type"] for r in records for c in r["constraints"])
    return {t: counts[t] for t in sorted(constraints.TYPES)}


def score(records: Sequence[dict], outputs: Sequence[str]) -> dict[str, Any]:
    """IFEval's accuracies: a prompt counts if all its constraints hold, an instruction on its own."""
    if len(records) != len(outputs):
        raise ValueError(f"{len(records)} records but {len(outputs)} outputs")
    if not records:
        raise ValueError("no records to score")
    per_prompt = []
    per_type: dict[str, Counter] = {}
    for rec, output in zip(records, outputs, strict=True):
        results = []
        for c in rec["constraints"]:
            strict = constraints.check(output or "", c)
            loose = constraints.check(output or "", c, loose=True)
            results.append({"type": c["type"], "strict": strict, "loose": loose})
            per_type.setdefault(c["type"], Counter()).update(strict=strict, loose=loose, n=1)
        per_prompt.append(
            {
                "strict": all(r["strict"] for r in results),
                "loose": all(r["loose"] for r in results),
                "constraints": results,
            }
        )
    flat = [r for p in per_prompt for r in p["constraints"]]
    return {
        "prompt_level_strict": sum(p["strict"] for p in per_prompt) / len(per_prompt),
        "prompt_level_loose": sum(p["loose"] for p in per_prompt) / len(per_prompt),
        "instruction_level_strict": sum(r["strict"] for r in flat) / len(flat),
        "instruction_level_loose": sum(r["loose"] for r in flat) / len(flat),
        "per_type": {
            t: {"strict": c["strict"] / c["n"], "loose": c["loose"] / c["n"], "n": c["n"]}
            for t, c in sorted(per_type.items())
        },
        "per_prompt": per_prompt,
    }


def read_task_file(path: str | Path) -> list[dict[str, Any]]:
    """A pool / held-out file, every record checked; errors name the file, record and field."""
    rows, source = read_raw(str(path))
    out = []
    for i, raw in enumerate(rows):
        check_object(source, i, raw)
        where = f"{source}: record {i}, field 'constraints'"
        cons = raw.get("constraints")
        if not isinstance(cons, list) or not cons:
            got = "missing" if cons is None else f"expected a non-empty list, got {cons!r:.60}"
            raise DataError(f"{where}: {got}")
        cons = [constraints.validate(c, where) for c in cons]
        if not constraints.compatible([c["type"] for c in cons]):
            raise DataError(f"{where}: types that conflict: {', '.join(c['type'] for c in cons)}")
        out.append(
            {
                **raw,
                "instruction": text_field(source, i, raw, "instruction", True),
                "input": text_field(source, i, raw, "input", False) or "",
                "constraints": cons,
            }
        )
    if not out:
        raise DataError(f"{source}: no records")
    return out


def generate(seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The pool and the held-out set (disjoint base tasks)."""
    return {"pool": make_pool(seed), "heldout": make_heldout(seed)}


def check_heldout_record(record: dict, source: str, i: int) -> dict:
    """A held-out prompt needs a non-empty list of valid `constraints` (normalised in place)."""
    where = f"{source}: record {i}, field 'constraints'"
    if not isinstance(record.get("constraints"), list) or not record["constraints"]:
        raise DataError(f"{where}: missing or not a non-empty list")
    record["constraints"] = [constraints.validate(c, where) for c in record["constraints"]]
    return record


def score_prompts(records: Sequence[dict], outputs: Sequence[str]) -> tuple[list[bool], dict[str, Any]]:
    """Per prompt: every constraint holds strictly; and IFEval's figures (`score` less per_prompt)."""
    figures = score(records, outputs)
    per_prompt = figures.pop("per_prompt")
    return [p["strict"] for p in per_prompt], figures


TASK = Task(
    generate=generate,
    judge="verifier",
    check=check_heldout_record,
    score=score_prompts,
    keep=("constraints",),
)


def write(out: str | Path, seed: int) -> dict[str, list[dict]]:
    """Write both files under `out`; returns the records by split."""
    made = {"train": make_pool(seed), "heldout": make_heldout(seed)}
    for split, records in made.items():
        write_json_atomic(Path(out) / FILES[split], records)
    return made


@dataclass
class InstructionsOptions(Options):
    """Write the verifiable-instruction pool and held-out set (or --check the shipped ones)."""

    out: str = opt("data", "folder for instructions_pool.json / _heldout.json")
    seed: int = opt(0, "the seed of both files", lo=0, hi=2**32 - 1, parse=SEED)
    # (a field named `check` would hide Options.check: the flag is --check all the same)
    check_only: bool = opt(False, "exit 1 if the files in --out differ from a rerun", flags=("--check",))


def main(argv: list[str] | None = None) -> int:
    args = InstructionsOptions.parse(argv, prog="cut.tasks.instructions")
    return run_cli("cut.tasks.instructions", lambda: write_or_check(args))


def write_or_check(args: InstructionsOptions) -> int:
    """Write both files (and print the type counts), or with --check compare them with a rerun."""
    if args.check_only:
        with tempfile.TemporaryDirectory() as tmp:  # same writer, so the bytes compare exactly
            write(tmp, args.seed)
            stale = [
                name
                for name in FILES.values()
                if not (Path(args.out) / name).is_file()
                or (Path(args.out) / name).read_bytes() != (Path(tmp) / name).read_bytes()
            ]
        for name in stale:
            print(f"{Path(args.out) / name}: differs from a regeneration with --seed {args.seed}")
        if not stale:
            print(f"{', '.join(FILES.values())} in {args.out} match a regeneration")
        return 1 if stale else 0
    made = write(args.out, args.seed)
    pool, held = type_counts(made["train"]), type_counts(made["heldout"])
    width = max(map(len, pool))
    print(f"{'type':<{width}}  {'pool':>5}  {'heldout':>7}")
    for t in pool:
        print(f"{t:<{width}}  {pool[t]:>5}  {held[t]:>7}")
    print(
        f"wrote {len(made['train'])} prompts to {Path(args.out) / FILES['train']}, "
        f"{len(made['heldout'])} to {Path(args.out) / FILES['heldout']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
