"""Online CUT: generate -> judge -> CUT-train -> merge, round after round, resumable.

    python -m cut.online --config configs/online_demo.yaml      (or: bash scripts/online_loop.sh)

Each round r works in output_dir/round_r/ and records every stage in manifest.json:

    sample    N instructions from the pool (seeded permutation; rounds never share one)
    generate  the current model answers them                 -> responses.json (AlpacaEval format)
    judge     one judgment per response                      -> judged.json (failures recorded)
    build     the training file, failed judgments left out   -> train.json
    train     torchrun -m cut.train from the current model    -> adapter/
    merge     the adapter folded into the current model      -> model/ (next round's model)
    eval      accuracy on the held-out set (when one is given) -> eval.json

Rerunning the same command continues from the last completed stage: a stage marked done in the
manifest is never redone; a stage that was cut off is redone cleanly (generation and judging keep
what was already answered or paid for; training and merging start again from nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import FIELDS as TRAIN_FIELDS
from .config import TrainConfig, coerce
from .errors import ConfigError, DataError
from .generate import GenerateConfig, Sampling
from .io import write_json_atomic
from .judge import JudgeConfig
from .tasks.arithmetic import extract_final_answer

logger = logging.getLogger("cut.online")

STAGES = ("sample", "generate", "judge", "build", "train", "merge", "eval")
TRAIN_OWNED = {"base_model", "data_path", "output_dir"}  # set by the loop, per round


@dataclass
class OnlineConfig:
    base_model: str = ""  # the round-1 model
    output_dir: str = "saved_models/online"
    pool: str = (
        ""  # instructions to sample from (JSON / JSONL; a `reference` field feeds the reference judge)
    )
    heldout: str = ""  # optional: problems with `reference`, scored after each round
    rounds: int = 2
    instructions_per_round: int = 64
    seed: int = 0
    nproc_per_node: int = 1  # training processes (torchrun); 1 runs plain python
    merge_dtype: str = "auto"
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 16
    generate: Any = field(default_factory=dict)  # a flat mapping in YAML; a GenerateConfig once validated
    judge: Any = field(default_factory=dict)  # a mapping in YAML; a JudgeConfig once validated
    train: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("base_model", "pool"):
            if not getattr(self, name):
                raise ConfigError(f"online: missing required option {name}")
        if self.rounds < 1 or self.instructions_per_round < 1:
            raise ConfigError("online: rounds and instructions_per_round must be >= 1")
        unknown = set(self.train) - set(TRAIN_FIELDS)
        if unknown:
            raise ConfigError(f"online: unknown train option(s): {', '.join(sorted(unknown))}")
        owned = set(self.train) & TRAIN_OWNED
        if owned:
            raise ConfigError(
                f"online: train option(s) {', '.join(sorted(owned))} are set by the loop per round"
            )
        self.train = {k: coerce(k, v) for k, v in self.train.items()}
        if self.train.get("full_finetune"):
            raise ConfigError("online: full_finetune is not supported; each round merges a LoRA adapter")
        # generation and training must use one template, or rounds train on prompts they never answer
        gen = dict(self.generate) if isinstance(self.generate, dict) else self.generate.flat()
        gen_t, train_t = gen.get("prompt_template_name"), self.train.get("prompt_template_name")
        if gen_t and train_t and gen_t != train_t:
            raise ConfigError(f"online: generate uses template {gen_t!r} but train uses {train_t!r}")
        gen["prompt_template_name"] = self.train["prompt_template_name"] = gen_t or train_t or "chat"
        gen.setdefault("seed", self.seed)  # round r samples with seed + r
        self.generate = GenerateConfig.from_dict(gen, "online: generate")
        probe = TrainConfig(**self.train, base_model="-", data_path="-", output_dir="-")
        probe.validate()  # the whole train section must make a valid run, before any round starts
        probe.gradient_accumulation_steps(self.nproc_per_node)
        if not isinstance(self.judge, JudgeConfig):
            self.judge = JudgeConfig.from_dict(self.judge, "online: judge")


def fingerprint(cfg: OnlineConfig) -> str:
    """What decides a round's results; `rounds` may grow between runs without changing it."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("rounds", "output_dir")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str, overrides: dict[str, Any]) -> OnlineConfig:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read config: {err}") from None
    known = {f.name for f in dataclasses.fields(OnlineConfig)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{path}: unknown option(s): {', '.join(sorted(unknown))}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = OnlineConfig(**data)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------- files and the manifest


def read_problems(cfg: OnlineConfig) -> tuple[list[dict], list[dict]]:
    """The pool and the held-out set, checked before any round starts."""
    from .generate import validate_instructions
    from .records import read_raw

    rows, source = read_raw(cfg.pool)
    pool = validate_instructions(rows, source)
    heldout: list[dict] = []
    if cfg.heldout:
        rows, source = read_raw(cfg.heldout)
        heldout = [
            {**raw, **clean} for raw, clean in zip(rows, validate_instructions(rows, source), strict=True)
        ]
        for i, r in enumerate(heldout):
            if extract_final_answer(str(r.get("reference", ""))) is None:
                raise DataError(f"{source}: record {i}, field 'reference': missing or not a number")
    return pool, heldout


class Round:
    """One round's folder and manifest; stage status lives only in manifest.json."""

    def __init__(self, root: Path, index: int, model_in: str, config: str):
        self.dir = root / f"round_{index}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.path = self.dir / "manifest.json"
        fresh = {
            "round": index,
            "model_in": model_in,
            "config": config,
            "stages": {},
            "counts": {},
            "outputs": {},
        }
        self.manifest = json.loads(self.path.read_text()) if self.path.exists() else fresh
        if self.manifest["model_in"] != model_in:
            raise ConfigError(f"{self.path}: was started from {self.manifest['model_in']}, not {model_in}")
        if self.manifest.get("config") != config:
            raise ConfigError(
                f"{self.path}: was started with other settings; use a new output_dir for new ones"
            )

    def done(self, stage: str) -> bool:
        """Marked done in the manifest, and every output it recorded is still on disk."""
        entry = self.manifest["stages"].get(stage, {})
        if entry.get("status") != "done":
            return False
        missing = [p for p in entry.get("outputs", []) if not Path(p).exists()]
        if missing:
            logger.warning(
                "round %d: stage %s is done but %s is gone; redoing it", self.index, stage, missing[0]
            )
        return not missing

    def save(self) -> None:
        write_json_atomic(self.path, self.manifest)

    def run(self, stage: str, fn) -> None:
        if self.done(stage):
            return
        entry = self.manifest["stages"].setdefault(stage, {})
        entry["attempts"] = entry.get("attempts", 0) + 1
        if entry.get("status") == "running":
            logger.info("round %d: stage %s was cut off; redoing it", self.index, stage)
        entry["status"] = "running"
        self.save()
        start = time.time()
        logger.info("round %d: %s", self.index, stage)
        result = fn() or {}
        outputs = sorted(result.get("outputs", {}).values())
        entry.update(status="done", wall_s=round(time.time() - start, 2), outputs=outputs)
        for key in ("counts", "outputs"):
            self.manifest[key].update(result.get(key, {}))
        for key in ("train_metrics", "accuracy"):
            if key in result:
                self.manifest[key] = result[key]
        self.save()


# ---------------------------------------------------------------- stages


def sample_instructions(pool: list[dict], n: int, round_index: int, seed: int) -> list[dict]:
    """Round r takes slice r of one seeded permutation: no instruction is reused across rounds."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    lo, hi = (round_index - 1) * n, round_index * n
    if hi > len(pool):
        raise ConfigError(f"the pool has {len(pool)} instructions; {round_index} rounds of {n} need {hi}")
    return [pool[i] for i in order[lo:hi]]


def build_training_file(judged: Path, out: Path) -> dict[str, Any]:
    rows = json.loads(judged.read_text())
    keep = [r for r in rows if not r.get("judge_error")]
    write_json_atomic(out, keep)
    neg = sum(1 for r in keep if r.get("judgment") is not None)
    return {
        "counts": {
            "train_records": len(keep),
            "failed_left_out": len(rows) - len(keep),
            "train_negatives": neg,
            "train_positives": len(keep) - neg,
        }
    }


def train_round(cfg: OnlineConfig, rnd: Round, model_in: str) -> dict[str, Any]:
    adapter = rnd.dir / "adapter"
    if (adapter / "metrics.json").exists():  # it finished before the manifest was updated: keep it
        return summarise_training(adapter)
    if adapter.exists():  # a half-done training run is redone from nothing
        shutil.rmtree(adapter)
    train_cfg = {
        **cfg.train,
        "base_model": model_in,
        "data_path": str(rnd.dir / "train.json"),
        "output_dir": str(adapter),
    }
    conf = rnd.dir / "train_config.yaml"
    conf.write_text(yaml.safe_dump(train_cfg, sort_keys=False))
    if cfg.nproc_per_node > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={cfg.nproc_per_node}",
            "-m",
            "cut.train",
            "--config",
            str(conf),
        ]
    else:
        cmd = [sys.executable, "-m", "cut.train", "--config", str(conf)]
    logger.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return summarise_training(adapter)


def summarise_training(adapter: Path) -> dict[str, Any]:
    """Loss, flagged fraction and data counts from cut.train's metrics.json (written last)."""
    metrics = json.loads((adapter / "metrics.json").read_text())
    steps = [h for h in metrics["log_history"] if "mle" in h and "loss" in h]
    summary = {
        "train_loss": metrics["train"].get("train_loss"),
        "first_loss": steps[0]["loss"] if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        "mean_flagged": sum(h["flagged"] for h in steps) / len(steps) if steps else None,
        "steps": len(steps),
        "data": metrics["counts"],
    }
    return {"train_metrics": summary, "outputs": {"adapter": str(adapter)}}


def evaluate(model_path: str, heldout: list[dict], cfg: OnlineConfig) -> dict[str, Any]:
    """Greedy answers to the held-out problems; accuracy of their final numbers."""
    from .generate import generate_texts
    from .models import load_model, load_tokenizer
    from .tasks.arithmetic import answers_match, extract_final_answer
    from .templates import load_template

    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    template = load_template(cfg.generate.prompt_template_name, tokenizer)
    prompts = [template.plain(r["instruction"], r.get("input") or "") for r in heldout]
    texts = generate_texts(
        model,
        tokenizer,
        prompts,
        Sampling(max_new_tokens=cfg.eval_max_new_tokens),
        add_special_tokens=template.adds_special_tokens,
        batch_size=cfg.eval_batch_size,
    )
    del model
    release_memory()
    right = [
        answers_match(extract_final_answer(t), str(r["reference"]))
        for t, r in zip(texts, heldout, strict=True)
    ]
    return {
        "accuracy": sum(right) / len(right),
        "correct": sum(right),
        "total": len(right),
        "answers": [
            {"instruction": r["instruction"], "output": t, "reference": r["reference"], "correct": ok}
            for r, t, ok in zip(heldout, texts, right, strict=True)
        ],
    }


def release_memory() -> None:
    """Give back what an in-process model held before the training subprocess needs it."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_round(cfg: OnlineConfig, index: int, model_in: str, pool: list[dict], heldout: list[dict]) -> Round:
    from .generate import generate_file
    from .judge import judge_file, make_judge
    from .merge import merge

    rnd = Round(Path(cfg.output_dir), index, model_in, fingerprint(cfg))
    d = rnd.dir

    def sample():
        rows = sample_instructions(pool, cfg.instructions_per_round, index, cfg.seed)
        write_json_atomic(d / "instructions.json", rows)
        return {
            "counts": {"instructions": len(rows)},
            "outputs": {"instructions": str(d / "instructions.json")},
        }

    def generate():
        g = cfg.generate
        rows = generate_file(
            model_in,
            str(d / "instructions.json"),
            str(d / "responses.json"),
            dataclasses.replace(
                g,
                generator=f"round_{index - 1}" if index > 1 else Path(model_in).name,
                dataset="online-pool",
                # fresh samples each round, reproducible
                sampling=dataclasses.replace(g.sampling, seed=g.sampling.seed + index),
            ),
        )
        release_memory()
        return {"counts": {"responses": len(rows)}, "outputs": {"responses": str(d / "responses.json")}}

    def judge():
        counts = judge_file(
            str(d / "responses.json"),
            str(d / "judged.json"),
            make_judge(cfg.judge, str(d / "judge_cache.jsonl")),
        )
        return {
            "counts": {
                "positive": counts["positive"],
                "negative": counts["negative"],
                "failed_judgments": counts["failed"],
                "failed_reasons": counts["failed_reasons"],
            },
            "outputs": {"judged": str(d / "judged.json")},
        }

    def merge_stage():
        out = merge(model_in, str(d / "adapter"), str(d / "model"), cfg.merge_dtype)
        return {"outputs": {"model": str(out)}}

    def eval_stage():
        if not heldout:
            return {}
        res = evaluate(str(d / "model"), heldout, cfg)
        write_json_atomic(d / "eval.json", res)
        return {"accuracy": res["accuracy"], "outputs": {"eval": str(d / "eval.json")}}

    rnd.run("sample", sample)
    rnd.run("generate", generate)
    rnd.run("judge", judge)
    rnd.run("build", lambda: build_training_file(d / "judged.json", d / "train.json"))
    rnd.run("train", lambda: train_round(cfg, rnd, model_in))
    rnd.run("merge", merge_stage)
    rnd.run("eval", eval_stage)
    return rnd


def baseline_accuracy(cfg: OnlineConfig, heldout: list[dict]) -> float | None:
    """Held-out accuracy of the round-1 model, computed once and kept in round_0/eval.json."""
    if not heldout:
        return None
    path = Path(cfg.output_dir) / "round_0" / "eval.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, evaluate(cfg.base_model, heldout, cfg))
    return json.loads(path.read_text())["accuracy"]


def run(cfg: OnlineConfig) -> dict[str, Any]:
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "online_config.json", dataclasses.asdict(cfg))
    pool, heldout = read_problems(cfg)
    start = time.time()
    acc0 = baseline_accuracy(cfg, heldout)
    if acc0 is not None:
        print(f"round 0 (the starting model): held-out accuracy {acc0:.1%}", flush=True)
    model = cfg.base_model
    rounds = []
    for r in range(1, cfg.rounds + 1):
        rnd = run_round(cfg, r, model, pool, heldout)
        m = rnd.manifest
        model = m["outputs"]["model"]
        walls = {s: m["stages"][s].get("wall_s") for s in STAGES}
        rounds.append(
            {
                "round": r,
                "accuracy": m.get("accuracy"),
                "counts": m["counts"],
                "train": m.get("train_metrics"),
                "wall_s": walls,
            }
        )
        c = m["counts"]
        acc = f"held-out accuracy {m['accuracy']:.1%}; " if m.get("accuracy") is not None else ""
        print(
            f"round {r}: {acc}{c.get('positive', 0)} positives, {c.get('negative', 0)} negatives, "
            f"{c.get('failed_judgments', 0)} failed judgments; stage seconds "
            + ", ".join(f"{s} {w:.0f}" for s, w in walls.items() if w is not None),
            flush=True,
        )
    summary = {
        "baseline_accuracy": acc0,
        "rounds": rounds,
        "final_model": model,
        "wall_s": round(time.time() - start, 1),
    }
    write_json_atomic(root / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .llm import quiet_http_logs

    quiet_http_logs()
    p = argparse.ArgumentParser(prog="cut.online", description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", required=True, help="YAML: OnlineConfig fields, with generate / judge / train sections"
    )
    p.add_argument("--output_dir", help="override the config's output_dir")
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--base_model", help="override the round-1 model")
    args = p.parse_args(argv)
    try:
        cfg = load_config(
            args.config, {"output_dir": args.output_dir, "rounds": args.rounds, "base_model": args.base_model}
        )
        if (
            cfg.base_model.startswith("saved_models/SmolLM2-135M-Instruct")
            and not Path(cfg.base_model).exists()
        ):
            from .smollm import ensure_smollm2

            ensure_smollm2(cfg.base_model)
        run(cfg)
    except (ConfigError, DataError) as err:
        print(f"cut.online: error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:
        print(
            f"cut.online: error: a stage failed ({' '.join(map(str, err.cmd))}: exit {err.returncode}); "
            "fix it and rerun the same command to continue",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
