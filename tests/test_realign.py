"""Tests for cut.realign: the criteria file (the released task set, pass-through tasks, aliases), task
labels (a field or an LLM call), the rewrite reply and its adaptive gate, best-of-n, ReAlign's
filters (token length, code both ways) and ours, failed calls, the output format, resuming, the
CLI, and an end-to-end run with a local tiny model. The LLM is a real HTTP server on 127.0.0.1
(tests/fake_openai.py) with scripted replies; every fixture below is written for these tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cut.data.records import build_examples, load_records
from cut.errors import ConfigError, DataError
from cut.llm.client import ClientConfig
from cut.llm.completer import ApiCompleter, LocalCompleter
from cut.methods.realign import (
    CHARACTERS,
    CLASSIFY_PROMPT,
    DEFAULT_CRITERIA,
    GATE,
    PROMPT_HEADERS,
    REWRITE_PROMPT,
    CompleterRewriter,
    Length,
    RealignConfig,
    RealignOptions,
    Reply,
    check_rewrite,
    classify_prompt,
    code_changed,
    count,
    final_answer_changed,
    has_code,
    judged_against,
    leaked_markup,
    load_criteria,
    longest,
    main,
    parse_reply,
    parse_task,
    realign_file,
    rewrite_prompt,
    short_answer_dropped,
    task_choice,
    token_length,
    too_short,
)

from fake_openai import FakeOpenAI

# the task names of the ReAlign release (code/constant.py, TASK_DESCRIPTION), in its order; the 11
# it leaves alone are those missing from its REWRITE_TASK list
RELEASED_TASKS = (
    "question_generation story_generation poem_generation email_generation data_generation "
    "advice_giving recommendations how_to_generation planning instructional_rewriting "
    "language_polishing paraphrasing text_correction code_correction code_simplification "
    "information_extraction keywords_extraction table_extraction title_generation "
    "text_summarization note_summarization explain_code explain_answer text_to_text_translation "
    "text_to_code_translation code_to_code_translation code_to_text_translation open_qa closed_qa "
    "fill_in_the_blank fact_verification math_puzzles language_learning_questions "
    "natural_language_learning_tutor exam_problem_solving_tutor ml_ai_language_model_tutor "
    "general_classification ordering sentiment_analysis code_language_classification "
    "language_classification topic_classification value_judgement rejecting roleplay default"
).split()
RELEASED_PASS_THROUGH = (
    "story_generation poem_generation advice_giving paraphrasing code_simplification "
    "table_extraction title_generation text_summarization note_summarization roleplay default"
).split()

# a small criteria file of our own for the runs below: the fallback `general` is rewritten
CRITERIA = """\
tasks:
  general:
    description: a request that fits none of the other kinds
    criterion: Answer first, then give the detail in short paragraphs.
  how_to:
    description: step-by-step instructions for doing something
    criterion: Number the steps, one action each.
  open_qa:
    description: a factual question with a definite answer
    criterion: State the answer in the first sentence, then the context.
  code:
    description: writing or explaining program code
    criterion: Open with the approach, then the code in a fenced block.
  math:
    description: a calculation with one exact numeric answer
    final_number: true
    criterion: Solve in numbered steps; end with the final answer.
  poem:
    description: a poem
    rewrite: false
"""
TASKS = ["general", "how_to", "open_qa", "code", "math", "poem"]

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
    "rec-4": "a haiku, I think",
}


def reply(text: str, decision: str = "REWRITE", reasoning: str = "The format fits.") -> str:
    """A rewrite answer in the reply shape the prompt asks for."""
    return f"Reasoning: {reasoning}\nDecision: {decision}\nRevised response:\n{text}"


def key_of(body: dict) -> str:
    """'classify rec-N' or 'rewrite rec-N': which call, for which record."""
    text = body["messages"][-1]["content"]
    kind = "classify" if text.startswith("Decide which kind") else "rewrite"
    return kind + " " + re.search(r"rec-\d+", text).group(0)


def fake_llm(rewrites: dict | None = None, classified: dict | None = None, scripts=None) -> FakeOpenAI:
    """Answers a classify call from `classified` and a rewrite call with reply(rewrites[rec])."""
    rewrites, classified = rewrites or GOOD, classified or CLASSIFIED

    def answer(body: dict) -> str:
        kind, rec = key_of(body).split()
        return classified[rec] if kind == "classify" else reply(rewrites[rec])

    return FakeOpenAI(scripts, default=answer, key=key_of)


def client(
    fake: FakeOpenAI, cache: Path | None = None, temperature: float = 0.0, **options
) -> CompleterRewriter:
    options = {"max_retries": 0, "backoff": 0.01, "timeout": 5.0, **options}
    config = ClientConfig(
        fake.base_url,
        "rewriter-model",
        cache_file=str(cache) if cache else None,
        temperature=temperature,
        **options,
    )
    return CompleterRewriter(ApiCompleter(config))


def write_records(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def criteria_file(tmp_path: Path, text: str = CRITERIA) -> str:
    path = tmp_path / "criteria.yaml"
    path.write_text(text)
    return str(path)


def run(tmp_path: Path, fake: FakeOpenAI, rows=None, cache: bool = True, **cfg) -> tuple[dict, list[dict]]:
    """realign_file over records() with our criteria file; one greedy sample unless cfg says otherwise."""
    src = write_records(tmp_path / "data.json", records() if rows is None else rows)
    out = tmp_path / "realigned.json"
    cfg = {"criteria": criteria_file(tmp_path), "samples": 1, "temperature": 0.0, **cfg}
    rewriter = client(fake, tmp_path / "cache.jsonl" if cache else None, cfg["temperature"])
    counts = realign_file(src, str(out), rewriter, RealignConfig(**cfg))
    return counts, json.loads(out.read_text())


@pytest.fixture()
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


class WordTokenizer:
    """A tokenizer in the shape of transformers': one id per whitespace word, a BOS first as LLaMA's."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [1] * add_special_tokens + [7] * len(text.split())}


# --------------------------------------------------------------------------------------------
# criteria
# --------------------------------------------------------------------------------------------


def test_shipped_criteria_are_the_released_task_set():
    criteria = load_criteria(str(DEFAULT_CRITERIA))
    assert list(criteria.tasks) == RELEASED_TASKS and criteria.fallback == "default"
    assert [c.task for c in criteria.tasks.values() if not c.rewrite] == RELEASED_PASS_THROUGH
    assert re.fullmatch(r"realign_criteria\.yaml@[0-9a-f]{8}", criteria.source)
    for c in criteria.tasks.values():
        assert "\n" not in c.description and c.description
        assert (len(c.text.split()) >= 10) if c.rewrite else not c.text
        assert "```" not in c.text  # a fence in the prompt would invite a leak
    assert [c.task for c in criteria.tasks.values() if c.final_number] == ["math_puzzles"]


def test_custom_criteria_shape_both_prompts(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "fallback: other\ntasks:\n  other:\n    description: anything else\n    rewrite: false\n"
        "  recipe:\n    description: a cooking recipe\n    aliases: [cooking, food]\n    criterion: |\n"
        "      List the ingredients first, then number the steps.\n"
    )
    criteria = load_criteria(str(path))
    assert list(criteria.tasks) == ["other", "recipe"] and criteria.source.startswith("mine.yaml@")
    assert criteria.fallback == "other" and not criteria.tasks["other"].rewrite
    assert criteria.labels() == {"other": "other", "recipe": "recipe", "cooking": "recipe", "food": "recipe"}
    record = {"instruction": "rec-0: Make soup.", "input": "for two", "output": "Boil vegetables."}
    asked = classify_prompt(record, criteria)
    assert "- other: anything else\n- recipe: a cooking recipe" in asked and "open_qa" not in asked
    assert "rec-0: Make soup.\n\nfor two" in asked and "(for example: recipe)" in asked
    prompt = rewrite_prompt(record, criteria.tasks["recipe"])
    assert "(recipe)]\nList the ingredients first, then number the steps.\n" in prompt
    assert "[Response]\nBoil vegetables.\n" in prompt and "[Evidence]" not in prompt
    assert GATE in prompt and "Decision: REWRITE or KEEP\nRevised response:" in prompt
    with_evidence = rewrite_prompt(
        {**record, "evidence": ["Soup needs salt.", "  "]}, criteria.tasks["recipe"]
    )
    assert "[Evidence]\n1. Soup needs salt.\n\n[Format for this kind" in with_evidence
    assert "evidence passages bear" in with_evidence


def test_the_ablation_prompt_has_no_gate():
    """--no_gate: the same prompt without the decision step and its Decision line (the paper's
    non-adaptive rewriting)."""
    criterion = load_criteria(str(DEFAULT_CRITERIA)).tasks["how_to_generation"]
    record = {"instruction": "How do I make tea?", "output": TEA}
    gated, plain = rewrite_prompt(record, criterion), rewrite_prompt(record, criterion, gate=False)
    assert GATE in gated and "KEEP" in gated
    assert GATE not in plain and "Decision" not in plain and "KEEP" not in plain
    assert plain.endswith("Revised response:\n<the reformatted response>")
    assert (
        gated.replace(GATE, "").split("[Request]")[1].split("Reply in")[0]
        == plain.split("[Request]")[1].split("Reply in")[0]
    )


GENERAL = "  general:\n    description: d\n    criterion: c\n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("tasks: [unclosed\n", r"not valid YAML at line \d+ column \d+"),
        ("- a\n- b\n", r"expected a mapping with the key 'tasks', got list"),
        ("task:\n" + GENERAL, r"unknown top-level key\(s\) task; known: tasks, fallback"),
        ("tasks:\n" + GENERAL + "extra: 1\n", r"unknown top-level key\(s\) extra"),
        ("tasks: {}\n", r"tasks: expected a mapping of task name -> entry"),
        (
            "tasks:\n  general:\n    description: d\n",
            r"tasks\.general\.criterion: must be a non-empty string \(missing\); a task that is rewritten",
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
            r"tasks\.general: unknown key\(s\) example; known: description, criterion, rewrite",
        ),
        ("tasks:\n  general: be brief\n", r"tasks\.general: expected a mapping with a description"),
        (
            "tasks:\n" + GENERAL + "  Open QA:\n    description: d\n    criterion: c\n",
            r"tasks\.Open QA: a task name is lower-case",
        ),
        (
            "tasks:\n  code:\n    description: d\n    criterion: c\n",
            r"tasks\.general: missing; it is required \(the fallback task\) unless",
        ),
        ("fallback: nope\ntasks:\n" + GENERAL, r"fallback: 'nope' names no task of the file"),
        ("tasks:\n" + GENERAL + "    rewrite: 'no'\n", r"tasks\.general\.rewrite: must be true or false"),
        (
            "tasks:\n" + GENERAL + "    final_number: 1\n",
            r"tasks\.general\.final_number: must be true or false",
        ),
        ("tasks:\n" + GENERAL + "    aliases: Misc\n", r"tasks\.general\.aliases: must be a list of labels"),
        (
            "tasks:\n" + GENERAL + "    aliases: [Misc]\n",
            r"tasks\.general\.aliases: must be a list of labels",
        ),
        (
            "tasks:\n" + GENERAL + "    aliases: [code]\n  code:\n    description: d\n    criterion: c\n",
            r"tasks\.general\.aliases: 'code' already names task code",
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


def test_a_task_that_is_not_rewritten_needs_no_criterion(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("tasks:\n" + GENERAL + "  poem:\n    description: a poem\n    rewrite: false\n")
    assert load_criteria(str(path)).tasks["poem"].text == ""


def test_missing_criteria_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read the criteria file"):
        load_criteria(str(tmp_path / "nope.yaml"))


# --------------------------------------------------------------------------------------------
# reading the task from a label, and the rewrite from an answer
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
        ("The best fit is general, because nothing else fits.", "general"),
        ("<think>maybe code or math</think>math", "math"),
        ("how to", "how_to"),
        ("poetry", None),
        ("code or math", None),
        ("", None),
    ],
)
def test_parse_task(answer, task):
    assert parse_task(answer, TASKS) == task


def test_parse_task_prefers_the_longer_name():
    assert parse_task("This is open qa.", ["general", "qa", "open_qa"]) == "open_qa"


@pytest.mark.parametrize(
    "label, task, unknown",
    [
        ("email_generation", "email_generation", False),  # ReAlign's classifier writes the names
        ("Email Generation", "email_generation", False),
        ("email-generation", "email_generation", False),
        ("Category: Math Puzzles", "math_puzzles", False),
        ("text_summarization", "text_summarization", False),
        ("Default", "default", False),
        ("poetry", "default", True),  # no task: the file's fallback, the label kept
    ],
)
def test_labels_from_another_classifier_read_with_the_released_names(label, task, unknown):
    choice = task_choice(label, load_criteria(str(DEFAULT_CRITERIA)))
    assert choice.task == task and (choice.label == label if unknown else choice.label is None)


def test_aliases_map_another_label_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "fallback: default\ntasks:\n  default:\n    description: d\n    rewrite: false\n"
        "  text_to_code_translation:\n    description: code\n    aliases: [coding, programming]\n"
        "    criterion: Code in a block.\n"
    )
    criteria = load_criteria(str(path))
    assert task_choice("Coding", criteria).task == "text_to_code_translation"
    assert task_choice("programming", criteria).task == "text_to_code_translation"
    assert task_choice("brainstorming", criteria) == ("default", "brainstorming", None)


@pytest.mark.parametrize(
    "answer, parsed",
    [
        (reply("1. Boil."), Reply("The format fits.", False, "1. Boil.")),
        (reply("", "KEEP", "A single word is asked."), Reply("A single word is asked.", True, "")),
        ("Reasoning: no fit\nDecision: keep", Reply("no fit", True, "")),  # KEEP needs no response
        # ReAlign's own reply shape: no decision line; a copy is its gate's verdict (read later)
        ("Reasoning: fits\nRevised response: 1. Boil.\n2. Pour.", Reply("fits", False, "1. Boil.\n2. Pour.")),
        (
            "**Reasoning:** fits\n**Decision:** Rewrite\n**Revised response:**\n- a",
            Reply("fits", False, "- a"),
        ),
        ("<think>hmm</think>Reasoning: ok\nRevised response:\nX", Reply("ok", False, "X")),
        ("1. Boil.\n2. Pour.", None),  # no revised response: no answer
        ("Reasoning: fits\nDecision: REWRITE", None),
        ("", None),
    ],
)
def test_parse_reply(answer, parsed):
    assert parse_reply(answer) == parsed


# --------------------------------------------------------------------------------------------
# ReAlign's filters: token length and code both ways (code/rewrite_data_selection.py)
# --------------------------------------------------------------------------------------------


def released_length_selection(original: str, rewrite: str, tokenizer, threshold: float = 0.5) -> bool:
    """ReAlign's length_selection, written from its published rule: True keeps the rewrite."""
    original_length = len(tokenizer(original)["input_ids"]) - 1
    rewrite_length = len(tokenizer(rewrite)["input_ids"]) - 1
    return not rewrite_length <= threshold * original_length


def test_token_length_filter_is_realigns():
    """Ten words of original: ReAlign keeps a rewrite of 6+ tokens and refuses 5 (at the threshold,
    `<=`), counting its tokenizer's ids less the BOS; ours with the same tokenizer agrees."""
    tok = WordTokenizer()
    length = token_length(tok)
    original = " ".join(["word"] * 10)
    for n in range(0, 15):
        rewrite = " ".join(["w"] * n)
        ours = too_short(original, rewrite, 0.5, length) is None
        assert ours == released_length_selection(original, rewrite, tok), n
    assert too_short(original, "a b c d e", 0.5, length) == "too short: 5 of 10 tokens (<= 0.5 x)"
    assert too_short(original, "a b c d e f", 0.5, length) is None
    # characters without a tokenizer: a long word is one token but many characters
    assert too_short("x" * 100, "y" * 50, 0.5) == "too short: 50 of 100 characters (<= 0.5 x)"
    assert too_short("x" * 100, "  " + "y" * 51 + "\n", 0.5) is None
    assert too_short(original, "supercalifragilistic-expialidocious-words", 0.5) is None  # 41 > 34 characters
    assert (
        too_short(original, "supercalifragilistic-expialidocious-words", 0.5, length) is not None
    )  # 1 token
    assert too_short("x" * 100, "y", 0.0) is None


def test_token_length_with_a_real_tokenizer(tiny_model):
    from cut.modeling.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    length = token_length(tok)
    text = "The capital of France is Paris."
    assert length.count(text) == len(tok(text, add_special_tokens=False)["input_ids"]) > 0
    assert length.unit == "tokens"


def released_code_selection(original: str, rewrite: str) -> bool:
    """ReAlign's code_selection, written from its published rule: True keeps the rewrite."""

    def code(text: str) -> bool:
        fenced = re.search(r"```[\s\S]*?```", text) is not None
        return fenced or ("def " in text and "return " in text)

    return code(original) == code(rewrite)


@pytest.mark.parametrize(
    "original, rewrite, reason",
    [
        (CODE, GOOD["rec-2"], None),
        (CODE, "Multiply the number by two and return it.", "code block dropped"),
        (CODE, "def double(x): return 2 * x  # inline, no fence", None),  # a def with a return is code
        ("Double it: x * 2.", "```python\nx * 2\n```", "code added"),  # the other direction
        ("Double it: x * 2.", "def f(x):\n    return x * 2", "code added"),
        ("No code here.", "Still none.", None),
        ("```\nunclosed fence", "Prose only.", None),  # one fence is no block
        ("~~~\nls -l\n~~~", "Run ls -l.", None),  # released: only backtick fences
        ("We define things and return them.", "Same.", None),  # 'define ' is not 'def '
    ],
)
def test_code_filter_works_both_ways_as_released(original, rewrite, reason):
    assert code_changed(original, rewrite) == reason
    assert (reason is None) == released_code_selection(original, rewrite)
    assert has_code(CODE) and not has_code("plain")


def test_released_filters_are_only_code_and_length():
    released, ours = RealignConfig(filters="released"), RealignConfig()
    leaked = "Revised response:\n" + TEA + " Enjoy it."
    assert check_rewrite(TEA, leaked, released) is None  # ReAlign's alpaca filters let this through
    assert check_rewrite(TEA, leaked, ours).startswith("leaked prompt markup")
    for cfg in (released, ours):
        assert check_rewrite(TEA, TEA + "\n\n```\ntea()\n```", cfg) == "code added"
        assert check_rewrite(TEA, "Tea.", cfg).startswith("too short")
    assert check_rewrite("Paris.", "It is Lyon, in France.", released) is None
    assert check_rewrite("Paris.", "It is Lyon, in France.", ours).startswith("short answer dropped")


def test_longest_candidate_first_of_equals():
    assert longest(["ab", "abcd", "abc"]) == 1
    assert longest(["abc", "xyz"]) == 0  # select_optimal_response keeps the first of equals
    # in tokens, three short words beat one long one; in characters the long word wins
    texts = ["a b c", "incomprehensibilities"]
    assert longest(texts, token_length(WordTokenizer())) == 0 and longest(texts, CHARACTERS) == 1
    assert longest(texts, Length(lambda t: 5, "tokens")) == 0


# --------------------------------------------------------------------------------------------
# our filters (--filters all)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "original, rewrite, reason",
    [
        (TEA, GOOD["rec-0"], None),
        (TEA, "[Response]\n" + TEA, "leaked prompt markup: '[Response]'"),
        (
            TEA,
            "[Format for this kind of task (how_to)]\n" + TEA,
            "leaked prompt markup: '[Format for this kind of task'",
        ),
        (TEA, "<|im_start|>assistant\n" + TEA, "leaked prompt markup: '<|im_start|>'"),
        (TEA, "### Response:\n" + TEA, "leaked prompt markup: '### Response'"),
        (TEA, "Revised response: " + TEA, "leaked prompt markup: 'Revised response:'"),
        (TEA, TEA + "\nDecision: KEEP", "leaked prompt markup: 'Decision: KEEP'"),
        (TEA, "Reasoning: it fits.\n" + TEA, "leaked prompt markup: 'Reasoning:'"),
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


def test_looping_rewrites_are_rejected():
    cfg = RealignConfig()
    loop = "Here are the tips.\n\n" + "Boil the water first.\n" * 3
    assert check_rewrite(TEA, TEA + "\n" + loop, cfg).startswith("repeats a line 3 times")
    # a line the original already repeats as often is the original's, not a loop
    poem = "Row, row, row your boat gently.\n" * 3 + "Gently down."
    assert check_rewrite(poem, "Title\n\n" + poem + "\nThe end of the stream.", cfg) is None
    assert check_rewrite(TEA, TEA + "\n\n- step\n- step\n- step", cfg) is None  # short lines


def test_check_rewrite_runs_every_filter_in_order():
    cfg = RealignConfig()
    assert check_rewrite(TEA, "   \n", cfg) == "empty"
    assert check_rewrite(TEA, "Here is the revised response: tea.", cfg).startswith("leaked")
    assert check_rewrite(TEA, "Tea.", cfg).startswith("too short")
    assert check_rewrite(CODE, "Multiply the number by two, then give it back.", cfg) == "code block dropped"
    assert check_rewrite("Paris.", "It is Lyon, in France.", cfg).startswith("short answer dropped")
    math = "12 + 30 = 42, so the sum of the two numbers is 42."
    wrong = "1. 12 + 30 = 43.\n\nThe answer is 43."
    assert check_rewrite(math, wrong, cfg, final_number=True).startswith("final answer")
    assert check_rewrite(math, wrong, cfg) is None  # only for a task marked final_number
    assert check_rewrite(TEA, GOOD["rec-0"], cfg) is None


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


def test_config_defaults_are_the_released_ones_and_checks():
    cfg = RealignConfig()
    assert (cfg.gate, cfg.samples, cfg.temperature, cfg.min_length_ratio) == (True, 2, 0.3, 0.5)
    with pytest.raises(ConfigError, match="min_length_ratio must be a finite number >= 0"):
        RealignConfig(min_length_ratio=-0.1)
    with pytest.raises(ConfigError, match="chunk_size must be an integer >= 1"):
        RealignConfig(chunk_size=0)
    with pytest.raises(ConfigError, match="samples must be an integer >= 1"):
        RealignConfig(samples=0)
    with pytest.raises(ConfigError, match="samples 2 at temperature 0 would draw one greedy answer 2 times"):
        RealignConfig(temperature=0.0)
    assert RealignConfig(samples=1, temperature=0.0).samples == 1
    with pytest.raises(ConfigError, match="filters must be one of all, released, got 'some'"):
        RealignConfig(filters="some")
    with pytest.raises(ConfigError, match="gate must be true or false"):
        RealignConfig(gate="no")
    with pytest.raises(ConfigError, match="tokenizer must be a name"):
        RealignConfig(tokenizer=" ")
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
    assert load_criteria(criteria_file(tmp_path)).tasks["how_to"].text in tea_prompt
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
    assert rows[4]["task_label"] == "a haiku, I think"
    assert counts["unknown_task_labels"] == 1 and counts["rewritten"] == 5


def test_the_gates_keep_returns_the_original_unchanged(tmp_path, no_proxy):
    """KEEP, or a copy in ReAlign's own reply shape (its gate copies the response): the original
    stays byte for byte, with the rewriter's reason; it is neither a rewrite nor a rejection."""
    answers = {
        "rec-0": reply("", "KEEP", "The request wants one paragraph; the steps format does not fit."),
        # a copy with its whitespace changed: the original is kept as it was, not the copy
        "rec-1": "Reasoning: A one-word answer needs no format.\nRevised response:\n  Paris. \n",
        "rec-2": reply(GOOD["rec-2"]),
    }

    def answer(body: dict) -> str:
        return answers[key_of(body).split()[1]]

    rows_in = records()[:3]
    with FakeOpenAI(default=answer, key=key_of) as fake:
        counts, rows = run(tmp_path, fake, rows=rows_in, task_field="task")
        prompts = [b["messages"][-1]["content"] for b in fake.bodies]
    assert all(GATE in p for p in prompts)
    assert [r["output"] for r in rows] == [TEA, "Paris.", GOOD["rec-2"]]
    assert [r["rewritten"] for r in rows] == [False, False, True]
    assert rows[0]["rewrite_declined"] == "The request wants one paragraph; the steps format does not fit."
    assert rows[1]["rewrite_declined"] == "A one-word answer needs no format."
    for row in rows[:2]:
        assert not {"original_output", "rewrite_rejected", "rewrite_error"} & set(row)
    assert counts["declined"] == 2 and counts["rewritten"] == 1 and counts["rejected"] == 0


def test_no_gate_sends_the_ablation_prompt(tmp_path, no_proxy):
    with fake_llm() as fake:
        counts, rows = run(tmp_path, fake, task_field="task", gate=False)
        prompts = [b["messages"][-1]["content"] for b in fake.bodies]
    assert len(prompts) == 5 and not any(GATE in p or "Decision" in p for p in prompts)
    assert counts["rewritten"] == 5 and rows[0]["realign"]["gate"] is False


def test_a_pass_through_task_never_reaches_the_server(tmp_path, no_proxy):
    """The shipped criteria and labels from another classifier (--task_field category): the 11 tasks
    the release leaves alone, `default` and an unknown label (-> default) are never sent."""
    labelled = [  # (instruction, output, category)
        ("Write a story about a fox.", "Once, a fox.", "story_generation"),
        ("Title this essay.", "On Foxes", "Title Generation"),
        ("Hello there.", "Hi!", "default"),
        ("Tell me a riddle.", "What has keys?", "riddles"),
        ("Pretend to be a pirate.", "Arr.", "roleplay"),
    ]
    rows_in = [
        {"instruction": f"rec-{i}: {instruction}", "output": output, "category": category}
        for i, (instruction, output, category) in enumerate(labelled)
    ]
    with fake_llm() as fake:
        src = write_records(tmp_path / "data.json", rows_in)
        out = tmp_path / "realigned.json"
        cfg = RealignConfig(task_field="category")  # the shipped criteria, the released defaults
        counts = realign_file(src, str(out), client(fake, None, 0.3), cfg)
        assert not fake.hits and not fake.bodies
    rows = json.loads(out.read_text())
    assert [r["output"] for r in rows] == [r["output"] for r in rows_in]
    assert [r["task"] for r in rows] == [
        "story_generation",
        "title_generation",
        "default",
        "default",
        "roleplay",
    ]
    assert [r["rewrite_skipped"] for r in rows][:2] == [
        "pass-through task: story_generation is not rewritten",
        "pass-through task: title_generation is not rewritten",
    ]
    assert rows[3]["task_label"] == "riddles" and rows[0]["category"] == "story_generation"
    assert counts["skipped_reasons"] == {"pass-through task": 5} and counts["rewritten"] == 0


def test_best_of_two_keeps_the_longer_at_temperature_0_3(tmp_path, no_proxy):
    """The released defaults: two draws per record at 0.3 (classifying stays greedy), the longer kept,
    and only then filtered: a longer draw that a filter refuses is not replaced by the shorter."""
    short, longer = "1. Boil water.\n2. Steep the tea bag three minutes.", GOOD["rec-0"] + " Enjoy the tea."
    scripts = {
        "rewrite rec-0": [lambda b: reply(short), lambda b: reply(longer)],  # the second is longer
        "rewrite rec-1": [
            lambda b: reply("The capital of France is Paris, on the Seine."),
            lambda b: reply("Paris."),
        ],
        # the longer draw is the KEEP (it counts as the original), so the original stays
        "rewrite rec-2": [
            lambda b: reply("```python\ndef double(x): return 2*x\n```"),  # shorter than the original
            lambda b: reply("", "KEEP", "fits already"),
        ],
        # the longer draw adds code: refused, although the shorter one would pass
        "rewrite rec-3": [
            lambda b: reply("1. 12 + 30 = 42.\n\nThe answer is 42."),
            lambda b: reply("1. 12 + 30 = 42.\n\n```\nprint(12 + 30)\n```\n\nThe answer is 42."),
        ],
    }
    rows_in = [{k: v for k, v in r.items() if k != "task"} for r in records()[:4]]
    cfg = RealignConfig(criteria=criteria_file(tmp_path))
    assert (cfg.samples, cfg.temperature) == (2, 0.3)
    src = write_records(tmp_path / "data.json", rows_in)
    out = tmp_path / "realigned.json"
    with fake_llm(scripts=scripts) as fake:
        counts = realign_file(src, str(out), client(fake, tmp_path / "cache.jsonl", cfg.temperature), cfg)
        temperatures = {(key_of(b).split()[0], b["temperature"]) for b in fake.bodies}
        hits = dict(fake.hits)
        assert hits == {
            **{f"classify rec-{i}": 1 for i in range(4)},
            **{f"rewrite rec-{i}": 2 for i in range(4)},
        }
        assert temperatures == {("classify", 0.0), ("rewrite", 0.3)}
        rows = json.loads(out.read_text())
        assert rows[0]["output"] == longer and rows[0]["rewritten"]
        assert rows[1]["output"] == "The capital of France is Paris, on the Seine."
        assert rows[2]["output"] == CODE and rows[2]["rewrite_declined"] == "fits already"
        assert rows[3]["output"] == rows_in[3]["output"] and rows[3]["rewrite_rejected"] == "code added"
        assert rows[0]["realign"]["samples"] == 2 and rows[0]["realign"]["temperature"] == 0.3
        assert counts["rewritten"] == 2 and counts["declined"] == 1 and counts["rejected"] == 1
        # each draw has its own cache entry: a rerun elsewhere asks for nothing
        cached = [json.loads(line)["key"] for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
        assert len(cached) == len(set(cached)) == 12
        realign_file(src, str(tmp_path / "again.json"), client(fake, tmp_path / "cache.jsonl", 0.3), cfg)
        assert dict(fake.hits) == hits
    assert json.loads((tmp_path / "again.json").read_text()) == rows


def test_best_of_n_in_tokens_with_a_tokenizer(tmp_path, no_proxy, monkeypatch):
    """--tokenizer: the longer candidate and the length filter count tokens (ReAlign's), not characters."""
    import cut.methods.realign as realign

    monkeypatch.setattr(realign, "load_length", lambda name: token_length(WordTokenizer()))
    many_words = "To make tea: boil it, pour it, wait, and then take the bag out."  # 15 words, 64 chars
    few_words = (
        "Tea-making: water-boiling, bag-steeping (three-minutes), bag-removing, tea-drinking-enjoying."
    )
    scripts = {"rewrite rec-0": [lambda b: reply(few_words), lambda b: reply(many_words)]}
    with fake_llm(scripts=scripts) as fake:
        counts, rows = run(
            tmp_path,
            fake,
            rows=records()[:1],
            task_field="task",
            samples=2,
            temperature=0.3,
            tokenizer="word-tokenizer",
        )
    assert rows[0]["output"] == many_words  # more tokens, fewer characters
    assert rows[0]["realign"]["tokenizer"] == "word-tokenizer"


def test_a_failed_or_unreadable_draw_fails_the_record_and_is_asked_again(tmp_path, no_proxy):
    """One of the two draws fails (http 500) or has no revised response: the record is an error, not
    a rewrite from the other draw; the rerun asks only for what failed (the good draws are cached)."""
    scripts = {
        "rewrite rec-0": ["ok", "500"],
        "rewrite rec-1": ["ok", lambda b: "I would rather just say: Paris."],
    }
    rows_in = records()[:2]
    with fake_llm(scripts=scripts) as fake:
        counts, rows = run(tmp_path, fake, rows=rows_in, task_field="task", samples=2, temperature=0.3)
        assert rows[0]["rewrite_error"] == "rewrite: http 500"
        assert rows[1]["rewrite_error"] == "rewrite: no 'Revised response:' in the answer"
        for row, rec in zip(rows, rows_in, strict=True):
            assert row["output"] == rec["output"] and not row["rewritten"] and "original_output" not in row
        assert counts["failed"] == 2 and counts["rewritten"] == 0
        cache = (tmp_path / "cache.jsonl").read_text()
        assert "rather just say" not in cache  # an unreadable answer is never cached
        before = dict(fake.hits)
        counts, rows = run(tmp_path, fake, rows=rows_in, task_field="task", samples=2, temperature=0.3)
        asked = {k: n - before[k] for k, n in fake.hits.items()}
    assert asked == {"rewrite rec-0": 1, "rewrite rec-1": 1}
    assert counts["rewritten"] == 2 and [r["output"] for r in rows] == [GOOD["rec-0"], GOOD["rec-1"]]


BAD = {
    "rec-0": "Make tea.",  # too short
    "rec-1": "The capital of France is Lyon, on the Rhone.",  # the short answer is gone
    "rec-2": "Multiply the number by two and give it back; double(4) gives 8.",  # the code block is gone
    "rec-3": "1. 12 + 30 = 43.\n\nThe answer is 43.",  # a different final answer
    "rec-4": "[Response]\n" + HAIKU,  # prompt markup
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
        "criteria": load_criteria(criteria_file(tmp_path)).source,
        "task_field": "task",
        "evidence_field": "evidence",
        "gate": True,
        "samples": 1,
        "temperature": 0.0,
        "tokenizer": None,
        "filters": "all",
        "min_length_ratio": 0.5,
        "short_answer_words": 6,
    }
    assert counts["skipped"] == 1 and counts["skipped_reasons"] == {"judged negative": 1}
    examples, stats = build_examples(load_records(str(tmp_path / "realigned.json")))
    assert stats["positive"] == 5 and stats["negative"] == 1
    assert [e.record.output for e in examples] == [GOOD[f"rec-{i}"] for i in range(5)] + ["It is 8."]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cache.jsonl", "criteria.yaml", "data.json", "realigned.json"]


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

        def complete(self, prompts, progress=None, sample=None):
            self.calls += 1
            if self.calls == self.crash_at:
                raise KeyboardInterrupt
            out = tmp_path / "realigned.json"
            self.seen.append(len(json.loads(out.read_text())) if out.exists() else 0)
            answers = []
            for p in prompts:
                kind, rec = key_of({"messages": [{"content": p}]}).split()
                answers.append((CLASSIFIED[rec] if kind == "classify" else reply(GOOD[rec]), None))
            return answers

    src = write_records(
        tmp_path / "data.json", [{k: v for k, v in r.items() if k != "task"} for r in records()]
    )
    out = str(tmp_path / "realigned.json")
    cfg = RealignConfig(criteria=criteria_file(tmp_path), chunk_size=2, samples=1, temperature=0.0)
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
    criteria = criteria_file(tmp_path)
    with fake_llm() as fake:
        base = ["--input_file", src, "--output_file", out, "--rewriter", "openai"]
        args = base + ["--base_url", fake.base_url, "--model", "m", "--task_field", "task"]
        args += ["--criteria", criteria, "--max_retries", "0"]
        assert main(args) == 0  # the released defaults: two draws each
        counts = json.loads(capsys.readouterr().out)
        assert counts["rewritten"] == 5 and Path(out + ".cache.jsonl").exists()
        assert fake.hits == {f"rewrite rec-{i}": 2 for i in range(5)}
        assert {b["temperature"] for b in fake.bodies} == {0.3}

        ablation = str(tmp_path / "ablation.json")
        flags = ["--no_gate", "--samples", "1", "--temperature", "0", "--filters", "released"]
        assert main(args[:3] + [ablation] + args[4:] + flags) == 0
        rows = json.loads(Path(ablation).read_text())
        assert {k: rows[0]["realign"][k] for k in ("gate", "samples", "temperature", "filters")} == {
            "gate": False,
            "samples": 1,
            "temperature": 0.0,
            "filters": "released",
        }
        assert not any("Decision" in b["messages"][-1]["content"] for b in fake.bodies[-5:])
        sent = sum(fake.hits.values())

        bad = tmp_path / "bad.yaml"
        bad.write_text("tasks:\n  code:\n    description: d\n    criterion: c\n")
        assert main(args + ["--criteria", str(bad)]) == 2
        assert "bad.yaml: tasks.general: missing" in capsys.readouterr().err

        assert main(args + ["--tokenizer", str(tmp_path / "no-such-tokenizer")]) == 2
        assert "--tokenizer" in capsys.readouterr().err

        Path(out).write_text(json.dumps([{"instruction": "x", "output": "y"}]))  # not ours
        assert main(args) == 2
        assert "exists but is not cut.realign's output" in capsys.readouterr().err

        assert main(args[:3] + [str(tmp_path / "o.jsonl")] + args[4:]) == 2
        assert "must end in .json" in capsys.readouterr().err
        assert sum(fake.hits.values()) == sent  # none of the refused runs sent a request
    with pytest.raises(SystemExit) as exc:
        main(args + ["--temperature", "0"])
    assert exc.value.code == 2 and "samples 2 at temperature 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(base + ["--model", "m"])
    assert exc.value.code == 2 and "--rewriter openai needs --base_url and --model" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# a local transformers rewriter
# --------------------------------------------------------------------------------------------


def test_local_rewriter_end_to_end_records_why(tmp_path, tiny_chat_model):
    local = LocalCompleter(
        str(tiny_chat_model), batch_size=2, max_new_tokens=8, device="cpu", temperature=0.3
    )
    rewriter = CompleterRewriter(local)
    assert local.text("Hi").endswith("<s>assistant\n") and rewriter.name == f"local:{tiny_chat_model}"
    long = [
        TEA + " " + TEA + " " + TEA,
        CODE + "\n\nCall it with any number; it returns twice that." * 3,
        HAIKU * 3,
    ]
    rows_in = [{"instruction": f"rec-{i}: Help.", "output": text} for i, text in enumerate(long)]
    src = write_records(tmp_path / "data.json", rows_in)
    out = tmp_path / "realigned.json"
    counts = realign_file(src, str(out), rewriter, RealignConfig(criteria=criteria_file(tmp_path)))
    rows = json.loads(out.read_text())
    # eight tokens of an untrained model: no revised response in them, the originals kept
    assert [r["output"] for r in rows] == [r["output"] for r in rows_in]
    for row in rows:
        assert row["rewritten"] is False and row["task"] in TASKS
        assert row["rewrite_error"] == "rewrite: no 'Revised response:' in the answer"
    assert counts["failed"] == 3 and counts["rewritten"] == 0
    assert rows[0]["realign"]["rewriter"] == rewriter.name
    assert local.sampling.temperature == 0.3 and local.sampling.seed == 1  # the 2nd draw


def test_count_groups_rejections_by_kind():
    rows = [
        {"rewritten": False, "task": "general", "rewrite_rejected": "repeats a line 22 times: 'x'"},
        {"rewritten": False, "task": "general", "rewrite_rejected": "repeats a line 6 times: 'y'"},
        {"rewritten": False, "task": "general", "rewrite_rejected": "code added"},
        {"rewritten": False, "task": "general", "rewrite_declined": "the format does not fit"},
        {"rewritten": True, "task": "summary"},
    ]
    counts = count(rows)
    assert counts["rejected_reasons"] == {"repeats a line": 2, "code added": 1}
    assert (counts["rejected"], counts["rewritten"], counts["declined"]) == (3, 1, 1)


def test_meta_commentary_is_rejected_unless_the_original_had_it():
    cfg = RealignConfig()
    original = "1. Check the tide.\n2. Wear shoes."
    talk = original + "\n\nThe original response was rewritten to include the requested format."
    assert check_rewrite(original, talk, cfg).startswith("talks about the rewrite: 'The original response'")
    assert check_rewrite(original, original.replace(". ", ": "), cfg) is None
    # a text about answers that already said so is not the rewriter talking
    quoting = "A revised answer is better than the original answer."
    assert check_rewrite(quoting, quoting + " Always revise.", cfg) is None


def test_options_from_a_config_file_and_flags(tmp_path):
    config = tmp_path / "realign.yaml"
    config.write_text(
        "input_file: data.json\noutput_file: out.json\nsamples: 1\ntemperature: 0\n"
        "rewriter: {rewriter: local, model: some/model, max_new_tokens: 64}\n"
    )
    opts = RealignOptions.parse(["--config", str(config), "--no_gate", "--filters", "released"])
    assert (opts.rewriter.rewriter, opts.rewriter.model, opts.rewriter.max_new_tokens) == (
        "local",
        "some/model",
        64,
    )
    assert opts.rewriter.max_tokens == 2048 and opts.rewriter.timeout == 120.0  # realign's own defaults
    cfg = opts.config()
    assert (cfg.gate, cfg.samples, cfg.temperature, cfg.filters) == (False, 1, 0.0, "released")
    with pytest.raises(SystemExit) as exc:
        RealignOptions.parse(["--config", str(config), "--samples", "0"])
    assert exc.value.code == 2
