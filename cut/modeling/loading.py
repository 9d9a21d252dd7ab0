"""Loading models and tokenizers: one place for folders, LoRA adapters, devices and dtypes.

One dtype vocabulary across train, merge, generate and the judges: `auto | bf16 | fp16 | fp32`;
the long spellings `bfloat16 | float16 | float32` that `--dtype` documented are accepted too.
`auto` means bf16 on a GPU that runs it natively and fp32 elsewhere (half precision is slow on
CPU); `cut.merge` reads `auto` as "the base model's own dtype".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cut.data.files import parse_json
from cut.errors import ConfigError

DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")  # the canonical spellings


def canonical_dtype(name: str) -> str:
    """'bfloat16' -> 'bf16', ...; ConfigError for a name outside the vocabulary."""
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    dtype = DTYPES[name]
    return "auto" if dtype is None else next(n for n in DTYPE_NAMES if DTYPES[n] == dtype)


def device_problem(device: str) -> str | None:
    """Why `device` cannot be used on this machine, or None: a name torch does not know, a CUDA
    device where this torch sees none (a CPU-only build, no GPU) or fewer, an MPS device without MPS.
    Asked before anything loads, so `--device cuda` on a CPU box is one line, not an AssertionError."""
    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return f"{device!r} is not a device: use auto, cpu, cuda or cuda:N"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return (
                f"{device!r}: this torch sees no CUDA GPU (a CPU-only build, or none here); use auto or cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return f"{device!r}: this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}"
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return f"{device!r}: MPS is not available here; use auto or cpu"
    return None


def check_device(device: str, name: str = "device") -> str:
    """`device` if it can be used here, else ConfigError naming `name` and why."""
    why = device_problem(device)
    if why is not None:
        raise ConfigError(f"{name} {why}")
    return device


def device_option(text: str) -> str:
    """The argparse type of a --device option: device_problem's answer as the parser's one-line error."""
    why = device_problem(text)
    if why is not None:
        raise argparse.ArgumentTypeError(why)
    return text


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(check_device(device))


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """A torch dtype from the vocabulary; auto: bf16 on a bf16-capable GPU, else fp32."""
    dtype = DTYPES[canonical_dtype(name)]
    if dtype is not None:
        return dtype
    on_gpu = (device.type == "cuda") if device is not None else torch.cuda.is_available()
    return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32


def saved_dtype(model: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a model folder (or hub name) was saved in, from its config; fp32 if unsaid."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    name = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
    if isinstance(name, torch.dtype):
        return name
    return DTYPES.get(str(name).replace("torch.", "")) or torch.float32


def adapter_base(model: str) -> str | None:
    """The base model of a PEFT adapter folder, or None when `model` is not one."""
    cfg = Path(model) / "adapter_config.json"
    if not cfg.exists():
        return None
    try:
        base = parse_json(cfg.read_text(encoding="utf-8"), str(cfg)).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        base = None
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{cfg}: not a PEFT adapter config (no base_model_name_or_path)")
    return base


def check_model_path(model: str) -> None:
    """A path that is not there would otherwise reach the hub as a confusing 'repo id' error."""
    if not Path(model).exists() and (
        Path(model).is_absolute() or model.startswith((".", "~")) or model.count("/") > 1
    ):
        raise ConfigError(f"{model}: model folder not found")


def model_name(model: str) -> str:
    """A short display name: the folder's name, or the last part of a hub name."""
    p = Path(model)
    return p.resolve().name if p.exists() else model.rstrip("/").rsplit("/", 1)[-1]


def load_tokenizer(model: str, trust_remote_code: bool = False):
    """The tokenizer of a model folder or name; an adapter folder without one uses its base's."""
    from transformers import AutoTokenizer

    base = adapter_base(model)
    source = model if base is None or (Path(model) / "tokenizer_config.json").exists() else base
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def load_model(
    model: str,
    dtype: str = "auto",
    device: str | None = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str = "",
):
    """A causal LM in eval mode on `device`: a folder or name, or a LoRA adapter folder (its base is
    loaded under it). device=None leaves it where from_pretrained puts it, in train mode (the
    trainer's case: the Trainer or DeepSpeed places it)."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device) if device is not None else None
    kwargs: dict = {"dtype": resolve_dtype(dtype, dev), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if adapter_base(model) is not None:
        from peft import AutoPeftModelForCausalLM

        lm = AutoPeftModelForCausalLM.from_pretrained(model, **kwargs)
    else:
        lm = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    return lm if dev is None else lm.to(dev).eval()
