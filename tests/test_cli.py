"""The `cut` console script: subcommands reach each tool's own main."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cut import cli

CUT = Path(sys.executable).with_name("cut")


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_subcommand_help_is_the_tools_own(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    assert "--" in capsys.readouterr().out  # the tool's own options


@pytest.mark.parametrize("missing", ["base_model", "data_path"])
def test_train_errors_like_python_m(tiny_model, tiny_data, tmp_path, missing):
    """`cut train` and `python -m cut.train` give the same named error and exit status."""
    paths = {"base_model": str(tiny_model), "data_path": str(tiny_data)}
    paths[missing] = str(tmp_path / "missing.json")
    args = [f"--{k}={v}" for k, v in paths.items()] + [f"--output_dir={tmp_path / 'out'}"]
    a = subprocess.run([str(CUT), "train", *args], capture_output=True, text=True)
    b = subprocess.run([sys.executable, "-m", "cut.train", *args], capture_output=True, text=True)
    assert a.returncode == b.returncode == 2
    assert a.stderr.strip().splitlines()[-1] == b.stderr.strip().splitlines()[-1]
    assert "missing.json" in a.stderr
