"""cut.urial: URIAL prompt files used verbatim in the three released turn formats (checked against
a reference written here from URIAL's published rule), the K = 0 file, stop strings per format,
answer cleaning, --print_prompt, the vllm engine through a stand-in module, and the CLI end to end
on the tiny model."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import cut.generate as gen
from cut.errors import ConfigError, DataError, EngineError
from cut.generate import Sampling, cut_at_stop, generate_texts, tokenize_prompts
from cut.urial import (
    DEFAULT_PROMPT,
    STOP,
    adds_special_tokens,
    build_parser,
    clean_answer,
    config_from_args,
    detect_turn_format,
    history_turns,
    load_urial_prompt,
    main,
    render,
    urial_file,
    urial_prompt,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the reference: URIAL's rule
#
# URIAL (Re-Align/URIAL, src/unified_utils.py apply_template + src/fastchat_conversation.py) reads
# the prompt file whole (datasets "text", sample_by="document": UTF-8, universal newlines), makes it
# the system message of a conversation template chosen by the prompt's *name*, appends the turns
# with alternating roles, then the answer role with no message, and calls get_prompt():
#   name holds "inst_help_v5" -> urial_v5:  roles "# User:"/"# Assistant:", style URIAL, seps ""
#   name holds "inst_help_v6" -> urial_v6:  roles "# User:"/"# Assistant:", style URIAL_V6
#   otherwise                 -> urial_backticks: roles "# Query:"/"# Answer:", style URIAL, seps ```
# style URIAL:    message -> "\n" + role + "\n" + sep + "\n" + message + "\n" + sep2 + "\n"
#                 none    -> "\n" + role + "\n" + sep + "\n"
# style URIAL_V6: "\n\n" + role + "\n" + (message.strip("\n") + "\n" if message else "")
# Written here from that description, independently of cut.urial.


def urial_reference(system: str, name: str, chats: list[str]) -> str:
    if "inst_help_v5" in name:
        roles, style, sep = ("# User:", "# Assistant:"), "urial", ""
    elif "inst_help_v6" in name:
        roles, style, sep = ("# User:", "# Assistant:"), "v6", ""
    else:
        roles, style, sep = ("# Query:", "# Answer:"), "urial", "```"
    messages = [(roles[i % 2], chat) for i, chat in enumerate(chats)] + [(roles[1], None)]
    ret = system
    for role, message in messages:
        if style == "v6":
            ret += "\n\n" + role + "\n" + (message.strip("\n") + "\n" if message else "")
        elif message:
            ret += "\n" + role + "\n" + sep + "\n" + message + "\n" + sep + "\n"
        else:
            ret += "\n" + role + "\n" + sep + "\n"
    return ret


# Fixtures of our own in each released layout (texts written for these tests).
# backticks, fences on their own lines (as inst_1k_v4.help), a trailing newline
FENCED = (
    "# Instruction\n\nYou are a tidy helper.\nAnswer in one line.\n\n\n\n"
    "# Query:\n```\nName a fruit.\n```\n\n# Answer:\n```\nA pear.\n```\n\n"
    "# Query:\n```\nShow a loop.\n```\n\n# Answer:\n```\nHere:\n```python\nfor i in range(2): pass\n```\n```\n"
)
# backticks, fences inline on the query line and a space-only line (as inst_1k), no final newline
INLINE = (
    "# Instruction\n\nKeep it short.\n\n\n\n"
    "# Query:\n```Which planet is red?```\n \n# Answer:\n```\nMars.\n```\n\n"
    "# Query:\n```Count to two.``` \n \n# Answer:\n```\nOne, two.\n```"
)
# K = 0: the preamble alone (as inst_only)
ONLY = "# Instruction\n\nBelow are questions to a careful assistant.\nIt answers them well.\n"
# '# User:' / '# Assistant:' with a blank line after each header (as inst_help_v5-*)
USER_BLANK = (
    "# Instruction\n\nTalk plainly.\n\n\n\n# User:\n\nHow warm is tea?\n\n\n\n"
    "# Assistant:\n\nHot, near 70 degrees.\n\n\n\n# User:\n\nAnd ice?\n\n\n\n# Assistant:\n\nZero or less.\n\n"
)
# '# User:' / '# Assistant:' with the text right under the header (as inst_help_v6-1k)
USER_TIGHT = (
    "# Instruction\n\nTalk plainly.\n\n\n# User:\nHow warm is tea?\n\n\n"
    "# Assistant:\nHot, near 70 degrees.\n\n\n# User:\nAnd ice?\n\n\n# Assistant:\nZero or less."
)

FILES = {  # file name (URIAL chooses the format by it) -> text
    "inst_1k_v4.help.txt": FENCED,
    "inst_1k.txt": INLINE,
    "inst_only.txt": ONLY,
    "inst_help_v5-1k.txt": USER_BLANK,
    "inst_help_v6-1k.txt": USER_TIGHT,
    "inst_help_v6-2k.txt": USER_BLANK,  # URIAL's v6-2k has v5's blank lines: the name decides
    "inst_help_v3.txt": USER_BLANK,  # '# User:' headers, but URIAL's rule gives it backticks
}
QUESTION = "What is 2+2?\n\nAnswer with a number."
HISTORY = [("First question?", "\nFirst answer.\n\n```\ncode\n```\n")]


@pytest.fixture()
def prompt_files(tmp_path) -> dict[str, Path]:
    paths = {}
    for name, text in FILES.items():
        paths[name] = tmp_path / name
        paths[name].write_text(text)
    return paths


@pytest.mark.parametrize("name", sorted(FILES))
def test_render_is_urials_assembly(name):
    text = FILES[name]
    want = urial_reference(text, name, [QUESTION])
    assert render(text, QUESTION, name=name) == want
    assert render(text, QUESTION, detect_turn_format(text, name)) == want
    multi = urial_reference(text, name, [HISTORY[0][0], HISTORY[0][1], QUESTION])  # MT-bench turn 2
    assert render(text, QUESTION, name=name, history=HISTORY) == multi
    # the file comes first, byte for byte, and nothing of it is re-rendered
    assert want.startswith(text) and len(want) > len(text)


def test_render_by_hand_one_per_format():
    """The three formats written out, so a reader sees the bytes (and the reference is checked)."""
    assert render("S", "Q", "backticks") == "S\n# Query:\n```\nQ\n```\n\n# Answer:\n```\n"
    assert render("S", "Q", "v5") == "S\n# User:\n\nQ\n\n\n# Assistant:\n\n"
    assert render("S", "\nQ\n\n", "v6") == "S\n\n# User:\nQ\n\n\n# Assistant:\n"
    for fmt, name in (("backticks", "x.txt"), ("v5", "inst_help_v5.txt"), ("v6", "inst_help_v6.txt")):
        assert render("S", "Q", fmt) == urial_reference("S", name, ["Q"])


def test_turn_format_without_a_name_is_read_from_the_headers():
    assert detect_turn_format(FENCED) == detect_turn_format(INLINE) == "backticks"
    assert detect_turn_format(ONLY) == "backticks"  # K = 0: URIAL's default template
    assert detect_turn_format(USER_BLANK) == "v5" and detect_turn_format(USER_TIGHT) == "v6"
    assert render(USER_TIGHT, "Q") == urial_reference(USER_TIGHT, "inst_help_v6", ["Q"])
    with pytest.raises(ConfigError, match="turn_format must be auto or one of backticks, v5, v6"):
        render(FENCED, "Q", "chatml")


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
def test_prompt_file_newlines_are_read_as_urials_loader_does(tmp_path, newline):
    path = tmp_path / "inst_1k.txt"
    path.write_bytes(INLINE.replace("\n", newline).encode())
    prompt = load_urial_prompt(str(path))
    assert prompt.text == INLINE and prompt.turn_format == "backticks"
    assert prompt.render(QUESTION) == urial_reference(INLINE, "inst_1k", [QUESTION])


def test_every_fixture_file_loads_and_renders(prompt_files):
    for name, path in prompt_files.items():
        prompt = load_urial_prompt(str(path))
        assert prompt.text == FILES[name]
        assert prompt.render(QUESTION, HISTORY) == urial_reference(FILES[name], name, [*HISTORY[0], QUESTION])
        assert prompt.tag.startswith(f"urial:{name}:{prompt.turn_format}@")


def test_turn_format_option_overrides_urials_rule(prompt_files, caplog):
    path = str(prompt_files["inst_help_v3.txt"])
    with caplog.at_level("WARNING", logger="cut.urial"):
        urials = load_urial_prompt(path)
    assert urials.turn_format == "backticks"  # what URIAL ran, '# User:' headers notwithstanding
    assert "its examples use '# User:' headers but the queries are written with '# Query:'" in caplog.text
    assert "--turn_format v5" in caplog.text
    own = load_urial_prompt(path, "v5")
    assert own.render("Q") == urial_reference(USER_BLANK, "inst_help_v5", ["Q"]) and own.tag != urials.tag
    assert load_urial_prompt(path, "auto").turn_format == "backticks"


@pytest.mark.parametrize(
    "content, message",
    [(None, "cannot read the URIAL prompt"), (b"\xff\xfe", "not UTF-8 text"), (b" \n\n", "file is empty")],
)
def test_unreadable_prompt_file_is_a_config_error_naming_it(tmp_path, content, message):
    path = tmp_path / "p.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^{path}: .*{message}"):
        load_urial_prompt(str(path))


def test_default_prompt_is_its_file_then_the_query():
    prompt = load_urial_prompt()
    assert prompt.text == DEFAULT_PROMPT.read_text() and prompt.turn_format == "backticks"
    want = DEFAULT_PROMPT.read_text() + "\n# Query:\n```\nWhat is 2+2?\n```\n\n# Answer:\n```\n"
    assert urial_prompt("What is 2+2?") == want == urial_reference(prompt.text, "default", ["What is 2+2?"])
