"""The judge kinds (JUDGES: one line each), their options (JudgeConfig) and make_judge.

A new judge is one file under cut/judges/ with a class that has `name`, `judge(records,
progress)`, `requires` (the JudgeConfig fields it cannot do without) and a classmethod
`from_config(cfg, default_cache_file)`, plus its line in JUDGES.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from cut.args import opt
from cut.errors import ConfigError
from cut.judges.api import OpenAIJudge
from cut.judges.local import LocalJudge
from cut.judges.reference import ReferenceJudge
from cut.judges.verdict import Judge
from cut.judges.verifier import VerifierJudge
from cut.llm.completer import LLMOptions

JUDGES: dict[str, Any] = {
    "openai": OpenAIJudge,
    "local": LocalJudge,
    "reference": ReferenceJudge,
    "verifier": VerifierJudge,
}
JUDGE_KINDS = tuple(JUDGES)  # the built-in kinds


@dataclass
class JudgeConfig(LLMOptions):
    """Every judge option, checked once; the names are cut.judge's options (kind is --judge).

    cache_file None means the caller's default (make_judge's default_cache_file), '' no cache.
    """

    kind: str = opt("reference", "the judge: one of cut.judges.JUDGES")
    prompt_file: str | None = opt(None, "judge prompt with {instruction}, {input}, {response}")

    def __post_init__(self) -> None:
        judge = JUDGES.get(self.kind)
        if judge is None:
            raise ConfigError(f"judge kind must be one of {', '.join(JUDGES)}, got {self.kind!r}")
        if not all(getattr(self, name) for name in judge.requires):
            raise ConfigError(f"judge {self.kind} needs {' and '.join(judge.requires)}")
        problems = self.backend_problems(texts=["prompt_file"])
        if problems:
            raise ConfigError("; ".join(problems))
        if "base_url" in judge.requires:
            self.client_config()  # checks base_url

    # the order of the settings in a run's record (online_config.json): kind first, as before the
    # backend options moved to LLMOptions, so a run writes the same file
    RECORD_ORDER: ClassVar[tuple[str, ...]] = ("kind", "base_url", "model", "api_key_env", "prompt_file")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        first = {k: values.pop(k) for k in self.RECORD_ORDER}
        return {**first, **values}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "judge") -> JudgeConfig:
        """From a config file's mapping; ConfigError names source and any unknown key."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a mapping of judge options, got {type(d).__name__}")
        known = ["kind", *(f.name for f in fields(cls) if f.name != "kind")]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
        try:
            return cls(**d)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_args(cls, args: Any) -> JudgeConfig:
        """From a command line's namespace, whose --judge is the kind."""
        return cls(
            kind=args.judge, **{f.name: getattr(args, f.name) for f in fields(cls) if f.name != "kind"}
        )


def make_judge(cfg: JudgeConfig, default_cache_file: str | None = None) -> Judge:
    """The judge cfg describes; an openai judge caches in cfg.cache_file, else default_cache_file."""
    return JUDGES[cfg.kind].from_config(cfg, default_cache_file)
