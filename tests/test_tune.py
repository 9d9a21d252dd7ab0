"""cut.tune: knob trials on a validation split of the pool that the online rounds never reach."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cut.errors import ConfigError
from cut.loop.online import sample_instructions
from cut.loop.tune import main, prepare, validation_split

from conftest import REPO
from helpers import letter_pool, write_online_config

POOL = letter_pool("etaoinsrhldcumfp")


def write_config(tmp: Path, model: str, rounds: int = 1, per_round: int = 8) -> Path:
    loop = {"rounds": rounds, "instructions_per_round": per_round, "samples_per_instruction": 2, "seed": 3}
    return write_online_config(tmp, model, POOL, verifier=True, generate_with={"batch_size": 16}, **loop)


def write_trials(tmp: Path, trials: dict, size: int = 6) -> Path:
    path = tmp / "trials.yaml"
    path.write_text(
        yaml.safe_dump({"output_dir": str(tmp / "tune"), "validation_size": size, "trials": trials})
    )
    return path


def test_validation_split_is_the_tail_the_rounds_never_reach():
    pool = [{"instruction": f"task {i}"} for i in range(100)]
    val = validation_split(pool, 20, seed=7, reserved=3 * 16)
    assert len(val) == 20 and len({v["instruction"] for v in val}) == 20
    rounds = [r["instruction"] for k in (1, 2, 3) for r in sample_instructions(pool, 16, k, 7)]
    assert not set(rounds) & {v["instruction"] for v in val}
    # the rounds that remain possible up to the split stay outside it; the next one would overlap
    last = [r["instruction"] for r in sample_instructions(pool, 16, 5, 7)]  # instructions 64..79
    assert not set(last) & {v["instruction"] for v in val}
    assert validation_split(pool, 20, seed=7, reserved=48) == val  # deterministic
    assert validation_split(pool, 20, seed=8, reserved=48) != val  # the seed's own permutation
    with pytest.raises(ConfigError, match="overlap"):
        validation_split(pool, 20, seed=7, reserved=81)
    with pytest.raises(ConfigError, match=">= 1"):
        validation_split(pool, 0, seed=7, reserved=0)


@pytest.mark.parametrize(
    "trials, message",
    [
        ({}, "non-empty mapping"),
        ({"x": {"objective": "ppo"}}, "objective must be one of"),
        ({"x": {"lr": 1}}, "'objective', 'train', 'positive_share', 'refine_tries' only"),
        ({"x": {"positive_share": 2}}, "trial 'x'.*positive_share must be a number in"),
        ({"x": {"train": {"weight_unflaged": 0}}}, "trial 'x'.*weight_unflaged"),
        ({"x": {"train": {"weight_unflagged": -1}}}, "trial 'x'.*weight_unflagged must be >= 0"),
    ],
)
def test_bad_trials_are_refused_before_any_work(tmp_path, trials, message):
    cfg = write_config(tmp_path, "unused-model")
    with pytest.raises(ConfigError, match=message):
        prepare(str(cfg), str(write_trials(tmp_path, trials)))
    assert not (tmp_path / "tune").exists()  # nothing written: not even the validation split


def test_a_split_the_rounds_would_reach_is_refused(tmp_path, capsys):
    cfg = write_config(tmp_path, "unused-model", rounds=2, per_round=6)  # 12 of 16; 6 more do not fit
    assert main(["--config", str(cfg), "--trials", str(write_trials(tmp_path, {"cut": {}}))]) == 2
    assert "overlap" in capsys.readouterr().err


def run_tune(cfg: Path, trials: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "cut.tune", "--config", str(cfg), "--trials", str(trials)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_trials_train_on_the_same_samples_and_are_scored_on_validation(tiny_model, tmp_path):
    cfg = write_config(tmp_path, str(tiny_model))
    trials = write_trials(
        tmp_path,
        {"cut": {}, "cut_no_unflagged": {"train": {"weight_unflagged": 0}, "positive_share": 0.5}},
    )
    proc = run_tune(cfg, trials)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = tmp_path / "tune"
    val = json.loads((root / "validation.json").read_text())
    assert len(val) == 6
    sampled = {
        r["instruction"] for r in json.loads((root / "cut" / "round_1" / "responses.json").read_text())
    }
    assert len(sampled) == 8 and not sampled & {v["instruction"] for v in val}
    for rel in ("round_0/eval.json", "round_1/responses.json", "round_1/judged.json"):
        assert (root / "cut_no_unflagged" / rel).read_bytes() == (root / "cut" / rel).read_bytes(), rel
    conf = yaml.safe_load((root / "cut_no_unflagged" / "round_1" / "train_config.yaml").read_text())
    assert conf["weight_unflagged"] == 0
    # positive_share 0.5: the trial trains every positive and as many negatives (or fewer)
    full = json.loads((root / "cut" / "round_1" / "train.json").read_text())
    half = json.loads((root / "cut_no_unflagged" / "round_1" / "train.json").read_text())
    pos = [r for r in full if r["judgment"] is None]
    assert pos and [r for r in half if r["judgment"] is None] == pos
    assert len(half) - len(pos) == min(len(pos), len(full) - len(pos))
    for name in ("cut", "cut_no_unflagged"):
        ev = json.loads((root / name / "round_1" / "eval.json").read_text())
        assert [a["instruction"] for a in ev["answers"]] == [v["instruction"] for v in val]
    report = json.loads((root / "comparison.json").read_text())
    assert report["split"] == "validation" and set(report["objectives"]) == {"cut", "cut_no_unflagged"}
    assert "validation prompts passing" in (root / "comparison.md").read_text()
    # the run is resumable: a rerun finds every stage done and trains nothing
    again = run_tune(cfg, trials)
    assert again.returncode == 0 and "cut.train" not in again.stderr
