"""One training step in a fresh process: its peak memory and time, as JSON on stdout.

    python -m benchmarks.step --variant cut|original|sft --vocab 262144 --seq 1024 --negatives 2

A tiny-hidden Llama with a large vocabulary (the head dominates, as it does at Qwen / Gemma
vocabulary sizes), LoRA on every linear layer but the head, and a micro-batch of negatives with
random token ids: response = seq/2 tokens, judged prompt = seq/2, plain prompt = seq/2 - seq/8.
- cut:      this project's forward (n_pos + 2 n_neg sequences, head on targets only, chunked)
- original: the released formulation (doubled batch, float32 softmax over the vocabulary)
- sft:      plain `model(input_ids, labels=...)` over the same sequences (what SFT costs)
Peak memory is the step's own: max RSS (or max_memory_allocated on a GPU) minus what was held
before the step. The first step is the measured one; later steps are timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time

import torch

from cut.data.pairs import CUTCollator
from cut.modeling.tiny import llama_config
from cut.training.trainer import install_cut_forward

from .baseline import original_collate, original_loss

PAD = 0


def build_model(vocab: int, hidden: int = 64, layers: int = 2, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    lm = LlamaForCausalLM(llama_config(vocab, hidden, layers, max_position_embeddings=4096, pad_token_id=PAD))
    model = get_peft_model(
        lm, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    # give LoRA B non-zero values so the adapter matters and the two formulations are compared for real
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    # the once-per-run head check is not part of a training step
    install_cut_forward(model.get_base_model(), threshold=1.1, weight_unlike=1.0, check_head=False)
    return model


def synthetic_features(negatives: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    out = []
    for _ in range(negatives):
        response, plain = ids(seq // 2), ids(seq // 2 - seq // 8)
        judged = plain[:1] + ids(seq // 8) + plain[1:]  # the judgment sits inside the prompt
        out.append({"prompt_ids": plain, "judged_ids": judged, "response_ids": response})
    return out


def sft_batch(features: list[dict]) -> dict[str, torch.Tensor]:
    """The same sequences CUT runs, with labels on the response tokens."""
    batch = CUTCollator(PAD)(features)
    labels = torch.full_like(batch["input_ids"], -100).view(-1)
    labels[batch["tgt_pos"] + 1] = batch["tgt_ids"]
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": labels.view_as(batch["input_ids"]),
    }


def make_step(variant: str, model, features: list[dict], device: torch.device):
    if variant == "cut":
        batch = {k: v.to(device) for k, v in CUTCollator(PAD)(features).items()}
        return lambda: model(**batch)["loss"], int(batch["attention_mask"].sum())
    if variant == "original":
        batch = {k: v.to(device) for k, v in original_collate(features, PAD, 1.0).items()}
        real = int(batch["attention_mask"].sum() + batch["attention_mask_neg"].sum())
        return lambda: original_loss(model, batch, threshold=1.1), real
    if variant == "sft":
        batch = {k: v.to(device) for k, v in sft_batch(features).items()}
        return lambda: model(**batch).loss, int(batch["attention_mask"].sum())
    raise ValueError(variant)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start the high-water mark (VmHWM) afresh, so model building cannot count as the step's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb * 1024


def start_peak(device: torch.device) -> int:
    """Start the peak afresh; return what is held now (the step's own peak is counted above it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    reset_peak_rss()
    return rss_bytes()


def peak_since(before: int, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return peak_rss_bytes() - before


def timed_step(model, run, device: torch.device) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    run().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(
    variant: str, vocab: int, seq: int, negatives: int, timed_steps: int, device: torch.device
) -> dict:
    model = build_model(vocab).to(device)
    features = synthetic_features(negatives, seq, vocab)
    run, tokens = make_step(variant, model, features, device)
    before = start_peak(device)
    t0 = time.perf_counter()
    loss = run()
    loss.backward()
    peak = peak_since(before, device)
    first = time.perf_counter() - t0
    times = [timed_step(model, run, device) for _ in range(timed_steps)]
    return {
        "variant": variant,
        "vocab": vocab,
        "seq": seq,
        "negatives": negatives,
        "tokens": tokens,
        "peak_mb": peak / 2**20,
        "first_step_s": first,
        "step_s": sorted(times)[len(times) // 2] if times else first,
        "loss": loss.item(),
    }


def oom_result(variant: str, vocab: int, seq: int, negatives: int, error: str) -> dict:
    """A step that ran out of memory, reported as a result."""
    return {
        "variant": variant,
        "vocab": vocab,
        "seq": seq,
        "negatives": negatives,
        "oom": True,
        "error": error,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.step")
    p.add_argument("--variant", required=True, choices=("cut", "original", "sft"))
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--negatives", type=int, default=2)
    p.add_argument("--timed_steps", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--memory_limit_gb", type=float, default=0, help="CPU: fail cleanly past this address space"
    )
    args = p.parse_args(argv)
    if args.memory_limit_gb and args.device == "cpu":
        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = measure(
            args.variant, args.vocab, args.seq, args.negatives, args.timed_steps, torch.device(args.device)
        )
    except (RuntimeError, MemoryError) as err:  # out of memory: report it as a result
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        error = str(err).splitlines()[0][:200]
        result = oom_result(args.variant, args.vocab, args.seq, args.negatives, error)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
