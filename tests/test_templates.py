"""Tests for cut.templates: the Alpaca pair, the tokenizer's chat template and .json files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cut.data.records import Record
from cut.data.templates import ALPACA, load_template

from helpers import raises_naming_file

RELEASED_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


# --------------------------------------------------------------------------------------------
# alpaca
# --------------------------------------------------------------------------------------------


def test_alpaca_plain_without_input_is_the_released_text():
    t = load_template("alpaca")
    assert t.plain("Name a colour.") == RELEASED_NO_INPUT.format(instruction="Name a colour.")
    assert t.plain("Name a colour.", "") == t.plain("Name a colour.")
    assert t.adds_special_tokens


def test_alpaca_folds_the_input_as_the_released_code():
    """finetune_unlikelihood.py: instruction + "\n" + input, then the no-input prompts."""
    t = load_template("alpaca")
    plain = t.plain("Add the numbers.", "3 and 4")
    assert plain == ALPACA["prompt_no_input"].format(instruction="Add the numbers.\n3 and 4")
    judged = t.judged("Add the numbers.", "3 and 4", "8 is wrong.")
    assert judged == ALPACA["prompt_no_input_judge"].format(
        instruction="Add the numbers.\n3 and 4", judgment="8 is wrong."
    )
    assert "### Input:" not in plain + judged


def test_alpaca_input_plain_with_input():
    text = load_template("alpaca_input").plain("Add the numbers.", "3 and 4")
    assert text.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Instruction:\nAdd the numbers.\n\n### Input:\n3 and 4\n\n### Response:\n" in text
    assert text.endswith("### Response:\n")
    assert "Judgment" not in text


def test_alpaca_judged_without_input():
    text = load_template("alpaca").judged("Name a colour.", "", "Green is not primary.")
    assert (
        "### Instruction:\nName a colour.\n\n### Judgment:\nGreen is not primary.\n\n### Response:\n" in text
    )
    assert "should match the corresponding judgment" in text
    assert "### Input:" not in text


def test_alpaca_input_judged_with_input():
    text = load_template("alpaca_input").judged("Add the numbers.", "3 and 4", "8 is wrong.")
    assert text.endswith(
        "### Instruction:\nAdd the numbers.\n\n### Input:\n3 and 4\n\n### Judgment:\n8 is wrong.\n\n### Response:\n"
    )


def test_braces_in_the_values_are_kept():
    t = load_template("alpaca")
    assert "Print {x}." in t.plain("Print {x}.")
    assert "use {}" in t.judged("Print {x}.", "", "use {}")


def test_prompts_for_a_record():
    t = load_template("alpaca")
    r = Record("Add the numbers.", "3 and 4", "8", "8 is wrong.")
    plain, judged = t.prompts(r, r.judgment)
    assert plain == t.plain("Add the numbers.", "3 and 4")
    assert judged == t.judged("Add the numbers.", "3 and 4", "8 is wrong.")
    assert t.prompts(r, None) == (plain, None)


# --------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)


def test_chat_plain_ends_with_the_generation_prompt(chat_tokenizer):
    t = load_template("chat", chat_tokenizer)
    text = t.plain("Add the numbers.", "3 and 4")
    assert text == "<s>user\nAdd the numbers.\n\n3 and 4</s><s>assistant\n"
    assert text.endswith("<s>assistant\n")
    assert not t.adds_special_tokens


def test_chat_judged_puts_the_judgment_in_the_user_turn(chat_tokenizer):
    t = load_template("chat", chat_tokenizer)
    text = t.judged("Name a colour.", "", "Green is not primary.")
    assert text.endswith("<s>assistant\n")
    user_turn = text[len("<s>user\n") : text.index("</s>")]
    assert text.startswith("<s>user\n")
    assert user_turn.startswith("Name a colour.")
    assert "Green is not primary." in user_turn
    assert text.count("<s>user\n") == 1
    assert text != t.plain("Name a colour.")


def test_chat_needs_a_chat_template(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert not getattr(tok, "chat_template", None)
    with pytest.raises(ValueError, match="chat template"):
        load_template("chat", tok)
    with pytest.raises(ValueError, match="chat template"):
        load_template("chat")


# --------------------------------------------------------------------------------------------
# .json template files
# --------------------------------------------------------------------------------------------


def write_template(tmp_path: Path, formats) -> str:
    path = tmp_path / "my_template.json"
    path.write_text(json.dumps(formats))
    return str(path)


SHORT = {
    "prompt_input": "Q: {instruction} [{input}]\nA: ",
    "prompt_no_input": "Q: {instruction}\nA: ",
    "prompt_input_judge": "Q: {instruction} [{input}]\nJ: {judgment}\nA: ",
    "prompt_no_input_judge": "Q: {instruction}\nJ: {judgment}\nA: ",
}


def test_user_json_template(tmp_path):
    path = write_template(tmp_path, {**SHORT, "description": "extra keys are ignored"})
    t = load_template(path)
    assert t.name == path
    assert t.plain("Hi?") == "Q: Hi?\nA: "
    assert t.plain("Add.", "3, 4") == "Q: Add. [3, 4]\nA: "
    assert t.judged("Hi?", "", "Too short.") == "Q: Hi?\nJ: Too short.\nA: "
    assert t.judged("Add.", "3, 4", "Wrong.") == "Q: Add. [3, 4]\nJ: Wrong.\nA: "
    assert t.adds_special_tokens


def test_json_copy_of_alpaca_matches_alpaca(tmp_path):
    t = load_template(write_template(tmp_path, ALPACA))
    alpaca = load_template("alpaca_input")
    assert t.plain("x", "y") == alpaca.plain("x", "y")
    assert t.judged("x", "", "j") == alpaca.judged("x", "", "j")


def test_template_missing_a_key_names_file_and_key(tmp_path):
    formats = dict(SHORT)
    del formats["prompt_no_input_judge"]
    path = write_template(tmp_path, formats)
    with pytest.raises(ValueError, match="prompt_no_input_judge") as err:
        load_template(path)
    assert path in str(err.value)


def test_template_key_that_is_not_a_string(tmp_path):
    path = write_template(tmp_path, {**SHORT, "prompt_input": ["Q: {instruction}"]})
    with pytest.raises(ValueError, match="prompt_input") as err:
        load_template(path)
    assert path in str(err.value)


@pytest.mark.parametrize(
    "bad",
    ["Q: {instruction\nA: ", "Q: {question}\nA: ", "Q: {0}\nA: ", "Q: {instruction:d}\nA: "],
    ids=["unclosed-brace", "unknown-field", "positional", "bad-format-spec"],
)
def test_bad_format_string_names_file_and_key(tmp_path, bad):
    path = write_template(tmp_path, {**SHORT, "prompt_no_input": bad})
    with pytest.raises(ValueError, match="prompt_no_input") as err:
        load_template(path)
    assert path in str(err.value)


def test_attribute_format_field_names_the_file(tmp_path):
    path = write_template(tmp_path, {**SHORT, "prompt_no_input": "Q: {instruction.x}\nA: "})
    with pytest.raises(ValueError, match="prompt_no_input") as err:
        load_template(path)
    assert path in str(err.value)


def test_template_file_that_is_not_an_object(tmp_path):
    path = write_template(tmp_path, [SHORT])
    with pytest.raises(ValueError) as err:
        load_template(path)
    assert path in str(err.value)


def test_template_file_that_is_not_json(tmp_path):
    raises_naming_file(tmp_path, "{not json", load_template, ValueError, "cannot read template")


def test_missing_template_file(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="cannot read template") as err:
        load_template(path)
    assert path in str(err.value)


@pytest.mark.parametrize("name", ["vicuna", "templates/alpaca.yaml", "Alpaca"])
def test_unknown_template_name(name):
    with pytest.raises(ValueError, match="unknown template") as err:
        load_template(name)
    assert repr(name) in str(err.value)
