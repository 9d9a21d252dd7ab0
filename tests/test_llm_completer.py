"""Tests for cut.llm.completer: the one LLM backend layer (an API through cut.llm's client, a local
transformers model), its options (LLMOptions, declared once) and make_completer."""

from __future__ import annotations

import pytest

from cut.errors import ConfigError
from cut.llm.completer import ApiCompleter, LLMOptions, LocalCompleter, make_completer

from fake_openai import FakeOpenAI


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_options_defaults_flags_and_checks():
    opts = LLMOptions.parse(["--model", "m", "--timeout", "5", "--max_tokens", "9"], prog="x")
    assert (opts.model, opts.timeout, opts.max_tokens, opts.concurrency, opts.max_new_tokens) == (
        "m",
        5.0,
        9,
        8,
        256,
    )
    assert opts.backend_problems() == []
    bad = LLMOptions(timeout=0.0, concurrency=2000)
    assert bad.backend_problems() == [
        "timeout must be a finite number > 0, got 0.0",
        "concurrency must be at most 1024, got 2000",
    ]
    with pytest.raises(SystemExit):
        LLMOptions.parse(["--timeout", "0"], prog="x")


def test_api_completer_greedy_calls_and_samples_have_their_own_requests_and_cache_keys(tmp_path):
    cache = str(tmp_path / "c.jsonl")
    with FakeOpenAI() as fake:
        opts = LLMOptions(base_url=fake.base_url, model="m", max_retries=0)
        completer = make_completer("openai", opts, cache, temperature=0.7)
        assert isinstance(completer, ApiCompleter) and completer.name == "openai:m"
        assert completer.complete(["a", [{"role": "user", "content": "b"}]]) == [
            ("echo: a", None),
            ("echo: b", None),
        ]
        completer.complete(["a"], temperature=0.0)
        completer.complete(["a"], sample=1)
        completer.complete(["a"], sample=1)  # from the cache
        refused = completer.complete(["z"], accept=lambda t: False)
        completer.complete(["z"], accept=lambda t: False)  # a refused answer is asked again
    assert refused == [("echo: z", None)]
    assert [b["temperature"] for b in fake.bodies if b["messages"][-1]["content"] == "a"] == [0.7, 0.0, 0.7]
    assert fake.hits == {"a": 3, "b": 1, "z": 2}
    key = completer.client.cache_key
    assert len({key("a"), key("a", temperature=0.0), key("a", sample=1), key("a", sample=0)}) == 3
    assert key("a", sample=0) == key("a")


def test_make_completer_refuses_what_it_cannot_build():
    with pytest.raises(ConfigError, match="needs base_url and model"):
        make_completer("openai", LLMOptions(model="m"))
    with pytest.raises(ConfigError, match="needs model"):
        make_completer("local", LLMOptions())
    with pytest.raises(ConfigError, match="backend must be one of openai, local"):
        make_completer("other", LLMOptions(model="m"))


def test_local_completer_greedy_whole_and_samples(tiny_chat_model):
    local = make_completer("local", LLMOptions(model=str(tiny_chat_model), max_new_tokens=4))
    assert isinstance(local, LocalCompleter) and local.chat
    ticks = []
    prompts = ["Say hi.", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}]]
    first = local.complete(prompts, ticks.append)
    assert local.complete(prompts) == first and sum(ticks) == 2
    assert all(isinstance(t, str) and e is None for t, e in first)
    (text, error), fits = local.complete(["word " * 2000, "Hi."], whole=True)
    assert text is None and error.startswith("prompt too long: ") and fits[1] is None
    local.complete(["Hi."], temperature=1.0, sample=3)
    assert (local.sampling.temperature, local.sampling.seed) == (1.0, 3)
