"""Multi-turn chat records (cut.data.records `history`, cut.data.templates chat): the model trains on
the conversation it will see at inference, not on one user message holding a transcript.

Expected prompts are rendered here straight through the tokenizer's `apply_chat_template` (and, for
the single-turn records, by a plain re-implementation of each template), never by the template code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from cut.analysis.ratios import bounded
from cut.data.pairs import CUTCollator, tokenize_example
from cut.data.records import Example, Record, load_records
from cut.data.templates import ALPACA, load_template
from cut.training.loss import Role

from helpers import tiny_train_config

SUFFIX = "\n\nWrite a response that matches this judgment of it:\n"  # the chat judged suffix, written out
JUDGMENT = "8 is wrong: 3 + 4 = 7."
MESSAGES = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "Add 1 and 1."},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "Add 3 and 4."},
    {"role": "assistant", "content": "The sum is 8."},
]
FLAT = "system: Answer with a number.\nuser: Add 1 and 1.\nassistant: 2"


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    return AutoTokenizer.from_pretrained(tiny_chat_model)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def chat(tok, turns: list[dict]) -> str:
    return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def with_last_user(turns: list[dict], content: str) -> list[dict]:
    return [*turns[:-1], {"role": "user", "content": content}]


@pytest.fixture
def record(tmp_path) -> Record:
    (r,) = load_records(write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES, "judgment": JUDGMENT}]))
    return r


# --------------------------------------------------------------------------------------------
# records keep the turns
# --------------------------------------------------------------------------------------------


def test_messages_and_chat_prompts_keep_their_turns(tmp_path):
    rows = [
        {"messages": MESSAGES, "judgment": JUDGMENT},
        {"prompt": MESSAGES[:4], "completion": [MESSAGES[4]], "label": False, "judgment": JUDGMENT},
        {"messages": MESSAGES[3:]},  # one user turn: no history, as before
        {"prompt": "Add 3 and 4.", "completion": "7"},
    ]
    a, b, single, plain = load_records(write_jsonl(tmp_path / "mixed.jsonl", rows))
    turns = tuple((m["role"], m["content"]) for m in MESSAGES[:3])
    for r in (a, b):
        assert (r.instruction, r.input, r.output, r.history) == ("Add 3 and 4.", FLAT, "The sum is 8.", turns)
    assert (single.input, single.history) == ("", ())
    assert (plain.input, plain.history) == ("", ())


# --------------------------------------------------------------------------------------------
# chat renders the conversation
# --------------------------------------------------------------------------------------------


def test_chat_plain_is_the_conversation_and_judged_differs_in_the_last_user_turn(tok, record):
    template = load_template("chat", tok)
    plain, judged = template.prompts(record, record.judgment)
    assert plain == chat(tok, MESSAGES[:4])
    assert judged == chat(tok, with_last_user(MESSAGES[:4], "Add 3 and 4." + SUFFIX + JUDGMENT))
    assert FLAT not in plain and "system: " not in plain  # the transcript is not repeated
    head = chat(tok, MESSAGES[:3])[: -len("<s>assistant\n")]  # the turns before the last user turn
    assert plain.startswith(head) and judged.startswith(head)
    assert plain.count("<s>user\n") == judged.count("<s>user\n") == 2


def test_response_tokens_and_targets_are_the_last_assistant_turn(tok, record):
    """As the trainer tokenises: the same response ids after both contexts, and the loss targets are
    exactly the last assistant turn's tokens (plus EOS), nothing of the earlier turns."""
    template = load_template("chat", tok)
    feat = tokenize_example(Example(record, record.judgment), template, tok, 4096)
    response = feat["response_ids"]
    assert tok.decode(response) == "The sum is 8." + tok.eos_token
    assert tok.decode(feat["prompt_ids"]) == chat(tok, MESSAGES[:4])
    assert tok.decode(feat["judged_ids"]) == chat(
        tok, with_last_user(MESSAGES[:4], "Add 3 and 4." + SUFFIX + JUDGMENT)
    )
    full = tok.apply_chat_template(MESSAGES, tokenize=False)  # the whole conversation, as a transcript
    assert tok.decode(feat["prompt_ids"] + response) == full

    batch = CUTCollator(pad_token_id=tok.pad_token_id, packing=True)([feat])
    ids = batch["input_ids"][0]
    cu = batch["cu_seq_lens"].tolist()  # judged sequence, then the plain one
    for role, (a, b) in zip((Role.ALIGN_N, Role.MISALIGN_N), zip(cu[:-1], cu[1:], strict=True), strict=True):
        mine = batch["tgt_role"] == role
        pos = batch["tgt_pos"][mine] + 1  # the predicted token sits one after the predicting state
        assert batch["tgt_ids"][mine].tolist() == response == ids[pos].tolist()
        assert pos.tolist() == list(range(b - len(response), b))  # the sequence's last tokens, no others
        assert a < pos.min()


def test_alpaca_and_json_templates_still_get_the_flattened_turns(tok, record, tmp_path):
    alpaca = load_template("alpaca")
    plain, judged = alpaca.prompts(record, record.judgment)
    assert plain == ALPACA["prompt_no_input"].format(instruction=f"Add 3 and 4.\n{FLAT}")
    assert judged == ALPACA["prompt_no_input_judge"].format(
        instruction=f"Add 3 and 4.\n{FLAT}", judgment=JUDGMENT
    )
    plain, _ = load_template("alpaca_input").prompts(record, None)
    assert plain == ALPACA["prompt_input"].format(instruction="Add 3 and 4.", input=FLAT)


def test_bounded_cuts_a_long_turn_to_the_same_training_tokens(tok, tmp_path):
    """cut inspect's tail cut covers the turns: a huge earlier turn is cut, the kept prompt tokens are not."""
    long = " ".join(f"word{i}" for i in range(20_000))
    msgs = [{"role": "user", "content": long}, *MESSAGES[2:]]
    (r,) = load_records(write_jsonl(tmp_path / "long.jsonl", [{"messages": msgs, "judgment": JUDGMENT}]))
    template, cutoff = load_template("chat", tok), 64
    ex = Example(r, r.judgment)
    cut = bounded(ex, tok, cutoff)
    assert len(cut.record.history[0][1]) < len(long) and cut.record.history[1:] == r.history[1:]
    whole, short = (tokenize_example(e, template, tok, cutoff) for e in (ex, cut))
    assert whole == short


# --------------------------------------------------------------------------------------------
# single-turn records: byte-identical to the one-message rendering
# --------------------------------------------------------------------------------------------

SHORT = {
    "prompt_input": "Q: {instruction} [{input}]\nA: ",
    "prompt_no_input": "Q: {instruction}\nA: ",
    "prompt_input_judge": "Q: {instruction} [{input}] J: {judgment}\nA: ",
    "prompt_no_input_judge": "Q: {instruction} J: {judgment}\nA: ",
}


def naive(name: str, tok, instruction: str, input: str, judgment: str | None) -> str:
    """Each template's single-turn prompt, written out: alpaca folds the input into the instruction,
    alpaca_input and .json files pick the input / judged variant, chat is one user message."""
    if name == "chat":
        user = f"{instruction}\n\n{input}" if input else instruction
        user += "" if judgment is None else SUFFIX + judgment
        return chat(tok, [{"role": "user", "content": user}])
    formats = SHORT if name == "json" else ALPACA
    if name == "alpaca" and input:
        instruction, input = f"{instruction}\n{input}", ""
    key = ("prompt_input" if input else "prompt_no_input") + ("" if judgment is None else "_judge")
    return formats[key].format(instruction=instruction, input=input, judgment=judgment)


@pytest.mark.parametrize("name", ["alpaca", "alpaca_input", "chat", "json"])
@pytest.mark.parametrize("input", ["", "3 and 4"])
@pytest.mark.parametrize("judgment", [None, "7 is right; say so in words."])
def test_single_turn_prompts_are_unchanged(tok, tmp_path, name, input, judgment):
    path = tmp_path / "short.json"
    path.write_text(json.dumps(SHORT))
    template = load_template(str(path) if name == "json" else name, tok)
    r = Record("Add the numbers.", input, "7", judgment)
    plain, judged = template.prompts(r, judgment)
    assert plain == naive(name, tok, "Add the numbers.", input, None)
    assert judged == (None if judgment is None else naive(name, tok, "Add the numbers.", input, judgment))


def test_a_one_turn_chat_file_renders_as_before(tok, tmp_path):
    rows = [{"messages": MESSAGES[3:], "judgment": JUDGMENT}]
    (r,) = load_records(write_jsonl(tmp_path / "one.jsonl", rows))
    plain, judged = load_template("chat", tok).prompts(r, r.judgment)
    assert plain == naive("chat", tok, "Add 3 and 4.", "", None)
    assert judged == naive("chat", tok, "Add 3 and 4.", "", JUDGMENT)


# --------------------------------------------------------------------------------------------
# cut train, cut dpo, cut kto on a multi-turn file
# --------------------------------------------------------------------------------------------


def conversation(k: int, answer: str, judgment: str | None) -> dict:
    msgs = [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": f"Add {k} and 1."},
        {"role": "assistant", "content": str(k + 1)},
        {"role": "user", "content": "And add 3 and 4."},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": msgs, **({"judgment": judgment} if judgment else {})}


MULTI = [
    conversation(1, "The sum is 7.", None),
    conversation(1, "The sum is 8.", JUDGMENT),
    conversation(2, "7", None),
    conversation(2, "9", "9 is wrong: 3 + 4 = 7."),
]


def test_cut_train_runs_on_a_multi_turn_file(tiny_chat_model, tmp_path, monkeypatch):
    from cut.training.train import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = write_jsonl(tmp_path / "multi.jsonl", MULTI)
    out = tmp_path / "out"
    argv = [
        f"--base_model={tiny_chat_model}",
        f"--data_path={data}",
        f"--output_dir={out}",
        "--prompt_template_name=chat",
        "--batch_size=2",
        "--micro_batch_size=2",
        "--max_steps=1",
        "--cutoff_len=256",
        "--lora_target_modules=all-linear",
        "--warmup_steps=0",
    ]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["counts"]["positive"], metrics["counts"]["negative"]) == (2, 2)
    assert metrics["train"]["train_loss"] > 0


def test_dpo_and_kto_prompts_are_the_conversation(tiny_chat_model, tok, tmp_path):
    from cut.training import dpo, kto

    data = write_jsonl(tmp_path / "multi.jsonl", MULTI)
    cfg = tiny_train_config(
        tiny_chat_model, data, tmp_path / "out", prompt_template_name="chat", cutoff_len=256
    )
    features, counts = dpo.prepare_data(cfg, dpo.DPOOptions(), tok)
    assert (counts["prompts"], counts["pairs"]) == (2, 2)  # the earlier turns tell the prompts apart
    for f, k in zip(features, (1, 2), strict=True):
        msgs = conversation(k, "", None)["messages"][:4]
        assert tok.decode(f["prompt_ids"]) == chat(tok, msgs)
    assert [tok.decode(f["rejected_ids"]) for f in features] == ["The sum is 8.</s>", "9</s>"]
    kto_features, _ = kto.prepare_data(cfg, tok)
    prompts = [tok.decode(f["prompt_ids"]) for f in kto_features]
    assert prompts == [chat(tok, conversation(k, "", None)["messages"][:4]) for k in (1, 1, 2, 2)]
