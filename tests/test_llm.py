"""Tests for cut.llm: the OpenAI-compatible client against real HTTP servers on 127.0.0.1 with scripted
faults: answers and order, the cache, the concurrency bound, each failure reason, Retry-After and
backoff, stopping, the key (never written or logged, never sent to another origin), the config."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import Counter

import pytest

from cut.errors import ConfigError
from cut.llm.client import ClientConfig, LLMClient, as_messages, read_cache

from fake_openai import FakeOpenAI

KEY_ENV = "CUT_LLM_TEST_KEY"
KEY = "sk-llm-test-0b1c2d3e4f5a6978"


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def client(base_url: str, **options) -> LLMClient:
    options = {"api_key_env": KEY_ENV, "timeout": 5.0, "max_retries": 2, "backoff": 0.01, **options}
    return LLMClient(ClientConfig(base_url, "test-model", **options))


# --------------------------------------------------------------------------------------------
# answers, the cache, concurrency
# --------------------------------------------------------------------------------------------


def test_answers_in_order_for_strings_and_message_lists():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "b"}]
    prompts = ["a", chat, "c", "a", [{"role": "user", "content": "c"}]]  # the last two repeat earlier ones
    ticks = []
    with FakeOpenAI(delay=0.02) as fake:
        answers = client(fake.base_url, concurrency=2).complete(prompts, ticks.append)
    assert answers == [
        ("echo: a", None),
        ("echo: b", None),
        ("echo: c", None),
        ("echo: a", None),
        ("echo: c", None),
    ]
    assert fake.hits == {"a": 1, "b": 1, "c": 1}, "a repeated prompt was asked twice"
    assert sum(ticks) == len(prompts)
    sent = next(b for b in fake.bodies if b["messages"][-1]["content"] == "b")
    assert sent == {"model": "test-model", "messages": chat, "temperature": 0.0, "max_tokens": 512}


def test_cache_hit_avoids_a_request_and_the_key_covers_every_setting(tmp_path):
    cache = tmp_path / "sub" / "answers.jsonl"
    with FakeOpenAI({"bad": ["400"]}) as fake:
        first = client(fake.base_url, cache_file=str(cache)).complete(["a", "b", "bad"])
        assert first == [("echo: a", None), ("echo: b", None), (None, "http 400")]
        assert sorted(read_cache(str(cache)).values()) == ["echo: a", "echo: b"], "a failure was cached"
        hits = Counter(fake.hits)

        again = client(fake.base_url, cache_file=str(cache)).complete(
            ["a", [{"role": "user", "content": "b"}], "bad"]
        )
        assert again == [("echo: a", None), ("echo: b", None), ("echo: bad", None)]
        assert fake.hits - hits == {"bad": 1}, "a cached answer was asked again"

        # what shapes an answer is in the key: another max_tokens, temperature or model asks again
        for options in ({"max_tokens": 64}, {"temperature": 0.7}):
            hits = Counter(fake.hits)
            client(fake.base_url, cache_file=str(cache), **options).complete(["a"])
            assert fake.hits - hits == {"a": 1}, options
        other = LLMClient(
            ClientConfig(fake.base_url, "other-model", api_key_env=KEY_ENV, cache_file=str(cache))
        )
        assert other.cache_key("a") != client(fake.base_url).cache_key("a")


def test_torn_cache_line_is_skipped_and_ended(tmp_path, caplog):
    cache = tmp_path / "c.jsonl"
    with FakeOpenAI() as fake:
        llm = client(fake.base_url, cache_file=str(cache))
        cache.write_text(
            json.dumps({"key": llm.cache_key("a"), "content": "cached a"}) + "\n" + '{"key": "ab'
        )
        assert llm.complete(["a", "b"]) == [("cached a", None), ("echo: b", None)]
    assert fake.hits == {"b": 1}
    assert "skipped 1 unreadable line" in caplog.text
    assert len(read_cache(str(cache))) == 2


def test_concurrency_is_bounded():
    prompts = [f"p{i}" for i in range(12)]
    with FakeOpenAI(delay=0.05) as fake:
        answers = client(fake.base_url, concurrency=3).complete(prompts)
    assert all(text for text, _ in answers)
    assert 2 <= fake.max_inflight <= 3


# --------------------------------------------------------------------------------------------
# failures and retries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, answer, hits",
    [
        (["500", "503", "502"], (None, "http 502 after 2 retries"), 3),  # the last fault names it
        (["503", "500"], ("echo: p", None), 3),
        (["408", "409", "429"], (None, "http 429 after 2 retries"), 3),
        (["400"], (None, "http 400"), 1),
        (["404"], (None, "http 404"), 1),
        (["401"], (None, "http 401"), 1),
        ([("500", {"x-should-retry": "false"})], (None, "http 500"), 1),
        (["slow", "slow", "slow"], (None, "timeout after 2 retries"), 3),
        (["slow", "ok"], ("echo: p", None), 2),
        (["notjson", "nochoices", "nocontent"], (None, "malformed response body after 2 retries"), 3),
        (["nocontent", "ok"], ("echo: p", None), 2),
        (["500", "notjson", "503"], (None, "http 503 after 2 retries"), 3),  # one budget for every fault
        (["notjson", "500", "nochoices"], (None, "malformed response body after 2 retries"), 3),
    ],
)
def test_failure_reasons_and_retries(script, answer, hits):
    script = [(int(r[0]), r[1]) if isinstance(r, tuple) else r for r in script]
    with FakeOpenAI({"p": script}, slow=0.5) as fake:
        assert client(fake.base_url, timeout=0.2).complete(["p"]) == [answer]
    assert fake.hits["p"] == hits


def test_a_retry_after_of_an_hour_is_not_waited_for():
    with FakeOpenAI({"p": [(429, {"Retry-After": "3600"})]}) as fake:
        start = time.monotonic()
        answer = client(fake.base_url).complete(["p"])
    assert time.monotonic() - start < 2.0
    # openai 3.54 fails at once (a wait over 120 s); openai 1.40 retried after the backoff
    assert answer in ([(None, "http 429")], [("echo: p", None)])


def test_connection_refused_is_retried_then_fails():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = client(f"http://127.0.0.1:{port}/v1", timeout=1.0, max_retries=1)
    assert llm.complete(["p"]) == [(None, "connection error after 1 retries")]


def test_no_retries_when_max_retries_is_0():
    with FakeOpenAI({"p": ["500", "500"]}) as fake:
        assert client(fake.base_url, max_retries=0).complete(["p"]) == [(None, "http 500")]
    assert fake.hits["p"] == 1


@pytest.mark.parametrize("header", [{"Retry-After": "0.05"}, {"Retry-After-Ms": "50"}])
def test_retry_after_overrides_backoff(header):
    with FakeOpenAI({"p": [(429, header), (503, header)]}) as fake:
        start = time.monotonic()
        assert client(fake.base_url, backoff=5.0).complete(["p"]) == [("echo: p", None)]
    assert time.monotonic() - start < 1.0, "the server's wait was not honoured"
    assert fake.hits["p"] == 3


def test_backoff_sets_the_wait_without_retry_after():
    with FakeOpenAI({"p": ["500", "500"]}) as fake:
        start = time.monotonic()
        assert client(fake.base_url, backoff=0.2).complete(["p"]) == [("echo: p", None)]
    # 0.2 s then 0.4 s, each times 0.5 to 1.5
    assert 0.3 <= time.monotonic() - start < 2.0


def test_stop_event_ends_a_retry_wait_at_once():
    with FakeOpenAI({"p": ["500"] * 9}) as fake:
        llm = client(fake.base_url, backoff=30.0, max_retries=5)
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()
        start = time.monotonic()
        assert llm.ask("p", stop) == (None, "interrupted")
    assert time.monotonic() - start < 3.0 and fake.hits["p"] == 1


def test_ctrl_c_stops_requests_in_flight():
    def progress(n: int) -> None:
        if n:  # the first answer: "ctrl-c"
            raise KeyboardInterrupt

    with FakeOpenAI({f"p{i}": ["500"] * 9 for i in range(1, 4)}) as fake:
        llm = client(fake.base_url, backoff=30.0, max_retries=5, concurrency=4)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            llm.complete(["p0", "p1", "p2", "p3"], progress)
    assert time.monotonic() - start < 3.0, "the pool waited for retries"


# --------------------------------------------------------------------------------------------
# the key
# --------------------------------------------------------------------------------------------


def test_key_is_sent_but_never_written_logged_or_in_a_reason(tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, KEY)
    cache = tmp_path / "c.jsonl"
    scripts = {"p401": ["401"], "p500": ["500"] * 3, "p400": [(400, {"X-Echo": "see body"})]}
    with FakeOpenAI(scripts) as fake:
        llm = client(fake.base_url, cache_file=str(cache))
        answers = llm.complete(["ok", "p401", "p500", "p400"])
    assert answers[0] == ("echo: ok", None)
    assert [a[1] for a in answers[1:]] == ["http 401", "http 500 after 2 retries", "http 400"]
    assert set(fake.auth) == {f"Bearer {KEY}"}
    captured = capsys.readouterr()
    for text in (caplog.text, captured.out, captured.err, cache.read_text(), repr(answers), repr(vars(llm))):
        assert KEY not in text
    assert "is not set" not in caplog.text


def test_no_key_means_no_authorization_header(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.delenv(KEY_ENV, raising=False)
    with FakeOpenAI({"p": ["500"]}) as fake:
        assert client(fake.base_url).complete(["p", "q"]) == [("echo: p", None), ("echo: q", None)]
    assert fake.auth == [None, None, None]
    assert f"{KEY_ENV} is not set: sending no Authorization header" in caplog.text


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("elsewhere", [True, False])
def test_redirect_is_not_followed_so_the_key_stays_at_its_origin(monkeypatch, status, elsewhere):
    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeOpenAI() as other, FakeOpenAI() as fake:
        target = (other if elsewhere else fake).base_url + "/chat/completions"
        fake.scripts["p"] = [(status, {"Location": target})]
        assert client(fake.base_url).complete(["p"]) == [(None, f"http {status}")]
    assert fake.hits["p"] == 1 and fake.auth == [f"Bearer {KEY}"]
    assert other.auth == [] and not other.hits, "the other origin was asked"


# --------------------------------------------------------------------------------------------
# the config and prompts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, match",
    [
        ({"base_url": "localhost:8000/v1"}, "base_url must start with http:// or https://"),
        ({"base_url": "ftp://h/v1"}, "base_url must start with http:// or https://"),
        ({"model": " "}, "model must be a non-empty string"),
        ({"concurrency": 0}, "concurrency must be an integer >= 1, got 0"),
        ({"concurrency": 2.0}, "concurrency must be an integer >= 1, got 2.0"),
        ({"timeout": 0}, "timeout must be a finite number > 0, got 0"),
        ({"timeout": float("nan")}, "timeout must be a finite number > 0"),
        ({"max_retries": -1}, "max_retries must be an integer >= 0"),
        ({"backoff": float("inf")}, "backoff must be a finite number >= 0"),
        ({"max_tokens": 0, "temperature": -1}, "max_tokens must be .*; temperature must be"),
        ({"api_key_env": ""}, "api_key_env must be a non-empty string"),
        ({"cache_file": 3}, "cache_file must be a string"),
    ],
)
def test_client_config_rejects_bad_values(options, match):
    with pytest.raises(ConfigError, match=match):
        ClientConfig(**{"base_url": "http://127.0.0.1:8000/v1", "model": "m", **options})


def test_client_config_defaults():
    c = ClientConfig("https://api.openai.com/v1", "m")
    assert (c.api_key_env, c.concurrency, c.timeout, c.max_retries, c.backoff) == (
        "OPENAI_API_KEY",
        8,
        60.0,
        5,
        1.0,
    )
    assert (c.max_tokens, c.temperature, c.cache_file) == (512, 0.0, None)


def test_as_messages():
    assert as_messages("hi") == [{"role": "user", "content": "hi"}]
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert as_messages(chat) == chat
    for bad in ([], [{"content": "no role"}], [{"role": "user"}], ("a", "b"), None):
        with pytest.raises(ValueError):
            as_messages(bad)
