"""KTO baseline: every judged record as an unpaired desirable / undesirable example, through TRL's KTOTrainer.

    python -m cut.baselines.kto --config train_config.yaml [--beta 0.1] [--rejected_tokens spans]

What a user with pass/fail feedback and few pairs would run (Ethayarajh et al. 2024, KTO): unlike
DPO it needs no prompt with both a passing and a failing answer, so every sample trains. The YAML
and flags are cut.train's, as for cut.baselines.dpo (CUT-only options are accepted and ignored);
the YAML may add `kto_beta`, `desirable_weight` and `rejected_tokens`. TRL's option names work as
for cut.baselines.dpo: KTOConfig's beta is kto_beta, its desirable_weight is ours (undesirable_weight
only 1, loss_type only kto). Positives are desirable, negatives undesirable, failed judgments left out. desirable_weight 0 (the default) sets it from
the data to n_undesirable / n_desirable, the lower end of the range the KTO paper recommends
(Eq. 8: lambda_D n_D / (lambda_U n_U) in [1, 4/3]), so the two kinds weigh the same in total.
With rejected_tokens spans an undesirable example's log-ratio sums only the tokens inside its
judgment's `spans` (all tokens of a record without spans). The reference is the adapter-free model.
Tokenised by cut exactly as cut.train tokenises a positive; TRL pads, scores and optimises.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

from cut.args import opt
from cut.data.pairs import tokenize_example
from cut.data.records import Example, classify, load_records
from cut.data.templates import load_template
from cut.errors import DataError
from cut.training import dpo as dpo_recipe
from cut.training.config import TrainConfig
from cut.training.dpo import (
    RecipeOptions,
    beta_option,
    logger,
    parse_config,
    preference_trainer,
    rejected_tokens_option,
    save_configs,
    setup,
)
from cut.training.train import process_rank, shared_arguments


@dataclass
class KTOOptions(RecipeOptions):
    TRL_FIXED: ClassVar[dict[str, tuple[Any, str]]] = {
        "loss_type": (
            "kto",
            "cut kto trains the KTO loss (TRL's default loss_type); for apo_zero_unpaired use `trl kto`",
        ),
        "undesirable_weight": (
            1.0,
            "cut kto weighs every undesirable example 1: set the balance with --desirable_weight "
            "(TRL's desirable_weight / undesirable_weight)",
        ),
    }

    beta: float = beta_option("KTO beta: how far the policy may move from the reference.", "--kto_beta")
    desirable_weight: float = opt(
        0.0,
        "Weight of desirable (positive) examples, as TRL's KTOConfig.desirable_weight (undesirable ones "
        "weigh 1); 0 = n_undesirable / n_desirable from the data.",
        lo=0,
    )
    rejected_tokens: str = rejected_tokens_option(
        "Which tokens of an undesirable response its log-ratio sums: all (KTO) | spans (the "
        "judgment's marked text only; all tokens of a record without spans)."
    )


OPTIONS = KTOOptions
YAML_KEYS = KTOOptions.yaml_keys()


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, KTOOptions]:
    return parse_config(argv, KTOOptions, "cut.baselines.kto")


def prepare_data(cfg: TrainConfig, tokenizer) -> tuple[list[dict], dict[str, int]]:
    """{prompt_ids, completion_ids, label, completion_span} per record that fits; failed judgments out."""
    records = load_records(cfg.data_path)
    template = load_template(cfg.prompt_template_name, tokenizer)
    counts = dict.fromkeys(("records", "positive", "negative", "failed_judgment", "too_long"), 0)
    counts["records"] = len(records)
    features = []
    for r in records:
        kind = classify(r, cfg.score_threshold)
        if kind == "failed":
            counts["failed_judgment"] += 1
            continue
        counts[kind] += 1
        f = tokenize_example(Example(r, None), template, tokenizer, cfg.cutoff_len, cfg.add_eos_token)
        if f is None:
            counts["too_long"] += 1
            continue
        desirable = kind == "positive"
        features.append(
            {
                "prompt_ids": f["prompt_ids"],
                "completion_ids": f["response_ids"],
                "label": desirable,
                "completion_span": [] if desirable else f["span_mask"],
            }
        )
    n_good = sum(f["label"] for f in features)
    if not n_good or n_good == len(features):
        raise DataError(
            f"{cfg.data_path}: KTO needs desirable and undesirable examples; got {n_good} desirable, "
            f"{len(features) - n_good} undesirable that fit ({counts})"
        )
    counts.update(train_desirable=n_good, train_undesirable=len(features) - n_good)
    return features, counts


def add_kl_completions(features: list[dict], per_device: int) -> list[dict]:
    """TRL's KL estimate: within each run of `per_device` examples, example i is also scored with the
    completion of example i - 1 (a mismatched pair), as KTOTrainer's own preparation does."""
    out = []
    for lo in range(0, len(features), per_device):
        chunk = features[lo : lo + per_device]
        for i, f in enumerate(chunk):
            out.append({**f, "KL_completion_ids": chunk[i - 1]["completion_ids"]})
    return out


def _undesirable_rows(examples: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    return [(i, e) for i, e in enumerate(examples) if not e["label"]]


def build_trainer(cfg: TrainConfig, opts: KTOOptions):
    """Validate, tokenise the records, load the model and wire TRL's KTOTrainer; nothing trains yet."""
    from trl import KTOConfig, KTOTrainer

    tokenizer = setup(cfg, "KTO")
    features, counts = prepare_data(cfg, tokenizer)
    weight = opts.desirable_weight or counts["train_undesirable"] / counts["train_desirable"]
    counts["desirable_weight"] = weight
    if process_rank() == 0:
        save_configs(cfg, opts, "kto")
        logger.info(
            "KTO: %(records)d records -> %(train_desirable)d desirable, %(train_undesirable)d undesirable "
            "(failed judgments %(failed_judgment)d, too long %(too_long)d left out); desirable_weight %(desirable_weight).3g",
            counts,
        )
    args = KTOConfig(
        **shared_arguments(cfg),
        beta=opts.beta,
        desirable_weight=weight,
        undesirable_weight=1.0,
        max_length=cfg.cutoff_len,  # never bites: prompts were fitted to it already
        save_strategy="no",
    )
    # TRL reads a KL dataset in order (train_sampling_strategy "sequential"): shuffle once with the seed,
    # so a micro-batch mixes prompts and its mismatched pairs are other prompts' answers
    random.Random(cfg.seed).shuffle(features)
    data = add_kl_completions(features, cfg.micro_batch_size)
    trainer = preference_trainer(
        KTOTrainer, "completion_span", _undesirable_rows, cfg, opts, args, data, tokenizer
    )
    return trainer, counts


def main(argv: list[str] | None = None) -> int:
    return dpo_recipe.main(argv, parse, build_trainer, "kto")


if __name__ == "__main__":
    sys.exit(main())
