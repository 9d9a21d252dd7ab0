"""The training objectives of the online loop, one declaration each.

An objective says what a round trains on and how: which module the train stage runs (`recipe`:
cut.train, or a preference recipe such as cut.baselines.dpo), which train settings it implies
(hindsight: misalign false), which records of the judged round it keeps (`records`; None: every
judged answer) and whether the round rewrites failing answers first (`refines`, ILF). An objective
with a `base` is a variant of that one: the loop runs the base with `train` (and `loop`) settings on
top; `cut compare` runs one loop per objective. A new objective is one `Objective(...)` here (or in
its own file) plus its line in OBJECTIVES:

    OBJECTIVES["cut_x"] = Objective(base="cut", train={"weight_unlike": 2.0})

The loop's `objective:` setting takes the objectives without a base (`loop_objectives()`); the
variants keep their base's name there, so a variant's round fingerprint is its base's with the
variant's train settings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from cut.errors import DataError

# (the round's judged records, failed judgments left out; the kept ILF rewrites or None)
#     -> (the training records, counts to update); DataError when nothing is left to train on
Records = Callable[[list[dict], "list[dict] | None"], tuple[list[dict], dict[str, Any]]]

TRAIN_RECIPE = "cut.train"

# forward prediction (Weston 2016; a baseline of the CUT paper): the model learns to produce the
# judgment of an answer; our own wording
CRITIQUE_PROMPT = (
    "{instruction}{input}\n\nAn answer to this request was:\n{output}\n\n"
    "Judge the answer: say what is wrong with it, or that it is perfect."
)
PERFECT = "The answer is perfect."


def critique_records(rows: list[dict]) -> list[dict]:
    """One record per judged answer whose response is its judgment (PERFECT for a positive)."""
    return [
        {
            "instruction": CRITIQUE_PROMPT.format(
                instruction=r["instruction"],
                input=f"\n\n{r['input']}" if r.get("input") else "",
                output=r["output"],
            ),
            "input": "",
            "output": r["judgment"] if r.get("judgment") is not None else PERFECT,
            "judgment": None,
        }
        for r in rows
    ]


def positives(rows: list[dict], rewrites: list[dict] | None) -> tuple[list[dict], dict[str, Any]]:
    """The passing answers (and, for ILF, the rewrites that passed), trained by MLE."""
    keep = [r for r in rows if r.get("judgment") is None] + list(rewrites or [])
    counts: dict[str, Any] = {"train_records": len(keep), "train_negatives": 0}
    if rewrites is not None:
        counts["train_rewrites"] = len(rewrites)
    if not keep:
        raise DataError("no positive response this round")
    return keep, counts


def positives_and_critiques(
    rows: list[dict], rewrites: list[dict] | None
) -> tuple[list[dict], dict[str, Any]]:
    """Forward prediction: the positives by MLE, and every judgment predicted from its answer."""
    pos = [r for r in rows if r.get("judgment") is None]
    keep = pos + critique_records(rows)
    return keep, {"train_records": len(keep), "train_negatives": 0, "train_critiques": len(keep) - len(pos)}


@dataclass(frozen=True)
class Objective:
    """One objective: how a round trains (a base objective), or a base with settings on top (a variant)."""

    base: str | None = None  # a variant: the loop objective it runs (its `objective:` setting)
    train: Mapping[str, Any] = field(default_factory=dict)  # a variant's train settings over the config's
    loop: Mapping[str, Any] = field(default_factory=dict)  # a variant's loop settings (positive_share ...)
    recipe: str = TRAIN_RECIPE  # the module the train stage runs with --config train_config.yaml
    implied: Mapping[str, Any] = field(default_factory=dict)  # train settings the objective sets itself
    records: Records | None = None  # the round's training records; None: every judged answer
    refines: bool = False  # ILF: a refine stage rewrites failing answers before the build

    @property
    def preference(self) -> bool:
        """Trained by a recipe of its own (DPO, KTO) whose settings are its own train keys."""
        return self.recipe != TRAIN_RECIPE


OBJECTIVES: dict[str, Objective] = {
    "cut": Objective(),  # the paper's objective: the config's train section as it is
    "cut_spans": Objective(base="cut", train={"flag_source": "spans"}),  # UL on the judge's marked text
    "sft": Objective(records=positives),  # MLE on the positives (rejection-sampling fine-tuning)
    "hindsight": Objective(implied={"misalign": False}),  # Align-P + Align-N, no Misalign-N
    "dpo": Objective(recipe="cut.baselines.dpo"),  # TRL's DPOTrainer on (passing, failing) pairs
    "kto": Objective(recipe="cut.baselines.kto"),  # TRL's KTOTrainer on every answer, unpaired
    # the model rewrites failing answers given the judgment; passing rewrites by MLE
    "ilf": Objective(records=positives, refines=True),
    # forward prediction: positives by MLE + the model learns to write the judgment
    "forward": Objective(records=positives_and_critiques),
    # judgment-using objectives with no MLE on failing text (issue 20)
    "cut_npo": Objective(  # positives by MLE; span tokens of negatives pushed below the round's start model
        base="cut",
        train={"flag_source": "spans", "unlikelihood": "npo", "weight_unflagged": 0, "weight_align_n": 0},
    ),
    "span_dpo": Objective(base="dpo", train={"rejected_tokens": "spans"}),  # DPO counting the span tokens
    "span_kto": Objective(base="kto", train={"rejected_tokens": "spans"}),  # KTO counting the span tokens
}


def loop_objectives() -> tuple[str, ...]:
    """The names the loop's `objective:` setting takes: the objectives that are no variant."""
    return tuple(name for name, o in OBJECTIVES.items() if o.base is None)


def get(name: str) -> Objective:
    """The loop objective `name` (a variant resolves to its base)."""
    obj = OBJECTIVES[name]
    return OBJECTIVES[obj.base] if obj.base is not None else obj


def variant(name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(the loop objective, train settings, loop settings) that run objective `name`."""
    obj = OBJECTIVES[name]
    return obj.base or name, dict(obj.train), dict(obj.loop)


def variants() -> dict[str, tuple[str, dict[str, Any], dict[str, Any]]]:
    """Every objective as `cut compare` runs it (name -> variant(name)), in declaration order."""
    return {name: variant(name) for name in OBJECTIVES}


def recipe_keys(objective: str) -> tuple[str, ...]:
    """The YAML keys a preference recipe adds to the train section (dpo_beta, rejected_tokens, ...)."""
    obj = OBJECTIVES.get(objective)
    if obj is None or obj.base is not None or not obj.preference:
        return ()
    return tuple(import_module(obj.recipe).YAML_KEYS)


def all_recipe_keys() -> frozenset[str]:
    """Every preference recipe's own train keys: never inherited by a variant from the base config."""
    return frozenset(k for name in loop_objectives() for k in recipe_keys(name))
