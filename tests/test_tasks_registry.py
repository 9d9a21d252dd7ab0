"""cut.tasks.registry: a task is one Task declaration plus one line, read by the online loop."""

from __future__ import annotations

import json

import pytest
import yaml

from cut.errors import DataError
from cut.judges import JUDGES
from cut.loop.online import load_config, read_problems, score_heldout
from cut.tasks import arithmetic, instructions
from cut.tasks.registry import TASKS
from cut.tasks.task import Task


def test_registered_tasks_generate_judge_and_score():
    assert list(TASKS) == ["arithmetic", "instructions"]
    assert all(task.judge in JUDGES for task in TASKS.values())
    made = TASKS["arithmetic"].generate(0)
    assert made == arithmetic.generate(0) and len(made["pool"]) == 600 and len(made["heldout"]) == 100
    assert not {r["instruction"] for r in made["pool"]} & {r["instruction"] for r in made["heldout"]}
    res = score_heldout(
        "arithmetic", made["heldout"][:2], [f"The answer is {made['heldout'][0]['reference']}", "no"]
    )
    assert (res["accuracy"], res["correct"], res["total"]) == (0.5, 1, 2)
    assert [a["correct"] for a in res["answers"]] == [True, False] and "reference" in res["answers"][0]
    held = instructions.make_heldout()[:3]
    res = score_heldout("instructions", held, ["x", "y", "z"])
    assert res["accuracy"] == res["prompt_level_strict"] and "per_prompt" not in res and "per_type" in res
    assert all("constraints" in a for a in res["answers"])


def tiny_task() -> Task:
    """Answers must repeat the record's `word`; scored by exact match."""

    def check(record, source, i):
        if not isinstance(record.get("word"), str):
            raise DataError(f"{source}: record {i}, field 'word': missing")
        return {**record, "word": record["word"].lower()}

    def score(records, outputs):
        right = [o.strip().lower() == r["word"] for r, o in zip(records, outputs, strict=True)]
        return right, {"words": len(records)}

    return Task(
        generate=lambda seed: {"pool": [{"instruction": "Say a.", "word": "a"}], "heldout": []},
        judge="reference",
        check=check,
        score=score,
        keep=("word",),
    )


def test_a_new_task_is_one_declaration(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "tiny", tiny_task())
    rows = [{"instruction": "Say Hi.", "word": "Hi"}, {"instruction": "Say yo.", "word": "yo"}]
    (tmp_path / "pool.json").write_text(json.dumps(rows))
    (tmp_path / "held.json").write_text(json.dumps(rows))
    conf = {"base_model": "m", "pool": str(tmp_path / "pool.json"), "heldout": str(tmp_path / "held.json")}
    conf.update(task="tiny", output_dir=str(tmp_path / "out"), judge={"kind": "reference"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(conf))
    cfg = load_config(str(tmp_path / "c.yaml"), {})  # the loop accepts the registered name
    pool, heldout = read_problems(cfg)
    assert len(pool) == 2 and [r["word"] for r in heldout] == ["hi", "yo"]  # checked by the task
    res = score_heldout("tiny", heldout, ["HI", "no"])
    assert res["accuracy"] == 0.5 and res["words"] == 2 and res["answers"][0]["word"] == "hi"
    (tmp_path / "held.json").write_text(json.dumps([{"instruction": "Say."}]))
    with pytest.raises(DataError, match=r"held.json: record 0, field 'word': missing"):
        read_problems(cfg)
