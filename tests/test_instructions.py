"""Verifiable-instruction prompts: base tasks, composition, the shipped files, IFEval scoring, file errors."""

from __future__ import annotations

import json

import pytest

from cut.errors import DataError
from cut.tasks import constraints
from cut.tasks.base_tasks import HELDOUT, TRAIN
from cut.tasks.instructions import (
    FILES,
    compose,
    main,
    make_heldout,
    make_pool,
    read_task_file,
    score,
    type_counts,
)

from conftest import REPO


@pytest.fixture(scope="module")
def pool():
    return make_pool()


@pytest.fixture(scope="module")
def heldout():
    return make_heldout()


def _key(r):
    return r["instruction"], r["input"]


def test_base_tasks_are_many_distinct_and_disjoint():
    assert len(TRAIN) >= 160 and len(HELDOUT) >= 70
    for tasks in (TRAIN, HELDOUT):
        assert len({(t["task"], t["input"]) for t in tasks}) == len(tasks)
        assert all(set(t) == {"task", "input"} and t["task"].strip() for t in tasks)
    assert not {t["task"] for t in TRAIN} & {t["task"] for t in HELDOUT}
    inputs = {t["input"] for t in TRAIN} & {t["input"] for t in HELDOUT}
    assert inputs <= {""}


def test_pool_and_heldout_sizes_distinct_and_disjoint(pool, heldout):
    assert len(pool) >= 2000 and len(heldout) >= 300
    for recs, split in ((pool, "train"), (heldout, "heldout")):
        assert len({_key(r) for r in recs}) == len(recs)
        assert [r["id"] for r in recs] == [f"{split}-{i:05d}" for i in range(1, len(recs) + 1)]
    assert not {r["instruction"] for r in pool} & {r["instruction"] for r in heldout}


def test_compose_is_seeded():
    a = compose(50, "heldout", seed=3)
    assert a == compose(50, "heldout", seed=3)
    assert a != compose(50, "heldout", seed=4)
    with pytest.raises(ValueError):
        compose(5, "test", seed=0)


def test_constraints_validate_compatible_and_cover_every_type(pool, heldout):
    for recs in (pool, heldout):
        sizes = {len(r["constraints"]) for r in recs}
        assert sizes == {1, 2, 3}
        for i, r in enumerate(recs):
            assert r["instruction"].startswith(tuple(t["task"] + " " for t in TRAIN + HELDOUT))
            for c in r["constraints"]:
                assert constraints.validate(c, f"record {i}") == c
            assert constraints.compatible([c["type"] for c in r["constraints"]])
        counts = type_counts(recs)
        assert min(counts.values()) > 0, counts  # every type occurs in both splits
        assert max(counts.values()) <= 3 * min(counts.values()), counts  # roughly balanced


def test_shipped_files_are_a_fresh_regeneration(tmp_path, capsys):
    data = REPO / "data"
    if not all((data / name).exists() for name in FILES.values()):
        pytest.skip("data/instructions_*.json not generated yet")
    assert main(["--out", str(tmp_path)]) == 0
    for name in FILES.values():
        assert (tmp_path / name).read_bytes() == (data / name).read_bytes(), name
    assert main(["--out", str(data), "--check"]) == 0
    (tmp_path / FILES["heldout"]).write_text("[]\n")
    assert main(["--out", str(tmp_path), "--check"]) == 1
    assert FILES["heldout"] in capsys.readouterr().out
    assert len(read_task_file(data / FILES["train"])) == 2000


def test_read_task_file_names_file_record_and_field(tmp_path, heldout):
    good = heldout[:3]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(good))
    assert read_task_file(path) == good
    bad = [good[0], {**good[1], "constraints": [{"type": "no_such_type", "params": {}}]}]
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=rf"{path}: record 1, field 'constraints'"):
        read_task_file(path)
    path.write_text(json.dumps([{**good[0], "constraints": []}]))
    with pytest.raises(DataError, match=rf"{path}: record 0, field 'constraints'"):
        read_task_file(path)
    path.write_text(json.dumps([{**good[0], "instruction": 5}]))
    with pytest.raises(DataError, match=rf"{path}: record 0, field 'instruction'"):
        read_task_file(path)


def _c(type_, **params):
    return {"type": type_, "params": params}


def test_score_by_hand():
    """4 prompts, 8 constraints (strict / loose):
    0 no_comma T/T, all_lowercase T/T                   -> prompt T/T
    1 all_lowercase F/T (loose drops the 'Sure!' line), end_phrase T/T (case ignored) -> prompt F/T
    2 no_comma F/F                                       -> prompt F/F
    3 end_phrase F/F (text after it), no_comma T/T, all_lowercase T/T -> prompt F/F
    prompt level 1/4 strict, 2/4 loose; instruction level 5/8 strict, 6/8 loose."""
    records = [
        {"constraints": [_c("no_comma"), _c("all_lowercase")]},
        {"constraints": [_c("all_lowercase"), _c("end_phrase", phrase="Hope this helps.")]},
        {"constraints": [_c("no_comma")]},
        {"constraints": [_c("end_phrase", phrase="Have a great day!"), _c("no_comma"), _c("all_lowercase")]},
    ]
    outputs = [
        "all good here and nothing else",
        "Sure!\nhere are my tips. hope this helps.",
        "one, two",
        "have a great day! bye",
    ]
    s = score(records, outputs)
    assert s["prompt_level_strict"] == 0.25 and s["prompt_level_loose"] == 0.5
    assert s["instruction_level_strict"] == 5 / 8 and s["instruction_level_loose"] == 6 / 8
    assert s["per_type"] == {
        "all_lowercase": {"strict": 2 / 3, "loose": 1.0, "n": 3},
        "end_phrase": {"strict": 0.5, "loose": 0.5, "n": 2},
        "no_comma": {"strict": 2 / 3, "loose": 2 / 3, "n": 3},
    }
    assert [(p["strict"], p["loose"]) for p in s["per_prompt"]] == [
        (True, True),
        (False, True),
        (False, False),
        (False, False),
    ]
    assert s["per_prompt"][1]["constraints"] == [
        {"type": "all_lowercase", "strict": False, "loose": True},
        {"type": "end_phrase", "strict": True, "loose": True},
    ]
    with pytest.raises(ValueError):
        score(records, outputs[:3])


def test_repeat_request_asks_for_the_base_task(pool):
    repeats = [r for r in pool if any(c["type"] == "repeat_request" for c in r["constraints"])]
    assert repeats
    for r in repeats:
        (c,) = [c for c in r["constraints"] if c["type"] == "repeat_request"]
        assert r["instruction"].startswith(c["params"]["request"] + " ")
        assert constraints.check(r["instruction"] + "\nMy answer.", c)
