"""Serving a merged cut model: `cut merge` writes a save_pretrained folder, an OpenAI-compatible
server loads it like any other model, and the reply it serves is the merged model's own.

- In CI: a tiny chat model, a real cut adapter (three steps of cut.train), `cut merge` through the
  CLI, the folder served by `transformers serve` on 127.0.0.1 (tests/served.py) and queried with
  the `openai` client. The served greedy reply must equal the merged folder's greedy answer
  computed here with transformers (same chat template, same max tokens), and differ from the
  base model's, so a server that loaded the base (or anything else) fails the test.
- Opt-in: the same folder through FastChat 0.2.36's controller, model worker and OpenAI API server,
  started by scripts/serve_fastchat.sh in the side venv it builds (.venv-fastchat, or
  $CUT_FASTCHAT_VENV):

      scripts/serve_fastchat.sh --setup-only && CUT_TEST_FASTCHAT=1 .venv/bin/python -m pytest tests/test_serving.py

  FastChat never reads the tokenizer's chat template: its chat endpoint renders one of its own
  conversation templates, chosen from the folder's name ("one_shot", a long one-shot example, for
  a cut folder) or by --conv-template. So the tests assert two things: /v1/completions with the
  prompt the tokenizer's template renders answers as the merged model does, and /v1/chat/completions
  answers as the merged model does to the prompt FastChat's template renders, which is neither.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="transformers serve needs fastapi (the dev extra)")
pytest.importorskip("uvicorn", reason="transformers serve needs uvicorn (the dev extra)")
openai = pytest.importorskip("openai")

import torch  # noqa: E402
from served import TransformersServer, free_port  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from cut.data.templates import load_template  # noqa: E402
from cut.training.train import run  # noqa: E402

from conftest import REPO, TINY_RECORDS  # noqa: E402
from test_train import tiny_config  # noqa: E402

pytestmark = pytest.mark.slow

CUT = Path(sys.executable).with_name("cut")
MAX_TOKENS = 24
QUESTION = "What is the capital of France?"
FASTCHAT_VENV = Path(os.environ.get("CUT_FASTCHAT_VENV", REPO / ".venv-fastchat"))
FASTCHAT = pytest.mark.skipif(
    os.environ.get("CUT_TEST_FASTCHAT") != "1" or not (FASTCHAT_VENV / ".cut-installed").exists(),
    reason="opt-in: build the side venv with scripts/serve_fastchat.sh --setup-only and set CUT_TEST_FASTCHAT=1",
)


@pytest.fixture(scope="module")
def merged(tiny_chat_model, tmp_path_factory) -> Path:
    """A cut adapter on the tiny chat model, merged by the `cut merge` command."""
    root = tmp_path_factory.mktemp("serving")
    data = root / "judgments.json"
    data.write_text(json.dumps(TINY_RECORDS))
    run(tiny_config(tiny_chat_model, data, root / "adapter", max_steps=2, learning_rate=2e-2))
    out = root / "merged"
    argv = [str(CUT), "merge", "--base_model", str(tiny_chat_model), "--adapter", str(root / "adapter")]
    done = subprocess.run([*argv, "--output_dir", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def chat_prompt(folder: Path, content: str) -> str:
    """One user turn in the folder's chat template, with the generation prompt."""
    tok = AutoTokenizer.from_pretrained(folder)
    return tok.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def greedy(folder: Path, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    """The folder's greedy continuation of `prompt` (a chat template writes its own special tokens,
    so none are added), special tokens dropped from the decoded reply, as the servers decode it."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
        )
    return tok.decode(out[0, ids.shape[-1] :], skip_special_tokens=True)


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)


def ask(base_url: str, model: str, content: str, max_tokens: int = MAX_TOKENS) -> str:
    reply = client(base_url).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0.0,
    )
    return reply.choices[0].message.content


def test_transformers_serve_answers_as_the_merged_model(merged, tiny_chat_model, tmp_path):
    base_tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    assert AutoTokenizer.from_pretrained(merged).chat_template == base_tok.chat_template, (
        "cut merge lost the chat template a server needs"
    )
    want = greedy(merged, chat_prompt(merged, QUESTION))
    assert want and want != greedy(tiny_chat_model, chat_prompt(merged, QUESTION)), (
        "the adapter did not change the greedy reply; the test could not tell merged from base"
    )
    with TransformersServer(tmp_path / "serve.log") as server:
        got = ask(server.base_url, str(merged), QUESTION)
    assert got == want


# ---------------------------------------------------------------- FastChat (opt-in)


def fastchat_python(code: str) -> str:
    """Run `code` in the FastChat side venv; its stdout."""
    done = subprocess.run(
        [str(FASTCHAT_VENV / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def fastchat_prompt(template: str, content: str) -> str:
    """The prompt FastChat's chat endpoint builds from one user turn with `template`."""
    code = (
        "import json, sys\nfrom fastchat.conversation import get_conv_template\n"
        f"c = get_conv_template({template!r})\nc.append_message(c.roles[0], {content!r})\n"
        "c.append_message(c.roles[1], None)\nprint(json.dumps(c.get_prompt()))"
    )
    return json.loads(fastchat_python(code))


@pytest.fixture(scope="module")
def fastchat(merged, tmp_path_factory):
    """scripts/serve_fastchat.sh serving the merged folder with FastChat's alpaca template; its
    base_url. SIGTERM at the end, as Ctrl-C, stops the controller, worker and API server."""
    logs = tmp_path_factory.mktemp("fastchat")
    env = {**os.environ, "CUT_FASTCHAT_VENV": str(FASTCHAT_VENV), "CUT_FASTCHAT_LOGS": str(logs)}
    env["CUT_FASTCHAT_PORT"] = str(free_port())  # the next two ports go to the controller and worker
    argv = ["bash", str(REPO / "scripts" / "serve_fastchat.sh"), str(merged), "--conv-template", "alpaca"]
    out = open(logs / "script.log", "w+")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 300
        while "base_url=" not in (text := (logs / "script.log").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, text[-3000:]
            time.sleep(1)
        yield text.split("base_url=")[1].split()[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        out.close()
    left = subprocess.run(["pgrep", "-f", "--", f"--model-path {merged}"], capture_output=True, text=True)
    assert not left.stdout.strip(), f"FastChat processes left running: {left.stdout}"


@FASTCHAT
def test_fastchat_picks_its_own_template_for_a_cut_folder(merged):
    """A cut folder's name matches none of FastChat's model adapters: it gets "one_shot", a
    conversation with a long worked example, not the tokenizer's chat template."""
    code = f"from fastchat.model.model_adapter import get_conversation_template as g; print(g({str(merged)!r}).name)"
    assert fastchat_python(code).strip() == "one_shot"


@FASTCHAT
def test_fastchat_completions_answer_as_the_merged_model(fastchat, merged, tiny_chat_model):
    """The prompt the tokenizer's chat template renders, sent as it is to /v1/completions."""
    prompt = chat_prompt(merged, QUESTION)
    reply = client(fastchat).completions.create(
        model=merged.name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0
    )
    want = greedy(merged, prompt)
    assert want and want != greedy(tiny_chat_model, prompt), (
        "base and merged agree here; the test shows nothing"
    )
    assert reply.choices[0].text == want


@FASTCHAT
def test_fastchat_chat_answers_as_the_merged_model_to_its_own_template(fastchat, merged, tiny_chat_model):
    """--conv-template alpaca: the chat endpoint renders FastChat's alpaca prompt, which is neither
    the tokenizer's chat template nor cut's alpaca prompt (FastChat writes "### Instruction: Q" and
    ends on "### Response:", cut puts each on its own line). The merged model ends its turn at once
    on that prompt (an empty reply) where the base rambles, so the equality still tells them apart."""
    prompt = fastchat_prompt("alpaca", QUESTION)
    assert prompt != chat_prompt(merged, QUESTION)
    assert prompt != load_template("alpaca").plain(QUESTION)
    assert QUESTION in prompt and "### Response:" in prompt
    want = greedy(merged, prompt)
    assert want != greedy(tiny_chat_model, prompt), "base and merged agree here; the test shows nothing"
    assert ask(fastchat, merged.name, QUESTION) == want
