"""Model cards: the README.md of a cut.train output folder (adapter or full model) and of a
cut.merge folder, in place of PEFT's empty template.

A card says what a reader needs to reuse or reproduce the model: the base model, the objective
and its loss settings, the data and its counts (positives / negatives / failed judgments), the
resolved config (the same text as cut_config.yaml) and the final metrics. Pure text from dicts:
no model, no file is read here.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

PAPER = "https://arxiv.org/abs/2312.14591"  # Xu et al., Reasons to Reject? Aligning Language Models with Judgments

# the options that shape CUT's loss, in the order the README explains them
LOSS_KEYS = (
    "weight_unlike",
    "threshold",
    "combine",
    "flag_source",
    "unlikelihood",
    "npo_beta",
    "gamma",
    "misalign",
    "weight_unflagged",
    "weight_align_n",
    "score_threshold",
    "on_failed_judgment",
    "downsample",
)
COUNT_ROWS = (
    ("records", "records read"),
    ("positive", "positives (trained by MLE)"),
    ("negative", "negatives (trained against their judgment)"),
    ("failed_judgment", "failed judgments (dropped, or positives with on_failed_judgment positive)"),
    ("downsampled_away", "positives left out by downsample"),
    ("too_long", "left out: longer than cutoff_len"),
    ("train_examples", "training examples"),
    ("val_examples", "validation examples"),
)


def _front_matter(base_model: str, library: str, tags: list[str]) -> str:
    meta = {
        "base_model": base_model,
        "library_name": library,
        "pipeline_tag": "text-generation",
        "tags": tags,
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _table(rows: list[tuple[str, Any]], head: tuple[str, str]) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def _data_line(config: dict[str, Any]) -> str:
    where = f"`{config.get('data_path', '')}`"
    if config.get("dataset_config"):
        where += f", config `{config['dataset_config']}`"
    if config.get("dataset_split", "train") != "train":
        where += f", split `{config['dataset_split']}`"
    return where


def _metric_rows(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [(f"train/{k}", v) for k, v in (metrics.get("train") or {}).items()]
    rows += [(k if k.startswith("eval") else f"eval/{k}", v) for k, v in (metrics.get("eval") or {}).items()]
    if "wall_s" in metrics:
        rows.append(("wall seconds", metrics["wall_s"]))
    return rows


def training_card(
    config: dict[str, Any],
    metrics: dict[str, Any],
    merged: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
) -> str:
    """The card of a cut.train folder (merged None) or of the model cut.merge folded it into
    (merged: the merge's cut_merge.json, {base_model, adapter, dtype}). recipe: a preference
    baseline's own config ({objective: dpo | kto, beta, ...}) when the adapter came from one."""
    base = (merged or {}).get("base_model") or config.get("base_model", "")
    full = bool(config.get("full_finetune"))
    adapter = not full and merged is None
    kind = "LoRA adapter" if adapter else "merged model" if merged is not None else "fully fine-tuned model"
    tags = ["cut", "contrastive-unlikelihood-training", "judgments"] + (["lora"] if not full else [])
    counts = metrics.get("counts") or {}
    if recipe:  # a preference baseline (cut dpo / cut kto): say so, not CUT
        name = str(recipe.get("objective", "")).upper()
        title = f"# {kind} of {base}, trained with {name}\n"
        what = (
            f"A {kind} of `{base}` trained by `cut {name.lower()}` (TRL's {name} trainer) on judged "
            "responses: passing answers are the preferred side, failing ones the rejected side"
            + (
                ", counted only over the tokens inside the judgment's spans"
                if recipe.get("rejected_tokens") == "spans"
                else ""
            )
            + ".\n"
        )
        tags.append(name.lower())
    elif not config:
        title = f"# {kind} of {base}\n"
        what = f"A {kind} of `{base}`; the adapter's training config was not found, so nothing is said of how it was trained.\n"
    else:
        title = f"# {kind} of {base}, trained with CUT\n"
        what = (
            f"A {kind} of `{base}` trained by Contrastive Unlikelihood Training (CUT, [Xu et al. 2024]({PAPER})) "
            "with `cut` on judged responses: responses judged good are trained by "
            "maximum likelihood; a response with a critique is trained against it: the tokens whose "
            "probability rises when the critique is in the context (the judgment-conditioned / plain ratio "
            "above `threshold`) get an unlikelihood loss, the rest keep their likelihood.\n"
        )
    parts = [_front_matter(base, "peft" if adapter else "transformers", tags), title, what]
    if merged is not None:
        parts.append(
            f"Merged by `cut merge` from the adapter `{merged.get('adapter', '')}` "
            f"(weights in `{merged.get('dtype', '')}`).\n"
        )
    parts.append("## Objective and loss settings\n")
    settings = recipe.items() if recipe else ((k, config[k]) for k in LOSS_KEYS if k in config)
    parts.append(_table([(f"`{k}`", v) for k, v in settings], ("option", "value")) + "\n")
    lora = [
        (f"`{k}`", config[k])
        for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
        if k in config
    ]
    if not full and lora:
        parts.append("LoRA: " + ", ".join(f"{k} = {v}" for k, v in lora) + ".\n")
    parts.append("## Data\n")
    parts.append(f"Judged records from {_data_line(config)}.\n")
    if counts:
        rows = [(label, counts[key]) for key, label in COUNT_ROWS if key in counts]
        parts.append(_table(rows, ("records", "count")) + "\n")
    else:
        parts.append("No counts recorded (metrics.json missing).\n")
    parts.append("## Final metrics\n")
    rows = _metric_rows(metrics)
    parts.append(
        (_table(rows, ("metric", "value")) if rows else "None recorded (metrics.json missing).") + "\n"
    )
    parts.append("## Use\n")
    parts.append(_usage(base, adapter) + "\n")
    parts.append("## Resolved config (`cut_config.yaml`)\n")
    parts.append("```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```\n")
    return "\n".join(parts)


def _usage(base: str, adapter: bool) -> str:
    if adapter:
        code = (
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base)})\n"
            'model = PeftModel.from_pretrained(base, "THIS_FOLDER")\n'
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")\n'
        )
        note = f"or fold it in: `cut merge --base_model {base} --adapter THIS_FOLDER --output_dir MERGED`"
        return f"```python\n{code}```\n\n{note}"
    code = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")\n'
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")\n'
    )
    return f"```python\n{code}```\n\nPrompts follow the training template (`prompt_template_name` below)."
