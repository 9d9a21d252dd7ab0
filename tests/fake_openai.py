"""A fake OpenAI-compatible chat-completions server on 127.0.0.1 with scripted replies, for the tests
of cut.llm, cut.judge and the evaluations that ask an LLM.

    with FakeOpenAI({"p": ["500", "ok"]}, answers={"q": "Perfect."}) as fake:
        ...  # point a client at fake.base_url
    fake.hits["p"] == 2

Each POST .../chat/completions is filed under a key: by default the last message's content, or
what `key(body)` returns. A key's script is a list of replies for its first requests, then "ok".
A reply is one of
  "ok"         200 with the answer: answers[key], else `default` (a string, or a callable of the
               request body; by default "echo: <last message's content>")
  "slow"       the same after `slow` seconds (the client's timeout runs out first, if it is shorter)
  "notjson"    200 with an HTML body
  "nochoices"  200 with a JSON body without "choices"
  "nocontent"  200 with a message whose content is null
  "500", 500   that HTTP status with an error body that echoes the key that was sent, as some APIs do
  (status, headers)  the same, with these headers (Retry-After, Location, x-should-retry, ...)
  a callable   called with the request body: 200 with the string it returns
An answer in `answers` or `default` may also be a callable of the request body.

`logprobs(body)` (none by default: no "logprobs" in any reply, as before) chooses per request what
a 200 answer carries as choices[0].logprobs.content: None for none, else [(token, {alternative:
logprob, ...}), ...], sent as OpenAI does (each token's own logprob, its top_logprobs listed).

Recorded: hits (Counter of keys), auth (each request's Authorization header, None when absent),
bodies (the JSON bodies), max_inflight (the most requests being answered at once). A GET (where a
followed redirect would land) is recorded as key "GET <path>" and answered 405.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = Any  # str | int | tuple[int | str, dict[str, str]] | Callable[[dict], str]


def last_content(body: dict) -> str:
    return body["messages"][-1]["content"]


def echo(body: dict) -> str:
    return f"echo: {last_content(body)}"


class FakeOpenAI:
    def __init__(
        self,
        scripts: dict[str, list[Reply]] | None = None,
        answers: dict[str, str | Callable[[dict], str]] | None = None,
        *,
        default: str | Callable[[dict], str] = echo,
        key: Callable[[dict], str] = last_content,
        delay: float = 0.0,
        slow: float = 0.6,
        logprobs: Callable[[dict], list[tuple[str, dict[str, float]]] | None] | None = None,
    ) -> None:
        self.scripts = {k: list(v) for k, v in (scripts or {}).items()}
        self.answers = dict(answers or {})
        self.default, self.key = default, key
        self.delay, self.slow = delay, slow
        self.logprobs = logprobs
        self.hits: Counter[str] = Counter()
        self.auth: list[str | None] = []
        self.bodies: list[dict] = []
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # the client hung up on a slow answer
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.base_url = self.origin + "/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.record(self, "GET " + self.path, None)
                fake.send(self, 405, {}, b"{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                key = fake.key(body)
                fake.record(self, key, body)
                with fake.lock:
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                    script = fake.scripts.get(key)
                    reply = script.pop(0) if script else "ok"
                time.sleep(fake.slow if reply == "slow" else fake.delay)
                with fake.lock:
                    fake.inflight -= 1  # before the reply, so the client's next request never overlaps
                fake.reply(self, reply, key, body)

        return Handler

    def record(self, h: BaseHTTPRequestHandler, key: str, body: dict | None) -> None:
        with self.lock:
            self.hits[key] += 1
            self.auth.append(h.headers.get("Authorization"))
            if body is not None:
                self.bodies.append(body)

    def answer(self, key: str, body: dict) -> str:
        answer = self.answers.get(key, self.default)
        return answer(body) if callable(answer) else answer

    def reply(self, h: BaseHTTPRequestHandler, reply: Reply, key: str, body: dict) -> None:
        if callable(reply):
            return self.send_answer(h, reply(body), body)
        if reply in ("ok", "slow"):
            return self.send_answer(h, self.answer(key, body), body)
        if reply == "notjson":
            return self.send(h, 200, {}, b"<html>502 bad gateway</html>")
        if reply == "nochoices":
            return self.send_json(h, 200, {}, {"object": "error", "message": "overloaded"})
        if reply == "nocontent":
            return self.send_content(h, None)
        status, headers = reply if isinstance(reply, tuple) else (reply, {})
        sent = (h.headers.get("Authorization") or "").removeprefix("Bearer ")
        self.send_json(h, int(status), headers, {"error": {"message": f"Incorrect API key provided: {sent}"}})

    def send_answer(self, h: BaseHTTPRequestHandler, content: str, body: dict) -> None:
        """A 200 answer to `body`: send_content's, with the tokens' logprobs where `logprobs` gives any."""
        tokens = self.logprobs(body) if self.logprobs else None
        if tokens is None:
            return self.send_content(h, content)
        message = {"role": "assistant", "content": content}
        logprobs = {"content": [wire_token(t, alts) for t, alts in tokens]}
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": "stop"}
        self.send_json(h, 200, {}, {"choices": [choice]})

    def send_content(self, h: BaseHTTPRequestHandler, content: str | None) -> None:
        message = {"role": "assistant", "content": content}
        self.send_json(h, 200, {}, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

    def send_json(self, h: BaseHTTPRequestHandler, status: int, headers: dict, obj: dict) -> None:
        self.send(h, status, headers, json.dumps(obj).encode())

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, headers: dict, body: bytes) -> None:
        h.send_response(status)
        for k, v in {"Content-Type": "application/json", **headers}.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


def wire_token(token: str, alternatives: dict[str, float]) -> dict:
    """One entry of OpenAI's logprobs.content: the token, its logprob, its top_logprobs."""
    top = [{"token": a, "logprob": lp, "bytes": list(a.encode())} for a, lp in alternatives.items()]
    own = alternatives.get(token, min(alternatives.values(), default=0.0))
    return {"token": token, "logprob": own, "bytes": list(token.encode()), "top_logprobs": top}
