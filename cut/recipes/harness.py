"""Ranking-based evaluation with EleutherAI's LM Evaluation Harness (lm-eval), the path the CUT
paper takes for ARC, HellaSwag, MMLU and TruthfulQA.

    cut lm-eval --model saved_models/run/merged --tasks paper --output_file saved_models/run/lm_eval.json
    cut lm-eval --model saved_models/run/adapter --tasks arc_challenge:25,hellaswag:10 --output_file r.json
    cut lm-eval --model M --tasks my_task --include_path my_tasks/ --output_file r.json   (local tasks)

--model is a merged `cut merge` folder (any save_pretrained folder or hub name) or a LoRA adapter
folder written by cut.train: lm-eval then loads the adapter's base and applies the adapter (and
the adapter's tokenizer, which cut.train saves beside it). `--tasks paper` is ARC-Challenge
(25-shot, acc_norm), HellaSwag (10-shot, acc_norm), MMLU (5-shot, acc) and TruthfulQA-MC2
(0-shot, acc): the shots of the Open LLM Leaderboard (v1), which reported these four tasks with
this harness; the release names the tasks and the harness but not its settings. `task:shots`
sets a task's shots; a task without them uses --num_fewshot (else the task's own default). The
model is loaded once; each group of tasks with the same shots is one lm-eval call.

The output file (written atomically) holds lm-eval's results, n-shot and versions for every
task, and `headline`: one number per task (the metric above; acc_norm, else acc, for others).
lm-eval downloads the public tasks' data from the Hugging Face hub on first use; local tasks
(--include_path: a folder of lm-eval task YAML files) need nothing from the network.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cut.args import INT_MAX, Options, integer, number, opt, run_cli
from cut.data.files import check_writable, write_json_atomic
from cut.errors import ConfigError, EngineError
from cut.modeling.loading import (
    DTYPES,
    adapter_base,
    check_model_path,
    device_option,
    resolve_device,
    resolve_dtype,
)

logger = logging.getLogger("cut.lm_eval")

# task -> (shots, headline metric)
PAPER_TASKS: dict[str, tuple[int, str]] = {
    "arc_challenge": (25, "acc_norm"),
    "hellaswag": (10, "acc_norm"),
    "mmlu": (5, "acc"),
    "truthfulqa_mc2": (0, "acc"),
}
INSTALL = "pip install -c .venv/constraints.txt -e '.[eval]' (lm-eval 0.4.13)"


def require_lm_eval():
    try:
        return importlib.import_module("lm_eval")
    except ImportError:
        raise EngineError(f"cut lm-eval needs the lm-eval package: {INSTALL}") from None


def parse_tasks(text: str) -> dict[str, int | None]:
    """'paper' -> the paper's four tasks with their shots; 'a:25,b' -> {'a': 25, 'b': None}."""
    if text.strip() == "paper":
        return {name: shots for name, (shots, _) in PAPER_TASKS.items()}
    tasks: dict[str, int | None] = {}
    for item in text.split(","):
        name, _, shots = item.strip().partition(":")
        if not name:
            raise ConfigError(f"tasks: an empty task name in {text!r}")
        if shots and not (shots.isdigit() and int(shots) <= 1000):
            raise ConfigError(f"tasks: shots of {name} must be a whole number in [0, 1000], got {shots!r}")
        tasks[name] = int(shots) if shots else None
    return tasks


def model_args(
    model: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False
) -> dict:
    """HFLM's arguments for a model folder or a cut.train adapter folder (base + peft)."""
    check_model_path(model)
    dev = resolve_device(device)
    args: dict[str, Any] = {
        "pretrained": model,
        "dtype": str(resolve_dtype(dtype, dev)).removeprefix("torch."),
        "device": str(dev),
        "trust_remote_code": trust_remote_code,
    }
    base = adapter_base(model)
    if base is not None:
        args.update(pretrained=base, peft=model)
        if (Path(model) / "tokenizer_config.json").exists():
            args["tokenizer"] = model
    return args


def task_manager(lm_eval, names: list[str], include_path: str | None):
    """Only the local folder's tasks are indexed when they are all that is asked for (indexing
    lm-eval's own thousands of task files takes a while)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        if not Path(include_path).is_dir():
            raise ConfigError(f"include_path {include_path}: no such folder")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
        return TaskManager(include_path=include_path)
    return TaskManager()


def headline_metric(task: str, metrics: dict[str, Any]) -> tuple[str, float] | None:
    wanted = [PAPER_TASKS[task][1]] if task in PAPER_TASKS else ["acc_norm", "acc"]
    for name in wanted + ["acc"]:
        value = metrics.get(f"{name},none")
        if isinstance(value, (int, float)):
            return name, float(value)
    return None


def evaluate(
    model: str,
    tasks: dict[str, int | None],
    *,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    seed: int = 1234,
) -> dict[str, Any]:
    """lm-eval on every task (see the module docstring); returns what the output file holds."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        raise ConfigError("tasks: none given")
    args = model_args(model, dtype, device, trust_remote_code)
    manager = task_manager(lm_eval, list(tasks), include_path)
    groups: dict[int | None, list[str]] = defaultdict(list)
    for name, shots in tasks.items():
        groups[shots if shots is not None else num_fewshot].append(name)
    lm = HFLM(**args, batch_size=batch_size)
    out: dict[str, Any] = {"model": model, "model_args": args, "results": {}, "n-shot": {}, "versions": {}}
    for shots, names in groups.items():
        logger.info("lm-eval: %s, %s-shot", ", ".join(names), "default" if shots is None else shots)
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=shots,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        for key in ("results", "n-shot", "versions"):
            out[key].update(res.get(key, {}))
    out["headline"] = {}
    for task, metrics in out["results"].items():
        got = headline_metric(task, metrics)
        if got is not None:
            out["headline"][task] = {"metric": got[0], "value": got[1]}
    return out


@dataclass
class HarnessOptions(Options):
    """Ranking-based evaluation through lm-eval (cut lm-eval)."""

    model: str = opt("", "a merged model folder (or hub name), or a cut.train adapter folder", required=True)
    tasks: str = opt(
        "paper", "paper (arc_challenge:25, hellaswag:10, mmlu:5, truthfulqa_mc2:0) or task[:shots],..."
    )
    output_file: str = opt("", "JSON: lm-eval's results and one headline number per task", required=True)
    num_fewshot: int | None = opt(None, "shots of tasks given without :shots", parse=integer(0, 1000))
    include_path: str | None = opt(None, "a folder of lm-eval task YAML files (local tasks)")
    limit: float | None = opt(
        None, "documents per task (a fraction if < 1)", parse=number(0, None, lo_open=True)
    )
    batch_size: int = opt(8, "documents per forward", parse=integer(1, 4096))
    device: str = opt("auto", "auto | cpu | cuda | cuda:N", parse=device_option)
    dtype: str = opt("auto", "auto: bf16 on a GPU, else fp32", choices=DTYPES)
    seed: int = opt(1234, "lm-eval's seeds (few-shot draws)", parse=integer(0, INT_MAX))
    trust_remote_code: bool = opt(False, "allow model code from the model folder")


def build_parser() -> argparse.ArgumentParser:
    return HarnessOptions.build_parser("cut.lm_eval")


def main(argv: list[str] | None = None) -> int:
    opts = HarnessOptions.parse(argv, prog="cut.lm_eval")

    def body() -> None:
        tasks = parse_tasks(opts.tasks)
        check_writable(opts.output_file, "output_file")
        settings = {k: v for k, v in opts.flat().items() if k not in ("model", "tasks", "output_file")}
        out = evaluate(opts.model, tasks, **settings)
        write_json_atomic(opts.output_file, out)
        for task, h in out["headline"].items():
            print(f"{task}: {h['metric']} {h['value']:.4f}")

    return run_cli("cut.lm_eval", body)


if __name__ == "__main__":
    sys.exit(main())
