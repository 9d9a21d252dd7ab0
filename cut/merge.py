"""Fold a LoRA adapter into its base model and write a `save_pretrained` folder.

    python -m cut.merge --base_model PATH --adapter DIR --output_dir DIR [--dtype bfloat16]

The merge runs in float32 and casts at the end; the folder (model + tokenizer) is written to a
temporary sibling and renamed, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from .io import build_dir_atomic
from .models import DTYPES, canonical_dtype, load_tokenizer, resolve_dtype, saved_dtype


def merge(
    base_model: str, adapter: str, output_dir: str, dtype: str = "auto", trust_remote_code: bool = False
) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    dtype = canonical_dtype(dtype)  # auto keeps the base model's own dtype
    base = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    target = saved_dtype(base_model, trust_remote_code) if dtype == "auto" else resolve_dtype(dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged = merged.to(target)
    tok_source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else Path(base_model)
    tokenizer = load_tokenizer(str(tok_source), trust_remote_code)

    meta = {"base_model": str(base_model), "adapter": str(adapter_dir), "dtype": str(target)}

    def build(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "cut_merge.json").write_text(json.dumps(meta, indent=1))
        if (adapter_dir / "cut_config.yaml").exists():  # generation finds the training template here
            shutil.copy2(adapter_dir / "cut_config.yaml", tmp / "cut_config.yaml")

    return build_dir_atomic(output_dir, build)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cut.merge", description=__doc__.split("\n")[0])
    p.add_argument("--base_model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", "--lora_weights", required=True, help="adapter folder written by cut.train")
    p.add_argument("--output_dir", required=True, help="where the merged save_pretrained folder goes")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPES),
        help="dtype of the merged weights (auto: the base's)",
    )
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the model folder")
    args = p.parse_args(argv)
    try:
        out = merge(args.base_model, args.adapter, args.output_dir, args.dtype, args.trust_remote_code)
    except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
        print(f"cut.merge: error: {err}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
