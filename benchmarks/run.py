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
The run writes results.json; benchmarks.report turns it into results.md and results.png.
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
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from transformers import TrainerCallback

from .report import chart, write_report
from .step import measure, oom_result

if TYPE_CHECKING:
    from cut.training.config import TrainConfig

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
# gpu: also padded vs packed micro-batches on the GPU (flash-attention varlen when installed)
SUITES["gpu"] = {
    **SUITES["cpu"],
    "mem_seqs": [512, 1024, 2048],
    "sections": "memory,throughput,scaling,packing",
}
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


def assert_same_loss(a: float, b: float) -> None:
    """(a) cut and (b) the released formulation must agree, or their costs are not comparable."""
    assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), f"cut {a} != original {b}"


# ---------------------------------------------------------------- 1 + 3: one step in a fresh process


def one_step(variant: str, vocab: int, seq: int, negatives: int, in_process: bool = False) -> dict[str, Any]:
    if in_process:
        return measure(variant, vocab, seq, negatives, timed_steps=1, device=torch.device("cpu"))
    flags = {
        "variant": variant,
        "vocab": vocab,
        "seq": seq,
        "negatives": negatives,
        "timed_steps": 1,  # the first step gives memory, one more gives a warm step time
        "memory_limit_gb": MEMORY_LIMIT_GB,
    }
    cmd = [sys.executable, "-m", "benchmarks.step"]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode < 0:  # killed (e.g. by the kernel's OOM killer)
        return oom_result(variant, vocab, seq, negatives, f"signal {-proc.returncode}")
    if proc.returncode != 0:
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
                assert_same_loss(a["loss"], b["loss"])
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


class Lineup(NamedTuple):
    """The four trainers of section 2 on the same records, and what the comparison needs of them."""

    trainers: dict[str, Any]  # (a) cut, (b) original, (c) sft, (d) trl, in the order they are timed
    tokens: dict[str, int]  # real (non-padding) tokens each trains on in one epoch
    features: list[dict]  # cut's tokenised examples
    failed_judgments: int


class EpochTimer(TrainerCallback):
    """Times the epoch itself: Trainer set-up and teardown are not training."""

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_train_end(self, args, state, control, **kw):
        self.seconds = time.perf_counter() - self.t0


def throughput_section(cfg: dict, workdir: Path) -> dict | None:
    data_path = REPO / cfg["thr_data"]  # an absolute thr_data stands as it is
    if not data_path.exists():
        print(f"[throughput] skipped: {data_path} is absent", flush=True)
        return None
    records = json.loads(data_path.read_text())[: cfg["thr_records"]]
    lineup = build_lineup(records, cfg["thr_model"], cfg["thr_cutoff"], workdir)
    loss_a, loss_b = first_batch_losses(lineup)
    walls = time_epochs(lineup.trainers, cfg.get("thr_repeats", cfg["repeats"]))
    feats, tokens = lineup.features, lineup.tokens
    n_neg = sum(1 for f in feats if f["judged_ids"])
    return {
        "records": len(records),
        "data": data_path.name,
        "model": cfg["thr_model"],
        "cutoff": cfg["thr_cutoff"],
        "examples": len(feats),
        "negatives": n_neg,
        "positives": len(feats) - n_neg,
        "failed_judgments": lineup.failed_judgments,
        "loss_cut": loss_a,
        "loss_original": loss_b,
        "variants": {
            k: {"wall_s": stats(v), "tokens": tokens[k], "tokens_per_s": stats([tokens[k] / w for w in v])}
            for k, v in walls.items()
        },
    }


def build_lineup(records: list[dict], model: str, cutoff: int, workdir: Path) -> Lineup:
    """(a)-(d) on the same records; (b) trains on (a)'s own tokenised examples."""
    from cut.training.config import TrainConfig
    from cut.training.train import build_trainer

    cut_file = workdir / "records.json"
    cut_file.write_text(json.dumps(records))
    sft_file = workdir / "records_sft.json"  # same records, every judgment removed: plain MLE on x -> y
    sft_file.write_text(
        json.dumps([{**r, "judgment": None} for r in records if r.get("judgment") != "$ERROR$"])
    )
    base = model_for(model, workdir)
    common = train_options(base, cutoff, workdir)
    cut_cfg = TrainConfig(data_path=str(cut_file), **common)
    trainers: dict[str, Any] = {}
    trainers["cut"], counts = build_trainer(cut_cfg)
    feats = list(trainers["cut"].train_dataset)
    trainers["original"] = original_trainer(cut_cfg, feats, trainers["cut"].processing_class)
    trainers["sft"], _ = build_trainer(TrainConfig(data_path=str(sft_file), **common))
    trainers["trl"], trl_tokens = trl_trainer(base, records, cut_cfg, workdir)
    tokens = {
        "cut": cut_tokens(feats),
        "original": cut_tokens(feats),  # the same real tokens, plus its padding rows
        "sft": sum(len(f["prompt_ids"]) + len(f["response_ids"]) for f in trainers["sft"].train_dataset),
        "trl": trl_tokens,
    }
    return Lineup(trainers, tokens, feats, counts["failed_judgment"])


def train_options(base: str, cutoff: int, workdir: Path) -> dict[str, Any]:
    """The TrainConfig fields (a) and (c) share: LoRA on every linear layer, one epoch, no saving."""
    return dict(
        base_model=base,
        output_dir=str(workdir / "out"),
        micro_batch_size=4,
        batch_size=8,
        num_epochs=1,
        cutoff_len=cutoff,
        learning_rate=1e-4,
        warmup_steps=0,
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        save_steps=10**6,
        logging_steps=10**6,
        seed=0,
        prompt_template_name="alpaca",
        weight_unlike=1.0,
    )


def cut_tokens(feats: list[dict]) -> int:
    """Real tokens cut runs: prompt + response for each example, and judged prompt + response again
    for a negative."""
    return sum(
        len(f["prompt_ids"])
        + len(f["response_ids"])
        + (len(f["judged_ids"]) + len(f["response_ids"]) if f["judged_ids"] else 0)
        for f in feats
    )


def original_trainer(cfg: TrainConfig, feats: list[dict], tokenizer):
    """(b): the released formulation in the same Trainer loop, on cut's own tokenised examples."""
    from datasets import Dataset

    from cut.training.train import load_model, training_arguments

    from .baseline import OriginalTrainer, original_collate

    return OriginalTrainer(
        model=load_model(cfg),
        args=training_arguments(cfg, False),
        train_dataset=Dataset.from_list(feats),
        data_collator=lambda fs: original_collate(fs, tokenizer.pad_token_id, cfg.weight_unlike),
        processing_class=tokenizer,
        threshold=cfg.threshold,
    )


def first_batch_losses(lineup: Lineup) -> tuple[float, float]:
    """The same loss from (a) and (b) on the same batch and the same weights, or the run fails."""
    from .baseline import original_collate, original_loss

    cut, original = lineup.trainers["cut"], lineup.trainers["original"]
    first = lineup.features[: cut.args.per_device_train_batch_size]  # one micro-batch
    original.model.load_state_dict(cut.model.state_dict())
    batch_b = original_collate(first, cut.processing_class.pad_token_id, 1.0)
    with torch.no_grad():
        loss_a = cut.model(**cut.data_collator(first))["loss"].item()
        loss_b = original_loss(original.model, batch_b, original.threshold).item()
    assert_same_loss(loss_a, loss_b)
    return loss_a, loss_b


def time_epochs(trainers: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Seconds per epoch of each trainer: interleaved repeats after a two-step warm-up each."""
    for t in trainers.values():
        t.add_callback(EpochTimer())
        t.args.max_steps = 2
        t.train()
        t.args.max_steps = -1
    walls: dict[str, list[float]] = {k: [] for k in trainers}
    for r in range(repeats):
        for name, t in trainers.items():
            print(f"[throughput] repeat {r + 1}/{repeats}: {name}", flush=True)
            t.train()
            walls[name].append(t.callback_handler.callbacks[-1].seconds)
    return walls


def model_for(kind: str, workdir: Path) -> str:
    if kind == "smollm2":
        from cut.modeling.smollm import ensure_smollm2

        return str(ensure_smollm2(REPO / "saved_models" / "SmolLM2-135M-Instruct"))
    from cut.modeling.tiny import build_tiny_model

    return str(build_tiny_model(workdir / "tiny"))


def trl_rows(records: list[dict]) -> list[dict[str, str]]:
    """Prompt / completion pairs in the alpaca template; records whose judging failed are dropped."""
    from cut.data.templates import load_template

    template = load_template("alpaca")
    return [
        {"prompt": template.plain(r["instruction"], r.get("input") or ""), "completion": r["output"]}
        for r in records
        if r.get("judgment") != "$ERROR$"
    ]


def trl_trainer(base: str, records: list[dict], cfg: TrainConfig, workdir: Path) -> tuple[Any, int]:
    """TRL's SFTTrainer on the same records, prompts and LoRA: the peer a user would otherwise pick."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

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
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(trl_rows(records)),
        processing_class=AutoTokenizer.from_pretrained(base),
        peft_config=lora,
    )
    return trainer, sum(len(x) for x in trainer.train_dataset["input_ids"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    p.add_argument("--out", default=str(REPO / "benchmarks"))
    p.add_argument("--sections", help="default: memory,throughput,scaling (gpu: and packing)")
    args = p.parse_args(argv)
    cfg = SUITES[args.suite]
    args.sections = args.sections or cfg.get("sections", "memory,throughput,scaling")
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
    print(write_report(out, results, cfg["scale_vocab"]))
    chart(out, results)
    print(
        f"wrote {out / 'results.md'}, {out / 'results.png'}, {out / 'results.json'} in {time.time() - start:.0f} s"
    )
    if "packing" in sections:  # its own packing.md / png / json (python -m benchmarks.packing)
        from benchmarks import packing

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return packing.main(["--device", device, "--out", str(out)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
