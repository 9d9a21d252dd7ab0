"""Try training knobs on a validation split of the pool, never on the held-out set.

    python -m cut.tune --config configs/online_instructions.yaml --trials configs/tune_instructions.yaml

The validation split is the last `validation_size` instructions of the pool's seeded permutation:
the online rounds take their slices from its front (`cut.online.sample_instructions`), and a config
whose rounds would reach the split is refused. Every trial is one round of the online loop from the
config's base model on the same round-1 samples (sampled once, by the first trial, and copied as
`cut compare` does), trained with the trial's objective and train overrides, and scored on the
validation split instead of the held-out set. Trials run one after another; rerunning resumes.
Writes output_dir/validation.json and output_dir/comparison.{json,md,png} (cut.compare's report:
validation scores per trial, exact McNemar against the start and against a trial named sft).

A trials file:

    output_dir: saved_models/tune_instructions
    validation_size: 160
    trials:
      cut: {}                                        # the config's objective and train section
      cut_no_unflagged: {train: {weight_unflagged: 0}}
      sft: {objective: sft}
      cut_half_positive: {positive_share: 0.5}       # a loop setting: negatives down-sampled to half
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import sys
from pathlib import Path
from typing import Any

from cut.args import INT_MAX, opt, run_cli
from cut.data.files import check_writable, write_json_atomic
from cut.errors import ConfigError
from cut.loop.config import LoopArgs, read_config
from cut.loop.objectives import loop_objectives
from cut.loop.online import OnlineConfig, load_config, read_problems

logger = logging.getLogger("cut.loop.tune")

LOOP_SETTINGS = ("positive_share", "refine_tries")  # loop settings a trial may set beside its train section
# a trial's name is its folder's: a plain name, never a path (no separator, no '..', not hidden)
TRIAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def validation_split(pool: list[dict], size: int, seed: int, reserved: int) -> list[dict]:
    """The last `size` instructions of the permutation `sample_instructions` slices from the front;
    `reserved` = how many the online rounds take (refused when they would reach the split)."""
    if size < 1:
        raise ConfigError(f"validation_size must be >= 1, got {size}")
    if reserved + size > len(pool):
        raise ConfigError(
            f"the pool has {len(pool)} instructions: the rounds take {reserved} from the front, so a "
            f"validation split of {size} from the back would overlap them"
        )
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[i] for i in order[len(pool) - size :]]


def read_trials(path: str) -> dict[str, Any]:
    """The trials file, every value checked: ConfigError names the file (and the trial)."""
    shape = "a trials file is a mapping with output_dir, validation_size, trials"
    data = read_config(path, ("output_dir", "validation_size", "trials"), "trials", shape)
    output_dir = data.get("output_dir") or ""
    if not isinstance(output_dir, str):
        raise ConfigError(f"{path}: output_dir must be a folder name, got {output_dir!r}")
    size = data.get("validation_size", 160)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= INT_MAX:
        raise ConfigError(f"{path}: validation_size must be a whole number in [1, {INT_MAX}], got {size!r}")
    trials = data.get("trials")
    if not isinstance(trials, dict) or not trials:
        raise ConfigError(f"{path}: 'trials' must be a non-empty mapping of name -> settings")
    for name, spec in trials.items():
        spec = spec or {}
        where = f"{path}: trial {name!r}"
        if not isinstance(name, str) or not TRIAL_NAME.match(name):
            raise ConfigError(
                f"{where}: a trial name is its folder's name: up to 64 letters, digits, '_' and '-', "
                "starting with a letter or digit"
            )
        if not isinstance(spec, dict) or set(spec) - {"objective", "train", *LOOP_SETTINGS}:
            raise ConfigError(
                f"{where}: settings are 'objective', 'train', {', '.join(map(repr, LOOP_SETTINGS))} only"
            )
        if spec.get("objective", "cut") not in loop_objectives():
            raise ConfigError(f"{where}: objective must be one of {', '.join(loop_objectives())}")
        if not isinstance(spec.get("train", {}), dict):
            raise ConfigError(f"{where}: 'train' must be a mapping of train options")
        trials[name] = spec
    return {"output_dir": output_dir, "validation_size": size, "trials": trials}


def prepare(
    config: str, trials_path: str, output_dir: str | None = None, write: bool = True
) -> tuple[OnlineConfig, dict[str, tuple[str, dict[str, Any]]]]:
    """The base config of the trials (one round, scored on the validation split) and the variants;
    every trial's settings are checked as a whole online config before anything runs. Writes the
    split into output_dir (write False: nothing, for a report of the runs there)."""
    spec = read_trials(trials_path)
    main_cfg = load_config(config, {})
    root = Path(output_dir or spec["output_dir"] or Path(main_cfg.output_dir).with_name("tune"))
    check_writable(root, "output_dir")
    if main_cfg.task != "instructions":
        raise ConfigError(f"{config}: cut.tune scores the instructions task only, not {main_cfg.task!r}")
    pool, _ = read_problems(main_cfg)
    reserved = main_cfg.rounds * main_cfg.instructions_per_round
    val = validation_split(pool, spec["validation_size"], main_cfg.seed, reserved)
    val_path = root / "validation.json"
    base = dataclasses.replace(main_cfg, output_dir=str(root), heldout=str(val_path), rounds=1)
    variants = {
        name: (
            s.get("objective", main_cfg.objective),
            dict(s.get("train", {})),
            {k: s[k] for k in LOOP_SETTINGS if k in s},
        )
        for name, s in spec["trials"].items()
    }
    from cut.loop.compare import variant_config

    for name in variants:  # a bad train option fails here, before the first trial trains
        try:
            cfg = variant_config(base, name, variants)
            cfg.validate()
        except ConfigError as err:
            raise ConfigError(f"{trials_path}: trial {name!r}: {err}") from None
    if not write:
        return base, variants
    root.mkdir(parents=True, exist_ok=True)  # only once every trial is valid
    write_json_atomic(val_path, val)
    logger.info(
        "validation split: %d of %d pool instructions (the rounds use the first %d of the permutation)",
        len(val),
        len(pool),
        reserved,
    )
    return base, variants


@dataclasses.dataclass
class TuneArgs(LoopArgs):
    """Try training knobs on a validation split of the pool, never on the held-out set."""

    trials: str = opt("", "YAML: output_dir, validation_size, trials", required=True)
    output_dir: str | None = opt(None, "override the trials file's output_dir")
    report_only: bool = opt(False, "rewrite the table and chart from the runs")


def main(argv: list[str] | None = None) -> int:
    args = TuneArgs.parse(argv, prog="cut.tune")

    def body() -> None:
        from cut.loop.compare import run_or_report

        base, variants = prepare(args.config, args.trials, args.output_dir, write=not args.report_only)
        run_or_report(base, list(variants), variants, "validation", args.report_only)

    return run_cli("cut.tune", body)


if __name__ == "__main__":
    sys.exit(main())
