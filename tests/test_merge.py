"""cut.merge: the merged model computes what the adapter model computes."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from cut.modeling.merge import main as merge_main
from cut.training.train import run

from test_train import tiny_config


def test_merged_logits_equal_adapter_logits(tiny_model, tiny_data, tmp_path):
    adapter = tmp_path / "adapter"
    run(tiny_config(tiny_model, tiny_data, adapter, max_steps=3, learning_rate=5e-2))
    merged_dir = tmp_path / "merged"
    assert (
        merge_main(
            ["--base_model", str(tiny_model), "--adapter", str(adapter), "--output_dir", str(merged_dir)]
        )
        == 0
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")], "temporary folder left behind"

    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = tok(
        ["What is the capital of France?", "Add the numbers 3 and 4."], return_tensors="pt", padding=True
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**ids).logits
        peft_logits = PeftModel.from_pretrained(base, adapter).eval()(**ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        merged_logits = merged(**ids).logits
    diff = (peft_logits - merged_logits).abs().max().item()
    print(f"max |adapter - merged| logit difference: {diff:.2e}")
    assert diff < 1e-4
    assert (peft_logits - base_logits).abs().max().item() > 1e-2, (
        "the adapter changed nothing; the test is void"
    )
    assert json.loads((merged_dir / "cut_merge.json").read_text())["adapter"] == str(adapter)
    card = (merged_dir / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {tiny_model}\nlibrary_name: transformers\n")
    assert f"Merged by `cut merge` from the adapter `{adapter}`" in card
    counts = json.loads((adapter / "metrics.json").read_text())["counts"]
    assert f"| negatives (trained against their judgment) | {counts['negative']} |" in card
    assert "| train/train_loss |" in card and "lora_r: 16" in card


def test_merge_dtype_and_bad_adapter(tiny_model, tiny_data, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    run(tiny_config(tiny_model, tiny_data, adapter, max_steps=1))
    out = tmp_path / "bf16"
    args = [
        "--base_model",
        str(tiny_model),
        "--adapter",
        str(adapter),
        "--output_dir",
        str(out),
        "--dtype",
        "bfloat16",
    ]
    assert merge_main(args) == 0
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert (
        merge_main(
            ["--base_model", str(tiny_model), "--adapter", str(tmp_path), "--output_dir", str(tmp_path / "x")]
        )
        == 2
    )
    assert "adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_card_names_a_preference_recipe_or_says_nothing_without_a_config():
    """A DPO adapter's card says DPO (and spans), not CUT; an adapter cut.train did not write gets
    a card that claims no training recipe (and no LoRA keys it does not have)."""
    from cut.modeling.card import training_card

    config = {
        "base_model": "b",
        "threshold": 1.1,
        "weight_unlike": 1.0,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj"],
        "data_path": "d.json",
    }
    meta = {"base_model": "b", "adapter": "a", "dtype": "fp32"}
    dpo = training_card(config, {}, meta, {"objective": "dpo", "beta": 0.1, "rejected_tokens": "spans"})
    assert "trained with DPO" in dpo and "inside the judgment's spans" in dpo
    assert "Contrastive Unlikelihood" not in dpo and "| `beta` | 0.1 |" in dpo and "`threshold`" not in dpo
    cut = training_card(config, {}, meta)
    assert "trained with CUT" in cut and "| `threshold` | 1.1 |" in cut
    bare = training_card({}, {}, meta)
    assert "trained with" not in bare and "LoRA:" not in bare
