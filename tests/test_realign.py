"""Tests for cut.realign: the criteria file, task classification (a field or an LLM call), the
rewrite filters, failed calls, the output format, resuming, and an end-to-end run with a local tiny
model. The LLM is a real HTTP server on 127.0.0.1 (tests/fake_openai.py) with scripted replies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cut.errors import ConfigError, DataError
from cut.llm import ClientConfig, LLMClient
from cut.realign import (
    CLASSIFY_PROMPT,
    DEFAULT_CRITERIA,
    PROMPT_HEADERS,
    REWRITE_PROMPT,
    ClientRewriter,
    LocalRewriter,
    RealignConfig,
    check_rewrite,
    classify_prompt,
    code_dropped,
    count,
    final_answer_changed,
    judged_against,
    leaked_markup,
    load_criteria,
    main,
    parse_task,
    realign_file,
    rewrite_prompt,
    short_answer_dropped,
    too_short,
)
from cut.records import build_examples, load_records

from fake_openai import FakeOpenAI

SHIPPED_TASKS = [
    "general",
    "open_qa",
    "explanation",
    "how_to",
    "email",
    "creative_writing",
    "brainstorm",
    "summary",
    "rewriting",
    "classification",
    "math",
    "code",
    "advice",
]

TEA = "Boil water, pour it over a tea bag in a cup, wait three minutes and take the bag out."
CODE = "```python\ndef double(x):\n    return 2 * x\n```"
HAIKU = "Soft rain on the roof,\nthe gutter hums a low tune,\nthe street shines like glass."


def records() -> list[dict]:
    return [
        {"id": "a", "instruction": "rec-0: How do I make tea?", "output": TEA, "task": "how_to", "src": "x"},
        {
            "id": "b",
            "instruction": "rec-1: What is the capital of France?",
            "input": "",
            "output": "Paris.",
            "task": "open_qa",
        },
        {
            "id": "c",
            "instruction": "rec-2: Write a function that doubles a number.",
            "output": CODE,
            "task": "code",
        },
        {
            "id": "d",
            "instruction": "rec-3: What is 12 + 30?",
            "output": "12 + 30 = 42. The answer is 42.",
            "task": "math",
        },
        {"id": "e", "instruction": "rec-4: Write a haiku about rain.", "output": HAIKU, "task": "poetry"},
    ]


GOOD = {
    "rec-0": "To make a cup of tea:\n\n1. Boil water.\n2. Pour it over a tea bag in a cup.\n"
    "3. Wait three minutes.\n4. Take the bag out.",
    "rec-1": "The capital of France is Paris.",
    "rec-2": "Multiply by two:\n\n```python\ndef double(x):\n    return 2 * x\n```\n\n`double(4)` returns 8.",
    "rec-3": "1. Add the numbers: 12 + 30 = 42.\n\nThe answer is 42.",
    "rec-4": "Rain\n\nSoft rain on the roof,\nthe gutter hums a low tune,\nthe street shines like glass.",
}
CLASSIFIED = {
    "rec-0": "how_to",
    "rec-1": "Open QA.",
    "rec-2": "`code`",
    "rec-3": "Task: math",
    "rec-4": "a poem, I think",
}


def key_of(body: dict) -> str:
    """'classify rec-N' or 'rewrite rec-N': which call, for which record."""
    text = body["messages"][-1]["content"]
    kind = "classify" if text.startswith("Decide which kind") else "rewrite"
    return kind + " " + re.search(r"rec-\d+", text).group(0)


def fake_llm(rewrites: dict | None = None, classified: dict | None = None, scripts=None) -> FakeOpenAI:
    """Answers a classify call from `classified` and a rewrite call from `rewrites`, by record."""
    rewrites, classified = rewrites or GOOD, classified or CLASSIFIED

    def answer(body: dict) -> str:
        kind, rec = key_of(body).split()
        return (classified if kind == "classify" else rewrites)[rec]

    return FakeOpenAI(scripts, default=answer, key=key_of)


def client(fake: FakeOpenAI, cache: Path | None = None, **options) -> ClientRewriter:
    options = {"max_retries": 0, "backoff": 0.01, "timeout": 5.0, **options}
    config = ClientConfig(
        fake.base_url, "rewriter-model", cache_file=str(cache) if cache else None, **options
    )
    return ClientRewriter(LLMClient(config))


def write_records(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def run(tmp_path: Path, fake: FakeOpenAI, rows=None, cache: bool = True, **cfg) -> tuple[dict, list[dict]]:
    src = write_records(tmp_path / "data.json", records() if rows is None else rows)
    out = tmp_path / "realigned.json"
    rewriter = client(fake, tmp_path / "cache.jsonl" if cache else None)
    counts = realign_file(src, str(out), rewriter, RealignConfig(**cfg))
    return counts, json.loads(out.read_text())


@pytest.fixture()
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------------------------
# criteria
# --------------------------------------------------------------------------------------------


def test_shipped_criteria_cover_the_task_set():
    criteria = load_criteria(str(DEFAULT_CRITERIA))
    assert list(criteria.tasks) == SHIPPED_TASKS
    assert re.fullmatch(r"realign_criteria\.yaml@[0-9a-f]{8}", criteria.source)
    for c in criteria.tasks.values():
        assert "\n" not in c.description and len(c.text.split()) >= 30
    assert "```" not in criteria.tasks["code"].text  # a fence in the prompt would invite a leak


CUSTOM = """\
tasks:
  general:
    description: anything else
    criterion: Answer in one short paragraph.
  recipe:
    description: a cooking recipe
    criterion: |
      List the ingredients first, then number the steps.
"""


def test_custom_criteria_shape_both_prompts(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(CUSTOM)
    criteria = load_criteria(str(path))
    assert list(criteria.tasks) == ["general", "recipe"] and criteria.source.startswith("mine.yaml@")
    record = {"instruction": "rec-0: Make soup.", "input": "for two", "output": "Boil vegetables."}
    asked = classify_prompt(record, criteria)
    assert "- general: anything else\n- recipe: a cooking recipe" in asked and "open_qa" not in asked
    assert "rec-0: Make soup.\n\nfor two" in asked and "(for example: recipe)" in asked
    prompt = rewrite_prompt(record, criteria.tasks["recipe"])
    assert "(recipe)]\nList the ingredients first, then number the steps.\n" in prompt
    assert "[Original response]\nBoil vegetables.\n" in prompt and "[Evidence]" not in prompt
    with_evidence = rewrite_prompt(
        {**record, "evidence": ["Soup needs salt.", "  "]}, criteria.tasks["recipe"]
    )
    assert "[Evidence]\n1. Soup needs salt.\n\n[Format guidance" in with_evidence
    assert "evidence passages bear" in with_evidence


GENERAL = "  general:\n    description: d\n    criterion: c\n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("tasks: [unclosed\n", r"not valid YAML at line \d+ column \d+"),
        ("- a\n- b\n", r"expected a mapping with the key 'tasks', got list"),
        ("task:\n" + GENERAL, r"unknown top-level key\(s\) task; the only key is 'tasks'"),
        ("tasks:\n" + GENERAL + "extra: 1\n", r"unknown top-level key\(s\) extra"),
        ("tasks: {}\n", r"tasks: expected a mapping of task name -> entry"),
        (
            "tasks:\n  general:\n    description: d\n",
            r"tasks\.general\.criterion: must be a non-empty string \(missing\)",
        ),
        (
            "tasks:\n  general:\n    description: d\n    criterion: '  '\n",
            r"tasks\.general\.criterion: must be a non-empty",
        ),
        (
            "tasks:\n  general:\n    description: 3\n    criterion: c\n",
            r"tasks\.general\.description: must be a non-empty",
        ),
        (
            "tasks:\n" + GENERAL + "    example: e\n",
            r"tasks\.general: unknown key\(s\) example; known: description, criterion",
        ),
        (
            "tasks:\n  general: be brief\n",
            r"tasks\.general: expected a mapping with description and criterion",
        ),
        (
            "tasks:\n" + GENERAL + "  Open QA:\n    description: d\n    criterion: c\n",
            r"tasks\.Open QA: a task name is lower-case",
        ),
        (
            "tasks:\n  code:\n    description: d\n    criterion: c\n",
            r"tasks\.general: missing; it is required",
        ),
        ("tasks:\n" + GENERAL + GENERAL, r"key 'general' appears twice in one mapping \(line 5\)"),
    ],
)
def test_malformed_criteria_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_criteria(str(path))
    assert str(err.value).startswith(f"{path}: ")


def test_missing_criteria_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read the criteria file"):
        load_criteria(str(tmp_path / "nope.yaml"))


# --------------------------------------------------------------------------------------------
# reading the task from an answer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, task",
    [
        ("code", "code"),
        ("Code.", "code"),
        ("  `open_qa`\n", "open_qa"),
        ("Open QA", "open_qa"),
        ("Task: how_to", "how_to"),
        ("**math**", "math"),
        ("The best fit is explanation, because the user asks why.", "explanation"),
        ("<think>maybe code or math</think>math", "math"),
        ("creative writing", "creative_writing"),
        ("poetry", None),
        ("code or math", None),
        ("", None),
    ],
)
def test_parse_task(answer, task):
    assert parse_task(answer, SHIPPED_TASKS) == task


def test_parse_task_prefers_the_longer_name():
    assert parse_task("This is open qa.", ["general", "qa", "open_qa"]) == "open_qa"


# --------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "original, rewrite, reason",
    [
        (TEA, GOOD["rec-0"], None),
        (TEA, "[Original response]\n" + TEA, "leaked prompt markup: '[Original response]'"),
        (
            TEA,
            "[Format guidance for this kind of task (how_to)]\n" + TEA,
            "leaked prompt markup: '[Format guidance'",
        ),
        (TEA, "<|im_start|>assistant\n" + TEA, "leaked prompt markup: '<|im_start|>'"),
        (TEA, "### Response:\n" + TEA, "leaked prompt markup: '### Response'"),
        (TEA, "Revised response: " + TEA, "leaked prompt markup: 'Revised response:'"),
        (
            TEA,
            "Sure! Here is the revised response:\n\n" + TEA,
            "leaked prompt markup: 'Sure! Here is the revised'",
        ),
        (TEA, "Assistant: " + TEA, "leaked prompt markup: 'Assistant:'"),
        # the same markup in the original is no leak
        ("### Response\n" + TEA, "### Response\n" + TEA + " Enjoy.", None),
        ("Use [Request] as a placeholder. " + TEA, "Use [Request] as a placeholder. " + TEA, None),
    ],
)
def test_leaked_markup(original, rewrite, reason):
    assert leaked_markup(original, rewrite) == reason


def test_every_prompt_header_is_a_leak_marker():
    headers = [
        line for p in (CLASSIFY_PROMPT, REWRITE_PROMPT) for line in p.splitlines() if line.startswith("[")
    ]
    assert len(headers) == 4 and "[Evidence]" in PROMPT_HEADERS  # that one is added with passages
    for line in headers:
        assert any(line.startswith(h) for h in PROMPT_HEADERS), line
    assert leaked_markup(TEA, "Here\u2019s the improved response:\n" + TEA) is not None


def test_too_short():
    original = "x" * 100
    assert too_short(original, "y" * 50, 0.5) is None
    assert too_short(original, "  " + "y" * 49 + "\n", 0.5) == "too short: 49 of 100 characters (< 0.5 x)"
    assert too_short(original, "y", 0.0) is None


def test_code_dropped():
    assert code_dropped(CODE, GOOD["rec-2"]) is None
    assert code_dropped(CODE, "~~~\ndef double(x): return 2 * x\n~~~") is None
    assert code_dropped(CODE, "def double(x): return 2 * x  # inline, no fence") == "code block dropped"
    assert code_dropped("No code here.", "Still none.") is None


@pytest.mark.parametrize(
    "original, rewrite, reason",
    [
        ("Paris.", "The capital of France is **Paris**.", None),
        ("Paris.", "The capital of France is Lyon.", "short answer dropped: 'paris' of 'Paris.'"),
        ("42", "The answer is 42.", None),
        ("42", "The answer is 420.", "short answer dropped: '42' of '42'"),
        ("1,000 metres", "It is 1000 metres.", None),
        ("The capital is Paris.", "Paris is the capital of France.", None),
        ("Red and blue.", "Red is one of them.", "short answer dropped: 'and blue' of 'Red and blue.'"),
        (TEA, "Something else entirely, long enough to pass the length check easily.", None),  # not short
    ],
)
def test_short_answer_dropped(original, rewrite, reason):
    assert short_answer_dropped(original, rewrite, 6) == reason


def test_final_answer_changed():
    original = "12 + 30 = 42. The answer is 42."
    assert final_answer_changed(original, GOOD["rec-3"]) is None
    assert (
        final_answer_changed(original, "1. 12 + 30 = 43.\n\nThe answer is 43.")
        == "final answer changed: 42 -> 43"
    )
    assert (
        final_answer_changed(original, "Twelve and thirty make forty-two.")
        == "final answer changed: 42 -> None"
    )
    assert final_answer_changed("No number at all.", "None here either.") is None


def test_unchanged_and_looping_rewrites_are_rejected():
    cfg = RealignConfig()
    assert check_rewrite(TEA, "  " + TEA.replace(" ", "  ") + "\n", "how_to", cfg) == "unchanged"
    loop = "Here are the tips.\n\n" + "Boil the water first.\n" * 3
    assert check_rewrite(TEA, TEA + "\n" + loop, "how_to", cfg).startswith("repeats a line 3 times")
    # a line the original already repeats as often is the original's, not a loop
    poem = "Row, row, row your boat gently.\n" * 3 + "Gently down."
    assert check_rewrite(poem, "Title\n\n" + poem + "\nThe end of the stream.", "general", cfg) is None
    assert check_rewrite(TEA, TEA + "\n\n- step\n- step\n- step", "how_to", cfg) is None  # short lines


def test_check_rewrite_runs_every_filter_in_order():
    cfg = RealignConfig()
    assert check_rewrite(TEA, "   \n", "how_to", cfg) == "empty"
    assert check_rewrite(TEA, "Here is the revised response: tea.", "how_to", cfg).startswith("leaked")
    assert check_rewrite(TEA, "Tea.", "how_to", cfg).startswith("too short")
    assert check_rewrite(CODE, "def double(x): return 2 * x  # no fence", "code", cfg) == "code block dropped"
    assert check_rewrite("Paris.", "It is Lyon, in France.", "open_qa", cfg).startswith(
        "short answer dropped"
    )
    math = "12 + 30 = 42, so the sum of the two numbers is 42."
    assert check_rewrite(math, "1. 12 + 30 = 43.\n\nThe answer is 43.", "math", cfg).startswith(
        "final answer"
    )
    assert check_rewrite(math, "1. 12 + 30 = 43.\n\nThe answer is 43.", "general", cfg) is None  # math only
    assert check_rewrite(TEA, GOOD["rec-0"], "how_to", cfg) is None


def test_judged_against():
    base = {"instruction": "i", "output": "o"}
    assert judged_against(base) is None
    assert judged_against({**base, "judgment": None}) is None
    assert judged_against({**base, "judgment": "The response is perfect."}) is None
    assert judged_against({**base, "judgment": "Too terse.", "score": 8}) is None
    assert judged_against({**base, "judgment": "8 is wrong; it is 7."}).startswith("judged negative")
    assert judged_against({**base, "judgment": "$ERROR$"}).startswith("failed judgment")
    assert judged_against({**base, "judgment": None, "judge_error": "http 500"}).startswith("failed judgment")
    assert judged_against({**base, "spans": [[0, 1]]}).startswith("spans")


def test_config_checks():
    with pytest.raises(ConfigError, match="min_length_ratio must be a finite number >= 0"):
        RealignConfig(min_length_ratio=-0.1)
    with pytest.raises(ConfigError, match="chunk_size must be an integer >= 1"):
        RealignConfig(chunk_size=0)
    with pytest.raises(ConfigError, match="task_field 'evidence' is another field's name"):
        RealignConfig(task_field="evidence")


# --------------------------------------------------------------------------------------------
# runs against a real HTTP server
# --------------------------------------------------------------------------------------------


def test_tasks_from_a_field_ask_no_classifier(tmp_path, no_proxy):
    with fake_llm() as fake:
        counts, rows = run(tmp_path, fake, task_field="task")
        bodies = [b["messages"][-1]["content"] for b in fake.bodies]
    assert sorted(fake.hits) == [f"rewrite rec-{i}" for i in range(5)]
    assert [r["task"] for r in rows] == ["how_to", "open_qa", "code", "math", "general"]
    assert rows[4]["task_label"] == "poetry" and all("task_label" not in r for r in rows[:4])
    assert [r["rewritten"] for r in rows] == [True] * 5
    assert [r["output"] for r in rows] == [GOOD[f"rec-{i}"] for i in range(5)]
    tea_prompt = next(b for b in bodies if "rec-0" in b)
    assert load_criteria(str(DEFAULT_CRITERIA)).tasks["how_to"].text in tea_prompt
    assert counts["rewritten"] == 5 and counts["unknown_task_labels"] == 1
    assert counts["tasks"] == {"how_to": 1, "open_qa": 1, "code": 1, "math": 1, "general": 1}


def test_tasks_by_the_llm_with_an_unknown_label(tmp_path, no_proxy):
    rows_in = [{k: v for k, v in r.items() if k != "task"} for r in records()]
    with fake_llm() as fake:
        counts, rows = run(tmp_path, fake, rows=rows_in)
        classify_body = next(b for b in fake.bodies if key_of(b) == "classify rec-0")
    assert sorted(fake.hits) == sorted(
        [f"classify rec-{i}" for i in range(5)] + [f"rewrite rec-{i}" for i in range(5)]
    )
    assert "- how_to: step-by-step instructions" in classify_body["messages"][-1]["content"]
    assert [r["task"] for r in rows] == ["how_to", "open_qa", "code", "math", "general"]
    assert rows[4]["task_label"] == "a poem, I think"
    assert counts["unknown_task_labels"] == 1 and counts["rewritten"] == 5


BAD = {
    "rec-0": "Make tea.",  # too short
    "rec-1": "The capital of France is Lyon, on the Rhone.",  # the short answer is gone
    "rec-2": "Multiply the number by two and return it; double(4) gives 8.",  # the code block is gone
    "rec-3": "1. 12 + 30 = 43.\n\nThe answer is 43.",  # a different final answer
    "rec-4": "[Original response]\n" + HAIKU,  # prompt markup
}


def test_rejected_rewrites_keep_the_original_and_say_why(tmp_path, no_proxy):
    with fake_llm(BAD) as fake:
        counts, rows = run(tmp_path, fake, task_field="task")
    assert [r["output"] for r in rows] == [r["output"] for r in records()]
    assert not any(r["rewritten"] for r in rows) and not any("original_output" in r for r in rows)
    reasons = [r["rewrite_rejected"].split(":")[0] for r in rows]
    assert reasons == [
        "too short",
        "short answer dropped",
        "code block dropped",
        "final answer changed",
        "leaked prompt markup",
    ]
    assert counts["rejected"] == 5 and counts["rewritten"] == 0
    assert counts["rejected_reasons"] == dict.fromkeys(reasons, 1)


def test_failed_calls_keep_the_original_and_are_asked_again(tmp_path, no_proxy):
    rows_in = [{k: v for k, v in r.items() if k != "task"} for r in records()]
    scripts = {"rewrite rec-0": ["500"], "classify rec-1": ["503"], "rewrite rec-2": ["nocontent"]}
    with fake_llm(scripts=scripts) as fake:
        counts, rows = run(tmp_path, fake, rows=rows_in)
        assert "rewrite rec-1" not in fake.hits  # no task, no rewrite
        assert rows[0]["rewrite_error"] == "rewrite: http 500" and rows[0]["task"] == "how_to"
        assert rows[1]["rewrite_error"] == "classify: http 503" and rows[1]["task"] is None
        assert rows[2]["rewrite_error"] == "rewrite: malformed response body"
        for r, orig in zip(rows[:3], rows_in[:3], strict=True):
            assert r["output"] == orig["output"] and r["rewritten"] is False and "original_output" not in r
        assert counts["failed"] == 3 and counts["rewritten"] == 2
        assert counts["failed_reasons"] == {
            "rewrite: http 500": 1,
            "classify: http 503": 1,
            "rewrite: malformed response body": 1,
        }
        before = dict(fake.hits)
        counts, rows = run(tmp_path, fake, rows=rows_in)  # the faults are spent: the failed three succeed
        asked = {k: n - before.get(k, 0) for k, n in fake.hits.items() if n > before.get(k, 0)}
    assert asked == {"rewrite rec-0": 1, "classify rec-1": 1, "rewrite rec-1": 1, "rewrite rec-2": 1}
    assert counts["rewritten"] == 5 and counts["failed"] == 0 and counts["resumed"] == 2
    assert not any("rewrite_error" in r for r in rows)


def test_output_is_training_data_with_the_input_fields(tmp_path, no_proxy):
    rows_in = records()
    rows_in[0]["evidence"] = ["Black tea steeps for three to five minutes."]
    rows_in[0]["judgment"] = None
    rows_in.append(
        {
            "instruction": "rec-5: What is 3 + 4?",
            "output": "It is 8.",
            "judgment": "8 is wrong; 3 + 4 is 7.",
            "spans": ["8"],
            "task": "math",
        }
    )
    with fake_llm() as fake:
        counts, rows = run(tmp_path, fake, rows=rows_in, task_field="task")
        tea_prompt = next(b for b in fake.bodies if key_of(b) == "rewrite rec-0")["messages"][-1]["content"]
    assert "[Evidence]\n1. Black tea steeps for three to five minutes.\n" in tea_prompt
    assert "rec-5" not in " ".join(fake.hits)  # a judged negative is never sent
    flags = {"rewritten", "task", "original_output", "realign"}
    for row, rec in zip(rows[:5], rows_in[:5], strict=True):
        assert set(row) == set(rec) | flags | ({"task_label"} if rec["task"] == "poetry" else set())
        assert row["original_output"] == rec["output"] and row["id"] == rec["id"]
    assert rows[0]["src"] == "x" and rows[0]["evidence"] == rows_in[0]["evidence"]
    assert rows[5] == {
        **rows_in[5],
        "rewritten": False,
        "rewrite_skipped": "judged negative: the judgment critiques this response",
        "realign": rows[0]["realign"],
    }
    assert rows[0]["realign"] == {
        "rewriter": "openai:rewriter-model",
        "criteria": load_criteria(str(DEFAULT_CRITERIA)).source,
        "task_field": "task",
        "evidence_field": "evidence",
        "min_length_ratio": 0.5,
        "short_answer_words": 6,
    }
    assert counts["skipped"] == 1 and counts["skipped_reasons"] == {"judged negative": 1}
    examples, stats = build_examples(load_records(str(tmp_path / "realigned.json")))
    assert stats["positive"] == 5 and stats["negative"] == 1
    assert [e.record.output for e in examples] == [GOOD[f"rec-{i}"] for i in range(5)] + ["It is 8."]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.jsonl", "data.json", "realigned.json"]


def test_resume_asks_nothing_again(tmp_path, no_proxy):
    with fake_llm() as fake:
        first, rows = run(tmp_path, fake)
        hits = dict(fake.hits)
        (tmp_path / "cache.jsonl").unlink()  # the output alone says what is done
        again, rows_again = run(tmp_path, fake)
        assert dict(fake.hits) == hits and rows_again == rows
        assert again["resumed"] == 5 and {k: v for k, v in again.items() if k != "resumed"} == {
            k: v for k, v in first.items() if k != "resumed"
        }
        # a cut-short output: only the missing records are asked for
        (tmp_path / "realigned.json").write_text(json.dumps(rows[:2]))
        assert not (tmp_path / "cache.jsonl").exists()  # the second run asked nothing
        counts, rows_third = run(tmp_path, fake)
        asked = {k: n - hits[k] for k, n in fake.hits.items() if n > hits[k]}
        assert asked == {f"{kind} rec-{i}": 1 for kind in ("classify", "rewrite") for i in (2, 3, 4)}
        assert counts["resumed"] == 2 and rows_third == rows
        # other settings redo every record; the cache (records 2-4 since it was removed) answers the rest
        hits = dict(fake.hits)
        counts, rows_fourth = run(tmp_path, fake, min_length_ratio=0.4)
        asked = {k: n - hits[k] for k, n in fake.hits.items() if n > hits[k]}
        assert asked == {f"{kind} rec-{i}": 1 for kind in ("classify", "rewrite") for i in (0, 1)}
        assert counts["resumed"] == 0 and rows_fourth[0]["realign"]["min_length_ratio"] == 0.4
        assert [r["output"] for r in rows_fourth] == [r["output"] for r in rows]


def test_chunks_are_written_as_they_finish_and_a_crash_resumes(tmp_path):
    class Scripted:
        """Rewrites with GOOD, classifies with CLASSIFIED; fails on its `crash_at`-th call."""

        name = "stub"

        def __init__(self, crash_at: int | None = None) -> None:
            self.calls, self.crash_at, self.seen = 0, crash_at, []

        def complete(self, prompts, progress=None):
            self.calls += 1
            if self.calls == self.crash_at:
                raise KeyboardInterrupt
            out = tmp_path / "realigned.json"
            self.seen.append(len(json.loads(out.read_text())) if out.exists() else 0)
            answers = []
            for p in prompts:
                kind, rec = key_of({"messages": [{"content": p}]}).split()
                answers.append(((CLASSIFIED if kind == "classify" else GOOD)[rec], None))
            return answers

    src = write_records(
        tmp_path / "data.json", [{k: v for k, v in r.items() if k != "task"} for r in records()]
    )
    out = str(tmp_path / "realigned.json")
    cfg = RealignConfig(chunk_size=2)
    crashing = Scripted(crash_at=4)  # chunk 1: calls 1, 2; chunk 2 dies on its rewrite call
    with pytest.raises(KeyboardInterrupt):
        realign_file(src, out, crashing, cfg)
    assert crashing.seen == [0, 0, 2] and len(json.loads(Path(out).read_text())) == 2
    resumed = Scripted()
    counts = realign_file(src, out, resumed, cfg)
    assert resumed.calls == 4 and resumed.seen == [2, 2, 4, 4]  # chunks {2, 3} and {4}
    assert counts["rewritten"] == 5 and counts["resumed"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda rs: rs[2].pop("output"), r"data\.json: record 2, field 'output': missing"),
        (lambda rs: rs[1].update(instruction="  "), r"data\.json: record 1, field 'instruction': empty"),
        (lambda rs: rs[3].pop("task"), r"data\.json: record 3, field 'task': missing"),
        (
            lambda rs: rs[0].update(evidence="a passage"),
            r"record 0, field 'evidence': expected a list of strings, got str",
        ),
        (
            lambda rs: rs[4].update(evidence=["ok", 3]),
            r"record 4, field 'evidence': expected a list of strings",
        ),
        (lambda rs: rs.append("not a record"), r"record 5: expected an object, got str"),
    ],
)
def test_bad_input_stops_before_any_request(tmp_path, no_proxy, change, message):
    rows_in = records()
    change(rows_in)
    with fake_llm() as fake:
        with pytest.raises(DataError, match=message):
            run(tmp_path, fake, rows=rows_in, task_field="task")
        assert not fake.hits
    assert not (tmp_path / "realigned.json").exists()


def test_cli(tmp_path, capsys, no_proxy):
    src = write_records(tmp_path / "data.json", records())
    out = str(tmp_path / "out.json")
    with fake_llm() as fake:
        base = ["--input_file", src, "--output_file", out, "--rewriter", "openai"]
        args = base + [
            "--base_url",
            fake.base_url,
            "--model",
            "m",
            "--task_field",
            "task",
            "--max_retries",
            "0",
        ]
        assert main(args) == 0
        counts = json.loads(capsys.readouterr().out)
        assert counts["rewritten"] == 5 and Path(out + ".cache.jsonl").exists()

        bad = tmp_path / "bad.yaml"
        bad.write_text("tasks:\n  code:\n    description: d\n    criterion: c\n")
        assert main(args + ["--criteria", str(bad)]) == 2
        assert "bad.yaml: tasks.general: missing" in capsys.readouterr().err

        Path(out).write_text(json.dumps([{"instruction": "x", "output": "y"}]))  # not ours
        assert main(args) == 2
        assert "exists but is not cut.realign's output" in capsys.readouterr().err

        assert main(args[:-4] + ["--output_file", str(tmp_path / "o.jsonl")]) == 2
        assert "must end in .json" in capsys.readouterr().err
        assert sum(fake.hits.values()) == 5
    with pytest.raises(SystemExit) as exc:
        main(base + ["--model", "m"])
    assert exc.value.code == 2 and "--rewriter openai needs --base_url and --model" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# a local transformers rewriter
# --------------------------------------------------------------------------------------------


def test_local_rewriter_end_to_end_records_why(tmp_path, tiny_chat_model):
    rewriter = LocalRewriter(str(tiny_chat_model), batch_size=2, max_new_tokens=8, device="cpu")
    assert rewriter.text("Hi").endswith("<s>assistant\n") and rewriter.name == f"local:{tiny_chat_model}"
    long = [
        TEA + " " + TEA + " " + TEA,
        CODE + "\n\nCall it with any number; it returns twice that." * 3,
        HAIKU * 3,
    ]
    rows_in = [{"instruction": f"rec-{i}: Help.", "output": text} for i, text in enumerate(long)]
    src = write_records(tmp_path / "data.json", rows_in)
    out = tmp_path / "realigned.json"
    counts = realign_file(src, str(out), rewriter, RealignConfig())
    rows = json.loads(out.read_text())
    criteria = load_criteria(str(DEFAULT_CRITERIA))
    # eight tokens of an untrained model: rejected by the filters, the originals kept
    assert [r["output"] for r in rows] == [r["output"] for r in rows_in]
    for row in rows:
        assert row["rewritten"] is False and row["task"] in criteria.tasks
        assert row["rewrite_rejected"].split(":")[0] in (
            "empty",
            "leaked prompt markup",
            "too short",
            "code block dropped",
            "short answer dropped",
        )
    assert counts["rejected"] == 3 and counts["failed"] == 0
    assert rows[0]["realign"]["rewriter"] == rewriter.name


def test_count_groups_rejections_by_kind():
    rows = [
        {"rewritten": False, "task": "general", "rewrite_rejected": "repeats a line 22 times: 'x'"},
        {"rewritten": False, "task": "general", "rewrite_rejected": "repeats a line 6 times: 'y'"},
        {"rewritten": False, "task": "general", "rewrite_rejected": "unchanged"},
        {"rewritten": True, "task": "summary"},
    ]
    counts = count(rows)
    assert counts["rejected_reasons"] == {"repeats a line": 2, "unchanged": 1}
    assert (counts["rejected"], counts["rewritten"]) == (3, 1)


def test_meta_commentary_is_rejected_unless_the_original_had_it():
    cfg = RealignConfig()
    original = "1. Check the tide.\n2. Wear shoes."
    talk = original + "\n\nThe original response was rewritten to include the requested format."
    assert check_rewrite(original, talk, "general", cfg).startswith(
        "talks about the rewrite: 'The original response'"
    )
    assert check_rewrite(original, original.replace(". ", ": "), "general", cfg) is None
    # a text about answers that already said so is not the rewriter talking
    quoting = "A revised answer is better than the original answer."
    assert check_rewrite(quoting, quoting + " Always revise.", "general", cfg) is None
