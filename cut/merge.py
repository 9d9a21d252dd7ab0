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

from .generate import DTYPES
from .io import build_dir_atomic


def merge(
    base_model: str, adapter: str, output_dir: str, dtype: str = "auto", trust_remote_code: bool = False
) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    base = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    target = DTYPES[dtype] or _config_dtype(base_model, trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged = merged.to(target)
    tok_source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else Path(base_model)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_source), trust_remote_code=trust_remote_code)

    meta = {"base_model": str(base_model), "adapter": str(adapter_dir), "dtype": str(target)}

    def build(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "cut_merge.json").write_text(json.dumps(meta, indent=1))
        if (adapter_dir / "cut_config.yaml").exists():  # generation finds the training template here
            shutil.copy2(adapter_dir / "cut_config.yaml", tmp / "cut_config.yaml")

    return build_dir_atomic(output_dir, build)


def _config_dtype(base_model: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype the base model was saved in (what `auto` keeps), for a folder or a hub name."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    name = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
    if isinstance(name, torch.dtype):
        return name
    return DTYPES.get(str(name).replace("torch.", "")) or torch.float32


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cut.merge", description=__doc__.split("\n")[0])
    p.add_argument("--base_model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", "--lora_weights", required=True, help="adapter folder written by cut.train")
    p.add_argument("--output_dir", required=True, help="where the merged save_pretrained folder goes")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=sorted(DTYPES),
        help="dtype of the merged weights (auto: the base's)",
    )
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the model folder")
    args = p.parse_args(argv)
    try:
        out = merge(args.base_model, args.adapter, args.output_dir, args.dtype, args.trust_remote_code)
    except (FileNotFoundError, ValueError) as err:
        print(f"cut.merge: error: {err}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
