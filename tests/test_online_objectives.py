"""cut.loop.objectives: one declaration per objective, resolved by the loop and by cut compare."""

from __future__ import annotations

import json

import pytest
import yaml

from cut.errors import ConfigError
from cut.loop import objectives
from cut.loop.compare import VARIANTS, variant_config
from cut.loop.objectives import Objective
from cut.loop.online import build_training_file, load_config


def base_config(tmp_path, **over):
    conf = {
        "base_model": "m",
        "pool": "pool.json",
        "output_dir": str(tmp_path / "out"),
        "judge": {"kind": "reference"},
        "train": {"learning_rate": 0.01},
        **over,
    }
    path = tmp_path / "online.yaml"
    path.write_text(yaml.safe_dump(conf))
    return load_config(str(path), {})


def test_registry_keeps_the_objectives_and_their_order():
    assert objectives.loop_objectives() == ("cut", "sft", "hindsight", "dpo", "kto", "ilf", "forward")
    assert list(VARIANTS) == [
        "cut", "cut_spans", "sft", "hindsight", "dpo", "kto", "ilf", "forward", "cut_npo", "span_dpo", "span_kto",
    ]  # fmt: skip
    assert VARIANTS["span_dpo"] == ("dpo", {"rejected_tokens": "spans"}, {})
    assert (
        objectives.get("span_kto").recipe == "cut.baselines.kto"
        and objectives.get("cut").recipe == "cut.train"
    )
    assert "dpo_beta" in objectives.recipe_keys("dpo") and objectives.recipe_keys("span_dpo") == ()


def test_a_new_variant_is_one_declaration(tmp_path, monkeypatch):
    monkeypatch.setitem(objectives.OBJECTIVES, "tiny", Objective(base="hindsight", train={"threshold": 2.0}))
    base = base_config(tmp_path, objective="dpo", train={"learning_rate": 0.01, "dpo_beta": 0.5})
    cfg = variant_config(base, "tiny")
    assert cfg.objective == "hindsight" and cfg.output_dir.endswith("tiny")
    # the recipe's own keys are not inherited; the variant's settings are on top
    assert cfg.train == {"learning_rate": 0.01, "prompt_template_name": "chat", "threshold": 2.0}
    cfg.validate()
    assert "tiny" not in objectives.loop_objectives()  # a variant is no value of `objective:`


def test_a_new_loop_objective_is_one_declaration(tmp_path, monkeypatch):
    def negatives(rows, rewrites):
        keep = [r for r in rows if r.get("judgment") is not None]
        return keep, {"train_records": len(keep), "train_positives": 0}

    tiny = Objective(records=negatives, implied={"weight_unflagged": 0.0})
    monkeypatch.setitem(objectives.OBJECTIVES, "tiny", tiny)
    cfg = base_config(tmp_path, objective="tiny")  # accepted by the loop's validation
    assert cfg.objective == "tiny" and "tiny" in objectives.loop_objectives()
    with pytest.raises(ConfigError, match="objective tiny means train.weight_unflagged 0.0; leave it unset"):
        base_config(tmp_path, objective="tiny", train={"weight_unflagged": 1.0})
    judged = [
        {"instruction": "a", "input": "", "output": "x", "judgment": None},
        {"instruction": "b", "input": "", "output": "y", "judgment": "Wrong."},
    ]
    (tmp_path / "judged.json").write_text(json.dumps(judged))
    counts = build_training_file(tmp_path / "judged.json", tmp_path / "train.json", "tiny")["counts"]
    assert json.loads((tmp_path / "train.json").read_text()) == judged[1:]
    assert counts["train_records"] == 1 and counts["train_positives"] == 0


def test_positives_only_objective_with_nothing_to_train_names_the_file(tmp_path):
    judged = [{"instruction": "b", "input": "", "output": "y", "judgment": "Wrong."}]
    (tmp_path / "judged.json").write_text(json.dumps(judged))
    with pytest.raises(ValueError, match=r"judged.json: no positive response this round; sft has nothing"):
        build_training_file(tmp_path / "judged.json", tmp_path / "train.json", "sft")
    counts = build_training_file(
        tmp_path / "judged.json", tmp_path / "train.json", "ilf", rewrites=[judged[0]]
    )
    assert counts["counts"]["train_rewrites"] == 1
