"""CUT rounds on judged files given in advance: the paper's online recipe replayed on its data.

    cut iterate --config configs/paper_online_13b.yaml [--dry_run] [--base_model M] [--output_dir D]

Iteration i trains a fresh LoRA adapter with cut.train on the i-th judged file, starting from the
model iteration i-1 produced (iteration 1: base_model), and merges it with cut.merge; the merged
model is the next iteration's start, as the release runs its rounds (fine-tuning-unlike.sh, then
merge.py, once per round). Unlike `cut online`, nothing is generated or judged here: the judged
files are fixed (the CUT release's data/iter: 1,000 Alpaca instructions per round, answered by
LLaMA2-chat-13b and judged by GPT-4).

output_dir/iter_i/ holds train_config.yaml, adapter/ and merged/. Rerunning continues: an
iteration whose merged/ exists is done; one whose adapter has metrics.json is merged only; a
cut-off training run is redone from nothing. Every judged file is read and checked, and the
training options validated, before the first iteration starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cut.args import integer, opt, run_cli
from cut.data.files import write_text_atomic
from cut.errors import ConfigError
from cut.loop.config import LoopArgs, load_dataclass
from cut.modeling.loading import DTYPES
from cut.training.config import FIELDS as TRAIN_FIELDS
from cut.training.config import TrainConfig, coerce

logger = logging.getLogger("cut.iterate")

TRAIN_OWNED = ("base_model", "data_path", "output_dir")  # set per iteration


@dataclass
class IterateConfig:
    """A replay of CUT rounds; YAML keys are exactly these field names."""

    base_model: str = ""  # the model of iteration 1
    data: list[str] = field(default_factory=list)  # one judged file per iteration, in order
    output_dir: str = "saved_models/iterate"
    nproc_per_node: int = 1  # training processes per iteration (torchrun); 1 runs plain python
    merge_dtype: str = "auto"  # dtype of each merged model (auto: the base's)
    train: dict[str, Any] = field(default_factory=dict)  # cut.train options, the same every iteration

    def validate(self) -> None:
        """Types, required fields and the train section as a whole cut.train run; no file is read."""
        for name in ("base_model", "output_dir", "merge_dtype"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"iterate: {name} must be a non-empty string, got {getattr(self, name)!r}")
        if (
            not isinstance(self.data, list)
            or not self.data
            or not all(isinstance(d, str) and d for d in self.data)
        ):
            raise ConfigError(f"iterate: data must be a non-empty list of judged files, got {self.data!r}")
        n = self.nproc_per_node
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4096:
            raise ConfigError(f"iterate: nproc_per_node must be a whole number in [1, 4096], got {n!r}")
        if self.merge_dtype not in DTYPES:
            raise ConfigError(
                f"iterate: merge_dtype must be one of {', '.join(DTYPES)}, got {self.merge_dtype!r}"
            )
        if not isinstance(self.train, dict):
            raise ConfigError(f"iterate: train must be a mapping of cut.train options, got {self.train!r}")
        unknown = sorted(set(self.train) - set(TRAIN_FIELDS))
        if unknown:
            raise ConfigError(f"iterate: unknown train option(s): {', '.join(map(str, unknown))}")
        owned = sorted(set(self.train) & set(TRAIN_OWNED))
        if owned:
            raise ConfigError(f"iterate: train option(s) {', '.join(owned)} are set per iteration")
        if self.train.get("full_finetune"):
            raise ConfigError("iterate: full_finetune is not supported; each iteration merges a LoRA adapter")
        try:
            self.train = {k: coerce(k, v) for k, v in self.train.items()}
            probe = TrainConfig(**self.train, base_model="-", data_path="-", output_dir=self.output_dir)
            probe.validate()
            probe.gradient_accumulation_steps(self.nproc_per_node)
        except ConfigError as err:
            raise ConfigError(f"iterate: train: {err}") from None


def load_config(path: str, overrides: dict[str, Any] | None = None) -> IterateConfig:
    """The YAML file, with `overrides` (None values ignored) on top; validated."""
    return load_dataclass(IterateConfig, path, overrides)


@dataclass(frozen=True)
class Iteration:
    index: int  # 1-based
    model_in: str
    data: str
    dir: Path

    @property
    def adapter(self) -> Path:
        return self.dir / "adapter"

    @property
    def merged(self) -> Path:
        return self.dir / "merged"


def plan(cfg: IterateConfig) -> list[Iteration]:
    """Iteration i starts from iteration i-1's merged model."""
    out, model = [], cfg.base_model
    for i, data in enumerate(cfg.data, 1):
        it = Iteration(i, model, data, Path(cfg.output_dir) / f"iter_{i}")
        out.append(it)
        model = str(it.merged)
    return out


def train_command(cfg: IterateConfig, conf: Path) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.nproc_per_node}"]
    if cfg.nproc_per_node == 1:
        launch = [sys.executable]
    return [*launch, "-m", "cut.train", "--config", str(conf), "--overwrite_output_dir"]


def merge_command(cfg: IterateConfig, it: Iteration) -> list[str]:
    return [
        sys.executable, "-m", "cut.merge", "--base_model", it.model_in, "--adapter", str(it.adapter),
        "--output_dir", str(it.merged), "--dtype", cfg.merge_dtype,
    ]  # fmt: skip


def check_data(cfg: IterateConfig) -> None:
    """Every judged file read and validated as cut.train will (a DataError names file, record, field)."""
    from cut.data.records import load_records

    for path in cfg.data:
        load_records(path)


def check_same_run(cfg: IterateConfig) -> Path:
    """output_dir holds this run or none: its iterate_config.yaml must match in every setting but
    output_dir (a moved folder is the same run)."""
    saved = Path(cfg.output_dir) / "iterate_config.yaml"
    now = dataclasses.asdict(cfg)
    if saved.exists():
        old = yaml.safe_load(saved.read_text()) or {}
        changed = sorted(k for k in now.keys() | old.keys() if k != "output_dir" and old.get(k) != now.get(k))
        if changed:
            raise ConfigError(
                f"{saved}: this folder holds a run with other settings ({', '.join(changed)}); use another output_dir"
            )
    return saved


def run(cfg: IterateConfig, dry_run: bool = False) -> list[Path]:
    """Every iteration in turn (done ones skipped); returns the merged models. `dry_run` prints the
    commands and runs nothing."""
    steps = plan(cfg)
    if dry_run:
        for it in steps:
            conf = it.dir / "train_config.yaml"
            print(f"# iteration {it.index}: {it.data} -> {it.merged}")
            print("$", " ".join(train_command(cfg, conf)))
            print("$", " ".join(merge_command(cfg, it)))
        return [it.merged for it in steps]
    check_data(cfg)
    saved = check_same_run(cfg)
    write_text_atomic(saved, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "CUT_DIE_WITH_PARENT": "1"}
    for it in steps:
        if it.merged.exists():
            logger.info("iteration %d: done (%s)", it.index, it.merged)
            continue
        if not (it.adapter / "metrics.json").exists():
            conf = it.dir / "train_config.yaml"
            train = {
                **cfg.train,
                "base_model": it.model_in,
                "data_path": it.data,
                "output_dir": str(it.adapter),
            }
            write_text_atomic(conf, yaml.safe_dump(train, sort_keys=False))
            _call(train_command(cfg, conf), env, f"iteration {it.index}: training")
        _call(merge_command(cfg, it), env, f"iteration {it.index}: merging")
    return [it.merged for it in steps]


def _call(cmd: list[str], env: dict[str, str], what: str) -> None:
    from cut.training.runs import die_with_parent_hook

    logger.info("%s\n$ %s", what, " ".join(cmd))
    # the child dies with this process, even by SIGKILL, as in cut.online
    done = subprocess.run(cmd, env=env, preexec_fn=die_with_parent_hook())
    if done.returncode:
        # a child's failure: exit 1, as a failed OS call
        raise ChildProcessError(f"{what} failed (exit {done.returncode}); rerun the same command to continue")


@dataclass
class IterateArgs(LoopArgs):
    """CUT rounds on judged files given in advance: the paper's online recipe replayed on its data."""

    CONFIG_HELP = "YAML with the IterateConfig keys"

    base_model: str | None = opt(None, "override: the model of iteration 1")
    output_dir: str | None = opt(None, "override: where the iterations go")
    nproc_per_node: int | None = opt(None, "override: training processes", parse=integer(1, 4096))
    dry_run: bool = opt(False, "print each iteration's commands and stop")


def main(argv: list[str] | None = None) -> int:
    args = IterateArgs.parse(argv, prog="cut.iterate")

    def body() -> None:
        overrides = {"base_model": args.base_model, "output_dir": args.output_dir}
        cfg = load_config(args.config, {**overrides, "nproc_per_node": args.nproc_per_node})
        merged = run(cfg, dry_run=args.dry_run)
        if not args.dry_run:
            print(f"final model: {merged[-1]}")

    return run_cli("cut.iterate", body)


if __name__ == "__main__":
    sys.exit(main())
