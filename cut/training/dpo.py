"""DPO baseline: the judged records CUT trains on, as preference pairs, through TRL's DPOTrainer.

    python -m cut.baselines.dpo --config train_config.yaml [--beta 0.1] [--max_pairs_per_prompt 4]

The YAML (and the flags) are cut.train's: the file the online loop writes works unchanged. CUT-only
options (threshold, weight_unlike, flag_source, ...) are accepted and ignored; the YAML may add
`dpo_beta` and `max_pairs_per_prompt`. TRL's option names mean what they mean to cut.train
(--num_train_epochs, --gradient_accumulation_steps, ...); DPOConfig's beta is dpo_beta, and its
loss_type is accepted as sigmoid only (the loss below). Per prompt (same instruction, input and chat turns), chosen = a positive
response and rejected = a negative one; every combination, at most max_pairs_per_prompt of them
(sampled with the seed). Records whose judgment failed are left out.

The loss is Eq. 7 of Rafailov et al. (2023), -log sigmoid(beta * (log pi/pi_ref(y_w|x) -
log pi/pi_ref(y_l|x))), with pi_ref = the base model (TRL disables the LoRA adapter for it).
Prompts and responses are tokenised by cut itself, exactly as cut.train tokenises a positive record
(template prompt, the template's own special tokens, EOS after the response, prompts cut from the
left to fit cutoff_len); TRL only pads, scores and optimises.

Writes output_dir/cut_config.yaml (the TrainConfig, so generation finds the template) and
output_dir/dpo_config.yaml first; the adapter, tokenizer and metrics.json (with "objective": "dpo") last.
output_dir is checked and locked as cut.train does: another run's folder is refused unless
--overwrite_output_dir, and output_dir/.cut.lock keeps a second trainer out.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import yaml

from cut.args import Options, Parser, coerce_value, group, opt, parse_list, run_cli, setup_logging
from cut.args import load_yaml as read_yaml
from cut.data.files import write_json_atomic, write_text_atomic
from cut.data.pairs import fit_prompt, tokenize_example
from cut.data.records import Example, Record, classify, load_records
from cut.data.templates import Template, load_template
from cut.errors import ConfigError, DataError
from cut.modeling import loading as models
from cut.modeling.card import training_card
from cut.training.config import TRL_ALIASES, TrainConfig, add_local_rank, add_trl_names, different_values
from cut.training.loss import CUTLossConfig
from cut.training.runs import check_output_dir, claim_output_dir
from cut.training.train import (
    limit_cutoff,
    process_rank,
    resolve_precision,
    shared_arguments,
    world_size,
)

logger = logging.getLogger("cut.training.dpo")

# TrainConfig options that shape CUT's objective or batches, which DPO does not have: every loss
# setting (CUTLossConfig's fields) and the options of CUT's batches, evaluation and checkpoints
IGNORED = (
    *(f.name for f in dataclasses.fields(CUTLossConfig)),
    "downsample",
    "logits_chunk_size",
    "train_on_inputs",
    "packing",
    "group_by_length",
    "val_set_size",
    "resume_from_checkpoint",
    "save_steps",
    "save_total_limit",
    "eval_steps",
)


REJECTED_TOKENS = ("all", "spans")
TRL_DEST = "trl:"  # the dest of a recipe's TRL flag (--beta), apart from its field's (--dpo_beta)


@dataclass
class RecipeOptions(Options):
    """A preference recipe's own options, coerced and checked when built: cut.online builds them
    from a train section's keys (`yaml_keys`) before any round starts."""

    # TRL's name (DPOConfig / KTOConfig) -> the field it sets: --beta is --dpo_beta
    TRL_NAMES: ClassVar[dict[str, str]] = {"beta": "beta"}
    # TRL options the recipe trains at one value -> (that value, what to do for another)
    TRL_FIXED: ClassVar[dict[str, tuple[Any, str]]] = {}

    def __post_init__(self) -> None:
        for name, (_f, tp, _path) in type(self).option_fields().items():
            setattr(self, name, coerce_value(tp, name, getattr(self, name)))
        self.check_fields()

    @classmethod
    def yaml_keys(cls) -> dict[str, str]:
        """YAML key -> field: a field's extra flag spelling (--dpo_beta) is its key, else its name."""
        return {
            (f.metadata["flags"] or (f"--{n}",))[0][2:]: n for n, (f, _, _) in cls.option_fields().items()
        }

    @classmethod
    def key_of(cls) -> dict[str, str]:
        """field -> its YAML key and flag as given (beta -> dpo_beta)."""
        return {n: k for k, n in cls.yaml_keys().items()}

    @classmethod
    def extra_keys(cls) -> tuple[str, ...]:
        return (*cls.yaml_keys(), *cls.TRL_NAMES, *cls.TRL_FIXED)

    @classmethod
    def add_trl_flags(cls, parser: Parser) -> None:
        """TRL's names in cut.train's "TRL option names" group, the recipe's own among them. Their
        dest is TRL_DEST + name, apart from their field's: --beta 0.2 --dpo_beta 0.3 is told apart."""
        trl = add_trl_names(parser, skip=(*cls.TRL_NAMES, *cls.TRL_FIXED))
        trl.conflict_handler = "resolve"  # --beta leaves the field's own flags (--dpo_beta stays)
        for alias, name in cls.TRL_NAMES.items():
            trl.add_argument(
                f"--{alias}", dest=TRL_DEST + alias, metavar=alias.upper(), help=f"= --{cls.key_of()[name]}"
            )
        for alias, (value, hint) in cls.TRL_FIXED.items():
            trl.add_argument(
                f"--{alias}", dest=TRL_DEST + alias, metavar=alias.upper(), help=f"only {value!r}: {hint}"
            )

    @classmethod
    def given_names(cls, args: dict[str, Any]) -> dict[str, Any]:
        """Parsed flags under the names they were given: --dpo_beta as dpo_beta, TRL's --beta as beta."""
        key = cls.key_of()
        return {
            k.removeprefix(TRL_DEST) if k.startswith(TRL_DEST) else key.get(k, k): v for k, v in args.items()
        }

    @classmethod
    def split(cls, values: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """One source's options (the YAML or the flags, by the names they were given) -> (cut.train's,
        the recipe's by field name). The recipe's key (dpo_beta) and TRL's name (beta) set one field
        and must agree; a TRL_FIXED option is accepted at the recipe's value and refused at another."""
        names = {**cls.TRL_NAMES, **cls.yaml_keys()}
        fields = cls.option_fields()
        train: dict[str, Any] = {}
        recipe: dict[str, Any] = {}
        given_as: dict[str, tuple[str, Any]] = {}
        for key, value in values.items():
            if key in cls.TRL_FIXED:
                cls.check_fixed(key, value, source)
            elif key not in names:
                train[key] = value
            else:
                name = names[key]
                coerced = coerce_value(fields[name][1], key if key == name else f"{key} ({name})", value)
                if name in recipe and recipe[name] != coerced:
                    raise different_values(source, name, (key, value), given_as[name])
                recipe[name], given_as[name] = coerced, (key, value)
        return train, recipe

    @classmethod
    def check_fixed(cls, key: str, value: Any, source: str) -> None:
        """A TRL_FIXED option's value is the recipe's (loss_type sigmoid, or [sigmoid] as TRL's list)."""
        fixed, hint = cls.TRL_FIXED[key]
        try:
            same = (
                parse_list(value) == [fixed]
                if isinstance(fixed, str)
                else coerce_value(type(fixed), key, value) == fixed
            )
        except ConfigError:
            same = False
        if not same:
            raise ConfigError(f"{source}: option {key} (TRL) must be {fixed!r} here, got {value!r}: {hint}")


def beta_option(help: str, flag: str) -> Any:
    """The preference loss's beta (a flag and YAML key of the recipe's name: --dpo_beta, ...)."""
    return opt(0.1, help, lo=0, lo_open=True, flags=(flag,))


def rejected_tokens_option(help: str) -> Any:
    return opt("all", help, choices=REJECTED_TOKENS)


@dataclass
class DPOOptions(RecipeOptions):
    TRL_FIXED: ClassVar[dict[str, tuple[Any, str]]] = {
        "loss_type": (
            "sigmoid",
            "cut dpo trains the sigmoid DPO loss (Eq. 7, TRL's default loss_type); train another "
            "(ipo, hinge, ...) with TRL's own `trl dpo`",
        )
    }

    beta: float = beta_option(
        "DPO beta: how far the policy may move from the reference (Eq. 7).", "--dpo_beta"
    )
    max_pairs_per_prompt: int = opt(
        4, "At most this many (chosen, rejected) pairs per prompt; 0 = all.", lo=0
    )
    rejected_tokens: str = rejected_tokens_option(
        "Which tokens of a rejected response its log-ratio sums: all (DPO) | spans (only the "
        "tokens inside the judgment's `spans`, the text the critique marks as wrong; all tokens of a "
        "record without spans): the gradient goes where the critique points."
    )


def recipe_run(options: type[RecipeOptions]) -> type[Options]:
    """cut.train's options (section `train`) and a recipe's (section `recipe`) as one Options
    class: the flags and YAML keys of cut.baselines.dpo / kto, with the launcher's --local_rank and
    TRL's option names (cut.train's and the recipe's own)."""

    def add_extra_flags(cls, parser: Parser) -> None:
        add_local_rank(parser)
        options.add_trl_flags(parser)

    return dataclasses.make_dataclass(
        f"{options.__name__}Run",
        [("train", TrainConfig, group(TrainConfig)), ("recipe", options, group(options))],
        bases=(Options,),
        namespace={
            "add_extra_flags": classmethod(add_extra_flags),
            "extra_keys": classmethod(lambda cls: (*TrainConfig.extra_keys(), *options.extra_keys())),
        },
    )


YAML_KEYS = DPOOptions.yaml_keys()  # YAML key -> DPOOptions field
OPTIONS = DPOOptions  # the recipe's own options (cut.online checks a train section's keys with it)


class Pair(NamedTuple):
    chosen: Record
    rejected: Record


# ---------------------------------------------------------------------------------------------- options


def parse_config(
    argv: list[str] | None = None, options: type[RecipeOptions] = DPOOptions, prog: str = "cut.baselines.dpo"
) -> tuple[TrainConfig, Any]:
    """defaults <- YAML <- flags, as cut.train (TRL's names too: TrainConfig.from_sources); the
    recipe's options come from their flags or YAML keys (dpo_beta, or TRL's beta: `RecipeOptions.split`).
    Every value is checked (the ignored ones too) before a word is logged; the rest is `validate`'s."""
    run = recipe_run(options)
    description = f"{prog}: a preference baseline on cut's judged records. Flags override --config."
    args = vars(run.build_parser(prog, description).parse_args(argv))
    args.pop("local_rank", None)
    path = args.pop("config", None)
    config_train, config_recipe = options.split(
        run.flatten(read_yaml(path), path) if path else {}, path or ""
    )
    flag_train, flag_recipe = options.split(options.given_names(args), "flags")
    cfg = TrainConfig.from_sources(config_train, flag_train, path or "")
    opts = options(**{**config_recipe, **flag_recipe})
    cfg.check_values()
    given = {TRL_ALIASES.get(k, (k,))[0] for k in (*config_train, *flag_train)}
    ignored = [k for k in IGNORED if k in given]
    if ignored:
        logger.info(
            "%s ignores the CUT-only option(s): %s",
            prog,
            ", ".join(f"{k}={getattr(cfg, k)!r}" for k in ignored),
        )
    return cfg, opts


# ---------------------------------------------------------------------------------------------- data


def build_pairs(
    records: list[Record], score_threshold: float, max_pairs_per_prompt: int, seed: int
) -> tuple[list[Pair], dict[str, int]]:
    """(chosen, rejected) pairs per prompt, in file order; a capped prompt keeps a seeded sample."""
    groups: dict[tuple[str, str, tuple], tuple[list[Record], list[Record]]] = {}  # + the chat turns
    counts = dict.fromkeys(
        ("records", "positive", "negative", "failed_judgment", "prompts", "prompts_with_pairs", "pairs"), 0
    )
    counts.update(records=len(records), pairs_capped_away=0)
    for r in records:
        kind = classify(r, score_threshold)
        if kind == "failed":
            counts["failed_judgment"] += 1
            continue
        counts[kind] += 1
        pos, neg = groups.setdefault((r.instruction, r.input, r.history), ([], []))
        (pos if kind == "positive" else neg).append(r)
    counts["prompts"] = len(groups)
    rng = random.Random(seed)
    pairs: list[Pair] = []
    for pos, neg in groups.values():
        combos = [Pair(p, n) for p in pos for n in neg]
        if not combos:
            continue
        if 0 < max_pairs_per_prompt < len(combos):
            keep = sorted(rng.sample(range(len(combos)), max_pairs_per_prompt))
            counts["pairs_capped_away"] += len(combos) - len(keep)
            combos = [combos[i] for i in keep]
        counts["prompts_with_pairs"] += 1
        pairs += combos
    counts["pairs"] = len(pairs)
    return pairs, counts


def tokenize_pair(
    pair: Pair, template: Template, tokenizer, cutoff_len: int, add_eos_token: bool = True
) -> dict[str, list[int]] | None:
    """{prompt_ids, chosen_ids, rejected_ids, rejected_span} as cut.train tokenises a positive; None if
    a response cannot fit. rejected_span: 1 / 0 per rejected token inside / outside the record's
    spans, [] when it marks none.

    Each response is tokenised after the plain prompt by `cut.data.pairs.tokenize_example` (the template's
    special tokens, EOS appended); the shared prompt is then cut from the left so that prompt + the
    longer response fits cutoff_len."""
    feats = [
        tokenize_example(Example(r, None), template, tokenizer, sys.maxsize, add_eos_token)
        for r in (pair.chosen, pair.rejected)
    ]
    chosen, rejected = (f["response_ids"] for f in feats)
    prompt = fit_prompt(feats[0]["prompt_ids"], max(len(chosen), len(rejected)), cutoff_len, tokenizer)
    if prompt is None:
        return None
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "rejected_span": feats[1]["span_mask"],
    }


def prepare_data(cfg: TrainConfig, opts: DPOOptions, tokenizer) -> tuple[list[dict], dict[str, int]]:
    records = load_records(cfg.data_path)
    pairs, counts = build_pairs(records, cfg.score_threshold, opts.max_pairs_per_prompt, cfg.seed)
    if not pairs:
        raise DataError(
            f"{cfg.data_path}: no preference pairs: no prompt has both a positive and a negative response "
            f"({counts['prompts']} prompts, {counts['positive']} positives, {counts['negative']} negatives, "
            f"{counts['failed_judgment']} failed judgments)"
        )
    template = load_template(cfg.prompt_template_name, tokenizer)
    features = [tokenize_pair(p, template, tokenizer, cfg.cutoff_len, cfg.add_eos_token) for p in pairs]
    counts["too_long"] = sum(f is None for f in features)
    features = [f for f in features if f is not None]
    if not features:
        raise DataError(f"{cfg.data_path}: no pair fits cutoff_len={cfg.cutoff_len} ({counts})")
    counts["train_pairs"] = len(features)
    return features, counts


# ---------------------------------------------------------------------------------------------- trainer


@dataclass
class SpanMaskedCollator:
    """Wraps a TRL collator: the completion tokens of the rows `rows(examples)` names that lie outside
    their example's span mask (`span_key`) leave completion_mask, so those rows' log-probs (and
    log-ratios) sum only the tokens the judgment marks. Rows whose example marks none keep every token.
    Relies on TRL's right-padded text layout: row i's completion token k sits at len(prompt_ids) + k."""

    inner: Any
    span_key: str
    rows: Any  # examples -> [(row index, example)]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner([{k: v for k, v in e.items() if k != self.span_key} for e in examples])
        mask = batch["completion_mask"]
        for row, e in self.rows(examples):
            span = e.get(self.span_key) or []
            if not span:
                continue
            start = len(e["prompt_ids"])
            keep = mask.new_tensor(span)
            mask[row, start : start + len(span)] *= keep
        return batch


def _rejected_rows(examples: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    return [(len(examples) + i, e) for i, e in enumerate(examples)]  # TRL's batch: [chosen..., rejected...]


def pretokenised_trainer(base: type, span_key: str, rows, rejected_tokens: str) -> type:
    """TRL's `base` trainer (DPOTrainer, KTOTrainer) fed the ids cut tokenised. TRL's own preparation
    would append the EOS string whatever add_eos_token says, call the tokenizer with its special
    tokens on an already chat-templated prompt (a second BOS), and split prompt from response where
    their ids diverge. With rejected_tokens "spans", the completion masks of the rows `rows(examples)`
    names keep their example's `span_key` tokens only (`SpanMaskedCollator`)."""

    class Pretokenised(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if rejected_tokens == "spans":
                self.data_collator = SpanMaskedCollator(self.data_collator, span_key, rows)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if span_key not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, span_key]

    Pretokenised.__name__ = Pretokenised.__qualname__ = f"Pretokenised{base.__name__}"
    return Pretokenised


def preference_trainer(
    base: type, span_key: str, rows, cfg: TrainConfig, opts: Any, args, features, tokenizer
):
    """TRL's `base` trainer on cut's tokenised `features`: a LoRA adapter (lora_config) around the
    policy (load_policy), span masks as `pretokenised_trainer` says."""
    from datasets import Dataset

    return pretokenised_trainer(base, span_key, rows, opts.rejected_tokens)(
        model=load_policy(cfg),
        args=args,
        train_dataset=Dataset.from_list(features),
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
    )


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets: Any = cfg.lora_target_modules
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def dpo_arguments(cfg: TrainConfig, opts: DPOOptions):
    from trl import DPOConfig

    return DPOConfig(
        **shared_arguments(cfg),
        beta=opts.beta,
        max_length=cfg.cutoff_len,  # never bites: prompts were fitted to it already
        save_strategy="no",
    )


def setup(cfg: TrainConfig, what: str):
    """The checks and the tokenizer every preference recipe starts with; nothing is loaded but the tokenizer."""
    from transformers import set_seed

    cfg.validate()
    if cfg.full_finetune:
        raise ConfigError(f"the {what} baseline trains a LoRA adapter: full_finetune is not supported")
    models.check_model_path(cfg.base_model)
    resolve_precision(cfg)
    cfg.gradient_accumulation_steps(world_size())  # fail early on an uneven batch
    set_seed(cfg.seed)
    tokenizer = models.load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # pads are masked from attention and loss
    limit_cutoff(cfg)
    return tokenizer


def save_configs(cfg: TrainConfig, opts: Any, objective: str) -> None:
    """output_dir/cut_config.yaml (generation finds the template there) and <objective>_config.yaml."""
    out = Path(cfg.output_dir)
    cfg.save(out / "cut_config.yaml")
    write_text_atomic(
        out / f"{objective}_config.yaml",
        yaml.safe_dump({"objective": objective, **dataclasses.asdict(opts)}, sort_keys=False),
    )


def load_policy(cfg: TrainConfig):
    model = models.load_model(
        cfg.base_model, cfg.precision, None, cfg.trust_remote_code, cfg.attn_implementation
    )
    model.config.use_cache = False
    return model


def build_trainer(cfg: TrainConfig, opts: DPOOptions):
    """Validate, pair and tokenise the data, load the model and wire TRL's trainer; nothing trains yet."""
    from trl import DPOTrainer

    tokenizer = setup(cfg, "DPO")
    features, counts = prepare_data(cfg, opts, tokenizer)
    if process_rank() == 0:
        save_configs(cfg, opts, "dpo")
        logger.info(
            "pairs: %(records)d records (%(positive)d positive, %(negative)d negative, %(failed_judgment)d "
            "failed judgments left out) over %(prompts)d prompts -> %(pairs)d pairs from %(prompts_with_pairs)d "
            "prompts (%(pairs_capped_away)d over the cap left out); too long %(too_long)d; train %(train_pairs)d",
            counts,
        )
    trainer = preference_trainer(
        DPOTrainer, "rejected_span", _rejected_rows, cfg, opts, dpo_arguments(cfg, opts), features, tokenizer
    )
    return trainer, counts


def run(cfg: TrainConfig, opts: Any, build=build_trainer, objective: str = "dpo") -> dict[str, Any]:
    """Check and lock output_dir as cut.train does (another run's folder refused unless
    overwrite_output_dir; a second trainer into it refused; metrics.json removed at the start),
    train and save; returns (and writes to output_dir/metrics.json, last) the run's metrics.
    `build(cfg, opts)` -> (trainer, counts) is the recipe (DPO here, KTO in cut.baselines.kto)."""
    cfg.validate()
    if cfg.resume_from_checkpoint:  # save_strategy "no": there is nothing to resume from
        raise ConfigError(
            f"the {objective.upper()} baseline saves no checkpoints: resume_from_checkpoint is not supported"
        )
    if process_rank() == 0:  # rank 0 decides about the folder; other ranks may start after it wrote there
        check_output_dir(cfg, resumable=False)  # no checkpoints: the advice is a new or cleared folder
    lock = claim_output_dir(cfg) if process_rank() == 0 else None
    try:
        return _train(cfg, opts, build, objective)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, opts: Any, build, objective: str) -> dict[str, Any]:
    trainer, counts = build(cfg, opts)
    start = time.time()
    result = trainer.train()
    trainer.save_model(cfg.output_dir)  # the PeftModel's save_pretrained, plus the tokenizer
    metrics = {
        "counts": counts,
        "train": result.metrics,
        "eval": {},
        "wall_s": round(time.time() - start, 2),
        "log_history": trainer.state.log_history,
        "objective": objective,
        **dataclasses.asdict(opts),
    }
    if trainer.is_world_process_zero():
        # the model card in place of PEFT's empty template (as cut.train writes one); metrics.json last
        recipe = {"objective": objective, **dataclasses.asdict(opts)}
        card = training_card(cfg.to_dict(), metrics, recipe=recipe)
        write_text_atomic(Path(cfg.output_dir) / "README.md", card)
        write_json_atomic(Path(cfg.output_dir) / "metrics.json", metrics)
        logger.info("saved the %s adapter to %s", objective.upper(), cfg.output_dir)
    return metrics


def main(
    argv: list[str] | None = None, parse=parse_config, build=build_trainer, objective: str = "dpo"
) -> int:
    setup_logging(logging.INFO if process_rank() == 0 else logging.WARNING)

    def body() -> None:
        cfg, opts = parse(argv)
        run(cfg, opts, build, objective)

    return run_cli(f"cut.baselines.{objective}", body)


if __name__ == "__main__":
    sys.exit(main())
