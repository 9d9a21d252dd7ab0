"""Tiny seeded models built on the spot: a byte-level BPE tokenizer and a 2-layer Llama."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Judgment: ### Response:",
    "What is the capital of France? The capital of France is Paris, not Lyon.",
    "Add the numbers 3 and 4. The sum is 7. The answer 8 is wrong; the correct answer is 7.",
    "Name a primary colour. Red is a primary colour. Green is not one in paint.",
    "The response is perfect. The judgment says the number is wrong.",
] * 20


def build_tiny_model(folder: Path, vocab_size: int = 512, seed: int = 0, chat: bool = False) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat:
        hf_tok.chat_template = (
            "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
        )
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(hf_tok),
        max_position_embeddings=512,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


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
