"""Fold a LoRA adapter into its base model and write a `save_pretrained` folder.

    python -m cut.merge --base_model PATH --adapter DIR --output_dir DIR [--dtype bfloat16]

The merge runs in float32 and casts at the end; the folder (model + tokenizer) is written to a
temporary sibling and renamed, so a crash never leaves a half-written model behind. Its README.md
is a model card (cut.modeling.card) from the adapter's cut_config.yaml and metrics.json.

A killed merge leaves its temporary sibling (`.NAME.XXXXXXXX`, NAME the output folder's name) or,
killed between the two renames, the previous model as `.NAME.old-PID`. The next merge into the
same output removes such folders when they are stale: the owner recorded inside
(`.cut_merge_owner`: pid and process start time) is no longer running, or there is no owner file
and the folder is older than this run. A merge still running is left alone. An `.old-PID` folder
is moved back to NAME if NAME is missing, else removed.

Errors (exit 2, one line): an unwritable output location, an adapter folder without
adapter_config.json, an adapter whose weights are cut short, an adapter made for another base.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cut.args import Options, opt, run_cli
from cut.data.files import build_dir_atomic, check_writable
from cut.errors import ConfigError, DataError
from cut.modeling.card import training_card
from cut.modeling.loading import DTYPES, canonical_dtype, load_tokenizer, resolve_dtype, saved_dtype

logger = logging.getLogger("cut.modeling.merge")

OWNER = ".cut_merge_owner"  # inside a temp folder while a merge fills it: "pid start_time"


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(owner: str) -> bool:
    pid, _, started = owner.partition(" ")
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, someone else's
        return True
    return not started or started == "None" or _start_time(int(pid)) in (None, started)


def clean_stale(output_dir: str | os.PathLike, run_start: float | None = None) -> list[Path]:
    """Remove the leftovers of killed merges into output_dir (the rule is in the module docstring)."""
    dest = Path(output_dir)
    if not dest.parent.is_dir():
        return []
    run_start = time.time() if run_start is None else run_start
    temp = re.compile(rf"^\.{re.escape(dest.name)}\.[a-z0-9_]{{8}}$")
    old = re.compile(rf"^\.{re.escape(dest.name)}\.old-(\d+)$")
    removed = []
    for p in sorted(dest.parent.iterdir()):
        if not p.is_dir() or p.is_symlink():
            continue
        if temp.match(p.name):
            owner = p / OWNER
            if owner.is_file():
                stale = not _running(owner.read_text().strip())
            else:
                stale = p.stat().st_mtime < run_start
            if stale:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        elif (m := old.match(p.name)) and not _running(m.group(1)):
            if dest.exists():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            else:  # killed between the two renames: the previous model goes back
                p.rename(dest)
                logger.warning("restored %s from %s, left by a killed merge", dest, p.name)
    if removed:
        logger.info(
            "removed %d stale folder(s) of killed merges: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


def _load_adapter(base, adapter_dir: Path, base_model: str):
    """PeftModel around base; a cut-short or foreign adapter is a one-line named error."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except Exception as err:
        damaged = (OSError, json.JSONDecodeError, UnicodeDecodeError)
        if type(err).__name__ == "SafetensorError" or isinstance(err, damaged):
            raise DataError(
                f"{adapter_dir}: cannot read the adapter (cut short or damaged?): {err}"
            ) from None
        if not isinstance(err, (RuntimeError, ValueError, KeyError)):
            raise
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
        raise ConfigError(f"{adapter_dir}: adapter does not fit base model {base_model}: {detail}") from None


def merge(
    base_model: str, adapter: str, output_dir: str, dtype: str = "auto", trust_remote_code: bool = False
) -> Path:
    from transformers import AutoModelForCausalLM

    run_start = time.time()
    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    check_writable(output_dir, "output_dir")
    clean_stale(output_dir, run_start)
    dtype = canonical_dtype(dtype)  # auto keeps the base model's own dtype
    base = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    target = saved_dtype(base_model, trust_remote_code) if dtype == "auto" else resolve_dtype(dtype)
    merged = _load_adapter(base, adapter_dir, base_model).merge_and_unload()
    merged = merged.to(target)
    tok_source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else Path(base_model)
    tokenizer = load_tokenizer(str(tok_source), trust_remote_code)

    meta = {"base_model": str(base_model), "adapter": str(adapter_dir), "dtype": str(target)}

    def build(tmp: Path) -> None:
        (tmp / OWNER).write_text(f"{os.getpid()} {_start_time(os.getpid())}")
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "cut_merge.json").write_text(json.dumps(meta, indent=1))
        if (adapter_dir / "cut_config.yaml").exists():  # generation finds the training template here
            shutil.copy2(adapter_dir / "cut_config.yaml", tmp / "cut_config.yaml")
        (tmp / "README.md").write_text(merged_card(adapter_dir, meta), encoding="utf-8")
        (tmp / OWNER).unlink()

    return build_dir_atomic(output_dir, build)


def merged_card(adapter_dir: Path, meta: dict) -> str:
    """The merged folder's model card, from the adapter's cut_config.yaml and metrics.json (either
    missing, for an adapter cut.train did not write, leaves its part of the card empty)."""
    import yaml

    config, metrics = {}, {}
    try:
        config = yaml.safe_load((adapter_dir / "cut_config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        pass
    try:
        metrics = json.loads((adapter_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    recipe = None  # an adapter of cut dpo / cut kto carries its recipe's config beside cut_config.yaml
    for name in ("dpo_config.yaml", "kto_config.yaml"):
        try:
            recipe = yaml.safe_load((adapter_dir / name).read_text())
            break
        except (OSError, yaml.YAMLError):
            continue
    return training_card(
        config if isinstance(config, dict) else {},
        metrics if isinstance(metrics, dict) else {},
        meta,
        recipe if isinstance(recipe, dict) else None,
    )


@dataclass
class MergeOptions(Options):
    """Fold a LoRA adapter into its base model and write a `save_pretrained` folder."""

    base_model: str = opt("", "the base model the adapter was trained on", required=True)
    adapter: str = opt("", "adapter folder written by cut.train", flags=("--lora_weights",), required=True)
    output_dir: str = opt("", "where the merged save_pretrained folder goes", required=True)
    dtype: str = opt("auto", "dtype of the merged weights (auto: the base's)", choices=DTYPES)
    trust_remote_code: bool = opt(False, "allow model code from the model folder")


def main(argv: list[str] | None = None) -> int:
    opts = MergeOptions.parse(argv, prog="cut.merge")

    def body() -> int:
        out = merge(opts.base_model, opts.adapter, opts.output_dir, opts.dtype, opts.trust_remote_code)
        print(f"merged model written to {out}")
        return 0

    return run_cli("cut.merge", body)


if __name__ == "__main__":
    sys.exit(main())
