"""cut.compare with a tiny model: every objective on identical round-1 samples, one report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cut.loop.compare import VARIANTS, markdown
from cut.tasks.instructions import make_heldout

from conftest import REPO
from helpers import letter_pool, write_online_config

pytestmark = pytest.mark.slow

# letters a short random answer sometimes has twice and sometimes not: positives, negatives and
# prompts with both (DPO pairs) from a tiny random model
POOL = letter_pool("etaoinsrhl")


def config(tmp: Path, tiny_model: Path) -> Path:
    loop = {"rounds": 1, "instructions_per_round": 10, "samples_per_instruction": 4, "seed": 0}
    heldout = make_heldout()[:6]
    return write_online_config(
        tmp,
        tiny_model,
        POOL,
        heldout,
        verifier=True,
        output_dir=str(tmp / "cmp"),
        generate_with={"batch_size": 20},
        **loop,
    )


def test_every_objective_trains_on_the_same_samples_and_is_reported(tiny_model, tmp_path):
    cfg = config(tmp_path, tiny_model)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "cut.compare", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = tmp_path / "cmp"
    names = list(VARIANTS)
    # identical inputs: round 0's evaluation and round 1's samples
    for name in names[1:]:
        for rel in ("round_0/eval.json", "round_1/responses.json", "round_1/judged.json"):
            assert (root / name / rel).read_bytes() == (root / names[0] / rel).read_bytes(), (name, rel)
    judged = json.loads((root / "cut" / "round_1" / "judged.json").read_text())
    pos = [r for r in judged if r["judgment"] is None]
    assert len(judged) == 40 and 0 < len(pos) < 40, "the fixture must give positives and negatives"
    # what each objective trained on
    train = {n: json.loads((root / n / "round_1" / "train.json").read_text()) for n in names}
    assert all(r["judgment"] is None for r in train["sft"]) and len(train["sft"]) == len(pos)
    assert len(train["cut"]) == len(train["hindsight"]) == len(train["cut_spans"]) == 40
    hind = yaml.safe_load((root / "hindsight" / "round_1" / "train_config.yaml").read_text())
    assert hind["misalign"] is False
    spans = yaml.safe_load((root / "cut_spans" / "round_1" / "train_config.yaml").read_text())
    assert spans["flag_source"] == "spans"
    # ilf trains the positives plus the rewrites the judge passed, at most one per failing answer
    ilf = root / "ilf" / "round_1"
    refined = json.loads((ilf / "refined.json").read_text())
    judged_rewrites = json.loads((ilf / "refine_judged.json").read_text())
    requests = json.loads((ilf / "refine_requests.json").read_text())
    assert len(requests) == 4 * (40 - len(pos)) and all(
        "Feedback on that answer" in r["instruction"] for r in requests
    )
    passed = [r for r in judged_rewrites if r["judgment"] is None]
    assert refined and len(refined) == len({r["origin"] for r in passed}) <= len(passed)
    assert all(r["judgment"] is None for r in refined)
    assert train["ilf"] == train["sft"] + refined
    manifest = json.loads((ilf / "manifest.json").read_text())
    assert manifest["counts"]["train_rewrites"] == len(refined) == manifest["counts"]["refine_kept"]
    # span variants and kto
    for n in ("span_dpo", "span_kto"):
        assert (
            json.loads((root / n / "round_1" / "adapter" / "metrics.json").read_text())["rejected_tokens"]
            == "spans"
        )
    kto = json.loads((root / "kto" / "round_1" / "adapter" / "metrics.json").read_text())
    assert kto["objective"] == "kto" and kto["counts"]["train_desirable"] == len(pos)
    npo = yaml.safe_load((root / "cut_npo" / "round_1" / "train_config.yaml").read_text())
    assert npo["unlikelihood"] == "npo" and npo["weight_align_n"] == 0
    dpo = json.loads((root / "dpo" / "round_1" / "adapter" / "metrics.json").read_text())
    assert dpo["objective"] == "dpo" and dpo["counts"]["pairs"] > 0
    for n in names:  # every objective took the same number of optimiser steps
        m = json.loads((root / n / "round_1" / "adapter" / "metrics.json").read_text())
        assert max(h.get("step", 0) for h in m["log_history"]) == 2, n
    # the report
    report = json.loads((root / "comparison.json").read_text())
    assert set(report["objectives"]) == set(names)
    start = json.loads((root / "cut" / "round_0" / "eval.json").read_text())
    for n in names:
        row = report["objectives"][n]["rounds"][0]
        ev = json.loads((root / n / "round_1" / "eval.json").read_text())
        assert row["accuracy"] == ev["accuracy"] == ev["prompt_level_strict"]
        gained = sum(
            a["correct"] and not b["correct"] for a, b in zip(ev["answers"], start["answers"], strict=True)
        )
        assert row["vs_start"]["only_a"] == gained and 0 <= row["vs_start"]["p_value"] <= 1
        assert ("vs_sft" in row) == (n != "sft") and ("vs_dpo" in row) == (n != "dpo")
        assert row["mean_length"] == sum(len(a["output"]) for a in ev["answers"]) / len(ev["answers"])
        assert row["per_type"] == {t: v["strict"] for t, v in ev["per_type"].items()}
    assert (root / "comparison.png").stat().st_size > 1000
    table = (root / "comparison.md").read_text()
    assert table == markdown(report) and all(f"| {n} |" in table for n in names)


def test_unknown_objective_is_refused(tiny_model, tmp_path, capsys):
    from cut.loop.compare import main

    assert main(["--config", str(config(tmp_path, tiny_model)), "--objectives", "cut,ppo"]) == 2
    assert "ppo" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_variants_take_their_own_recipe_settings(tiny_model, tmp_path):
    """A base config that runs span DPO (the shipped default) still compares plain `dpo`, and a
    CUT variant never inherits a DPO option it would refuse."""
    from cut.loop.compare import variant_config
    from cut.loop.online import load_config

    path = config(tmp_path, tiny_model)
    conf = yaml.safe_load(path.read_text())
    conf["objective"] = "dpo"
    conf["train"].update(rejected_tokens="spans", dpo_beta=0.2)
    path.write_text(yaml.safe_dump(conf))
    base = load_config(str(path), {})
    variants = {name: variant_config(base, name) for name in ("dpo", "span_dpo", "cut", "kto")}
    assert "rejected_tokens" not in variants["dpo"].train and "dpo_beta" not in variants["dpo"].train
    assert variants["span_dpo"].train["rejected_tokens"] == "spans"
    for cfg in variants.values():
        cfg.validate()  # a cut variant with rejected_tokens would be refused here
    assert variants["cut"].objective == "cut" and "rejected_tokens" not in variants["cut"].train
