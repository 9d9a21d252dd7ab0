"""One client for OpenAI-compatible chat endpoints (OpenAI, vLLM's server, ...): prompts in, answers out.

    client = LLMClient(ClientConfig(base_url="http://localhost:8000/v1", model="NAME"))
    client.complete(["What is 2 + 2?", [{"role": "system", "content": "..."}, {"role": "user", ...}]])
    # -> [("4", None), (None, "http 500 after 5 retries")]

The `openai` package sends the requests, with `timeout` seconds per request, and retries a 408, 409,
429 or 5xx answer, a timeout or a connection error up to `max_retries` times, waiting what the
server's Retry-After-ms / Retry-After header says (a zero or unreadable one: openai's own 0.5 s
doubling; a wait over 120 s is not retried at all in openai 3.x). This module adds:

- retry waits of `backoff` seconds, doubling (at most MAX_DELAY, jittered) where the server names no
  wait; a stop event (ctrl-c in complete()) ends a wait at once with the reason "interrupted";
- a malformed 200 answer (not JSON, or no choices[0].message.content string) is retried like the
  faults above, within the same `max_retries`;
- a JSONL cache of answers (`cache_file`), keyed by a sha256 of everything that shapes an answer, one
  line flushed per answer, so a rerun pays only for what failed; a torn last line is skipped; a
  caller that cannot read an answer says so (`accept`), and such an answer is neither cached nor
  taken from the cache, so the rerun asks again;
- bounded concurrency: `concurrency` requests in flight, one per distinct prompt, answers collected as
  they finish so a progress callback ticks;
- every answer is (text, None) or (None, a short reason): "http 400", "http 500 after 5 retries",
  "timeout after 5 retries", "connection error", "malformed response body", "interrupted";
- the API key is read from the environment variable `api_key_env` once, sent only as the
  Authorization header to base_url's own origin (redirects are not followed: a redirect fails as
  "http 30x"), and never written or logged: reasons hold status codes and fault kinds, never an error
  body (some APIs echo the key there). Without the variable no Authorization header is sent (a vLLM
  server needs none).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from cut.errors import ConfigError

logger = logging.getLogger("cut.llm.client")

MAX_DELAY = 60.0  # seconds; caps the backoff wait (openai caps a server's Retry-After at 120 s)
MALFORMED = "malformed response body"
NO_KEY = "EMPTY"  # openai.OpenAI wants some key; this one is never sent (the header is removed)

Message = dict[str, Any]  # {"role": "user", "content": "..."}
Prompt = str | list[Message]
Answer = tuple[str | None, str | None]  # (text, None) or (None, reason)
Progress = Callable[[int], None]

if TYPE_CHECKING:
    import openai


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientConfig:
    """Where to ask and how; cache_file None means no cache."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 60.0  # seconds per request
    max_retries: int = 5
    backoff: float = 1.0  # seconds before the first retry; doubles
    max_tokens: int = 512
    temperature: float = 0.0
    cache_file: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        problems = text_problems(self, required=("model", "api_key_env"), optional=("cache_file",))
        problems += number_problems(
            self,
            {
                "concurrency": "int>=1",
                "max_tokens": "int>=1",
                "max_retries": "int>=0",
                "timeout": ">0",
                "backoff": ">=0",
                "temperature": ">=0",
            },
        )
        if problems:
            raise ConfigError("; ".join(problems))


RULES = {
    "int>=1": "an integer >= 1",
    "int>=0": "an integer >= 0",
    ">0": "a finite number > 0",
    ">=0": "a finite number >= 0",
}


def number_problems(obj: object, rules: dict[str, str]) -> list[str]:
    """One message per field of obj that breaks its rule (a key of RULES)."""
    problems = []
    for name, rule in rules.items():
        value = getattr(obj, name)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if rule.startswith("int"):
            ok = is_int and value >= int(rule[-1])
        else:
            ok = (is_int or isinstance(value, float)) and math.isfinite(value)
            ok = ok and (value > 0 if rule == ">0" else value >= 0)
        if not ok:
            problems.append(f"{name} must be {RULES[rule]}, got {value!r}")
    return problems


def text_problems(obj: object, required: Sequence[str] = (), optional: Sequence[str] = ()) -> list[str]:
    """One message per required field of obj that is not a non-empty string, or optional one not a string."""
    problems = [
        f"{n} must be a non-empty string, got {getattr(obj, n)!r}"
        for n in required
        if not _text(getattr(obj, n))
    ]
    for name in optional:
        value = getattr(obj, name)
        if value is not None and not isinstance(value, str):
            problems.append(f"{name} must be a string, got {value!r}")
    return problems


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def as_messages(prompt: Prompt) -> list[Message]:
    """A prompt as chat messages: a string is one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"a prompt is a string or a non-empty list of messages, got {type(prompt).__name__}")
    for message in prompt:
        if not (isinstance(message, dict) and _text(message.get("role")) and "content" in message):
            raise ValueError(f"a message is a dict with a role and a content, got {message!r:.80}")
    return prompt


# --------------------------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    """The stop event was set while a retry waited."""


class _Call:
    """What one ask() needs to share with the hooks below (which run in its own thread)."""

    def __init__(self, stop: threading.Event, backoff: float) -> None:
        self.stop, self.backoff = stop, backoff
        self.attempts = 0
        self.malformed = False  # the last attempt ended in a malformed 200 answer


_current = threading.local()  # .call: the _Call of the ask() running in this thread


@functools.cache
def _openai_class() -> type[openai.OpenAI]:
    """openai.OpenAI whose retry waits follow `backoff` and end at once when the stop event is set.

    (openai is imported here, not with this module: it takes a second.)"""
    import openai

    class _OpenAI(openai.OpenAI):
        def _calculate_retry_timeout(
            self, remaining_retries: int, options: Any, response_headers: Any = None
        ) -> float:
            delay = super()._calculate_retry_timeout(remaining_retries, options, response_headers)
            call = getattr(_current, "call", None)
            if call is None:
                return delay
            named = response_headers and (
                "retry-after" in response_headers or "retry-after-ms" in response_headers
            )
            if not named:  # the server named no wait: ours, not openai's fixed 0.5 s doubling
                wait = call.backoff * 2 ** max(0, call.attempts - 1)
                delay = min(MAX_DELAY, wait) * random.uniform(0.5, 1.5)
            if call.stop.wait(delay):
                raise _Interrupted
            return 0.0  # waited already; openai sleeps no more

    return _OpenAI


class LLMClient:
    """Answers for prompts from an OpenAI-compatible /chat/completions endpoint; see the module doc."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        # read once; kept by the openai client only, never on this object or in a message
        key = os.environ.get(config.api_key_env) or None
        if key is None:
            logger.info(
                "%s is not set: sending no Authorization header (a vLLM server needs none)",
                config.api_key_env,
            )
        self._send_key = key is not None
        import openai

        http = openai.DefaultHttpxClient(
            # httpx would drop the key on a redirect to another origin, but a 307 / 308 would still
            # carry the prompt there: an endpoint that redirects fails instead ("http 30x")
            follow_redirects=False,
            event_hooks={"request": [self._on_request], "response": [self._on_response]},
        )
        self._openai = _openai_class()(
            base_url=config.base_url,
            api_key=key or NO_KEY,
            timeout=config.timeout,
            max_retries=config.max_retries,
            http_client=http,
        )

    def close(self) -> None:
        self._openai.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cache_key(self, prompt: Prompt, temperature: float | None = None, sample: int | None = None) -> str:
        """sha256 of what shapes an answer; temperature None is the config's; a sample k > 0 (the
        k-th independent draw) has a key of its own, sample 0 / None the plain one."""
        c = self.config
        t = c.temperature if temperature is None else temperature
        parts = [c.base_url.rstrip("/"), c.model, as_messages(prompt), t, c.max_tokens]
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        return key if not sample else hashlib.sha256(f"{key} sample {sample}".encode()).hexdigest()

    def complete(
        self,
        prompts: Sequence[Prompt],
        progress: Progress | None = None,
        accept: Callable[[str], bool] | None = None,
        temperature: float | None = None,
        sample: int | None = None,
    ) -> list[Answer]:
        """One answer per prompt, in order; progress(n) ticks as n prompts get their answer.

        With `accept`, an answer it refuses (one the caller cannot read) is returned but never
        cached, and a cached one it refuses is asked again: a failure is not an answer.
        temperature None: the config's; sample k: the k-th independent draw (its own request and
        cache entry; repeats of one prompt within a call are still asked once)."""
        progress = progress or (lambda n: None)
        messages = [as_messages(p) for p in prompts]
        per_call = (
            {} if temperature is None and sample is None else {"temperature": temperature, "sample": sample}
        )
        keys = [self.cache_key(m, **per_call) for m in messages]
        per_key = Counter(keys)
        cached = read_cache(self.config.cache_file) if self.config.cache_file else {}
        answers: dict[str, Answer] = {
            k: (cached[k], None) for k in per_key if k in cached and (accept is None or accept(cached[k]))
        }
        # one request per distinct prompt: repeats are asked once
        todo = {k: m for k, m in zip(keys, messages, strict=True) if k not in answers}
        logger.info("%d prompt(s) answered from the cache, %d to request", len(answers), len(todo))
        progress(sum(per_key[k] for k in answers))
        for key, answer in self.iter_answers(todo, accept, temperature):
            answers[key] = answer
            progress(per_key[key])
        return [answers[k] for k in keys]

    def iter_answers(
        self,
        todo: dict[str, Prompt],
        accept: Callable[[str], bool] | None = None,
        temperature: float | None = None,
    ) -> Iterator[tuple[str, Answer]]:
        """(key, answer) as requests finish, at most `concurrency` in flight; answers are cached
        (those `accept` takes, with one)."""
        pool, stop = ThreadPoolExecutor(max_workers=self.config.concurrency), threading.Event()
        try:
            with _open_cache(self.config.cache_file) as cache:
                futures = {pool.submit(self.ask, p, stop, temperature): k for k, p in todo.items()}
                for fut in as_completed(futures):
                    answer = fut.result()
                    if cache and answer[0] is not None and (accept is None or accept(answer[0])):
                        cache.write(json.dumps({"key": futures[fut], "content": answer[0]}) + "\n")
                        cache.flush()  # per answer, so a crash keeps what was paid for
                    yield futures[fut], answer
        finally:
            stop.set()  # on ctrl-c, requests in flight give up instead of retrying on
            pool.shutdown(wait=True, cancel_futures=True)

    def ask(
        self, prompt: Prompt, stop: threading.Event | None = None, temperature: float | None = None
    ) -> Answer:
        """(answer, None), or (None, why) once retries are spent or the fault is not transient."""
        import openai

        c = self.config
        call = _current.call = _Call(stop or threading.Event(), c.backoff)
        try:
            raw = self._openai.chat.completions.with_raw_response.create(
                model=c.model,
                messages=as_messages(prompt),
                temperature=c.temperature if temperature is None else temperature,
                max_tokens=c.max_tokens,
                **self.extra_request(),
            )
            return self.answer_of(raw.http_response.content)
        except _Interrupted:
            return None, "interrupted"
        # never str(err): openai's messages quote the error body
        except openai.APIStatusError as err:
            reason = f"http {err.status_code}"
        except openai.APITimeoutError:
            reason = "timeout"
        except openai.APIConnectionError:
            reason = MALFORMED if call.malformed else "connection error"
        finally:
            _current.call = None
        retries = call.attempts - 1
        return None, f"{reason} after {retries} retries" if retries > 0 else reason

    def extra_request(self) -> dict[str, Any]:
        """Fields a subclass adds to every request (cut.llm.completer's LogprobsClient: logprobs)."""
        return {}

    def answer_of(self, body: bytes) -> Answer:
        """The answer a 2xx reply's body gives: its message's content, or MALFORMED."""
        content = _content(body)
        return (content, None) if content is not None else (None, MALFORMED)

    # httpx event hooks: they run in the thread of the ask() that sends the request

    def _on_request(self, request: Any) -> None:
        if not self._send_key:
            request.headers.pop("Authorization", None)  # the placeholder key
        call = getattr(_current, "call", None)
        if call is not None:
            call.attempts += 1
            call.malformed = False

    def _on_response(self, response: Any) -> None:
        """A malformed 2xx answer raises httpx's DecodingError, which openai retries as it does a
        connection error; the last one becomes "malformed response body"."""
        if not response.is_success:
            return
        response.read()
        if _content(response.content) is None:
            call = getattr(_current, "call", None)
            if call is not None:
                call.malformed = True
            httpx = sys.modules[type(response).__module__.partition(".")[0]]  # httpx or httpx2
            raise httpx.DecodingError(MALFORMED, request=response.request)


def _content(raw: bytes) -> str | None:
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def quiet_http_logs() -> None:
    """For a command line: httpx logs every request and openai every retry at INFO."""
    for name in ("httpx", "httpx2", "httpcore", "httpcore2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------
# the answer cache
# --------------------------------------------------------------------------------------------


def read_cache(path: str) -> dict[str, str]:
    """key -> answer; unreadable lines (a run killed mid-write) are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    cache, bad = {}, 0
    for line in filter(str.strip, lines):
        try:
            row = json.loads(line)
            key, content = row["key"], row["content"]
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if isinstance(key, str) and isinstance(content, str):
            cache[key] = content
    if bad:
        logger.warning("%s: skipped %d unreadable line(s)", path, bad)
    return cache


def _open_cache(path: str | None) -> TextIO | contextlib.nullcontext:
    if not path:
        return contextlib.nullcontext()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if p.exists() and p.stat().st_size:
        with p.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    f = p.open("a", encoding="utf-8")
    if torn:
        f.write("\n")  # end a torn last line so the next answer gets a line of its own
    return f
