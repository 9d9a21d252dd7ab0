"""transformers' `generate` vs cut's compacting decoder, side by side in one process.

    python -m benchmarks.generation                 # SmolLM2-135M-Instruct, the first 128 held-out prompts
    python -m benchmarks.generation --quick         # a tiny model, seconds (keeps the script alive)

Greedy answers (the online loop's held-out evaluation) to --prompts held-out instructions
(data/instructions_heldout.json, chat template), --max_new_tokens each, at each --batch_sizes:
`generate` (finished rows keep computing until the batch's last row ends) against
`cut.generate.compacting_decode` (a finished row leaves the batch and the KV cache). Both see the same
length-sorted batches; the variants alternate and their order flips every repeat. Reports
seconds, generated tokens per second, the share of decode slots `generate` spends on real tokens,
and whether the greedy texts are identical. Writes generation.json and generation.md under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.packing import machine

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO / "saved_models" / "SmolLM2-135M-Instruct"
HELDOUT = REPO / "data" / "instructions_heldout.json"


def load(quick: bool, tmp: Path):
    from cut.modeling.loading import load_model, load_tokenizer

    if quick:
        from cut.modeling.tiny import build_tiny_model

        folder = build_tiny_model(tmp / "tiny")
        return load_model(str(folder)), load_tokenizer(str(folder)), "alpaca"
    if not SMOLLM2.exists():
        sys.exit(f"{SMOLLM2} is missing: run `python -m cut.smollm` first (bash scripts/setup.sh does)")
    return load_model(str(SMOLLM2)), load_tokenizer(str(SMOLLM2)), "chat"


def rows_for(tokenizer, template_name: str, n: int) -> list[list[int]]:
    from cut.data.templates import load_template
    from cut.modeling.generate import length_order, tokenize_prompts

    heldout = json.loads(HELDOUT.read_text(encoding="utf-8"))[:n]
    template = load_template(template_name, tokenizer)
    prompts = [template.plain(r["instruction"], r.get("input") or "") for r in heldout]
    rows = tokenize_prompts(tokenizer, prompts, template.adds_special_tokens)
    return [rows[i] for i in length_order(rows)]


@torch.inference_mode()
def run_generate(model, tokenizer, batch, gen_config, eos) -> tuple[list[list[int]], int]:
    from cut.modeling.generate import left_pad

    ids, mask = left_pad(batch, gen_config.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)[:, ids.shape[1] :]
    new = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        new.append(row[:cut])
    return new, out.shape[0] * out.shape[1]


def run_decode(model, tokenizer, batch, gen_config, eos) -> tuple[list[list[int]], int]:
    from cut.modeling.generate import compacting_decode, left_pad

    ids, mask = left_pad(batch, gen_config.pad_token_id)
    new = compacting_decode(model, ids, mask, gen_config, eos)
    return new, sum(min(len(t) + 1, gen_config.max_new_tokens) for t in new)


VARIANTS = {"generate": run_generate, "compacting": run_decode}


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from cut.modeling.generate import Sampling, eos_ids_of, pad_id_of

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--batch_sizes", default="32,64")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks"))
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens, args.batch_sizes = 16, 16, "8"
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, template = load(args.quick, Path(tmp))
        model.eval()
        rows = rows_for(tokenizer, template, args.prompts)
        eos = set(eos_ids_of(model, tokenizer))
        gen_config = Sampling(max_new_tokens=args.max_new_tokens).generation_config(
            pad_id_of(tokenizer), sorted(eos) or None
        )
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        results: dict[str, Any] = {}
        for size in sizes:
            batches = [rows[i : i + size] for i in range(0, len(rows), size)]
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            texts: dict[str, list[list[int]]] = {}
            slots: dict[str, int] = {}
            order = list(VARIANTS)
            for rep in range(args.repeats):
                for name in order if rep % 2 == 0 else order[::-1]:
                    start, new, used = time.perf_counter(), [], 0
                    for batch in batches:
                        out, n = VARIANTS[name](model, tokenizer, batch, gen_config, eos)
                        new += out
                        used += n
                    times[name].append(time.perf_counter() - start)
                    texts[name], slots[name] = new, used
            real = sum(len(t) for t in texts["compacting"])
            med = {v: statistics.median(t) for v, t in times.items()}
            same = sum(a == b for a, b in zip(texts["generate"], texts["compacting"], strict=True))
            results[str(size)] = {
                "seconds": {v: {"median": med[v], "all": times[v]} for v in VARIANTS},
                "generated_tokens": real,
                "tokens_per_s": {v: real / med[v] for v in VARIANTS},
                "speedup": med["generate"] / med["compacting"],
                "generate_real_slot_share": real / slots["generate"],
                "identical_texts": same,
                "prompts": len(rows),
            }
            r = results[str(size)]
            print(
                f"batch {size}: generate {med['generate']:.1f} s, compacting {med['compacting']:.1f} s "
                f"(x{r['speedup']:.2f}); {real} tokens; generate's real-token share "
                f"{r['generate_real_slot_share']:.0%}; identical greedy texts {same}/{len(rows)}",
                flush=True,
            )
    report = {
        "machine": machine("cpu"),
        "model": "tiny" if args.quick else "SmolLM2-135M-Instruct",
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "results": results,
    }
    out = Path(args.out)
    if not args.quick:
        (out / "generation.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        lines = [
            f"# generate vs compacting decoder ({report['model']}, {args.prompts} held-out prompts, "
            f"greedy, {args.max_new_tokens} new tokens, {report['machine']['cores']} cores)",
            "",
            "| batch | generate s | compacting s | speed-up | tokens | generate real-slot share | identical texts |",
            "|---|---|---|---|---|---|---|",
        ]
        for size, r in results.items():
            lines.append(
                f"| {size} | {r['seconds']['generate']['median']:.1f} | {r['seconds']['compacting']['median']:.1f} | "
                f"{r['speedup']:.2f}x | {r['generated_tokens']} | {r['generate_real_slot_share']:.0%} | "
                f"{r['identical_texts']}/{r['prompts']} |"
            )
        (out / "generation.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
