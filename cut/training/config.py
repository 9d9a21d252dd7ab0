"""Training options: one dataclass, filled from defaults <- YAML (--config) <- command-line flags.

Every flag of the released `finetune_unlikelihood.py` keeps its name and meaning; the rest are
what users of the Hugging Face stack expect. YAML keys are exactly the field names, or TRL's name for
the same option (TRL_ALIASES: --num_train_epochs is --num_epochs, --bf16 is --precision bf16, ...);
TRL options that mean nothing here (--push_to_hub, ...) are refused with what to do instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cut.args import FLOAT_MAX, INT_MAX, Parser, integer
from cut.data.files import check_writable
from cut.errors import ConfigError
from cut.modeling.loading import DTYPES, canonical_dtype


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A field with its help text; numbers may add their range: lo, hi (default INT_MAX / FLOAT_MAX)
    and lo_open (lo itself refused)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model / data
    base_model: str = _f("", "Hugging Face model folder or name of any causal LM (required).")
    data_path: str = _f(
        "",
        "Judgment data (required): .json list, .jsonl, or a `datasets` folder / name; records are "
        "instruction/output, chat `messages`, or prompt/completion(/label) (README: Data format).",
    )
    dataset_config: str = _f(
        "", "The config (subset) of a `datasets` name or folder with several; empty = its default."
    )
    dataset_split: str = _f("train", "The split of a `datasets` name or folder to train on.")
    output_dir: str = _f("saved_models/cut-lora", "Where the adapter (or full model), config and metrics go.")
    # training hyper-parameters
    batch_size: int = _f(
        128, "Global batch size in records: micro_batch_size x accumulation x processes.", lo=1
    )
    micro_batch_size: int = _f(
        8, "Records per process per forward (a negative record is two sequences).", lo=1
    )
    num_epochs: float = _f(1.0, "Training epochs.")
    learning_rate: float = _f(3e-4, "Peak learning rate.", lo=0, lo_open=True)
    cutoff_len: int = _f(4096, "Maximum tokens of one sequence; prompts are cut from the left to fit.", lo=2)
    val_set_size: float = _f(
        0, "Held-out records for evaluation: a count, or a fraction if < 1. 0 = none.", hi=INT_MAX
    )
    lr_scheduler: str = _f("cosine", "Learning-rate schedule (any transformers scheduler name).")
    warmup_steps: int = _f(100, "Linear warm-up steps.", lo=0)
    warmup_ratio: float = _f(
        0.0, "Warm-up as a fraction of all optimiser steps (0 < r < 1); replaces warmup_steps."
    )
    # lora
    lora_r: int = _f(16, "LoRA rank.", lo=1)
    lora_alpha: int = _f(16, "LoRA alpha.", lo=0, lo_open=True)
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_target_modules: list[str] = _f(
        ["gate_proj", "down_proj", "up_proj"],
        "Module names LoRA wraps, e.g. [q_proj,v_proj]; 'all-linear' for every linear layer but the head.",
    )
    full_finetune: bool = _f(False, "Train all weights instead of a LoRA adapter.")
    # llm
    train_on_inputs: bool = _f(False, "Also apply MLE to prompt tokens of the MLE contexts.")
    add_eos_token: bool = _f(True, "End every response with the tokenizer's EOS token.")
    group_by_length: bool = _f(False, "Batch records of similar length together (less padding).")
    packing: bool = _f(
        True,
        "Pack each micro-batch's sequences into one row without padding (position_ids restart per "
        "sequence, attention kept inside each); false: right-padded rows.",
    )
    prompt_template_name: str = _f(
        "alpaca", "alpaca | chat (the tokenizer's chat template) | path to a .json template."
    )
    # cut
    weight_unlike: float = _f(0.1, "alpha: weight of the unlikelihood term on flagged tokens.", lo=0)
    threshold: float = _f(
        1.1, "A plain-context token is flagged when p(y|x,j) / p(y|x) exceeds this.", lo=0, lo_open=True
    )
    downsample: float = _f(-1, "Keep r x n_negatives positives (sampled with the seed); -1 keeps all.")
    combine: str = _f(
        "mean", "mean: (MLE+UL)/2 as the released code; sum: MLE+UL as the paper.", choices=("mean", "sum")
    )
    flag_source: str = _f(
        "ratio",
        "Which plain-context tokens of a negative get the unlikelihood: ratio (p(y|x,j)/p(y|x) > threshold, "
        "the paper) | spans (the tokens overlapping the record's `spans`; the ratio where a record has none) "
        "| both (either).",
        choices=("ratio", "spans", "both"),
    )
    misalign: bool = _f(
        True,
        "false: leave out every negative's plain-context (Misalign-N) sequence, so negatives train only "
        "(x, j) -> y by MLE: judgment-conditioned MLE, the hindsight-style ablation the paper argues against.",
    )
    weight_unflagged: float = _f(
        1.0,
        "Weight of the MLE on a negative's unflagged plain-context tokens: 1 = the paper; 0 = a "
        "negative's plain context trains only its flagged tokens (by unlikelihood). Each term is a weighted mean, so a "
        "weight-0 token is as if absent.",
        lo=0,
    )
    weight_align_n: float = _f(
        1.0,
        "Weight of the MLE on a negative's judged context (x, j) -> y (Align-N): 1 = the paper; 0 = the "
        "judged context only supplies p(y|x,j) for the ratio, so no failing response is trained by MLE (a weighted "
        "mean: a weight-0 token is as if absent).",
        lo=0,
    )
    gamma: float = _f(0.0, "Weight the unlikelihood of a flagged token by p(y|x,j)^gamma; 0 = off.", lo=0)
    unlikelihood: str = _f(
        "ul",
        "What a flagged token gets: ul (the paper's -alpha*log(1-p(y|x)), whose push fades as p falls) | "
        "npo (alpha*(2/beta)*log(1+(p/p_ref)^beta) per token, anchored to the adapter-free model of the "
        "run: pushes every flagged token down at the same initial rate and stops a few 1/beta nats below "
        "the reference; LoRA only).",
        choices=("ul", "npo"),
    )
    npo_beta: float = _f(
        1.0,
        "beta of unlikelihood npo: how far (in 1/beta nats) a flagged token is pushed.",
        lo=0,
        lo_open=True,
    )
    score_threshold: float = _f(7.0, "A record whose 'score' is >= this counts as positive.", lo=-FLOAT_MAX)
    on_failed_judgment: str = _f(
        "drop",
        "Records whose judgment failed ('$ERROR$', empty): drop, or train them as positives.",
        choices=("drop", "positive"),
    )
    # logging
    wandb_project: str = _f("", "Weights & Biases project; setting it turns wandb reporting on.")
    wandb_run_name: str = _f("", "Run name for wandb / tensorboard.")
    wandb_watch: str = _f("", "wandb watch: false | gradients | all.")
    wandb_log_model: str = _f("", "wandb log model: false | true.")
    report_to: str = _f("none", "none | wandb | tensorboard | wandb,tensorboard.")
    logging_steps: int = _f(1, "Log every N optimiser steps.", lo=1)
    # run
    resume_from_checkpoint: str = _f(
        "",
        "A checkpoint folder, or 'true' for output_dir's newest complete one (incomplete ones, "
        "from a save that was cut off, are skipped); an adapter folder seeds the LoRA weights only.",
    )
    overwrite_output_dir: bool = _f(
        False, "Clear an output_dir that holds another run first (without it such a folder is refused)."
    )
    deepspeed: str = _f("", "DeepSpeed JSON config, e.g. configs/deepspeed/zero2.json.")
    precision: str = _f(
        "auto",
        "auto (bf16 on a bf16 GPU, else fp32) | bf16 | fp16 | fp32 (or bfloat16 | float16 | float32).",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    seed: int = _f(42, "Seed for sampling, splits, shuffling and initialisation.", hi=2**32 - 1)
    max_steps: int = _f(-1, "Stop after N optimiser steps (overrides num_epochs when > 0).")
    save_steps: int = _f(200, "Save a checkpoint every N steps.", lo=1)
    save_total_limit: int = _f(2, "Keep at most N checkpoints.", lo=1)
    eval_steps: int = _f(200, "Evaluate the validation split every N steps (when val_set_size > 0).", lo=1)
    weight_decay: float = _f(0.0, "AdamW weight decay.", lo=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.", lo=0)
    optim: str = _f("adamw_torch", "Optimiser name as transformers spells it.")
    logits_chunk_size: int = _f(
        0, "Target tokens per chunk of the output head; 0 = about 64 MiB of logits.", lo=0
    )
    dataloader_num_workers: int = _f(0, "DataLoader worker processes.", lo=0)
    attn_implementation: str = _f("", "eager | sdpa | flash_attention_2; empty = the model's default.")
    trust_remote_code: bool = _f(False, "Allow model code from the model folder (off unless you ask).")

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.precision in DTYPES:  # one dtype vocabulary: bfloat16 -> bf16, ...
            self.precision = canonical_dtype(self.precision)
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = _parse_list(self.lora_target_modules)

    def validate(self) -> None:
        """Every option's range, name and cross-field rule, checked at once before anything is
        loaded or written: floats finite, counts and rates in range, scheduler / optimiser names
        known to transformers, output_dir writable."""
        missing = [n for n in ("base_model", "data_path", "output_dir") if not getattr(self, n)]
        if missing:
            raise ConfigError(f"missing required option(s): {', '.join('--' + m for m in missing)}")
        self.check_values()
        from transformers import SchedulerType
        from transformers.training_args import OptimizerNames

        for name, known in (("lr_scheduler", SchedulerType), ("optim", OptimizerNames)):
            names = [k.value for k in known]
            if getattr(self, name) not in names:
                raise ConfigError(f"{name} must be one of {', '.join(names)}; got {getattr(self, name)!r}")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            raise ConfigError(f"deepspeed: no such file {self.deepspeed}")
        check_writable(self.output_dir, "output_dir")

    def check_values(self) -> None:
        """The values alone (no file, no import): finite, each in its field's range (lo / hi in its
        metadata), the choices, and the rules between fields. A ConfigError names the option."""
        for name in FIELDS:  # nan and inf pass every comparison below the wrong way
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        for name, (lo, hi, lo_open) in NUMBER_RANGES.items():
            value = getattr(self, name)
            if lo is not None and (value < lo or (lo_open and value == lo)):
                raise ConfigError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
            if value > hi:
                raise ConfigError(f"{name} must be <= {hi}, got {value}")
        if self.batch_size < self.micro_batch_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be >= micro_batch_size ({self.micro_batch_size}) >= 1"
            )
        if self.downsample != -1 and self.downsample < 0:
            raise ConfigError(f"downsample must be -1 (off) or >= 0, got {self.downsample}")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ConfigError(f"max_steps must be -1 (use num_epochs) or >= 1, got {self.max_steps}")
        if self.num_epochs <= 0 and self.max_steps == -1:
            raise ConfigError(f"num_epochs must be > 0 (or set max_steps), got {self.num_epochs}")
        if self.val_set_size < 0 or (self.val_set_size >= 1 and not float(self.val_set_size).is_integer()):
            raise ConfigError(
                f"val_set_size must be 0 (none), a fraction in (0, 1) or a whole count, got {self.val_set_size}"
            )
        if not self.full_finetune and not self.lora_target_modules:
            raise ConfigError("lora_target_modules is empty: name the modules LoRA wraps, or all-linear")
        if self.unlikelihood == "npo" and self.full_finetune:
            raise ConfigError(
                "unlikelihood npo needs the adapter-free model as its reference: not with full_finetune"
            )
        for name in ("combine", "on_failed_judgment", "precision", "flag_source", "unlikelihood"):
            choices = _meta(name).get("choices")
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

    def gradient_accumulation_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ConfigError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size x processes ({per_step})"
            )
        return self.batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        from cut.data.files import write_text_atomic

        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _meta(name: str) -> dict[str, Any]:
    return dict(FIELDS[name].metadata)


def _field_type(name: str) -> Any:
    return typing.get_type_hints(TrainConfig)[name]


def _ranges() -> dict[str, tuple[float | None, float, bool]]:
    """name -> (lo, hi, lo_open) of every int / float option, from the fields' metadata."""
    out = {}
    for name, f in FIELDS.items():
        tp = _field_type(name)
        if tp in (int, float):
            hi = f.metadata.get("hi", INT_MAX if tp is int else FLOAT_MAX)
            out[name] = (f.metadata.get("lo"), hi, f.metadata.get("lo_open", False))
    return out


def _parse_list(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in json.loads(text)]
        except json.JSONDecodeError:
            text = text[1:-1]  # fire style: [q_proj,v_proj]
    return [p.strip().strip("'\"") for p in text.split(",") if p.strip()]


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def coerce(name: str, value: Any) -> Any:
    """Turn a YAML / CLI value into the field's type; fire-style looks (--tag=001) do not leak."""
    tp = _field_type(name)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    try:
        if origin is list:
            return _parse_list(value)
        if tp is bool:
            return _parse_bool(value)
        if tp in (int, float) and isinstance(value, bool):  # YAML `true` is no count
            raise ValueError(f"not a number: {value!r}")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"not an integer: {value!r}")
            if isinstance(value, str) and "e" in value.lower():  # 1e3 from YAML / CLI
                as_float = float(value)
                if not as_float.is_integer():
                    raise ValueError(f"not an integer: {value!r}")
                return int(as_float)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if isinstance(value, bool):  # YAML `false` means unset, not the string "False"
                return "true" if value else ""
            return "" if value is None else str(value)
    except (TypeError, ValueError, OverflowError) as err:
        raise ConfigError(f"option {name}: {err}") from None
    return value


NUMBER_RANGES = _ranges()


def coerce_fields(cfg: TrainConfig) -> None:
    for name in FIELDS:
        setattr(cfg, name, coerce(name, getattr(cfg, name)))


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of option names to values")
    data = resolve_aliases(data, str(path))
    return {k: v if k == GRADIENT_ACCUMULATION else coerce(k, v) for k, v in data.items()}


# TRL's (SFTConfig / DPOConfig / ModelConfig / ScriptArguments / TrainingArguments) name for an
# option that means the same here -> (field, how its value maps onto the field)
TRL_ALIASES: dict[str, tuple[str, str]] = {
    "model_name_or_path": ("base_model", "same"),
    "dataset_name": ("data_path", "same"),
    "dataset_train_split": ("dataset_split", "same"),
    "num_train_epochs": ("num_epochs", "same"),
    "per_device_train_batch_size": ("micro_batch_size", "same"),
    "max_length": ("cutoff_len", "same"),
    "max_seq_length": ("cutoff_len", "same"),
    "lr_scheduler_type": ("lr_scheduler", "same"),
    "run_name": ("wandb_run_name", "same"),
    "bf16": ("precision", "bf16 if true"),
    "fp16": ("precision", "fp16 if true"),
    "torch_dtype": ("precision", "same"),
    "dtype": ("precision", "same"),
    "use_peft": ("full_finetune", "negated"),
    "completion_only_loss": ("train_on_inputs", "negated"),
}
# gradient_accumulation_steps is no field: batch_size = micro_batch_size x it x WORLD_SIZE
GRADIENT_ACCUMULATION = "gradient_accumulation_steps"

# TRL options with no meaning in cut -> what to do instead
TRL_REFUSED: dict[str, str] = {
    "push_to_hub": "cut does not upload; after training run `hf upload REPO OUTPUT_DIR` "
    "(the folder holds the adapter and its README.md model card)",
    "hub_model_id": "cut does not upload; name the repository in `hf upload REPO OUTPUT_DIR`",
    "hub_token": "cut does not upload; log in with `hf auth login` and run `hf upload REPO OUTPUT_DIR`",
    "hub_strategy": "cut does not upload; run `hf upload REPO OUTPUT_DIR` after training",
    "hub_private_repo": "cut does not upload; pass --private to `hf upload` (or create the repo private)",
    "dataset_text_field": "cut reads judged records (instruction/output, chat messages or "
    "prompt/completion/label): see the README's Data format",
    "per_device_eval_batch_size": "evaluation uses --micro_batch_size",
    "eval_strategy": "set --val_set_size (held-out records) and --eval_steps",
    "save_strategy": "checkpoints are saved every --save_steps steps",
    "logging_strategy": "cut logs every --logging_steps steps",
    "use_cpu": "cut trains on the GPU when one is visible: hide it with CUDA_VISIBLE_DEVICES=''",
    "tf32": "not an option here: set torch.backends.cuda.matmul.allow_tf32 in your launcher if needed",
    "load_in_4bit": "quantised bases are not supported: train in bf16 (--precision bf16)",
    "load_in_8bit": "quantised bases are not supported: train in bf16 (--precision bf16)",
    "beta": "CUT has no DPO beta; see --weight_unlike / --threshold (or `cut dpo --dpo_beta`)",
    "loss_type": "the objective is CUT; its knobs are --combine, --unlikelihood, --flag_source",
}


def _alias_value(alias: str, value: Any) -> tuple[str, Any]:
    name, how = TRL_ALIASES[alias]
    if how == "negated":
        try:
            return name, not _parse_bool(value)
        except ValueError as err:
            raise ConfigError(f"option {alias} (= not {name}): {err}") from None
    if how.endswith("if true"):
        try:
            on = _parse_bool(value)
        except ValueError as err:
            raise ConfigError(f"option {alias}: {err}") from None
        return name, (how.split()[0] if on else None)  # None: 'not this precision'
    if name == "precision":
        value = str(value).replace("torch.", "")
    return name, value


def _same_look(name: str, value: Any) -> Any:
    """bfloat16 and bf16 are one precision."""
    return (
        canonical_dtype(str(value).replace("torch.", ""))
        if name == "precision" and str(value).replace("torch.", "") in DTYPES
        else value
    )


def resolve_aliases(values: dict[str, Any], source: str) -> dict[str, Any]:
    """One source's options (a YAML file or the flags) under their field names: TRL names mapped
    (a field given twice must agree), refused TRL names and unknown names named. The result holds
    field names and, if given, gradient_accumulation_steps (see derive_batch_size)."""
    refused = [k for k in values if k in TRL_REFUSED]
    if refused:
        raise ConfigError(
            "; ".join(f"{source}: option {k} (TRL) has no meaning in cut: {TRL_REFUSED[k]}" for k in refused)
        )
    out = {k: v for k, v in values.items() if k not in TRL_ALIASES}
    given_as: dict[str, str] = {k: k for k in out}
    off: dict[str, list[str]] = {}  # precision values ruled out by bf16/fp16 false
    for alias in [k for k in values if k in TRL_ALIASES]:
        name, value = _alias_value(alias, values[alias])
        if value is None:
            off.setdefault(name, []).append(TRL_ALIASES[alias][1].split()[0])
            continue
        value = _same_look(name, coerce(name, value))
        if name in out and _same_look(name, coerce(name, out[name])) != value:
            raise ConfigError(
                f"{source}: {alias} ({values[alias]!r}) and {given_as[name]} ({out[name]!r}) "
                f"set {name} to different values: give one"
            )
        out[name], given_as[name] = value, alias
    for name, ruled_out in off.items():  # --bf16 false [--fp16 false]: fp32 unless set otherwise
        chosen = _same_look(name, out.get(name))
        if chosen in ruled_out:
            raise ConfigError(f"{source}: {given_as[name]} is {chosen} but {chosen} is set false")
        out.setdefault(name, "fp32")
    unknown = sorted(set(out) - set(FIELDS) - {GRADIENT_ACCUMULATION})
    if unknown:
        raise ConfigError(f"{source}: unknown option(s): {', '.join(unknown)}")
    return out


def world_size_from_env() -> int:
    """Processes of this launch: torchrun and the deepspeed launcher set WORLD_SIZE; 1 without."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be a whole number, got {os.environ['WORLD_SIZE']!r}") from None


def derive_batch_size(values: dict[str, Any], world_size: int) -> dict[str, Any]:
    """TRL's gradient_accumulation_steps -> batch_size = micro_batch_size x steps x world_size (the
    records of one optimiser step, as cut counts them). A batch_size given with it must equal that."""
    if GRADIENT_ACCUMULATION not in values:
        return values
    values = dict(values)
    steps = coerce_count(GRADIENT_ACCUMULATION, values.pop(GRADIENT_ACCUMULATION))
    micro = values.get("micro_batch_size", FIELDS["micro_batch_size"].default)
    derived = micro * steps * world_size
    if "batch_size" in values and values["batch_size"] != derived:
        raise ConfigError(
            f"batch_size {values['batch_size']} disagrees with gradient_accumulation_steps {steps}: "
            f"micro_batch_size {micro} x {steps} x {world_size} process(es) = {derived}; give one"
        )
    values["batch_size"] = derived
    return values


def coerce_count(name: str, value: Any) -> int:
    """A whole number >= 1 (YAML / CLI look coerced), for options that are no field."""
    if isinstance(value, bool):
        raise ConfigError(f"option {name}: not a number: {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {name}: not a whole number: {value!r}") from None
    if not math.isfinite(number) or not number.is_integer() or not 1 <= number <= INT_MAX:
        raise ConfigError(f"option {name} must be a whole number >= 1, got {value!r}")
    return int(number)


def _layer(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """top over base; batch_size and gradient_accumulation_steps replace each other across sources."""
    base = dict(base)
    if "batch_size" in top:
        base.pop(GRADIENT_ACCUMULATION, None)
    if GRADIENT_ACCUMULATION in top:
        base.pop("batch_size", None)
    base.update(top)
    return base


def build_parser(prog: str, trl_names: bool = False) -> argparse.ArgumentParser:
    """Every field as a flag; trl_names adds TRL's names (cut.train's own parser; the preference
    baselines that build on this one have options of their own that TRL names differently)."""
    parser = Parser(  # a bad flag is one line naming it, exit 2
        prog=prog,
        description="Contrastive Unlikelihood Training. Flags override --config; unknown flags are errors.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML file whose keys are option names.")
    parser.add_argument(
        "--local_rank", "--local-rank", type=integer(0, INT_MAX), help=argparse.SUPPRESS
    )  # deepspeed launcher
    for name, f in FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = {"help": f"{f.metadata['help']} (default: {default!r})", "metavar": name.upper()}
        if _field_type(name) is bool:
            kw.update(nargs="?", const="true")
        parser.add_argument(f"--{name}", **kw)
    if not trl_names:
        return parser
    trl = parser.add_argument_group(
        "TRL option names", "accepted for the option they mean here; give one name per option"
    )
    for alias, (name, how) in TRL_ALIASES.items():
        meaning = {"same": f"= --{name}", "negated": f"= --{name} with the opposite truth value"}.get(
            how, f"true: --{name} {how.split()[0]}; false: not {how.split()[0]} (fp32 unless --{name} says)"
        )
        kw = {"help": meaning, "metavar": alias.upper()}
        if _field_type(name) is bool or how != "same":
            kw.update(nargs="?", const="true")
        trl.add_argument(f"--{alias}", **kw)
    trl.add_argument(
        f"--{GRADIENT_ACCUMULATION}",
        metavar="N",
        help="sets --batch_size to micro_batch_size x N x WORLD_SIZE (the processes torchrun / deepspeed "
        "start; 1 without); a --batch_size given with it must equal that",
    )
    for alias, hint in TRL_REFUSED.items():
        trl.add_argument(f"--{alias}", nargs="?", const="true", help=f"refused: {hint}")
    return parser


def parse_config(argv: list[str] | None = None, prog: str = "cut.train") -> TrainConfig:
    """defaults <- YAML <- flags, each value coerced to its field's type."""
    args = vars(build_parser(prog, trl_names=True).parse_args(argv))
    args.pop("local_rank", None)
    values: dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path:
        values = load_yaml(config_path)
    flags = resolve_aliases(args, "flags")
    flags = {k: v if k == GRADIENT_ACCUMULATION else coerce(k, v) for k, v in flags.items()}
    values = derive_batch_size(_layer(values, flags), world_size_from_env())
    return TrainConfig(**values)
