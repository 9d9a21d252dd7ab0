"""Shared fixtures: tiny seeded models (built by `cut.tiny`, no download) and a few judgment records.
Plain helpers several test files share (tiny configs, CLI words, fakes) are in helpers.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cut.modeling.tiny import build_tiny_model

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tinychat") / "model", chat=True)


TINY_RECORDS = [
    {
        "instruction": "What is the capital of France?",
        "input": "",
        "output": "The capital of France is Lyon.",
        "judgment": "Wrong city: the capital of France is Paris, not Lyon.",
    },
    {"instruction": "Add the numbers.", "input": "3 and 4", "output": "The sum is 7.", "judgment": None},
    {
        "instruction": "Add the numbers.",
        "input": "3 and 4",
        "output": "The sum is 8.",
        "judgment": "The answer 8 is wrong; the correct answer is 7.",
    },
    {
        "instruction": "Name a primary colour.",
        "input": "",
        "output": "Red is a primary colour.",
        "judgment": "The response is perfect.",
    },
    {
        "instruction": "Name a primary colour.",
        "input": "",
        "output": "Green is a primary colour.",
        "judgment": "Green is not a primary colour in paint; red is.",
    },
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris.", "judgment": None},
    {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7", "judgment": "$ERROR$"},
    {
        "instruction": "Add the numbers 3 and 4.",
        "input": "",
        "output": "The sum is 7.",
        "score": 9,
        "judgment": "Fine, though terse.",
    },
]


@pytest.fixture()
def tiny_data(tmp_path) -> Path:
    path = tmp_path / "judgments.json"
    path.write_text(json.dumps(TINY_RECORDS, indent=1))
    return path
