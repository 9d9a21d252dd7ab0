"""Helpers several test files share: tiny training and online-loop configs, CLI words, a subprocess
started the way the tools run, a fake judge server that reports token usage, and the page check in
headless Chromium. Fixtures live in conftest.py; these are plain functions."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from fake_openai import FakeOpenAI

# ---------------------------------------------------------------- configs


def tiny_train_config(model, data, out, **kw):
    """A cut.train TrainConfig for a tiny model: LoRA on every linear layer, no dropout, a constant
    learning rate of 1e-2 from step 0, 128-token cut-off, seed 0; `kw` sets or overrides fields."""
    from cut.training.config import TrainConfig

    base = dict(
        base_model=str(model),
        data_path=str(data),
        output_dir=str(out),
        learning_rate=1e-2,
        warmup_steps=0,
        lr_scheduler="constant",
        lora_target_modules=["all-linear"],
        lora_dropout=0.0,
        cutoff_len=128,
        seed=0,
    )
    return TrainConfig(**{**base, **kw})


def letter_pool(letters: str) -> list[dict]:
    """One verifiable instruction a letter: 'Write word i. Use the letter c at least twice.'"""
    return [
        {
            "instruction": f"Write word {i}. Use the letter {c} at least twice.",
            "input": "",
            "constraints": [
                {"type": "letter_frequency", "params": {"letter": c, "relation": "at least", "n": 2}}
            ],
        }
        for i, c in enumerate(letters)
    ]


def write_online_config(
    tmp: Path,
    model,
    pool: list[dict],
    heldout: list[dict] | None = None,
    /,
    *,
    verifier: bool = False,
    generate_with: dict | None = None,
    train_with: dict | None = None,
    **top,
) -> Path:
    """tmp/online.yaml for cut.online on a tiny model, two optimiser steps a round, with the pool (and
    the held-out set) written beside it as pool.json (heldout.json). The defaults are the arithmetic
    task's (reference judge, batches of 4 everywhere); verifier=True gives the instructions task's
    (verifier judge, batches of 8, sampling at temperature 1, no checkpoint). `generate_with` and
    `train_with` add to their sections; `top` comes last, so it may set any key (pool and heldout
    too) or replace a whole section."""
    batch = 8 if verifier else 4
    if verifier:
        generate_with = {"temperature": 1.0, **(generate_with or {})}
        train_with = {"learning_rate": 0.01, "save_steps": 100, **(train_with or {})}
    conf = {
        "base_model": str(model),
        "output_dir": str(tmp / "online"),
        "pool": str(tmp / "pool.json"),
        "eval_max_new_tokens": 6,
        "eval_batch_size": 6 if verifier else 4,
        "judge": {"kind": "verifier" if verifier else "reference"},
        "generate": {
            "prompt_template_name": "alpaca",
            "batch_size": batch,
            "max_new_tokens": 6 if verifier else 8,
            **(generate_with or {}),
        },
        "train": {
            "prompt_template_name": "alpaca",
            "cutoff_len": 128,
            "batch_size": batch,
            "micro_batch_size": batch,
            "max_steps": 2,
            "lora_target_modules": ["all-linear"],
            **(train_with or {}),
        },
    }
    if verifier:
        conf["task"] = "instructions"
    (tmp / "pool.json").write_text(json.dumps(pool))
    if heldout is not None:
        (tmp / "heldout.json").write_text(json.dumps(heldout))
        conf["heldout"] = str(tmp / "heldout.json")
    conf.update(top)
    path = tmp / "online.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


# ---------------------------------------------------------------- files and command lines


def write(path: Path, rows) -> str:
    """`rows` as JSON at `path`; the path as a string, as a tool's flag takes it."""
    path.write_text(json.dumps(rows))
    return str(path)


def cli_args(**flags) -> list[str]:
    """A tool's command-line words, in the order given: cli_args(mode="score", runs=[a, b]) ==
    ["--mode", "score", "--runs", str(a), str(b)]."""
    words = []
    for name, value in flags.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        words += [f"--{name}", *map(str, values)]
    return words


def start(args: list[str]) -> subprocess.Popen:
    """`python args...` from the repository root in its own process group (a test can kill the whole
    tree), stdout and stderr in one text pipe."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def raises_naming_file(tmp_path: Path, text: str, load, error: type[Exception], match: str) -> None:
    """`load` of a file holding `text` raises `error` matching `match`, and the message names the file."""
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(error, match=match) as err:
        load(str(path))
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- fakes and fixtures' bodies


def task_key(body: dict) -> str:
    """task-N of the question; a re-ask (3 messages) is filed as task-N/reask."""
    task = re.search(r"task-\d+", body["messages"][0]["content"]).group(0)
    return task if len(body["messages"]) == 1 else task + "/reask"


class UsageFake(FakeOpenAI):
    """The fake server with a `usage` block, which alpaca_eval reads (vLLM's server sends one)."""

    def send_content(self, h, content):
        message = {"role": "assistant", "content": content}
        self.send_json(
            h,
            200,
            {},
            {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 3, "total_tokens": 53},
            },
        )


def one_thread():
    """A module-scoped autouse fixture's body: torch on one thread (the tiny model gains nothing from
    threads, and they thrash on a busy machine), restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- a page in a real browser

CHROMIUM = next(
    (
        shutil.which(b)
        for b in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
        if shutil.which(b)
    ),
    None,
)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")


def dump_dom(page: Path, fragment: str, profile: Path) -> str:
    """The DOM after the page's script ran, from headless Chromium."""
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    cmd += [f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'data-ready="1"' in proc.stdout, "the page's script did not finish: " + proc.stderr[-2000:]
    return re.sub(r"<script.*?</script>", "", proc.stdout, flags=re.S)  # the rendered elements only
