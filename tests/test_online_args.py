"""The loop tools' and task commands' flags: Options classes with the flags and defaults they had."""

from __future__ import annotations

import pytest

from cut.loop.compare import VARIANTS, CompareArgs
from cut.loop.iterate import IterateArgs
from cut.loop.online import OnlineArgs
from cut.loop.tune import TuneArgs
from cut.tasks.arithmetic import ArithmeticOptions
from cut.tasks.instructions import InstructionsOptions


def test_loop_flags_override_the_config_they_name(tmp_path):
    (tmp_path / "c.yaml").write_text("base_model: m\n")  # read by the tool itself, not by the flags
    c = str(tmp_path / "c.yaml")
    args = OnlineArgs.parse(["--config", c, "--rounds", "3", "--base_model", "b"], prog="cut.online")
    assert (args.config, args.rounds, args.base_model, args.output_dir) == (c, 3, "b", None)
    args = CompareArgs.parse(["--config", c, "--report_only"], prog="cut.compare")
    assert args.objectives == ",".join(VARIANTS) and args.report_only is True and args.rounds is None
    args = TuneArgs.parse(["--config", c, "--trials", "t.yaml"], prog="cut.tune")
    assert (args.trials, args.output_dir, args.report_only) == ("t.yaml", None, False)
    args = IterateArgs.parse(["--config", c, "--nproc_per_node", "2", "--dry_run"], prog="cut.iterate")
    assert (args.nproc_per_node, args.dry_run, args.base_model) == (2, True, None)


@pytest.mark.parametrize(
    "cls, argv, message",
    [
        (OnlineArgs, [], "the following arguments are required: --config"),
        (
            OnlineArgs,
            ["--config", "c.yaml", "--rounds", "0"],
            "argument --rounds: must be in [1, 2147483647]",
        ),
        (CompareArgs, ["--config", "c.yaml", "--rounds", "x"], "argument --rounds: must be a whole number"),
        (TuneArgs, ["--config", "c.yaml"], "missing required option(s): --trials"),
        (IterateArgs, ["--config", "c.yaml", "--nproc_per_node", "5000"], "must be in [1, 4096]"),
        (ArithmeticOptions, ["--n_pool", "0"], "argument --n_pool: must be in [1, 100000]"),
        (InstructionsOptions, ["--seed", "-1"], "argument --seed: must be in [0, 4294967295]"),
    ],
)
def test_bad_flags_are_one_line_exit_2(tmp_path, monkeypatch, capsys, cls, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("{}\n")
    with pytest.raises(SystemExit) as exc:
        cls.parse(argv, prog="cut.x")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1, err


def test_task_commands_keep_their_defaults():
    a = ArithmeticOptions.parse([], prog="cut.tasks.arithmetic")
    assert (a.pool, a.heldout, a.n_pool, a.n_heldout, a.seed) == (
        "data/arithmetic_pool.json", "data/arithmetic_heldout.json", 600, 100, 0,
    )  # fmt: skip
    i = InstructionsOptions.parse(["--check", "--seed", "4294967295"], prog="cut.tasks.instructions")
    assert (i.out, i.seed, i.check_only) == ("data", 2**32 - 1, True)
