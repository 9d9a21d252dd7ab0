"""Padded vs packed CUT micro-batches, side by side in one process (issue 9).

    python -m benchmarks.packing                  # CPU: SmolLM2-135M-Instruct + LoRA, ~10 minutes on 2 cores
    python -m benchmarks.packing --device cuda    # a GPU: bf16, flash-attention varlen if flash_attn is installed
    python -m benchmarks.packing --quick          # a tiny model, seconds (keeps the script alive)

1. tokens: what the model is fed over an epoch / the real tokens, padded and packed, at
   micro-batch 1, 4, 8 (the collator's own tensors counted): on the whole round-1 file as the
   issue measured it (downsample 0.25, cutoff 2048) and on the timed mix.
2. time: the round-1 mix (the first 64 records of ../shared/data/cut-online-iter/iter1.json, as
   benchmarks/run.py takes them; the repo's data/demo_judgments.json when that file is absent),
   cutoff 512, SmolLM2 + LoRA on every projection, the real Trainer. An epoch of the mix takes 1-2
   minutes per variant on 2 CPU cores, 12 variants x 3 repeats about an hour, so on CPU each timed
   run is a fixed number of optimizer steps (--steps, default 1) of 8 records (a seeded sample of
   the mix): 8 micro-batches of 1, 2 of 4, or 1 of 8, the same records for every variant. CUT, and SFT (plain MLE on the
   plain prompt + response of the same records, packed vs padded the same way). One warm-up run
   per layout, then --repeats rounds; within a round the variants alternate, and the order of
   the two layouts flips every round. Every run starts from the same LoRA weights (restored
   before each), LoRA dropout 0, so the two layouts must log the same loss, or the run fails.
Writes packing.json, packing.md, packing.png under --out (default: benchmarks/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_ITER1 = REPO.parent / "shared" / "data" / "cut-online-iter" / "iter1.json"
DEMO = REPO / "data" / "demo_judgments.json"
SMOLLM2 = REPO / "saved_models" / "SmolLM2-135M-Instruct"
MICRO_BATCHES = (1, 4, 8)
LAYOUTS = ("padded", "packed")
RECORDS_PER_STEP = 8  # batch_size: one optimizer step sees 8 records at every micro-batch size


def machine(device: str) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "gpu": gpu, "load_1min": load}


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ---------------------------------------------------------------- 1. tokens fed / real tokens


def fed_tokens(features: list[dict], micro_batch_size: int, pad_id: int, seed: int = 0) -> dict[str, float]:
    """One epoch in a seeded random order through CUTCollator: tokens fed per layout / real tokens."""
    from cut.data.pairs import CUTCollator, sequence_lengths

    order = list(range(len(features)))
    random.Random(seed).shuffle(order)
    real = sum(n for f in features for n in sequence_lengths(f))
    out = {}
    for layout in LAYOUTS:
        collate = CUTCollator(pad_id, packing=layout == "packed")
        fed = 0
        for i in range(0, len(order), micro_batch_size):
            fed += collate([features[j] for j in order[i : i + micro_batch_size]])["input_ids"].numel()
        out[layout] = fed / real
    return {**out, "real_tokens": real}


def token_section(data: str, tokenizer, base: str, cutoff: int, downsample: float, workdir: Path) -> dict:
    from cut.training.config import TrainConfig
    from cut.training.train import prepare_data

    cfg = TrainConfig(
        base_model=base,
        data_path=data,
        output_dir=str(workdir),
        cutoff_len=cutoff,
        downsample=downsample,
        seed=42,
    )
    feats, _, counts = prepare_data(cfg, tokenizer)
    pad = tokenizer.pad_token_id or 0
    return {
        "data": Path(data).name,
        "cutoff": cutoff,
        "downsample": downsample,
        "examples": len(feats),
        "negatives": counts["train_negatives"],
        "ratios": {mb: fed_tokens(feats, mb, pad) for mb in MICRO_BATCHES},
    }


# ---------------------------------------------------------------- 2. time per optimizer step


class Timer:
    """Times train() from its first to its last step: Trainer set-up and teardown are not training."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                outer.t0 = time.perf_counter()

            def on_train_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                outer.seconds = time.perf_counter() - outer.t0

        self.callback = _Callback()
        self.t0 = self.seconds = 0.0


def make_trainer(model, tokenizer, block: list[dict], mb: int, packing: bool, steps: int, workdir: Path):
    from datasets import Dataset

    from cut.data.pairs import CUTCollator
    from cut.training.config import TrainConfig
    from cut.training.train import training_arguments
    from cut.training.trainer import CUTTrainer

    cfg = TrainConfig(
        base_model="-",
        data_path="-",
        output_dir=str(workdir / f"mb{mb}-{'packed' if packing else 'padded'}"),
        micro_batch_size=mb,
        batch_size=RECORDS_PER_STEP,
        max_steps=steps,
        learning_rate=1e-4,
        warmup_steps=0,
        lr_scheduler="constant",
        save_steps=10**6,
        logging_steps=10**6,
        seed=0,
        precision="bf16" if torch.cuda.is_available() else "fp32",
    )
    timer = Timer()
    trainer = CUTTrainer(
        model=model,
        args=training_arguments(cfg, False),
        train_dataset=Dataset.from_list(block),
        data_collator=CUTCollator(tokenizer.pad_token_id or 0, packing=packing),
        processing_class=tokenizer,
        callbacks=[timer.callback],
    )
    return trainer, timer


def time_section(args, base: str, data: str, workdir: Path, data_name: str) -> dict:
    from cut.data.pairs import CUTCollator
    from cut.training.config import TrainConfig
    from cut.training.train import build_trainer

    attn = args.attn or ("sdpa" if args.device == "cpu" else _gpu_attention())
    cfg = TrainConfig(
        base_model=base,
        data_path=data,
        output_dir=str(workdir / "build"),
        micro_batch_size=RECORDS_PER_STEP,
        batch_size=RECORDS_PER_STEP,
        cutoff_len=args.cutoff,
        lora_dropout=0.0,  # deterministic: the two layouts must log the same loss
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        attn_implementation=attn,
        seed=0,
        weight_unlike=1.0,
        warmup_steps=0,  # this trainer only loads the model and the data; make_trainer times
    )
    trainer, counts = build_trainer(cfg)
    model, tokenizer = trainer.model, trainer.processing_class
    feats = list(trainer.train_dataset)
    n = min(len(feats), RECORDS_PER_STEP * args.steps)
    block = [feats[i] for i in sorted(random.Random(0).sample(range(len(feats)), n))]
    sft_block = [{**f, "judged_ids": []} for f in block]  # the plain prompt + response of the same records
    steps = n // RECORDS_PER_STEP
    pad = tokenizer.pad_token_id or 0

    # the same loss from both layouts on the same micro-batch of 8, with the same weights
    model.eval()
    with torch.no_grad():
        dev = next(model.parameters()).device
        first = {
            layout: model(**{k: v.to(dev) for k, v in CUTCollator(pad, packing=p)(block[:8]).items()})
            for layout, p in (("padded", False), ("packed", True))
        }
    model.train()
    loss = {k: v["loss"].item() for k, v in first.items()}
    tol = 1e-4 if args.device == "cpu" else 2e-2  # fp32 rounding; bf16 on a GPU rounds far more
    assert abs(loss["padded"] - loss["packed"]) <= tol * max(1.0, abs(loss["padded"])), loss

    start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    def reset():
        with torch.no_grad():
            for k, v in model.named_parameters():
                if k in start:
                    v.copy_(start[k])

    runs: dict[tuple[str, int, str], Any] = {}
    for workload, data_block in (("cut", block), ("sft", sft_block)):
        for mb in MICRO_BATCHES:
            for layout in LAYOUTS:
                runs[workload, mb, layout] = make_trainer(
                    model, tokenizer, data_block, mb, layout == "packed", steps, workdir
                )
    ratio_block = {
        (w, mb): fed_tokens(b, mb, pad)
        for w, b in (("cut", block), ("sft", sft_block))
        for mb in MICRO_BATCHES
    }

    def train(key) -> tuple[float, float]:
        reset()
        trainer, timer = runs[key]
        result = trainer.train()
        return timer.seconds, result.training_loss

    print(
        f"[time] warm-up (micro-batch 1, both layouts); {steps} optimizer step(s) of {n} records", flush=True
    )
    for layout in LAYOUTS:
        train(("cut", 1, layout))
    walls: dict[tuple, list[float]] = {k: [] for k in runs}
    losses: dict[tuple, float] = {}
    for r in range(args.repeats):
        for mb in MICRO_BATCHES:
            for workload in ("cut", "sft"):
                order = LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]
                for layout in order:
                    key = (workload, mb, layout)
                    seconds, loss_value = train(key)
                    walls[key].append(seconds)
                    losses.setdefault(key, loss_value)
                    print(
                        f"[time] repeat {r + 1}/{args.repeats} {workload} mb {mb} {layout}: {seconds:.1f} s, "
                        f"loss {loss_value:.6f}",
                        flush=True,
                    )
    for workload in ("cut", "sft"):
        for mb in MICRO_BATCHES:
            a, b = losses[workload, mb, "padded"], losses[workload, mb, "packed"]
            assert abs(a - b) <= tol * max(1.0, abs(a)), f"{workload} mb {mb}: padded loss {a} != packed {b}"

    real = {
        w: sum(len(f["prompt_ids"]) + len(f["response_ids"]) for f in b)
        + sum(len(f["judged_ids"]) + len(f["response_ids"]) for f in b if f["judged_ids"])
        for w, b in (("cut", block), ("sft", sft_block))
    }
    return {
        "model": Path(base).name,
        "attn_implementation": attn,
        "precision": "bf16" if args.device == "cuda" else "fp32",
        "data": data_name,
        "examples": len(feats),
        "negatives": counts["train_negatives"],
        "cutoff": args.cutoff,
        "loss_tolerance": tol,
        "steps": steps,
        "records": n,
        "real_tokens": real,
        "first_batch_loss": loss,
        "runs": [
            {
                "workload": w,
                "micro_batch": mb,
                "layout": layout,
                "wall_s": stats(walls[w, mb, layout]),
                "train_loss": losses[w, mb, layout],
                "fed_per_real": ratio_block[w, mb][layout],
            }
            for (w, mb, layout) in runs
        ],
    }


def _gpu_attention() -> str:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


# ---------------------------------------------------------------- report


def _run(t: dict, workload: str, mb: int, layout: str) -> dict:
    return next(
        r for r in t["runs"] if (r["workload"], r["micro_batch"], r["layout"]) == (workload, mb, layout)
    )


def write_report(out: Path, res: dict) -> str:
    info, tok, t = res["machine"], res["tokens"], res["time"]
    lines = [
        "# Padded vs packed CUT micro-batches (issue 9)",
        "",
        f"`{res['command']}`; machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
        f"GPU: {info['gpu']}; 1-minute load at start {info['load_1min']}. {res['wall_s']:.0f} s in all.",
        "",
    ]
    if res.get("data_note"):
        lines += [f"**{res['data_note']}**", ""]
    lines += ["## 1. Tokens fed to the model / real tokens, one epoch", ""]
    lines += ["| data | micro-batch | padded | packed |", "|---|---|---|---|"]
    for section in tok:
        name = f"{section['data']} ({section['examples']} examples, cutoff {section['cutoff']}"
        name += f", downsample {section['downsample']})" if section["downsample"] > 0 else ")"
        for mb, r in section["ratios"].items():
            lines.append(f"| {name} | {mb} | {r['padded']:.3f} | {r['packed']:.3f} |")
    lines += [
        "",
        f"## 2. Time: {t['model']} + LoRA, {t['attn_implementation']}, {t['precision']}, the real Trainer",
        "",
        f"{t['examples']} examples of {t['data']} (cutoff {t['cutoff']}, {t['negatives']} negatives). Each timed "
        f"run: {t['steps']} optimizer step(s) of {t['records']} records sampled from them (seed 0), the same "
        f"records in every run ({t['real_tokens']['cut']} real tokens for CUT, {t['real_tokens']['sft']} for "
        "SFT), not a full epoch; every run starts from the same LoRA weights. Seconds: median (min-max) of "
        f"{res['repeats']} repeats after a warm-up. Loss of the first micro-batch of 8: padded "
        f"{t['first_batch_loss']['padded']:.6f}, packed {t['first_batch_loss']['packed']:.6f}.",
        "",
        "| workload | micro-batch | fed/real padded | fed/real packed | padded s | packed s | speed-up | "
        "train loss padded | train loss packed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for workload in ("cut", "sft"):
        for mb in MICRO_BATCHES:
            a, b = _run(t, workload, mb, "padded"), _run(t, workload, mb, "packed")
            speed = a["wall_s"]["median"] / b["wall_s"]["median"]
            fmt = lambda s: f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"  # noqa: E731
            lines.append(
                f"| {workload} | {mb} | {a['fed_per_real']:.3f} | {b['fed_per_real']:.3f} | {fmt(a['wall_s'])} | "
                f"{fmt(b['wall_s'])} | {speed:.2f}x | {a['train_loss']:.6f} | {b['train_loss']:.6f} |"
            )
            if workload == "cut" and mb == 8:
                checks.append(
                    f"CUT, micro-batch 8: packed {speed:.2f}x faster (target >= 1.6x: "
                    f"{'met' if speed >= 1.6 else 'MISSED'})"
                )
            if workload == "cut" and mb == 1:
                checks.append(
                    f"CUT, micro-batch 1: packed {speed:.2f}x (target: no slower, >= 1.0x: "
                    f"{'met' if speed >= 1.0 else 'MISSED'})"
                )
    worst = max(r["packed"] for s in tok for r in s["ratios"].values())
    checks.insert(
        0,
        f"packed fed/real tokens <= {worst:.3f} everywhere (target <= 1.05: "
        f"{'met' if worst <= 1.05 else 'MISSED'})",
    )
    checks.append(
        f"padded and packed runs logged the same training loss (checked to {t['loss_tolerance']:g} relative; "
        "the table shows them)"
    )
    lines += ["", "## Targets", ""] + [f"- {c}" for c in checks] + [""]
    text = "\n".join(lines)
    (out / "packing.md").write_text(text)
    return text


def chart(out: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, tok = res["time"], res["tokens"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    x = range(len(MICRO_BATCHES))
    for ax, workload in zip(axes[:2], ("cut", "sft"), strict=True):
        for i, layout in enumerate(LAYOUTS):
            med = [_run(t, workload, mb, layout)["wall_s"] for mb in MICRO_BATCHES]
            ax.bar(
                [v + 0.4 * (i - 0.5) for v in x],
                [s["median"] for s in med],
                0.4,
                yerr=[[s["median"] - s["min"] for s in med], [s["max"] - s["median"] for s in med]],
                label=layout,
                color="C1" if layout == "padded" else "C0",
            )
        ax.set_xticks(list(x), [f"micro-batch {mb}" for mb in MICRO_BATCHES])
        ax.set_ylabel(f"seconds for {t['steps']} step(s) of {t['records']} records")
        ax.set_title(f"{workload.upper()}: {t['model']}, {t['attn_implementation']}")
        ax.legend()
    ax = axes[2]
    for section, style in zip(tok, ("-o", "--s"), strict=False):
        for layout, color in (("padded", "C1"), ("packed", "C0")):
            ax.plot(
                list(MICRO_BATCHES),
                [section["ratios"][mb][layout] for mb in MICRO_BATCHES],
                style,
                color=color,
                label=f"{layout}, {section['data']} cutoff {section['cutoff']}",
            )
    ax.set_xlabel("micro-batch (records)")
    ax.set_ylabel("tokens fed / real tokens")
    ax.set_title("padding over an epoch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "packing.png", dpi=110)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.packing", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default=str(REPO / "benchmarks"))
    p.add_argument("--records", type=int, default=64, help="the first N records of the round-1 file")
    p.add_argument("--cutoff", type=int, default=512)
    p.add_argument(
        "--steps", type=int, default=0, help="optimizer steps of 8 records per run (0: cpu 1, cuda all)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--attn",
        default="",
        help="attention implementation (default: cpu sdpa; cuda flash-attention 2 "
        "when flash_attn is installed, else sdpa)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny model and the demo data: seconds")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU visible")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the Trainer picks the GPU whenever it sees one
    if not args.steps:
        args.steps = 1 if args.device == "cpu" else -(-args.records // RECORDS_PER_STEP)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    info = machine(args.device)
    print(f"machine: {info}", flush=True)

    from cut.modeling.loading import load_tokenizer

    note = ""
    source = SHARED_ITER1
    if args.quick or not SHARED_ITER1.exists():
        source = DEMO
        if not args.quick:
            note = f"{SHARED_ITER1} is absent: timed on {DEMO.relative_to(REPO)} instead"
            print(note, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.quick:
            from cut.modeling.tiny import build_tiny_model

            base = str(build_tiny_model(workdir / "tiny"))
            args.cutoff, args.repeats = 128, 1
        else:
            from cut.modeling.smollm import ensure_smollm2

            base = str(ensure_smollm2(SMOLLM2))
        tokenizer = load_tokenizer(base)
        mix = workdir / "mix.json"
        mix.write_text(json.dumps(json.loads(source.read_text())[: args.records]))
        tokens = [token_section(str(mix), tokenizer, base, args.cutoff, -1, workdir)]
        if source == SHARED_ITER1:  # the issue's own measurement: the whole file
            tokens.insert(0, token_section(str(SHARED_ITER1), tokenizer, base, 2048, 0.25, workdir))
        tokens[-1]["data"] = f"first {args.records} records of {source.name}"
        for section in tokens:
            for mb, r in section["ratios"].items():
                print(
                    f"[tokens] {section['data']}: micro-batch {mb}: padded {r['padded']:.3f}, "
                    f"packed {r['packed']:.3f}",
                    flush=True,
                )
        timed = time_section(args, base, str(mix), workdir, tokens[-1]["data"])
    command = "python -m benchmarks.packing" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    res = {
        "command": command,
        "machine": info,
        "data_note": note,
        "repeats": args.repeats,
        "tokens": tokens,
        "time": timed,
        "wall_s": time.time() - start,
    }
    (out / "packing.json").write_text(json.dumps(res, indent=1))
    print(write_report(out, res))
    chart(out, res)
    print(
        f"wrote {out / 'packing.md'}, {out / 'packing.png'}, {out / 'packing.json'} in {res['wall_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
