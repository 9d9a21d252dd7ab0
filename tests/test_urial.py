"""cut.urial: URIAL prompt files used verbatim in the three released turn formats (checked against
a reference written here from URIAL's published rule), the K = 0 file, stop strings per format,
answer cleaning, --print_prompt, the vllm engine through a stand-in module, and the CLI end to end
on the tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import cut.modeling.generate as gen
from cut.data.files import decode_json_fields
from cut.errors import ConfigError, DataError, EngineError
from cut.methods.urial import (
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
from cut.modeling.generate import Sampling, cut_at_stop, generate_texts, tokenize_prompts

from helpers import one_thread
from test_generate import fake_vllm_module

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


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
    with caplog.at_level("WARNING", logger="cut.methods.urial"):
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


# ---------------------------------------------------------------- answers: stop strings and cleaning

# what a base model writes after its answer in each format: the next turn's header, as URIAL's file
CONTINUATIONS = {
    "backticks": "Four.\n```\n\n# Query:\n```\nNext?",
    "v5": "Four.\n\n\n# User:\n\nNext?",
    "v6": "Four.\n\n# User:\nNext?",
}


@pytest.mark.parametrize("fmt", sorted(CONTINUATIONS))
def test_urials_stop_strings_end_the_answer_in_every_format(fmt):
    user_header = next(line for line in render("S", "Q", fmt).split("\n") if line.startswith("#"))
    assert any(user_header.startswith(s) for s in STOP), (fmt, user_header)  # the format's next turn
    assert cut_at_stop(CONTINUATIONS[fmt], STOP) == CONTINUATIONS[fmt].split(user_header)[0]
    raw = cut_at_stop(CONTINUATIONS[fmt], STOP)
    assert clean_answer(raw) == "Four."
    assert STOP == ("# Query", "# User")  # URIAL's unified_infer.py, for every format


@pytest.mark.parametrize(
    "raw, urials, kept",
    [
        ("Paris.\n```\n\n", "Paris.", "Paris."),
        ("Use:\n```python\nx = 1\n```\n```\n", "Use:\npython\nx = 1", "Use:\n```python\nx = 1\n```"),
        ("Use:\n```python\nx = 1\n```", "Use:\npython\nx = 1", "Use:\n```python\nx = 1\n```"),
        ("Paris.\n```\n\n# Que", "Paris.\n\n\n# Que", "Paris."),  # max_new_tokens ended in a header
        ("Hi.\n\n# Use", "Hi.\n\n# Use", "Hi."),
        ("A<|endoftext|>B  ", "A B", "A<|endoftext|>B"),
        ("# Heading\nText", "# Heading\nText", "# Heading\nText"),
        ("", "", ""),
    ],
)
def test_clean_answer_as_urial_and_keeping_fences(raw, urials, kept):
    # URIAL's clear_output: rstrip, remove every ```, <|endoftext|> -> " ", strip
    reference = raw.rstrip().replace("```", "").replace("<|endoftext|>", " ").strip()
    assert clean_answer(raw) == urials == reference
    assert clean_answer(raw, keep_fences=True) == kept


def test_bos_is_added_once(tiny_model):
    from tokenizers import processors

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)]
    )
    for text in (urial_prompt("Hi"), tok.bos_token + urial_prompt("Hi")):
        ids = tokenize_prompts(tok, [text], adds_special_tokens(tok, text))[0]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


# ---------------------------------------------------------------- stop strings, row by row

PROMPTS = [
    "What is the capital of France?",
    "Add the numbers 3 and 4.",
    "Name a primary colour.",
    "The response is perfect.",
    "Below is an instruction that describes a task.",
    "Red is a primary colour. Green is not one in paint.",
]


def _first_hits(tok, rows: list[list[int]], text: str) -> list[int | None]:
    """Per row, how many new tokens until its decoded text holds `text` (None: never)."""
    hits = []
    for row in rows:
        k = next(
            (k for k in range(1, len(row) + 1) if text in tok.decode(row[:k], skip_special_tokens=True)), None
        )
        hits.append(k)
    return hits


def _stop_string(tok, rows: list[list[int]]) -> str:
    """A decoded token the greedy rows reach at the most different steps: a stop string that ends
    them at different points, found rather than hoped for."""
    candidates = {tok.decode([t]).strip() for row in rows for t in row[1:]} - {""}
    return max(sorted(candidates), key=lambda s: len({k for k in _first_hits(tok, rows, s) if k}))


def test_rows_stop_on_their_own_and_match_one_by_one(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    sampling = Sampling(max_new_tokens=24)
    cfg = sampling.generation_config(gen.pad_id_of(tok), gen.eos_ids_of(model, tok))
    ids = tokenize_prompts(tok, PROMPTS, True)
    eos = set(gen.eos_ids_of(model, tok))
    free = gen.compacting_decode(model, *gen.left_pad(ids, cfg.pad_token_id), cfg, eos)
    stop = _stop_string(tok, free)
    hits = _first_hits(tok, free, stop)
    assert len({k for k in hits if k}) > 1, f"no stop string ends rows at different steps ({hits})"

    # the decoder: each row ends on the step its text first holds the stop string, the others go on
    check = gen._stop_checker(tok, [stop])
    stopped = gen.compacting_decode(model, *gen.left_pad(ids, cfg.pad_token_id), cfg, eos, check)
    assert [len(r) for r in stopped] == [k or len(f) for k, f in zip(hits, free, strict=True)]
    assert all(s == f[: len(s)] for s, f in zip(stopped, free, strict=True))

    # the texts: cut before the stop string, the same in one batch as one by one
    batched = generate_texts(model, tok, PROMPTS, sampling, batch_size=6, progress=False, stop=[stop])
    single = generate_texts(model, tok, PROMPTS, sampling, batch_size=1, progress=False, stop=[stop])
    want = [cut_at_stop(tok.decode(f, skip_special_tokens=True), [stop]).strip() for f in free]
    assert batched == single == want
    assert all(stop not in t for t in batched)


def test_bad_stop_strings_are_refused():
    for stop in (["# Query", ""], [], [3]):
        with pytest.raises(ConfigError, match="stop strings must be one or more non-empty strings"):
            config_from_args({"stop": stop, "temperature": 0.0})


# ---------------------------------------------------------------- the prompt fills the context


def test_a_long_prompt_is_never_cut_its_answer_has_less_room(tiny_model, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()  # context: 512 tokens
    tok = AutoTokenizer.from_pretrained(tiny_model)
    from cut.methods.urial import UrialPrompt, generate_urial_texts

    prompt = UrialPrompt("# Instruction\n\nBe kind. ", "backticks", "long")
    queries = ["Hi?", "Say hello. " * 40]
    texts = [prompt.render(q) for q in queries]
    lengths = [len(r) for r in tokenize_prompts(tok, texts, True)]
    assert lengths[0] < 512 - 200 < lengths[1] < 512, lengths
    seen = []
    real = gen._generate_batch

    def spy(model, tokenizer, rows, gen_config, stop=()):
        seen.append(([len(r) for r in rows], gen_config.max_new_tokens))
        return real(model, tokenizer, rows, gen_config, stop)

    monkeypatch.setattr(gen, "_generate_batch", spy)
    out = generate_urial_texts(
        model, tok, queries, None, prompt, Sampling(max_new_tokens=200), progress=False
    )
    assert len(out) == 2
    room = (512 - lengths[1]) // 64 * 64 if 512 - lengths[1] >= 64 else 512 - lengths[1]
    assert sorted(seen) == sorted([([lengths[0]], 200), ([lengths[1]], room)])  # whole prompts, capped rooms

    with pytest.raises(
        ConfigError, match=r"^data\.json: record 1: its URIAL prompt is \d+ tokens, the model's context 512"
    ):
        generate_urial_texts(
            model, tok, ["Hi", "word " * 600], None, prompt, Sampling(max_new_tokens=8), progress=False,
            where=lambda i: f"data.json: record {i}",
        )  # fmt: skip


# ---------------------------------------------------------------- records and the CLI


@pytest.mark.parametrize(
    "history, message",
    [
        ("earlier", "record 1, field 'history': expected a list of {\"query\": ..., \"answer\": ...} objects, got str"),
        ([["q", "a"]], "record 1, field 'history[0]': expected an object"),
        ([{"query": "q"}], "record 1, field 'history[0].answer': missing, expected a non-empty string"),
        ([{"query": "q", "answer": 3}], "record 1, field 'history[0].answer': int, expected"),
        ([{"query": " ", "answer": "a"}], "record 1, field 'history[0].query': empty, expected"),
        ([{"query": "q", "answer": "a", "turn": 1}], "record 1, field 'history[0]': unknown key(s) turn"),
    ],
)  # fmt: skip
def test_bad_history_names_file_record_and_field(tiny_model, tmp_path, capsys, history, message):
    path = tmp_path / "questions.json"
    path.write_text(json.dumps([{"instruction": "A"}, {"instruction": "B", "history": history}]))
    out = tmp_path / "answers.json"
    with pytest.raises(DataError) as err:
        urial_file(str(tiny_model), str(path), str(out))
    assert str(err.value).startswith(f"{path}: {message}")
    argv = ["--model", str(tiny_model), "--data_path", str(path), "--output_file", str(out)]
    assert main(argv) == 2
    assert f"{path}: {message}" in capsys.readouterr().err
    assert not out.exists()
    assert main(["--data_path", str(path), "--print_prompt"]) == 2  # checked before printing too


def test_history_turns():
    rec = {"history": [{"query": "q1", "answer": "a1"}, {"query": "q2", "answer": "a2"}]}
    assert history_turns("f", 0, rec) == [("q1", "a1"), ("q2", "a2")]
    assert history_turns("f", 0, {}) == []


def _cfg(*extra):
    args = build_parser().parse_args(["--model", "m", "--data_path", "d", "--output_file", "o", *extra])
    return config_from_args(vars(args))


def test_defaults_are_urials():
    cfg = _cfg()
    s = cfg.sampling
    assert (s.temperature, s.top_p, s.repetition_penalty, s.max_new_tokens) == (0.0, 1.0, 1.1, 2048)
    assert (cfg.turn_format, cfg.stop, cfg.keep_fences, cfg.engine) == (
        "auto",
        ("# Query", "# User"),
        False,
        "auto",  # vllm (URIAL's runs' engine) where it imports, else hf
    )
    assert _cfg("--sample").sampling.temperature == 0.3
    assert _cfg("--sample", "--temperature", "0.7").sampling.temperature == 0.7
    with pytest.raises(ConfigError, match="--sample samples"):
        _cfg("--sample", "--temperature", "0")
    new = _cfg("--stop", "###", "--stop", "User:", "--keep_fences", "--turn_format", "v6", "--engine", "vllm")
    assert (new.stop, new.keep_fences, new.turn_format, new.engine) == (("###", "User:"), True, "v6", "vllm")


def test_every_earlier_flag_still_parses():
    cfg = _cfg(
        "--urial_prompt", "p.txt", "--batch_size", "4", "--max_new_tokens", "512", "--temperature", "0.2",
        "--repetition_penalty", "1.0", "--seed", "7", "--generator", "g", "--dataset", "d", "--limit", "3",
        "--dtype", "fp32", "--device", "cpu", "--trust_remote_code",
    )  # fmt: skip
    assert (cfg.urial_prompt, cfg.batch_size, cfg.sampling.max_new_tokens, cfg.sampling.temperature) == (
        "p.txt", 4, 512, 0.2,
    )  # fmt: skip
    assert (cfg.sampling.seed, cfg.generator, cfg.limit, cfg.dtype, cfg.trust_remote_code) == (
        7,
        "g",
        3,
        "fp32",
        True,
    )


def test_model_and_output_file_are_needed_unless_printing(tmp_path, capsys):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"instruction": "A"}]))
    with pytest.raises(SystemExit) as exit_:
        main(["--data_path", str(path)])
    assert exit_.value.code == 2
    assert "--model, --output_file (or --print_prompt)" in capsys.readouterr().err


@pytest.fixture()
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("a model or tokenizer was loaded")

    for name in ("load_model", "load_tokenizer", "load_vllm"):
        monkeypatch.setattr(f"cut.urial.{name}", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)


@pytest.mark.parametrize("name", sorted(FILES))
def test_print_prompt_is_the_exact_prompt_without_a_model(prompt_files, tmp_path, capsys, no_model, name):
    path = tmp_path / "q.jsonl"
    rows = [
        {"instruction": "Second turn?", "history": [{"query": "First?", "answer": "Yes."}]},
        {"instruction": "B"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--data_path", str(path), "--urial_prompt", str(prompt_files[name]), "--print_prompt"]) == 0
    out = capsys.readouterr().out
    assert out == urial_reference(FILES[name], name, ["First?", "Yes.", "Second turn?"])
    argv = ["--data_path", str(path), "--urial_prompt", str(prompt_files[name]), "--print_prompt"]
    assert main([*argv, "--turn_format", "v6"]) == 0  # the option overrides URIAL's rule
    assert capsys.readouterr().out == urial_reference(
        FILES[name], "inst_help_v6", ["First?", "Yes.", "Second turn?"]
    )


def test_print_prompt_of_the_default_file_with_input(tmp_path, capsys, no_model):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"instruction": "Add.", "input": "3 and 4"}]))
    assert main(["--model", "ignored", "--data_path", str(path), "--print_prompt"]) == 0
    assert capsys.readouterr().out == urial_reference(
        DEFAULT_PROMPT.read_text(), "default", ["Add.\n\n3 and 4"]
    )


@pytest.fixture()
def long_tiny_model(tiny_model, tmp_path):
    """The tiny model with room for the default prompt (about 2,400 of its tokens)."""
    folder = tmp_path / "long"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.max_position_embeddings = 4096
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def test_cli_end_to_end(long_tiny_model, prompt_files, tmp_path, monkeypatch):
    rows = [
        {"id": "a", "instruction": "What is the capital of France?"},
        {"id": "b", "instruction": "Add the numbers.", "input": "3 and 4"},
        {"id": "c", "instruction": "And in paint?", "history": [{"query": "Name a primary colour.", "answer": "Red."}]},
    ]  # fmt: skip
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen: list[str] = []
    real = gen._generate_batch

    def spy(model, tokenizer, ids, gen_config, stop=()):
        assert tuple(stop) == ("# Query", "# User"), "URIAL answers stop at the next turn"
        seen.extend(tokenizer.decode(r) for r in ids)
        return real(model, tokenizer, ids, gen_config, stop)

    monkeypatch.setattr(gen, "_generate_batch", spy)
    name = "inst_help_v5-1k.txt"
    out = tmp_path / "out" / "answers.json"
    argv = ["--model", str(long_tiny_model), "--data_path", str(path), "--output_file", str(out)]
    argv += ["--max_new_tokens", "6", "--batch_size", "2"]
    assert main([*argv, "--urial_prompt", str(prompt_files[name])]) == 0
    got = json.loads(out.read_text())
    assert [r["instruction"] for r in got] == [r["instruction"] for r in rows]
    assert all(isinstance(r["output"], str) and "```" not in r["output"] for r in got)
    first = got[0]
    assert first["generator"] == "long+urial" and first["dataset"] == "questions"
    assert (first["temperature"], first["repetition_penalty"], first["max_new_tokens"]) == (0.0, 1.1, 6)
    assert first["prompt_template"] == load_urial_prompt(str(prompt_files[name])).tag
    assert first["prompt_template"].startswith(f"urial:{name}:v5@")
    # lists as JSON text, which alpaca_eval can hash (cut.io.encode_json_fields)
    assert (first["stop"], first["json_fields"], first["keep_fences"]) == (
        '["# Query", "# User"]',
        "stop",
        False,
    )
    assert decode_json_fields(got[2])["history"] == rows[2]["history"] and got[1]["input"] == "3 and 4"
    text = FILES[name]
    assert sorted(seen) == sorted(
        [
            urial_reference(text, name, ["What is the capital of France?"]),
            urial_reference(text, name, ["Add the numbers.\n\n3 and 4"]),
            urial_reference(text, name, ["Name a primary colour.", "Red.", "And in paint?"]),
        ]
    )

    # a rerun resumes: nothing to generate, nothing changed; another prompt, format or cleaning is refused
    before, seen[:] = out.read_text(), []
    assert main([*argv, "--urial_prompt", str(prompt_files[name])]) == 0
    assert not seen and out.read_text() == before
    assert main(argv) == 2 and out.read_text() == before
    assert main([*argv, "--urial_prompt", str(prompt_files[name]), "--turn_format", "v6"]) == 2
    assert main([*argv, "--urial_prompt", str(prompt_files[name]), "--keep_fences"]) == 2
    assert out.read_text() == before

    # the default prompt on a fresh file
    default = tmp_path / "default.json"
    argv[5] = str(default)
    assert main([*argv, "--limit", "1"]) == 0
    assert seen == [urial_prompt("What is the capital of France?")]
    assert json.loads(default.read_text())[0]["prompt_template"] == load_urial_prompt().tag


def test_cli_refuses_an_unreadable_prompt_file_before_loading(tiny_model, tmp_path, capsys, no_model):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"instruction": "A"}]))
    out = tmp_path / "o.json"
    argv = ["--model", str(tiny_model), "--data_path", str(path), "--output_file", str(out)]
    assert main([*argv, "--urial_prompt", str(tmp_path / "missing.txt")]) == 2
    assert f"{tmp_path / 'missing.txt'}: cannot read the URIAL prompt" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- the vllm engine, through a stand-in


@pytest.fixture()
def fake_vllm(monkeypatch):
    """A stand-in vllm module that records what cut.urial hands it and answers with a canned
    continuation that runs into the next turn (a real vLLM would stop there itself)."""
    answer = "Answer:\n```python\nx = 1\n```\n```\n\n# User:\nmore"
    return fake_vllm_module(monkeypatch, lambda p: answer, max_model_len=4096)


def test_vllm_engine_gets_urials_prompts_and_settings(
    long_tiny_model, prompt_files, tmp_path, fake_vllm, monkeypatch
):
    monkeypatch.setattr(
        "cut.methods.urial.load_model", lambda *a, **k: pytest.fail("transformers model loaded")
    )
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"instruction": "Hi?"}, {"instruction": "Bye?"}]))
    name = "inst_1k.txt"
    rows = urial_file(
        str(long_tiny_model), str(path), str(tmp_path / "v.json"), engine="vllm", urial_prompt=str(prompt_files[name]),
        dtype="bfloat16", seed=3, progress=False,
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(long_tiny_model)
    want = [tok(urial_reference(INLINE, name, [q]))["input_ids"] for q in ("Hi?", "Bye?")]
    assert [p["prompt_token_ids"] for p in fake_vllm["prompts"]] == want
    assert fake_vllm["init"]["dtype"] == "bfloat16" and fake_vllm["init"]["seed"] == 3
    p = fake_vllm["params"][0]
    assert (p["temperature"], p["top_p"], p["repetition_penalty"], p["max_tokens"]) == (0.0, 1.0, 1.1, 2048)
    assert (p["stop"], p["include_stop_str_in_output"]) == (["# Query", "# User"], False)
    assert len({p["seed"] for p in fake_vllm["params"]}) == 2, "one seed per request"
    assert [r["output"] for r in rows] == [
        "Answer:\npython\nx = 1",
        "Answer:\npython\nx = 1",
    ]  # URIAL's cleaning

    kept = urial_file(
        str(long_tiny_model), str(path), str(tmp_path / "k.json"), engine="vllm",
        urial_prompt=str(prompt_files[name]), keep_fences=True, progress=False,
    )  # fmt: skip
    assert kept[0]["output"] == "Answer:\n```python\nx = 1\n```"


def test_vllm_missing_or_an_adapter_fails_before_loading(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises, installed or not
    monkeypatch.setattr("cut.methods.urial.load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded"))
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"instruction": "A"}]))
    out = tmp_path / "o.json"
    argv = [
        "--model",
        str(tiny_model),
        "--data_path",
        str(path),
        "--output_file",
        str(out),
        "--engine",
        "vllm",
    ]
    assert main(argv) == 2
    assert "--engine vllm needs the vllm package" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(EngineError):
        urial_file(str(tiny_model), str(path), str(out), engine="vllm")


def test_the_old_parser_names_the_new_way():
    from cut.methods.urial import parse_urial_prompt

    with pytest.raises(
        ConfigError, match=r"used verbatim; use load_urial_prompt\(path, turn_format\) or render"
    ):
        parse_urial_prompt("# Query:\n```\nq\n```\n")


# ---------------------------------------------------------------- the engine options, shared with cut generate


def test_urial_takes_cut_generates_engine_options(tmp_path, capsys):
    from cut.methods.urial import UrialOptions
    from cut.modeling.generate import EngineOptions, GenerateOptions

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for flag in (
        "--engine",
        "--enforce_eager",
        "--max_model_len",
        "--gpu_memory_utilization",
        "--kv_cache_gb",
    ):
        assert flag in out
    # one declaration: the same group class in both tools
    hints = {
        cls: cls.__dataclass_fields__["engine_options"].default_factory
        for cls in (UrialOptions, GenerateOptions)
    }
    assert set(hints.values()) == {EngineOptions}
    argv = ["--model", "m", "--data_path", "d.json", "--output_file", str(tmp_path / "o.json")]
    for flag, value in (
        ("--max_model_len", "0"),
        ("--gpu_memory_utilization", "1.5"),
        ("--enforce_eager", "x"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, flag, value])
        assert exit_.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    cfg = _cfg("--enforce_eager", "false", "--max_model_len", "64", "--kv_cache_gb", "1.5")
    assert (cfg.enforce_eager, cfg.max_model_len, cfg.kv_cache_gb) == (False, 64, 1.5)
    with pytest.raises(ConfigError, match="gpu_memory_utilization must be in"):
        config_from_args({"gpu_memory_utilization": 2.0})


def test_urial_vllm_engine_gets_the_engine_options(tiny_model, tmp_path, fake_vllm, monkeypatch):
    monkeypatch.setattr(
        "cut.methods.urial.load_model", lambda *a, **k: pytest.fail("transformers model loaded")
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"instruction": "Hi?"}]))
    argv = ["--model", str(tiny_model), "--data_path", str(path), "--output_file", str(tmp_path / "o.json")]
    assert main([*argv, "--engine", "vllm", "--max_model_len", "256", "--kv_cache_gb", "0.5"]) == 0
    init = fake_vllm["init"]
    assert (init["enforce_eager"], init["max_model_len"], init["kv_cache_memory_bytes"]) == (True, 256, 2**29)
    assert init["dtype"] == "float32"  # cut generate's auto on a CPU
    assert main([*argv[:-1], str(tmp_path / "p.json"), "--engine", "vllm", "--enforce_eager", "false"]) == 0
    assert fake_vllm["init"]["enforce_eager"] is False and "max_model_len" not in fake_vllm["init"]


def test_urial_reads_a_yaml_config(tmp_path, capsys):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"instruction": "A"}]))
    config = tmp_path / "urial.yaml"
    config.write_text(f"data_path: {path}\nturn_format: v5\nengine_options:\n  batch_size: 2\n")
    assert main(["--config", str(config), "--print_prompt"]) == 0
    assert capsys.readouterr().out.endswith("\n# User:\n\nA\n\n\n# Assistant:\n\n")
