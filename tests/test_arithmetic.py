"""Arithmetic problems with known answers: the pool, the answer reader, the match."""

from __future__ import annotations

import json

import pytest

from cut.tasks.arithmetic import answers_match, extract_final_answer, main, make_problems

from conftest import REPO


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 18 (see step 3).", "18"),
        ("7 x 8 = 56", "56"),
        ("10-12 apples, so 5", "5"),
        ("It is -3.", "-3"),
        ("So the answer: 1,234 coins, minus 2", "1234"),
        ("Each friend gets 2.5 cookies.", "2.5"),
        ("I cannot say.", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_answers_match_numerically():
    assert answers_match("56.0", "56") and answers_match("1/2", "0.5")
    assert not answers_match("55", "56") and not answers_match(None, "56") and not answers_match("x", "56")


def test_problems_are_right_distinct_and_seeded():
    probs = make_problems(200, seed=7)
    assert probs == make_problems(200, seed=7) and probs != make_problems(200, seed=8)
    assert len({p["instruction"] for p in probs}) == 200
    for p in probs:  # every reference is the true answer of its expression, where one is written out
        if p["instruction"].startswith("What is") and "times" in p["instruction"]:
            a, b = (int(x) for x in p["instruction"][8:-1].split(" times "))
            assert int(p["reference"]) == a * b


def test_shipped_files_are_the_generator_output(tmp_path):
    assert main(["--pool", str(tmp_path / "p.json"), "--heldout", str(tmp_path / "h.json")]) == 0
    for name, shipped in (("p.json", "arithmetic_pool.json"), ("h.json", "arithmetic_heldout.json")):
        assert json.loads((tmp_path / name).read_text()) == json.loads((REPO / "data" / shipped).read_text())
    pool = {r["instruction"] for r in json.loads((REPO / "data/arithmetic_pool.json").read_text())}
    held = {r["instruction"] for r in json.loads((REPO / "data/arithmetic_heldout.json").read_text())}
    assert not pool & held  # the held-out set never appears in training rounds
