"""Training options: one dataclass, filled from defaults <- YAML (--config) <- command-line flags.

Every flag of the released `finetune_unlikelihood.py` keeps its name and meaning; the rest are
what users of the Hugging Face stack expect. YAML keys are exactly the field names, or TRL's name for
the same option (TRL_ALIASES: --num_train_epochs is --num_epochs, --bf16 is --precision bf16, ...);
TRL options that mean nothing here (--push_to_hub, ...) are refused with what to do instead.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from cut.args import FLOAT_MAX, INT_MAX, Options, Parser, check_field, coerce_value, integer, opt, parse_bool
from cut.args import load_yaml as read_yaml
from cut.data.files import check_writable
from cut.errors import ConfigError
from cut.modeling.loading import DTYPES, canonical_dtype


@dataclass
class TrainConfig(Options):
    """Every option of cut.train, one flat dataclass: its fields are the flags and the YAML keys
    (flat, as every shipped config and the saved cut_config.yaml hold them). The comments group
    them as the issue's model / data / lora / optim / run / loss sections would; sections are not
    used because the saved config must stay flat and `TrainConfig(**flat)` is the record format."""

    DESCRIPTION: ClassVar[str] = (
        "Contrastive Unlikelihood Training. Flags override --config; unknown flags are errors."
    )

    # ---- model / data
    base_model: str = opt("", "Hugging Face model folder or name of any causal LM (required).", required=True)
    data_path: str = opt(
        "",
        "Judgment data (required): .json list, .jsonl, or a `datasets` folder / name; records are "
        "instruction/output, chat `messages`, or prompt/completion(/label) (README: Data format).",
        required=True,
    )
    dataset_config: str = opt(
        "", "The config (subset) of a `datasets` name or folder with several; empty = its default."
    )
    dataset_split: str = opt("train", "The split of a `datasets` name or folder to train on.")
    output_dir: str = opt(
        "saved_models/cut-lora", "Where the adapter (or full model), config and metrics go.", required=True
    )
    # ---- optim: batch, schedule
    batch_size: int = opt(
        128, "Global batch size in records: micro_batch_size x accumulation x processes.", lo=1
    )
    micro_batch_size: int = opt(
        8, "Records per process per forward (a negative record is two sequences).", lo=1
    )
    num_epochs: float = opt(1.0, "Training epochs.")
    learning_rate: float = opt(3e-4, "Peak learning rate.", lo=0, lo_open=True)
    cutoff_len: int = opt(4096, "Maximum tokens of one sequence; prompts are cut from the left to fit.", lo=2)
    val_set_size: float = opt(
        0, "Held-out records for evaluation: a count, or a fraction if < 1. 0 = none.", hi=INT_MAX
    )
    lr_scheduler: str = opt("cosine", "Learning-rate schedule (any transformers scheduler name).")
    warmup_steps: int = opt(100, "Linear warm-up steps.", lo=0)
    warmup_ratio: float = opt(
        0.0,
        "Warm-up as a fraction of all optimiser steps (0 < r < 1); replaces warmup_steps.",
        lo=0,
        hi=1,
        hi_open=True,
    )
    # ---- lora
    lora_r: int = opt(16, "LoRA rank.", lo=1)
    lora_alpha: int = opt(16, "LoRA alpha.", lo=0, lo_open=True)
    lora_dropout: float = opt(0.05, "LoRA dropout.", lo=0, hi=1, hi_open=True)
    lora_target_modules: list[str] = opt(
        ["gate_proj", "down_proj", "up_proj"],
        "Module names LoRA wraps, e.g. [q_proj,v_proj]; 'all-linear' for every linear layer but the head.",
    )
    full_finetune: bool = opt(False, "Train all weights instead of a LoRA adapter.")
    # ---- data: tokenising and batching
    train_on_inputs: bool = opt(False, "Also apply MLE to prompt tokens of the MLE contexts.")
    add_eos_token: bool = opt(True, "End every response with the tokenizer's EOS token.")
    group_by_length: bool = opt(False, "Batch records of similar length together (less padding).")
    packing: bool = opt(
        True,
        "Pack each micro-batch's sequences into one row without padding (position_ids restart per "
        "sequence, attention kept inside each); false: right-padded rows.",
    )
    prompt_template_name: str = opt(
        "alpaca", "alpaca | chat (the tokenizer's chat template) | path to a .json template."
    )
    # ---- loss (CUTLossConfig in cut.training.loss) and which records train
    weight_unlike: float = opt(0.1, "alpha: weight of the unlikelihood term on flagged tokens.", lo=0)
    threshold: float = opt(
        1.1, "A plain-context token is flagged when p(y|x,j) / p(y|x) exceeds this.", lo=0, lo_open=True
    )
    downsample: float = opt(-1, "Keep r x n_negatives positives (sampled with the seed); -1 keeps all.")
    combine: str = opt(
        "mean", "mean: (MLE+UL)/2 as the released code; sum: MLE+UL as the paper.", choices=("mean", "sum")
    )
    flag_source: str = opt(
        "ratio",
        "Which plain-context tokens of a negative get the unlikelihood: ratio (p(y|x,j)/p(y|x) > threshold, "
        "the paper) | spans (the tokens overlapping the record's `spans`; the ratio where a record has none) "
        "| both (either).",
        choices=("ratio", "spans", "both"),
    )
    misalign: bool = opt(
        True,
        "false: leave out every negative's plain-context (Misalign-N) sequence, so negatives train only "
        "(x, j) -> y by MLE: judgment-conditioned MLE, the hindsight-style ablation the paper argues against.",
    )
    weight_unflagged: float = opt(
        1.0,
        "Weight of the MLE on a negative's unflagged plain-context tokens: 1 = the paper; 0 = a "
        "negative's plain context trains only its flagged tokens (by unlikelihood). Each term is a weighted mean, so a "
        "weight-0 token is as if absent.",
        lo=0,
    )
    weight_align_n: float = opt(
        1.0,
        "Weight of the MLE on a negative's judged context (x, j) -> y (Align-N): 1 = the paper; 0 = the "
        "judged context only supplies p(y|x,j) for the ratio, so no failing response is trained by MLE (a weighted "
        "mean: a weight-0 token is as if absent).",
        lo=0,
    )
    gamma: float = opt(0.0, "Weight the unlikelihood of a flagged token by p(y|x,j)^gamma; 0 = off.", lo=0)
    unlikelihood: str = opt(
        "ul",
        "What a flagged token gets: ul (the paper's -alpha*log(1-p(y|x)), whose push fades as p falls) | "
        "npo (alpha*(2/beta)*log(1+(p/p_ref)^beta) per token, anchored to the adapter-free model of the "
        "run: pushes every flagged token down at the same initial rate and stops a few 1/beta nats below "
        "the reference; LoRA only).",
        choices=("ul", "npo"),
    )
    npo_beta: float = opt(
        1.0,
        "beta of unlikelihood npo: how far (in 1/beta nats) a flagged token is pushed.",
        lo=0,
        lo_open=True,
    )
    score_threshold: float = opt(7.0, "A record whose 'score' is >= this counts as positive.", lo=-FLOAT_MAX)
    on_failed_judgment: str = opt(
        "drop",
        "Records whose judgment failed ('$ERROR$', empty): drop, or train them as positives.",
        choices=("drop", "positive"),
    )
    # ---- run: logging
    wandb_project: str = opt("", "Weights & Biases project; setting it turns wandb reporting on.")
    wandb_run_name: str = opt("", "Run name for wandb / tensorboard.")
    wandb_watch: str = opt("", "wandb watch: false | gradients | all.")
    wandb_log_model: str = opt("", "wandb log model: false | true.")
    report_to: str = opt("none", "none | wandb | tensorboard | wandb,tensorboard.")
    logging_steps: int = opt(1, "Log every N optimiser steps.", lo=1)
    # ---- run: checkpoints, precision, optimiser, launch
    resume_from_checkpoint: str = opt(
        "",
        "A checkpoint folder, or 'true' for output_dir's newest complete one (incomplete ones, "
        "from a save that was cut off, are skipped); an adapter folder seeds the LoRA weights only.",
    )
    overwrite_output_dir: bool = opt(
        False, "Clear an output_dir that holds another run first (without it such a folder is refused)."
    )
    deepspeed: str = opt("", "DeepSpeed JSON config, e.g. configs/deepspeed/zero2.json.")
    precision: str = opt(
        "auto",
        "auto (bf16 on a bf16 GPU, else fp32) | bf16 | fp16 | fp32 (or bfloat16 | float16 | float32).",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    seed: int = opt(42, "Seed for sampling, splits, shuffling and initialisation.", lo=0, hi=2**32 - 1)
    max_steps: int = opt(-1, "Stop after N optimiser steps (overrides num_epochs when > 0).")
    save_steps: int = opt(200, "Save a checkpoint every N steps.", lo=1)
    save_total_limit: int = opt(2, "Keep at most N checkpoints.", lo=1)
    eval_steps: int = opt(200, "Evaluate the validation split every N steps (when val_set_size > 0).", lo=1)
    weight_decay: float = opt(0.0, "AdamW weight decay.", lo=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.", lo=0)
    optim: str = opt("adamw_torch", "Optimiser name as transformers spells it.")
    logits_chunk_size: int = opt(
        0, "Target tokens per chunk of the output head; 0 = about 64 MiB of logits.", lo=0
    )
    dataloader_num_workers: int = opt(0, "DataLoader worker processes.", lo=0)
    attn_implementation: str = opt("", "eager | sdpa | flash_attention_2; empty = the model's default.")
    trust_remote_code: bool = opt(False, "Allow model code from the model folder (off unless you ask).")

    def __post_init__(self) -> None:
        for name, (_f, tp, _path) in type(self).option_fields().items():
            setattr(self, name, coerce_value(tp, name, getattr(self, name)))
        if self.precision in DTYPES:  # one dtype vocabulary: bfloat16 -> bf16, ...
            self.precision = canonical_dtype(self.precision)

    # ---- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        """The whole check, before anything is loaded or written: each option against its
        declaration (required, finite, range, choices: cut.args), the rules between options, the
        scheduler / optimiser names transformers knows, the DeepSpeed file, output_dir writable."""
        self.check_fields()
        self.rules()
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
        """The values alone (no file, no import; the required paths may still be empty): each
        option's declared range and choices, then the rules between options."""
        for name, (f, tp, _path) in type(self).option_fields().items():
            if not f.metadata.get("required"):
                check_field(name, getattr(self, name), f, tp)
        self.rules()

    def rules(self) -> None:
        """What no single field's declaration says: -1 as 'off', and the rules between fields."""
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

    def gradient_accumulation_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ConfigError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size x processes ({per_step})"
            )
        return self.batch_size // per_step

    def save(self, path: str | os.PathLike) -> None:
        from cut.data.files import write_text_atomic

        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    # ---- sources: TRL names, gradient_accumulation_steps, the launcher's --local_rank -----------
    @classmethod
    def extra_keys(cls) -> tuple[str, ...]:
        return (*TRL_ALIASES, *TRL_REFUSED, GRADIENT_ACCUMULATION)

    @classmethod
    def add_extra_flags(cls, parser: Parser) -> None:
        add_local_rank(parser)
        add_trl_names(parser)

    @classmethod
    def from_sources(
        cls, config: dict[str, Any], flags: dict[str, Any], config_path: str = ""
    ) -> TrainConfig:
        """defaults <- YAML <- flags, TRL names resolved in each, gradient_accumulation_steps turned
        into batch_size; coerced, not yet checked (`validate` is the run's first step)."""
        flags = dict(flags)
        flags.pop("local_rank", None)
        values = resolved(config, config_path or "config")
        values = derive_batch_size(_layer(values, resolved(flags, "flags")), world_size_from_env())
        return cls(**values)


FIELDS = {f.name: f for f in fields(TrainConfig)}
FIELD_TYPES = {name: tp for name, (_f, tp, _path) in TrainConfig.option_fields().items()}


def coerce(name: str, value: Any) -> Any:
    """A YAML / CLI value as the option's type; fire-style looks (--tag=001) do not leak."""
    return coerce_value(TrainConfig.option_fields()[name][1], name, value)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A training config file as field name -> value: TRL names resolved, values coerced; a
    ConfigError names the file and the option."""
    return resolved(read_yaml(path), str(path))


def resolved(values: dict[str, Any], source: str) -> dict[str, Any]:
    """One source's values under their field names (see resolve_aliases), each coerced."""
    values = resolve_aliases(values, source)
    return {k: v if k == GRADIENT_ACCUMULATION else coerce(k, v) for k, v in values.items()}


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
            return name, not parse_bool(value)
        except ValueError as err:
            raise ConfigError(f"option {alias} (= not {name}): {err}") from None
    if how.endswith("if true"):
        try:
            on = parse_bool(value)
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
            raise different_values(source, name, (alias, values[alias]), (given_as[name], out[name]))
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


def different_values(source: str, name: str, one: tuple[str, Any], other: tuple[str, Any]) -> ConfigError:
    """Option `name` given under two names (each with its value) that disagree."""
    return ConfigError(
        f"{source}: {one[0]} ({one[1]!r}) and {other[0]} ({other[1]!r}) set {name} to different values: give one"
    )


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


def add_local_rank(parser: argparse.ArgumentParser) -> None:
    """The deepspeed launcher's --local_rank (accepted, ignored: LOCAL_RANK says the same)."""
    parser.add_argument("--local_rank", "--local-rank", type=integer(0, INT_MAX), help=argparse.SUPPRESS)


def add_trl_names(parser: argparse.ArgumentParser, skip: Collection[str] = ()) -> argparse._ArgumentGroup:
    """TRL's option names: the aliases, gradient_accumulation_steps and the refused names but those in
    `skip` (a recipe's own: cut dpo's beta, loss_type); returns the group, where the recipe adds them."""
    trl = parser.add_argument_group(
        "TRL option names", "accepted for the option they mean here; give one name per option"
    )
    for alias, (name, how) in TRL_ALIASES.items():
        meaning = {"same": f"= --{name}", "negated": f"= --{name} with the opposite truth value"}.get(
            how, f"true: --{name} {how.split()[0]}; false: not {how.split()[0]} (fp32 unless --{name} says)"
        )
        kw: dict[str, Any] = {"help": meaning, "metavar": alias.upper()}
        if FIELD_TYPES[name] is bool or how != "same":
            kw.update(nargs="?", const="true")
        trl.add_argument(f"--{alias}", **kw)
    trl.add_argument(
        f"--{GRADIENT_ACCUMULATION}",
        metavar="N",
        help="sets --batch_size to micro_batch_size x N x WORLD_SIZE (the processes torchrun / deepspeed "
        "start; 1 without); a --batch_size given with it must equal that",
    )
    for alias, hint in TRL_REFUSED.items():
        if alias not in skip:
            trl.add_argument(f"--{alias}", nargs="?", const="true", help=f"refused: {hint}")
    return trl


def build_parser(prog: str) -> argparse.ArgumentParser:
    """cut.train's parser: every field as a flag, --config, --local_rank and TRL's names."""
    return TrainConfig.build_parser(prog)


def parse_config(argv: list[str] | None = None, prog: str = "cut.train") -> TrainConfig:
    """defaults <- YAML <- flags, each value coerced to its field's type; a bad value is a
    ConfigError (a bad flag: exit 2), and the ranges are `validate`'s, the run's first step."""
    args = vars(build_parser(prog).parse_args(argv))
    path = args.pop("config", None)
    return TrainConfig.from_sources(read_yaml(path) if path else {}, args, path or "")
