"""The `local` judge: a transformers causal LM, greedy decoding in left-padded batches (cut.llm's
LocalCompleter)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cut.judges.verdict import (
    DEFAULT_PROMPT,
    Progress,
    Verdict,
    check_prompt,
    load_prompt,
    parse_verdict,
    render_prompt,
)
from cut.llm.client import Prompt
from cut.llm.completer import LocalCompleter

if TYPE_CHECKING:
    from cut.judges.registry import JudgeConfig


class LocalJudge(LocalCompleter):
    """A transformers causal LM as judge; a completer too (cut evaluate and realign ask it)."""

    requires = ("model",)

    def __init__(
        self,
        model: str,
        prompt: str = DEFAULT_PROMPT,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        device: str | None = None,
    ) -> None:
        check_prompt(prompt)  # before a model loads
        self.prompt = prompt
        super().__init__(model, batch_size, max_new_tokens, device)

    @classmethod
    def from_config(cls, cfg: JudgeConfig, default_cache_file: str | None = None) -> LocalJudge:
        return cls(cfg.model, load_prompt(cfg.prompt_file), cfg.batch_size, cfg.max_new_tokens)

    def text(self, prompt: Prompt | dict) -> str:
        """The model's input for a prompt, or for a record (the judge prompt rendered for it)."""
        return super().text(render_prompt(self.prompt, prompt) if isinstance(prompt, dict) else prompt)

    def judge(self, records: list[dict], progress: Progress | None = None) -> list[Verdict]:
        answers = self.complete([render_prompt(self.prompt, r) for r in records], progress)
        return [parse_verdict(text) for text, _ in answers]
