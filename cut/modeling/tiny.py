"""Tiny seeded models built on the spot, no download: for tests, benchmarks and examples.

`build_tiny_model(folder)` trains a byte-level BPE tokenizer on a few sentences in the shape of
the project's prompts and saves it beside a randomly initialised 2-layer Llama; a given seed
gives the same files every time, and `from_pretrained(folder)` reloads them exactly.
`llama_config(vocab_size)` is that Llama's shape at any vocabulary (the benchmarks give it a
large one, so the output head dominates as it does in real models).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerFast

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Judgment: ### Response:",
    "What is the capital of France? The capital of France is Paris, not Lyon.",
    "Add the numbers 3 and 4. The sum is 7. The answer 8 is wrong; the correct answer is 7.",
    "Name a primary colour. Red is a primary colour. Green is not one in paint.",
    "The response is perfect. The judgment says the number is wrong.",
] * 20
SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def train_tokenizer(vocab_size: int = 512, chat: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on CORPUS (deterministic); with `chat`, a minimal chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
    if chat:
        hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, **extra: Any) -> LlamaConfig:
    """A Llama `hidden` wide and `layers` deep (4 heads, 2 key-value heads); `extra` goes to LlamaConfig."""
    from transformers import LlamaConfig

    return small_config(LlamaConfig, vocab_size, hidden, layers, **extra)


def small_config(config_class: type, vocab_size: int, hidden: int = 64, layers: int = 2, **extra: Any):
    """Any architecture's config, `hidden` wide and `layers` deep (4 heads, 2 key-value heads)."""
    return config_class(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        **extra,
    )


def build_tiny_model(folder: str | Path, vocab_size: int = 512, seed: int = 0, chat: bool = False) -> Path:
    """Save a tiny tokenizer and a `seed`-initialised 2-layer Llama over its vocabulary in `folder`."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = train_tokenizer(vocab_size, chat)
    torch.manual_seed(seed)
    config = llama_config(
        len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
