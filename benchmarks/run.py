"""CUT's cost side by side with the released formulation and with plain SFT.

    python -m benchmarks.run --suite cpu       # the figures in benchmarks/results.md (~1 hour on 2 cores)
    python -m benchmarks.run --suite fast --out /tmp/bench   # tiny sizes, seconds (run by the tests)

1. memory: one training step at a large vocabulary, (a) cut (b) original (c) sft, each step in a
   fresh process (benchmarks.step) so peak RSS is the step's own;
2. throughput: one epoch on real judgment data (the first records of the paper's round-1 file,
   ../shared/data/cut-online-iter/iter1.json; skipped when absent) with SmolLM2-135M + LoRA:
   (a) cut (b) the released formulation in the same Trainer loop (c) SFT in this project
   (d) TRL's SFTTrainer;
3. scaling: step time and peak memory of cut vs sft as the sequence doubles.
Every figure is the median of `repeats` runs (min-max shown) after a warm-up; ratios are taken
within this one run. (a) and (b) must give the same loss on the same batch, or the run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_ITER1 = REPO.parent / "shared" / "data" / "cut-online-iter" / "iter1.json"

SUITES: dict[str, dict[str, Any]] = {
    # fast: tiny sizes, steps in this process (its memory figures mean nothing; it keeps the script alive)
    "fast": dict(
        in_process=True,
        mem_vocabs=[4096],
        mem_seqs=[64, 128],
        repeats=2,
        thr_model="tiny",
        thr_records=12,
        thr_data="data/demo_judgments.json",
        thr_cutoff=128,
        scale_vocab=4096,
        scale_seqs=[32, 64, 128],
    ),
    # cpu: sized to finish in about an hour on 2 cores; throughput epochs are the long part
    "cpu": dict(
        thr_repeats=3,
        mem_vocabs=[151936, 262144],
        mem_seqs=[512, 1024],
        repeats=3,
        thr_model="smollm2",
        thr_records=64,
        thr_data=str(SHARED_ITER1),
        thr_cutoff=512,
        scale_vocab=151936,
        scale_seqs=[256, 512, 1024, 2048],
    ),
}
SUITES["gpu"] = {**SUITES["cpu"], "mem_seqs": [512, 1024, 2048]}
MEMORY_LIMIT_GB = 18  # a CPU step past this fails cleanly and is reported as out of memory


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": gpu,
        "python": platform.python_version(),
    }


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(s: dict[str, float] | None, digits: int = 0) -> str:
    if not s:
        return "OOM"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


# ---------------------------------------------------------------- 1 + 3: one step in a fresh process


def one_step(variant: str, vocab: int, seq: int, negatives: int, in_process: bool = False) -> dict[str, Any]:
    if in_process:
        from .step import measure

        return measure(variant, vocab, seq, negatives, timed_steps=1, device=torch.device("cpu"))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.step",
        "--variant",
        variant,
        "--vocab",
        str(vocab),
        "--seq",
        str(seq),
        "--negatives",
        str(negatives),
        "--timed_steps",  # the first step gives memory, one more gives a warm step time
        "1",
        "--memory_limit_gb",
        str(MEMORY_LIMIT_GB),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        if proc.returncode < 0:  # killed (e.g. by the kernel's OOM killer)
            return {
                "variant": variant,
                "vocab": vocab,
                "seq": seq,
                "oom": True,
                "error": f"signal {-proc.returncode}",
            }
        raise RuntimeError(f"benchmarks.step failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_series(
    variants: list[str], vocab: int, seq: int, negatives: int, repeats: int, in_process: bool = False
) -> dict[str, dict]:
    """Interleaved repeats of each variant; median / min / max of peak memory and step time."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            runs[v].append(one_step(v, vocab, seq, negatives, in_process))
    out = {}
    for v, rs in runs.items():
        ok = [r for r in rs if not r.get("oom")]
        out[v] = {
            "peak_mb": stats([r["peak_mb"] for r in ok]) if ok else None,
            "step_s": stats([r["step_s"] for r in ok]) if ok else None,
            "tokens": ok[0]["tokens"] if ok else None,
            "loss": ok[0]["loss"] if ok else None,
            "oom": len(rs) - len(ok),
        }
    return out


def memory_section(cfg: dict) -> list[dict]:
    rows = []
    for vocab in cfg["mem_vocabs"]:
        for seq in cfg["mem_seqs"]:
            print(f"[memory] vocab {vocab}, seq {seq}", flush=True)
            res = step_series(
                ["cut", "original", "sft"], vocab, seq, 2, cfg["repeats"], cfg.get("in_process", False)
            )
            a, b = res["cut"], res["original"]
            if a["loss"] is not None and b["loss"] is not None:
                assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(b["loss"])), (a["loss"], b["loss"])
            rows.append({"vocab": vocab, "seq": seq, **res})
    return rows


def scaling_section(cfg: dict) -> list[dict]:
    rows = []
    for seq in cfg["scale_seqs"]:
        print(f"[scaling] seq {seq}", flush=True)
        res = step_series(
            ["cut", "sft"], cfg["scale_vocab"], seq, 1, cfg["repeats"], cfg.get("in_process", False)
        )
        rows.append({"seq": seq, **res})
    return rows


# ---------------------------------------------------------------- 2: epochs on real judgment data


def _records(path: str, n: int) -> list[dict]:
    rows = json.loads(Path(path).read_text())
    return rows[:n]


def throughput_section(cfg: dict, workdir: Path) -> dict | None:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from cut.config import TrainConfig
    from cut.train import build_trainer, load_model, training_arguments

    from .baseline import OriginalTrainer, original_collate, original_loss

    data_path = cfg["thr_data"] if Path(cfg["thr_data"]).is_absolute() else str(REPO / cfg["thr_data"])
    if not Path(data_path).exists():
        print(f"[throughput] skipped: {data_path} is absent", flush=True)
        return None
    records = _records(data_path, cfg["thr_records"])
    cut_file = workdir / "records.json"
    cut_file.write_text(json.dumps(records))
    sft_file = workdir / "records_sft.json"  # same records, every judgment removed: plain MLE on x -> y
    sft_file.write_text(
        json.dumps([{**r, "judgment": None} for r in records if r.get("judgment") != "$ERROR$"])
    )
    base = model_for(cfg["thr_model"], workdir)
    common = dict(
        base_model=base,
        output_dir=str(workdir / "out"),
        micro_batch_size=4,
        batch_size=8,
        num_epochs=1,
        cutoff_len=cfg["thr_cutoff"],
        learning_rate=1e-4,
        warmup_steps=0,
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        save_steps=10**6,
        logging_steps=10**6,
        seed=0,
        prompt_template_name="alpaca",
        weight_unlike=1.0,
    )
    cut_cfg = TrainConfig(data_path=str(cut_file), **common)
    trainers: dict[str, Any] = {}
    tokens: dict[str, int] = {}

    trainers["cut"], counts = build_trainer(cut_cfg)
    feats = list(trainers["cut"].train_dataset)
    tokens["cut"] = sum(
        len(f["prompt_ids"])
        + len(f["response_ids"])
        + (len(f["judged_ids"]) + len(f["response_ids"]) if f["judged_ids"] else 0)
        for f in feats
    )
    tokenizer = trainers["cut"].processing_class

    trainers["original"] = OriginalTrainer(
        model=load_model(cut_cfg),
        args=training_arguments(cut_cfg, False),
        train_dataset=Dataset.from_list(feats),
        data_collator=lambda fs: original_collate(fs, tokenizer.pad_token_id, cut_cfg.weight_unlike),
        processing_class=tokenizer,
        threshold=cut_cfg.threshold,
    )
    tokens["original"] = tokens["cut"]  # the same real tokens, plus its padding rows

    trainers["sft"], _ = build_trainer(TrainConfig(data_path=str(sft_file), **common))
    tokens["sft"] = sum(len(f["prompt_ids"]) + len(f["response_ids"]) for f in trainers["sft"].train_dataset)
    trainers["trl"], tokens["trl"] = trl_trainer(base, records, cut_cfg, workdir, AutoTokenizer)

    # the same loss from (a) and (b) on the same batch and the same weights
    first = feats[: cut_cfg.micro_batch_size]
    model_a, model_b = trainers["cut"].model, trainers["original"].model
    model_b.load_state_dict(model_a.state_dict())
    with torch.no_grad():
        loss_a = model_a(**trainers["cut"].data_collator(first))["loss"].item()
        loss_b = original_loss(
            model_b, original_collate(first, tokenizer.pad_token_id, 1.0), cut_cfg.threshold
        ).item()
    assert abs(loss_a - loss_b) <= 1e-4 * max(1.0, abs(loss_b)), f"cut {loss_a} != original {loss_b}"

    class Timer(TrainerCallback):
        """Times the epoch itself: Trainer set-up and teardown are not training."""

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0

    for t in trainers.values():  # warm-up: two steps each
        t.add_callback(Timer())
        t.args.max_steps = 2
        t.train()
        t.args.max_steps = -1
    walls: dict[str, list[float]] = {k: [] for k in trainers}
    repeats = cfg.get("thr_repeats", cfg["repeats"])
    for r in range(repeats):
        for name, t in trainers.items():
            print(f"[throughput] repeat {r + 1}/{repeats}: {name}", flush=True)
            t.train()
            walls[name].append(t.callback_handler.callbacks[-1].seconds)
    n_neg = sum(1 for f in feats if f["judged_ids"])
    return {
        "records": len(records),
        "data": Path(data_path).name,
        "model": cfg["thr_model"],
        "cutoff": cfg["thr_cutoff"],
        "examples": len(feats),
        "negatives": n_neg,
        "positives": len(feats) - n_neg,
        "failed_judgments": counts["failed_judgment"],
        "loss_cut": loss_a,
        "loss_original": loss_b,
        "variants": {
            k: {"wall_s": stats(v), "tokens": tokens[k], "tokens_per_s": stats([tokens[k] / w for w in v])}
            for k, v in walls.items()
        },
    }


def model_for(kind: str, workdir: Path) -> str:
    if kind == "smollm2":
        from cut.smollm import ensure_smollm2

        return str(ensure_smollm2(REPO / "saved_models" / "SmolLM2-135M-Instruct"))
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model

    return str(build_tiny_model(workdir / "tiny"))


def trl_trainer(base: str, records: list[dict], cfg, workdir: Path, auto_tokenizer):
    """TRL's SFTTrainer on the same records, prompts and LoRA: the peer a user would otherwise pick."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from cut.templates import load_template

    template = load_template("alpaca")
    rows = [
        {"prompt": template.plain(r["instruction"], r.get("input") or ""), "completion": r["output"]}
        for r in records
        if r.get("judgment") != "$ERROR$"
    ]
    tokenizer = auto_tokenizer.from_pretrained(base)
    args = SFTConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size,
        num_train_epochs=1,
        learning_rate=cfg.learning_rate,
        max_length=cfg.cutoff_len,
        completion_only_loss=True,
        save_strategy="no",
        logging_steps=10**6,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
    )
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    return trainer, tokens


# ---------------------------------------------------------------- report


def write_report(
    out: Path, suite: str, info: dict, memory: list, throughput: dict | None, scaling: list
) -> str:
    lines = [
        f"# Benchmarks (suite `{suite}`)",
        "",
        f"`python -m benchmarks.run --suite {suite}`; machine: {info['cpu']}, {info['cores']} cores, "
        f"torch {info['torch']}, GPU: {info['gpu']}. Each figure: median (min-max) of the repeats; ratios "
        "within this run.",
        "",
    ]
    lines += [
        "## 1. One CUT step at a large vocabulary (2 negatives = 4 sequences, tiny-hidden Llama, LoRA)",
        "",
        "| vocab | seq | tokens | (a) cut MiB | (b) original MiB | (c) sft MiB | (a)/(b) | (a)/(c) per token | "
        "(a) step s | (b) step s | (c) step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for r in memory:
        a, b, c = r["cut"], r["original"], r["sft"]
        ab = a["peak_mb"]["median"] / b["peak_mb"]["median"] if a["peak_mb"] and b["peak_mb"] else None
        ac = (
            (a["peak_mb"]["median"] / a["tokens"]) / (c["peak_mb"]["median"] / c["tokens"])
            if a["peak_mb"] and c["peak_mb"]
            else None
        )
        lines.append(
            f"| {r['vocab']} | {r['seq']} | {a['tokens']} | {fmt(a['peak_mb'])} | {fmt(b['peak_mb'])} | "
            f"{fmt(c['peak_mb'])} | {ab and f'{ab:.3f}' or 'b OOM'} | {ac and f'{ac:.3f}' or 'c OOM'} | "
            f"{fmt(a['step_s'], 2)} | {fmt(b['step_s'], 2)} | {fmt(c['step_s'], 2)} |"
        )
        if r["vocab"] == max(x["vocab"] for x in memory):
            checks.append(
                f"(a)/(b) memory at vocab {r['vocab']}, seq {r['seq']}: "
                f"{'b OOM' if ab is None else f'{ab:.3f}'} (target <= 0.35: {'met' if ab is None or ab <= 0.35 else 'MISSED'})"
            )
        checks.append(
            f"(a)/(c) memory per token at vocab {r['vocab']}, seq {r['seq']}: "
            f"{'c OOM' if ac is None else f'{ac:.3f}'} (target <= 1.3: {'met' if ac is None or ac <= 1.3 else 'MISSED'})"
        )
    lines += [
        "",
        "Peak memory is the step's own (peak RSS minus RSS before the step; on a GPU, "
        "max_memory_allocated minus allocated before). (a) and (b) computed the same loss on each batch.",
        "",
    ]
    if throughput:
        t = throughput
        v = t["variants"]
        lines += [
            f"## 2. One epoch on real judgment data ({t['records']} records of {t['data']}, {t['model']}, LoRA, "
            f"cutoff {t['cutoff']})",
            "",
            f"{t['examples']} examples trained: {t['positives']} positives, {t['negatives']} negatives "
            f"({t['failed_judgments']} failed judgments dropped). Loss of the first micro-batch: cut "
            f"{t['loss_cut']:.6f}, original {t['loss_original']:.6f}.",
            "",
            "| variant | wall s / epoch | tokens | tokens/s | s per 1k tokens |",
            "|---|---|---|---|---|",
        ]
        names = {
            "cut": "(a) cut",
            "original": "(b) original formulation",
            "sft": "(c) SFT, this project",
            "trl": "(d) TRL SFTTrainer",
        }
        for k, name in names.items():
            per_k = {x: 1000 * v[k]["wall_s"][x] / v[k]["tokens"] for x in ("median", "min", "max")}
            lines.append(
                f"| {name} | {fmt(v[k]['wall_s'], 1)} | {v[k]['tokens']} | {fmt(v[k]['tokens_per_s'], 1)} | "
                f"{fmt(per_k, 3)} |"
            )
        speedup = v["original"]["wall_s"]["median"] / v["cut"]["wall_s"]["median"]
        per = lambda k: v[k]["wall_s"]["median"] / v[k]["tokens"]  # noqa: E731
        checks.append(
            f"(b)/(a) epoch time: {speedup:.2f}x (target >= 1.5x: {'met' if speedup >= 1.5 else 'MISSED'})"
        )
        for k in ("sft", "trl"):
            ratio = per("cut") / per(k)
            checks.append(
                f"(a)/({'c' if k == 'sft' else 'd'}) time per token: {ratio:.3f} "
                f"(target <= 1.10: {'met' if ratio <= 1.10 else 'MISSED'})"
            )
        lines.append("")
    else:
        lines += [
            "## 2. Throughput on real judgment data",
            "",
            "skipped: ../shared/data/cut-online-iter/iter1.json is absent",
            "",
        ]
    lines += [
        f"## 3. Scaling with sequence length (1 negative = 2 sequences, vocab {SUITES[suite]['scale_vocab']})",
        "",
        "| seq | tokens | cut step s | sft step s | cut MiB | sft MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in scaling:
        lines.append(
            f"| {r['seq']} | {r['cut']['tokens']} | {fmt(r['cut']['step_s'], 2)} | {fmt(r['sft']['step_s'], 2)} | "
            f"{fmt(r['cut']['peak_mb'])} | {fmt(r['sft']['peak_mb'])} |"
        )
    lines += ["", "## Targets", ""] + [f"- {c}" for c in checks] + [""]
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


def chart(out: Path, memory: list, throughput: dict | None, scaling: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    labels = [f"V={r['vocab'] // 1000}k\nT={r['seq']}" for r in memory]
    for i, (k, name) in enumerate([("cut", "(a) cut"), ("original", "(b) original"), ("sft", "(c) sft")]):
        vals = [r[k]["peak_mb"]["median"] if r[k]["peak_mb"] else 0 for r in memory]
        ax.bar([x + 0.27 * (i - 1) for x in range(len(memory))], vals, 0.27, label=name)
    ax.set_xticks(range(len(memory)), labels)
    ax.set_ylabel("peak step memory (MiB)")
    ax.set_title("1. one step, 2 negatives")
    ax.legend()
    ax = axes[1]
    if throughput:
        v = throughput["variants"]
        keys = ["cut", "original", "sft", "trl"]
        ax.bar(
            ["(a) cut", "(b) original", "(c) sft", "(d) TRL"],
            [v[k]["tokens_per_s"]["median"] for k in keys],
            color=["C0", "C1", "C2", "C3"],
        )
        ax.set_ylabel("tokens / s")
        ax.set_title(f"2. epoch on {throughput['records']} real records ({throughput['model']})")
    else:
        ax.set_title("2. skipped (no real data)")
    ax = axes[2]
    seqs = [r["seq"] for r in scaling]
    for k, style in (("cut", "C0"), ("sft", "C2")):
        ax.plot(seqs, [r[k]["step_s"]["median"] for r in scaling], "-o", color=style, label=f"{k} step s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("step time (s)")
    ax2 = ax.twinx()
    for k, style in (("cut", "C0"), ("sft", "C2")):
        ax2.plot(
            seqs,
            [r[k]["peak_mb"]["median"] if r[k]["peak_mb"] else float("nan") for r in scaling],
            "--s",
            color=style,
            alpha=0.6,
            label=f"{k} MiB",
        )
    ax2.set_ylabel("peak step memory (MiB), dashed")
    ax.set_title("3. scaling, 1 negative")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    p.add_argument("--out", default=str(REPO / "benchmarks"))
    p.add_argument("--sections", default="memory,throughput,scaling")
    args = p.parse_args(argv)
    cfg = SUITES[args.suite]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {info}", flush=True)
    sections = set(args.sections.split(","))
    start = time.time()
    memory = memory_section(cfg) if "memory" in sections else []
    scaling = scaling_section(cfg) if "scaling" in sections else []
    with tempfile.TemporaryDirectory() as tmp:
        throughput = throughput_section(cfg, Path(tmp)) if "throughput" in sections else None
    results = {
        "suite": args.suite,
        "machine": info,
        "memory": memory,
        "throughput": throughput,
        "scaling": scaling,
        "wall_s": time.time() - start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(write_report(out, args.suite, info, memory, throughput, scaling))
    chart(out, memory, throughput, scaling)
    print(
        f"wrote {out / 'results.md'}, {out / 'results.png'}, {out / 'results.json'} in {time.time() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
