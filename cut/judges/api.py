"""The `openai` judge: an OpenAI-compatible chat endpoint (OpenAI, vLLM's server, ...) through
cut.llm's API completer: bounded concurrency, retries with backoff on 408 / 409 / 429 / 5xx /
timeouts / connection errors / malformed bodies, honouring Retry-After, and a JSONL cache of answers
so a rerun only asks again for what failed (an unreadable verdict included). The API key is read
from the environment, sent to base_url's origin only, and never logged or written."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from cut.judges.verdict import (
    DEFAULT_PROMPT,
    Progress,
    Verdict,
    answer_verdict,
    check_prompt,
    load_prompt,
    parse_verdict,
    render_prompt,
)
from cut.llm.client import ClientConfig
from cut.llm.completer import ApiCompleter

if TYPE_CHECKING:
    from cut.judges.registry import JudgeConfig


class OpenAIJudge:
    """An OpenAI-compatible chat endpoint as judge.

    options: the fields of cut.llm.client.ClientConfig (api_key_env, concurrency, timeout, max_retries,
    backoff, max_tokens, temperature, cache_file); cache_file None for no cache (the CLI defaults
    it next to the output).
    """

    requires = ("base_url", "model")

    def __init__(self, base_url: str, model: str, prompt: str = DEFAULT_PROMPT, **options: Any) -> None:
        check_prompt(prompt)
        self.prompt = prompt
        self.completer = ApiCompleter(ClientConfig(base_url, model, **options))
        self.client = self.completer.client
        self.name = f"openai:{model}"

    @classmethod
    def from_config(cls, cfg: JudgeConfig, default_cache_file: str | None = None) -> OpenAIJudge:
        """Caches in cfg.cache_file, else default_cache_file ('' for none)."""
        cache = default_cache_file if cfg.cache_file is None else cfg.cache_file or None
        return cls(prompt=load_prompt(cfg.prompt_file), **asdict(cfg.client_config(cache)))

    def cache_key(self, prompt: str) -> str:
        return self.client.cache_key(prompt)

    def judge(self, records: list[dict], progress: Progress | None = None) -> list[Verdict]:
        prompts = [render_prompt(self.prompt, r) for r in records]
        # an unreadable verdict is a failure, not an answer: never cached, asked again on a rerun
        answers = self.completer.complete(
            prompts, progress, accept=lambda text: parse_verdict(text).kind != "failed"
        )
        return [answer_verdict(*a) for a in answers]
