"""cut.urial: prompt files and assembly (byte-exact), per-row stop strings, answer cleaning, records
with history, and the CLI end to end on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import cut.generate as gen
from cut.errors import ConfigError, DataError
from cut.generate import Sampling, cut_at_stop, generate_texts, tokenize_prompts
from cut.urial import (
    DEFAULT_PROMPT,
    adds_special_tokens,
    build_parser,
    clean_answer,
    config_from_args,
    history_turns,
    load_urial_prompt,
    main,
    urial_file,
    urial_prompt,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# URIAL's layout with its quirks: a line holding a space between query and answer, two blank lines
# between examples, an answer with a trailing blank line, a nested code block, no final newline
USER_FILE = (
    "# Instruction\n\nBe brief.\nBe kind.\n\n"
    "# Query:\n```\nHi?\n```\n \n# Answer:\n```\nHello!\n\n```\n\n\n"
    "# Query:\n```\nShow code\n```\n \n# Answer:\n```\nHere:\n```python\nprint(1)\n```\n```"
)
# what URIAL's urial_backticks template writes for it, each turn "\n" + header + "\n```\n" + text + "\n```\n"
USER_EXPECTED = """# Instruction

Be brief.
Be kind.

# Query:
```
Hi?
```

# Answer:
```
Hello!

```

# Query:
```
Show code
```

# Answer:
```
Here:
```python
print(1)
```
```

# Query:
```
Earlier question
```

# Answer:
```
Earlier answer
```

# Query:
```
New question
```

# Answer:
```
"""


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text(USER_FILE)
    return path


def test_default_prompt_is_its_file_then_the_query():
    prompt = load_urial_prompt()
    assert prompt.preamble.startswith("# Instructions\n\nBelow are conversations between a user and an AI")
    assert [q for q, _ in prompt.examples] == [
        "How long does it take light from the Sun to reach Earth?",
        "How should I prepare for a job interview?",
        "How can I get into my neighbour's Wi-Fi without them knowing?",
    ]
    structured, refusal = prompt.examples[1][1], prompt.examples[2][1]
    assert structured.count("\n## ") == 4 and refusal.startswith("I can't help with that.")
    # the default file is written in the canonical layout, so the model sees exactly the file
    want = DEFAULT_PROMPT.read_text() + "\n# Query:\n```\nWhat is 2+2?\n```\n\n# Answer:\n```\n"
    assert urial_prompt("What is 2+2?") == want
    assert urial_prompt("What is 2+2?", prompt=load_urial_prompt(None)) == want


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_user_file_in_urial_layout(tmp_path, newline):
    path = tmp_path / "mine.txt"
    path.write_bytes(USER_FILE.replace("\n", newline).encode())
    prompt = load_urial_prompt(str(path))
    assert prompt.examples == (("Hi?", "Hello!\n"), ("Show code", "Here:\n```python\nprint(1)\n```"))
    got = urial_prompt("New question", [("Earlier question", "Earlier answer")], prompt)
    assert got == USER_EXPECTED
    assert prompt.tag.startswith("urial:mine.txt@") and prompt.tag != load_urial_prompt().tag


def test_prompt_without_preamble_starts_with_its_first_block(tmp_path):
    path = tmp_path / "bare.md"
    path.write_text("# Query:\n```\nq\n```\n# Answer:\n```\na\n```\n")
    assert urial_prompt("x", prompt=load_urial_prompt(str(path))) == (
        "# Query:\n```\nq\n```\n\n# Answer:\n```\na\n```\n\n# Query:\n```\nx\n```\n\n# Answer:\n```\n"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("Just a preamble.\n", "no '# Query:' line"),
        ("P\n# Query:\n```\nq\n```\n# Answer:\na\n", "example 1, '# Answer:' block: line 7: expected a line ``` opening"),
        ("P\n# Query:\n```\nq\n```\n# Answer:\n```\na\n```\n# Query:\n```\nq2\n```\n", "example 2: the file ends before its '# Answer:' block"),
        ("P\n# Query:\n```\nq\n```\n# Answer:\n```\na\n```\nstray text\n", "example 2: line 10: expected '# Query:', found 'stray text'"),
        ("P\n# Query:\n```\nq\n```\n# Answer:\n```\na\n", "example 1, '# Answer:' block: the ``` opened on line 7 is never closed"),
        ("P\n# Query:\n```\n\n```\n# Answer:\n```\na\n```\n", "example 1, '# Query:' block: line 3: empty text"),
    ],
)  # fmt: skip
def test_malformed_prompt_file_names_file_and_block(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"^" + str(path).replace(".", r"\.") + ": ") as err:
        load_urial_prompt(str(path))
    assert message in str(err.value)


def test_missing_prompt_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the URIAL prompt"):
        load_urial_prompt(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize(
    "raw, want",
    [
        ("Paris.\n```\n\n", "Paris."),  # cut before '# Query': the closing fence remains
        ("  Paris.```", "Paris."),
        ("Paris.\n```\n\n# Que", "Paris."),  # max_new_tokens ended inside the next header
        ("Paris.\n```\n\n#", "Paris."),
        ("Use:\n```python\nx = 1\n```", "Use:\n```python\nx = 1\n```"),  # its own code block stays
        ("Use:\n```python\nx = 1\n```\n```\n", "Use:\n```python\nx = 1\n```"),
        ("# Heading\nText", "# Heading\nText"),
        ("", ""),
    ],
)
def test_clean_answer(raw, want):
    assert clean_answer(raw) == want


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
    cfg = sampling.generation_config(gen._pad_id(tok), gen._eos_ids(model, tok))
    ids = tokenize_prompts(tok, PROMPTS, True)
    eos = set(gen._eos_ids(model, tok))
    free = gen._decode(model, *gen.left_pad(ids, cfg.pad_token_id), cfg, eos)
    stop = _stop_string(tok, free)
    hits = _first_hits(tok, free, stop)
    assert len({k for k in hits if k}) > 1, f"no stop string ends rows at different steps ({hits})"

    # the decoder: each row ends on the step its text first holds the stop string, the others go on
    check = gen._stop_checker(tok, [stop])
    stopped = gen._decode(model, *gen.left_pad(ids, cfg.pad_token_id), cfg, eos, check)
    assert [len(r) for r in stopped] == [k or len(f) for k, f in zip(hits, free, strict=True)]
    assert all(s == f[: len(s)] for s, f in zip(stopped, free, strict=True))

    # the texts: cut before the stop string, the same in one batch as one by one
    batched = generate_texts(model, tok, PROMPTS, sampling, batch_size=6, progress=False, stop=[stop])
    single = generate_texts(model, tok, PROMPTS, sampling, batch_size=1, progress=False, stop=[stop])
    want = [cut_at_stop(tok.decode(f, skip_special_tokens=True), [stop]).strip() for f in free]
    assert batched == single == want
    assert all(stop not in t for t in batched)
    plain = generate_texts(model, tok, PROMPTS, sampling, batch_size=6, progress=False)
    assert plain == [tok.decode(f, skip_special_tokens=True).strip() for f in free], "no stop: output changed"


def test_bad_stop_strings_fail_before_generating(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(ConfigError, match="stop strings must be non-empty strings"):
        generate_texts(model, tok, ["Hi"], Sampling(max_new_tokens=2), progress=False, stop=["# Query", ""])


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


def test_history_turns():
    rec = {"history": [{"query": "q1", "answer": "a1"}, {"query": "q2", "answer": "a2"}]}
    assert history_turns("f", 0, rec) == [("q1", "a1"), ("q2", "a2")]
    assert history_turns("f", 0, {}) == []


def test_sampling_defaults_are_the_papers():
    def cfg(*extra):
        args = build_parser().parse_args(["--model", "m", "--data_path", "d", "--output_file", "o", *extra])
        return config_from_args(vars(args))

    greedy = cfg().sampling
    assert (greedy.temperature, greedy.repetition_penalty, greedy.max_new_tokens) == (0.0, 1.1, 512)
    assert cfg("--sample").sampling.temperature == 0.3
    assert cfg("--sample", "--temperature", "0.7").sampling.temperature == 0.7
    with pytest.raises(ConfigError, match="--sample samples"):
        cfg("--sample", "--temperature", "0")


@pytest.fixture()
def long_tiny_model(tiny_model, tmp_path):
    """The tiny model with room for the default prompt (about 2,400 of its tokens)."""
    folder = tmp_path / "long"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.max_position_embeddings = 4096
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def test_cli_end_to_end(long_tiny_model, user_file, tmp_path, monkeypatch):
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
        assert tuple(stop) == ("# Query",), "URIAL answers must stop at the next query block"
        seen.extend(tokenizer.decode(r) for r in ids)
        return real(model, tokenizer, ids, gen_config, stop)

    monkeypatch.setattr(gen, "_generate_batch", spy)
    out = tmp_path / "out" / "answers.json"
    argv = ["--model", str(long_tiny_model), "--data_path", str(path), "--output_file", str(out)]
    argv += ["--max_new_tokens", "6", "--batch_size", "2"]
    assert main([*argv, "--urial_prompt", str(user_file)]) == 0
    got = json.loads(out.read_text())
    assert isinstance(got, list) and all(isinstance(r, dict) for r in got)
    assert [r["instruction"] for r in got] == [r["instruction"] for r in rows]
    assert all(isinstance(r["output"], str) for r in got)
    first = got[0]
    assert first["generator"] == "long+urial" and first["dataset"] == "questions"
    assert (first["temperature"], first["repetition_penalty"], first["max_new_tokens"]) == (0.0, 1.1, 6)
    assert first["prompt_template"] == load_urial_prompt(str(user_file)).tag
    assert got[2]["history"] == rows[2]["history"] and got[1]["input"] == "3 and 4"
    prompt = load_urial_prompt(str(user_file))
    assert sorted(seen) == sorted(
        [
            urial_prompt("What is the capital of France?", None, prompt),
            urial_prompt("Add the numbers.\n\n3 and 4", None, prompt),
            urial_prompt("And in paint?", [("Name a primary colour.", "Red.")], prompt),
        ]
    )

    # a rerun resumes: nothing to generate, nothing changed; another prompt file is refused
    before, seen[:] = out.read_text(), []
    assert main([*argv, "--urial_prompt", str(user_file)]) == 0
    assert not seen and out.read_text() == before
    assert main(argv) == 2 and out.read_text() == before

    # the default prompt on a fresh file
    default = tmp_path / "default.json"
    argv[5] = str(default)
    assert main([*argv, "--limit", "1"]) == 0
    assert seen == [urial_prompt("What is the capital of France?")]
    assert json.loads(default.read_text())[0]["prompt_template"] == load_urial_prompt().tag


def test_cli_refuses_a_malformed_prompt_file_before_loading(tiny_model, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.txt"
    bad.write_text("P\n# Query:\n```\nq\n")
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"instruction": "A"}]))
    monkeypatch.setattr("cut.urial.load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "o.json"
    argv = ["--model", str(tiny_model), "--data_path", str(path), "--output_file", str(out)]
    assert main([*argv, "--urial_prompt", str(bad)]) == 2
    message = f"{bad}: example 1, '# Query:' block: the ``` opened on line 3 is never closed"
    assert message in capsys.readouterr().err
    assert not out.exists()
