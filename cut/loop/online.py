"""Online CUT: generate -> judge -> CUT-train -> merge, round after round, resumable.

    python -m cut.online --config configs/online_instructions.yaml   (or: bash scripts/online_loop.sh)
    python -m cut.online --config configs/online_arithmetic.yaml     (the arithmetic task)

Each round r works in output_dir/round_r/ and records every stage in manifest.json:

    sample    N instructions from the pool (seeded permutation; rounds never share one)
    generate  the current model answers them                 -> responses.json (AlpacaEval format)
    judge     one judgment per response                      -> judged.json (failures recorded)
    build     the training file, failed judgments left out   -> train.json
    train     torchrun -m cut.train from the current model    -> adapter/
    merge     the adapter folded into the current model      -> model/ (next round's model)
    eval      the held-out set scored (when one is given)      -> eval.json
              task arithmetic: final-number accuracy; task instructions: IFEval's prompt- and
              instruction-level accuracy, strict and loose (accuracy = prompt-level strict)

`objective` picks what the train stage optimises on the round's judged samples: cut (the paper),
sft (the positives only), hindsight (cut.train with misalign false: no unlikelihood sequence) or
dpo (cut.baselines.dpo: TRL's DPOTrainer on passing/failing answers of one prompt). k =
samples_per_instruction answers are sampled per instruction. cut.compare runs one loop per
objective on identical data.

Rerunning the same command continues from the last completed stage: a stage marked done in the
manifest is never redone; a stage that was cut off is redone cleanly (generation and judging keep
what was already answered or paid for; training and merging start again from nothing).
"""

from __future__ import annotations

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

from cut.args import INT_MAX, integer, opt, run_cli
from cut.data.files import check_writable, write_json_atomic
from cut.errors import ConfigError, DataError
from cut.judges.judge import JudgeConfig
from cut.loop import objectives
from cut.loop.config import LoopArgs, load_dataclass
from cut.loop.objectives import recipe_keys
from cut.modeling.generate import GenerateConfig, Sampling, resolve_engine
from cut.modeling.loading import DTYPES
from cut.tasks.registry import TASKS
from cut.training.config import FIELDS as TRAIN_FIELDS
from cut.training.config import TrainConfig, coerce

logger = logging.getLogger("cut.loop.online")

STAGES = ("sample", "generate", "judge", "refine", "build", "train", "merge", "eval")
TRAIN_OWNED = {"base_model", "data_path", "output_dir"}  # set by the loop, per round
# settings added after runs existed: left out of a round's fingerprint while at their default, so
# those runs resume
LATE_FIELDS = {"refine_tries": 4, "positive_share": 0.0}
# the loop's whole-number settings and their least value (each at most INT_MAX, the seed 2**32 - 1)
WHOLE = {
    "rounds": 1,
    "instructions_per_round": 1,
    "samples_per_instruction": 1,
    "seed": 0,
    "nproc_per_node": 1,
    "eval_max_new_tokens": 1,
    "eval_batch_size": 1,
    "refine_tries": 1,
}
TEXT = ("base_model", "output_dir", "pool", "heldout", "task", "objective", "merge_dtype")

# ILF's refinement request (Scheurer et al. 2023, imitation learning from language feedback): the
# model rewrites its failing answer given the judgment; our own wording
REFINE_PROMPT = (
    "{instruction}{input}\n\n"
    "A first answer to this request was:\n{output}\n\n"
    "Feedback on that answer: {judgment}\n\n"
    "Write a new answer to the request that fixes every problem the feedback names. Reply with the new "
    "answer only."
)


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
    samples_per_instruction: int = 1  # k answers sampled per instruction and round
    task: str = "arithmetic"  # how the held-out set is scored: arithmetic | instructions
    objective: str = "cut"  # cut | sft (positives only) | hindsight (no Misalign-N) | dpo (TRL, pairs)
    seed: int = 0
    nproc_per_node: int = 1  # training processes (torchrun); 1 runs plain python
    merge_dtype: str = "auto"
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 16
    # objective ilf: rewrites sampled per failing answer, given its judgment (the judge keeps those
    # that pass; at most one per failing answer is trained, by MLE, beside the positives)
    refine_tries: int = 4
    # > 0: a round's negatives are down-sampled (seeded) so positives make at least this share of
    # the training records (the paper's online rounds were 71-77% positive); 0 keeps every negative
    positive_share: float = 0.0
    # cut generate's and cut judge's options: mappings in YAML, their config classes once validated
    generate: GenerateConfig | dict[str, Any] = field(default_factory=dict)  # a flat mapping in YAML
    judge: JudgeConfig | dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Every setting's type and range, the sections as whole tool configs: all before any model
        loads or anything is written. A ConfigError names the setting."""
        self.check_types()
        for name in ("base_model", "pool", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"online: missing required option {name}")
        if self.task not in TASKS:
            raise ConfigError(f"online: task must be one of {', '.join(TASKS)}, got {self.task!r}")
        names = objectives.loop_objectives()
        if self.objective not in names:
            raise ConfigError(f"online: objective must be one of {', '.join(names)}, got {self.objective!r}")
        if self.merge_dtype not in DTYPES:
            raise ConfigError(
                f"online: merge_dtype must be one of {', '.join(DTYPES)}, got {self.merge_dtype!r}"
            )
        for key, value in objectives.get(self.objective).implied.items():
            if self.train.get(key) not in (None, value):
                raise ConfigError(
                    f"online: objective {self.objective} means train.{key} {json.dumps(value)}; leave it unset"
                )
        unknown = set(self.train) - set(TRAIN_FIELDS) - set(recipe_keys(self.objective))
        if unknown:
            raise ConfigError(f"online: unknown train option(s): {', '.join(sorted(map(str, unknown)))}")
        owned = set(self.train) & TRAIN_OWNED
        if owned:
            raise ConfigError(
                f"online: train option(s) {', '.join(sorted(owned))} are set by the loop per round"
            )
        own = {k: self.train.pop(k) for k in list(self.train) if k in recipe_keys(self.objective)}
        try:
            self.train = {k: coerce(k, v) for k, v in self.train.items()}
        except ConfigError as err:
            raise ConfigError(f"online: train: {err}") from None
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
        # auto resolved once for the run (every round's model is a merged folder like the base):
        # the engine it stands for is the run's setting, in its fingerprint and online_config.json
        self.generate = dataclasses.replace(
            self.generate, engine=resolve_engine(self.generate.engine, self.base_model)
        )
        try:  # the whole train section must make a valid run, before any round starts
            probe = TrainConfig(**self.train, base_model="-", data_path="-", output_dir="-")
            probe.validate()
            probe.gradient_accumulation_steps(self.nproc_per_node)
        except ConfigError as err:
            raise ConfigError(f"online: train: {err}") from None
        if own:  # the recipe's own options, checked by its options class
            from importlib import import_module

            mod = import_module(objectives.get(self.objective).recipe)
            try:
                mod.OPTIONS(**{mod.YAML_KEYS[k]: v for k, v in own.items()})
            except ConfigError as err:
                raise ConfigError(f"online: train: {err}") from None
        self.train.update(own)
        if not isinstance(self.judge, JudgeConfig):
            self.judge = JudgeConfig.from_dict(self.judge, "online: judge")

    def check_types(self) -> None:
        """Texts are strings (empty when unset), whole numbers ints (not bools, strings or floats)
        in range, positive_share a number in [0, 1), the sections mappings (empty when unset)."""
        for name in TEXT:
            value = getattr(self, name)
            if value is None:
                setattr(self, name, "")
            elif not isinstance(value, str):
                raise ConfigError(f"online: {name} must be a string, got {value!r}")
        for name, lo in WHOLE.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"online: {name} must be an integer >= {lo}, got {value!r}")
            hi = 2**32 - 1 if name == "seed" else INT_MAX
            if value > hi:
                raise ConfigError(f"online: {name} must be an integer <= {hi}, got {value!r}")
        share = self.positive_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise ConfigError(f"online: positive_share must be a number in [0, 1), got {share!r}")
        self.positive_share = float(share)
        kinds = {"generate": (dict, GenerateConfig), "judge": (dict, JudgeConfig), "train": (dict,)}
        for name, kind in kinds.items():
            value = getattr(self, name)
            if value is None:
                setattr(self, name, {})
            elif not isinstance(value, kind):
                raise ConfigError(f"online: {name} must be a mapping of options, got {type(value).__name__}")


def run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What decides a round's results, from the config as a mapping: `rounds` may grow between
    runs and the folder may move; late settings at their default are left out."""
    return {
        k: v
        for k, v in config.items()
        if k not in ("rounds", "output_dir") and not (k in LATE_FIELDS and v == LATE_FIELDS[k])
    }


def fingerprint(cfg: OnlineConfig) -> str:
    settings = run_settings(dataclasses.asdict(cfg))
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_same_run(cfg: OnlineConfig) -> None:
    """A folder that holds a run is continued only with that run's settings: checked before anything
    is written there or a score of it is shown. The round manifests are the record of what ran
    (online_config.json may be one an earlier refused rerun overwrote); with none yet, the
    online_config.json of the run that started (round 0's evaluation may be on disk)."""
    root = Path(cfg.output_dir)
    hint = "use a new output_dir for new ones"
    changed = changed_settings(root / "online_config.json", cfg)
    what = f" ({', '.join(changed)})" if changed else ""
    manifests = sorted(root.glob("round_*/manifest.json"))
    for path in manifests:
        try:
            started = json.loads(path.read_text()).get("config")
        except (OSError, ValueError, AttributeError) as err:
            raise ConfigError(f"{path}: cannot be read ({err}); {hint}") from None
        if started != fingerprint(cfg):
            raise ConfigError(f"{path}: was started with other settings{what}; {hint}")
    if changed and not manifests:
        raise ConfigError(f"{root} holds a run started with other settings{what}; {hint}")


def changed_settings(saved: Path, cfg: OnlineConfig) -> list[str]:
    """The settings in which cfg differs from a run's online_config.json ([] when there is none)."""
    if not saved.exists():
        return []
    try:
        old = run_settings(json.loads(saved.read_text()))
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{saved}: cannot be read ({err}); use a new output_dir") from None
    new = run_settings(json.loads(json.dumps(dataclasses.asdict(cfg))))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def check_pool_size(cfg: OnlineConfig, pool: list[dict]) -> None:
    """Every round samples instructions no other round had: the pool must hold them all."""
    need = cfg.rounds * cfg.instructions_per_round
    if need > len(pool):
        raise ConfigError(
            f"online: pool {cfg.pool} has {len(pool)} instructions; rounds ({cfg.rounds}) x "
            f"instructions_per_round ({cfg.instructions_per_round}) need {need}"
        )


def load_config(path: str, overrides: dict[str, Any]) -> OnlineConfig:
    """The loop's YAML with `overrides` (None values ignored) on top, validated."""
    return load_dataclass(OnlineConfig, path, overrides)


# ---------------------------------------------------------------- files and the manifest


def read_problems(cfg: OnlineConfig) -> tuple[list[dict], list[dict]]:
    """The pool and the held-out set, checked before any round starts."""
    from cut.data.records import read_raw
    from cut.modeling.generate import validate_instructions

    rows, source = read_raw(cfg.pool)
    pool = validate_instructions(rows, source)
    heldout: list[dict] = []
    if cfg.heldout:
        rows, source = read_raw(cfg.heldout)
        heldout = [
            {**raw, **clean} for raw, clean in zip(rows, validate_instructions(rows, source), strict=True)
        ]
        heldout = TASKS[cfg.task].check_heldout(heldout, source)  # the task's own fields
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
        for key in ("train_metrics", "accuracy", "scores"):
            if key in result:
                self.manifest[key] = result[key]
        self.save()


# ---------------------------------------------------------------- stages


def sample_instructions(pool: list[dict], n: int, round_index: int, seed: int, k: int = 1) -> list[dict]:
    """Round r takes slice r of one seeded permutation: no instruction is reused across rounds.
    Each instruction is listed k times (field `sample` 0..k-1): k answers are sampled for it."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    lo, hi = (round_index - 1) * n, round_index * n
    if hi > len(pool):
        raise ConfigError(f"the pool has {len(pool)} instructions; {round_index} rounds of {n} need {hi}")
    picked = [pool[i] for i in order[lo:hi]]
    return [{**r, "sample": j} for r in picked for j in range(k)] if k > 1 else picked


def refine_requests(judged: list[dict], tries: int) -> list[dict]:
    """One rewrite request per failing answer and try: the instruction, the answer and its judgment
    in REFINE_PROMPT; `origin` = the answer's index in judged, `sample` = the try."""
    rows = []
    for i, r in enumerate(judged):
        if r.get("judgment") is None or r.get("judge_error"):
            continue
        text = REFINE_PROMPT.format(
            instruction=r["instruction"],
            input=f"\n\n{r['input']}" if r.get("input") else "",
            output=r["output"],
            judgment=r["judgment"],
        )
        rows += [{"instruction": text, "input": "", "origin": i, "sample": t} for t in range(tries)]
    return rows


def refine_candidates(judged: list[dict], rewrites: list[dict]) -> list[dict]:
    """The rewrites as answers to the original instructions (with their constraints), for the judge."""
    keep = ("instruction", "input", "constraints", "reference")
    out = []
    for w in rewrites:
        src = judged[w["origin"]]
        out.append(
            {
                **{k: src[k] for k in keep if k in src},
                "output": w["output"],
                "origin": w["origin"],
                "sample": w["sample"],
            }
        )
    return out


def passing_rewrites(candidates: list[dict]) -> list[dict]:
    """At most one passing rewrite per failing answer (the first try that passed), as a positive record."""
    seen: set[int] = set()
    kept = []
    for c in candidates:
        if c.get("judgment") is not None or c.get("judge_error") or c["origin"] in seen:
            continue
        seen.add(c["origin"])
        kept.append({k: v for k, v in c.items() if k not in ("origin", "sample")})
    return kept


def down_sample_negatives(rows: list[dict], share: float, seed: int) -> tuple[list[dict], int]:
    """Drop a seeded sample of negatives until positives are at least `share` of the rows (file order
    kept); returns (rows, negatives dropped). share 0 or no positive: nothing dropped."""
    pos = sum(1 for r in rows if r.get("judgment") is None)
    neg_idx = [i for i, r in enumerate(rows) if r.get("judgment") is not None]
    if share <= 0 or not pos:
        return rows, 0
    allowed = int(pos * (1 - share) / share + 1e-9)  # pos / (pos + allowed) >= share
    if len(neg_idx) <= allowed:
        return rows, 0
    keep = set(random.Random(seed).sample(neg_idx, allowed))
    dropped = len(neg_idx) - allowed
    return [r for i, r in enumerate(rows) if r.get("judgment") is None or i in keep], dropped


def build_training_file(
    judged: Path,
    out: Path,
    objective: str = "cut",
    responses: Path | None = None,
    rewrites: list[dict] | None = None,
    positive_share: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """The round's training records: failed judgments left out; `sft` keeps the positives only.

    The counts add up with the judge stage's: cut.judge counts an empty response as a failed
    judgment but never writes it to judged.json, so `empty_responses` (read from `responses`,
    by default responses.json beside judged.json) are counted into `failed_left_out` too. Then
    failed_left_out == the judge's failed_judgments, and (objectives other than sft)
    train_records + failed_left_out == the round's responses.
    """
    rows = json.loads(judged.read_text())
    responses = judged.with_name("responses.json") if responses is None else responses
    answered = json.loads(responses.read_text()) if responses.exists() else []
    empty = sum(1 for r in answered if not str(r.get("output") or "").strip())
    keep = [r for r in rows if not r.get("judge_error")]
    neg = sum(1 for r in keep if r.get("judgment") is not None)
    counts = {
        "train_records": len(keep),
        "failed_left_out": len(rows) - len(keep) + empty,
        "empty_responses": empty,
        "train_negatives": neg,
        "train_positives": len(keep) - neg,
    }
    obj = objectives.get(objective)
    if obj.records is not None:  # the objective's own selection (sft: the positives only)
        try:
            keep, more = obj.records(keep, list(rewrites or []) if obj.refines else None)
        except DataError as err:
            raise DataError(f"{judged}: {err}; {objective} has nothing to train on") from None
        counts.update(more)
    elif positive_share > 0:
        keep, dropped = down_sample_negatives(keep, positive_share, seed)
        counts.update(
            train_records=len(keep),
            train_negatives=counts["train_negatives"] - dropped,
            negatives_dropped=dropped,
        )
    write_json_atomic(out, keep)
    return {"counts": counts}


def train_round(cfg: OnlineConfig, rnd: Round, model_in: str) -> dict[str, Any]:
    adapter = rnd.dir / "adapter"
    if (adapter / "metrics.json").exists():  # it finished before the manifest was updated: keep it
        return summarise_training(adapter)
    from cut.training.runs import die_with_parent_hook, output_dir_in_use

    if output_dir_in_use(adapter):  # e.g. a trainer left by a loop killed on another machine
        raise ConfigError(f"{adapter} is locked by a training process that still runs; stop it first")
    if adapter.exists():  # a half-done training run is redone from nothing
        shutil.rmtree(adapter)
    train_cfg = {
        **cfg.train,
        **objectives.get(cfg.objective).implied,
        "base_model": model_in,
        "data_path": str(rnd.dir / "train.json"),
        "output_dir": str(adapter),
    }
    conf = rnd.dir / "train_config.yaml"
    conf.write_text(yaml.safe_dump(train_cfg, sort_keys=False))
    module = objectives.get(cfg.objective).recipe
    if cfg.nproc_per_node > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={cfg.nproc_per_node}",
            "-m",
            module,
            "--config",
            str(conf),
        ]
    else:
        cmd = [sys.executable, "-m", module, "--config", str(conf)]
    logger.info("$ %s", " ".join(cmd))
    # the trainer dies with this process, even by SIGKILL (PR_SET_PDEATHSIG; torchrun's workers
    # set it themselves from CUT_DIE_WITH_PARENT): a rerun never meets an orphan still writing
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "CUT_DIE_WITH_PARENT": "1"}
    subprocess.run(cmd, check=True, env=env, preexec_fn=die_with_parent_hook())
    return summarise_training(adapter)


def summarise_training(adapter: Path) -> dict[str, Any]:
    """Loss, flagged fraction and data counts from cut.train's metrics.json (written last)."""
    metrics = json.loads((adapter / "metrics.json").read_text())
    steps = [h for h in metrics["log_history"] if "loss" in h and "train_loss" not in h]
    flagged = [h["flagged"] for h in steps if "flagged" in h]
    summary = {
        "train_loss": metrics["train"].get("train_loss"),
        "first_loss": steps[0]["loss"] if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        "mean_flagged": sum(flagged) / len(flagged) if flagged else None,
        "last_margin": next((h["rewards/margins"] for h in reversed(steps) if "rewards/margins" in h), None),
        "steps": len(steps),
        "data": metrics["counts"],
    }
    return {"train_metrics": summary, "outputs": {"adapter": str(adapter)}}


def evaluate(model_path: str, heldout: list[dict], cfg: OnlineConfig) -> dict[str, Any]:
    """Greedy answers to the held-out set, scored by the task; `correct` per prompt in `answers`."""
    from cut.data.templates import load_template
    from cut.modeling.generate import generate_texts, load_vllm
    from cut.modeling.loading import load_model, load_tokenizer

    g = cfg.generate  # the loop's engine and its settings (the sampling ones are not used here)
    tokenizer = load_tokenizer(model_path)
    model = load_vllm(model_path, g) if g.engine == "vllm" else load_model(model_path)
    template = load_template(g.prompt_template_name, tokenizer)
    prompts = [template.plain(r["instruction"], r.get("input") or "") for r in heldout]
    texts = generate_texts(
        model,
        tokenizer,
        prompts,
        Sampling(max_new_tokens=cfg.eval_max_new_tokens),
        add_special_tokens=template.adds_special_tokens,
        batch_size=cfg.eval_batch_size,
        engine=g.engine,
    )
    del model
    release_memory()
    return score_heldout(cfg.task, heldout, texts)


def score_heldout(task: str, heldout: list[dict], texts: list[str]) -> dict[str, Any]:
    """accuracy (arithmetic: right final number; instructions: every constraint holds strictly),
    the task's other figures, and one answer per prompt with its `correct`."""
    return TASKS[task].score_answers(heldout, texts)


def release_memory() -> None:
    """Give back what an in-process model held before the training subprocess needs it."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_round(cfg: OnlineConfig, index: int, model_in: str, pool: list[dict], heldout: list[dict]) -> Round:
    from cut.judges.judge import judge_file, make_judge
    from cut.modeling.generate import generate_file
    from cut.modeling.merge import merge

    rnd = Round(Path(cfg.output_dir), index, model_in, fingerprint(cfg))
    d = rnd.dir

    def sample():
        rows = sample_instructions(
            pool, cfg.instructions_per_round, index, cfg.seed, cfg.samples_per_instruction
        )
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

    def refine():
        """ilf: the current model rewrites each failing answer given its judgment (refine_tries
        samples), the judge judges the rewrites against the original instruction."""
        if not objectives.get(cfg.objective).refines:
            return {}
        judged = json.loads((d / "judged.json").read_text())
        requests = refine_requests(judged, cfg.refine_tries)
        write_json_atomic(d / "refine_requests.json", requests)
        g = cfg.generate
        rewrites = (
            generate_file(
                model_in,
                None,
                str(d / "refine_responses.json"),
                dataclasses.replace(
                    g,
                    generator=f"round_{index - 1}" if index > 1 else Path(model_in).name,
                    dataset="online-refine",
                    sampling=dataclasses.replace(g.sampling, seed=g.sampling.seed + 1000 + index),
                ),
                records=requests,
            )
            if requests
            else []
        )
        release_memory()
        write_json_atomic(d / "refine_candidates.json", refine_candidates(judged, rewrites))
        counts = judge_file(
            str(d / "refine_candidates.json"),
            str(d / "refine_judged.json"),
            make_judge(cfg.judge, str(d / "refine_judge_cache.jsonl")),
        )
        kept = passing_rewrites(json.loads((d / "refine_judged.json").read_text()))
        write_json_atomic(d / "refined.json", kept)
        return {
            "counts": {
                "refine_requests": len(requests),
                "refine_passed": counts["positive"],
                "refine_kept": len(kept),
                "refine_failed_judgments": counts["failed"],
            },
            "outputs": {"refined": str(d / "refined.json")},
        }

    def build():
        refines = objectives.get(cfg.objective).refines
        rewrites = json.loads((d / "refined.json").read_text()) if refines else None
        return build_training_file(
            d / "judged.json",
            d / "train.json",
            cfg.objective,
            rewrites=rewrites,
            positive_share=cfg.positive_share,
            seed=cfg.seed + index,
        )

    def merge_stage():
        out = merge(model_in, str(d / "adapter"), str(d / "model"), cfg.merge_dtype)
        return {"outputs": {"model": str(out)}}

    def eval_stage():
        if not heldout:
            return {}
        res = evaluate(str(d / "model"), heldout, cfg)
        write_json_atomic(d / "eval.json", res)
        return {
            "accuracy": res["accuracy"],
            "scores": headline(res),
            "outputs": {"eval": str(d / "eval.json")},
        }

    rnd.run("sample", sample)
    rnd.run("generate", generate)
    rnd.run("judge", judge)
    rnd.run("refine", refine)
    rnd.run("build", build)
    rnd.run("train", lambda: train_round(cfg, rnd, model_in))
    rnd.run("merge", merge_stage)
    rnd.run("eval", eval_stage)
    return rnd


def headline(res: dict[str, Any]) -> dict[str, float]:
    """The eval's summary numbers (IFEval's four for instructions), without the answers."""
    keys = (
        "accuracy",
        "prompt_level_strict",
        "prompt_level_loose",
        "instruction_level_strict",
        "instruction_level_loose",
    )
    return {k: res[k] for k in keys if k in res}


def baseline_scores(cfg: OnlineConfig, heldout: list[dict]) -> dict[str, float] | None:
    """Held-out scores of the round-1 model, computed once and kept in round_0/eval.json."""
    if not heldout:
        return None
    path = Path(cfg.output_dir) / "round_0" / "eval.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, evaluate(cfg.base_model, heldout, cfg))
    return headline(json.loads(path.read_text()))


def describe_scores(scores: dict[str, float]) -> str:
    if "prompt_level_strict" in scores:
        return (
            f"held-out prompts passed {scores['prompt_level_strict']:.1%} strict / "
            f"{scores['prompt_level_loose']:.1%} loose, instructions {scores['instruction_level_strict']:.1%} / "
            f"{scores['instruction_level_loose']:.1%}"
        )
    return f"held-out accuracy {scores['accuracy']:.1%}"


def run(cfg: OnlineConfig) -> dict[str, Any]:
    root = Path(cfg.output_dir)
    check_writable(root, "output_dir")  # before any round loads a model
    check_same_run(cfg)  # before the old run's config is replaced or its round 0 shown
    pool, heldout = read_problems(cfg)
    check_pool_size(cfg, pool)  # before round 1, not when the pool runs out
    root.mkdir(parents=True, exist_ok=True)
    record = dataclasses.asdict(cfg)
    if isinstance(cfg.judge, JudgeConfig):
        record["judge"] = cfg.judge.to_dict()
    write_json_atomic(root / "online_config.json", record)
    start = time.time()
    scores0 = baseline_scores(cfg, heldout)
    if scores0 is not None:
        print(f"round 0 (the starting model): {describe_scores(scores0)}", flush=True)
    model = cfg.base_model
    rounds = []
    for r in range(1, cfg.rounds + 1):
        rnd = run_round(cfg, r, model, pool, heldout)
        m = rnd.manifest
        model = m["outputs"]["model"]
        walls = {s: m["stages"].get(s, {}).get("wall_s") for s in STAGES}
        rounds.append(
            {
                "round": r,
                "accuracy": m.get("accuracy"),
                "scores": m.get("scores"),
                "counts": m["counts"],
                "train": m.get("train_metrics"),
                "wall_s": walls,
            }
        )
        c = m["counts"]
        acc = f"{describe_scores(m['scores'])}; " if m.get("scores") else ""
        print(
            f"round {r}: {acc}{c.get('positive', 0)} positives, {c.get('negative', 0)} negatives, "
            f"{c.get('failed_judgments', 0)} failed judgments; stage seconds "
            + ", ".join(f"{s} {w:.0f}" for s, w in walls.items() if w is not None),
            flush=True,
        )
    summary = {
        "baseline_accuracy": scores0["accuracy"] if scores0 else None,
        "baseline_scores": scores0,
        "task": cfg.task,
        "objective": cfg.objective,
        "rounds": rounds,
        "final_model": model,
        "wall_s": round(time.time() - start, 1),
    }
    write_json_atomic(root / "summary.json", summary)
    return summary


@dataclass
class OnlineArgs(LoopArgs):
    """Online CUT: generate -> judge -> CUT-train -> merge, round after round, resumable."""

    CONFIG_HELP = "YAML: OnlineConfig fields, with generate / judge / train sections"

    output_dir: str | None = opt(None, "override the config's output_dir")
    rounds: int | None = opt(None, "override the number of rounds", parse=integer(1, INT_MAX))
    base_model: str | None = opt(None, "override the round-1 model")


def ensure_base_model(cfg: OnlineConfig) -> None:
    """The embedded SmolLM2 is converted on first use when the config names its default folder."""
    if cfg.base_model.startswith("saved_models/SmolLM2-135M-Instruct") and not Path(cfg.base_model).exists():
        from cut.modeling.smollm import ensure_smollm2

        ensure_smollm2(cfg.base_model)


def main(argv: list[str] | None = None) -> int:
    args = OnlineArgs.parse(argv, prog="cut.online")

    def body() -> None:
        from cut.llm.client import quiet_http_logs

        quiet_http_logs()
        cfg = load_config(
            args.config, {"output_dir": args.output_dir, "rounds": args.rounds, "base_model": args.base_model}
        )
        check_writable(cfg.output_dir, "output_dir")  # before a download, too
        ensure_base_model(cfg)
        try:
            run(cfg)
        except subprocess.CalledProcessError as err:  # a child's failure: exit 1, as a failed OS call
            raise ChildProcessError(
                f"a stage failed ({' '.join(map(str, err.cmd))}: exit {err.returncode}); "
                "fix it and rerun the same command to continue"
            ) from None

    return run_cli("cut.online", body)


if __name__ == "__main__":
    sys.exit(main())
