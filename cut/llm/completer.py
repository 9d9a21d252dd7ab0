"""One way to ask an LLM, from an OpenAI-compatible API or a local transformers model: prompts in,
answers out. cut.judges, cut.evaluation and cut.methods.realign all ask through it.

    opts = LLMOptions(base_url="http://localhost:8000/v1", model="NAME")   # the backend's options
    completer = make_completer("openai", opts, cache_file="answers.jsonl")  # or "local" (model: a path)
    completer.complete(["What is 2 + 2?", [{"role": "system", "content": "..."}, {"role": "user", ...}]])
    # -> [("4", None), (None, "http 500 after 5 retries")]

The interface (`Completer`, either backend):

- `name`: "openai:<model>" or "local:<model>", what a judgment or a record says asked it;
- `complete(prompts, progress=None, accept=None, *, temperature=None, sample=None)` -> one
  `Answer` per prompt, in order: (text, None) or (None, a short reason);
  - a prompt is a string (one user turn) or a list of chat messages ({"role", "content"});
  - progress(n) ticks as n prompts get their answer;
  - accept(text) -> bool: an answer the caller cannot read; the API backend neither caches it nor
    takes it from its cache, so a rerun asks again (the local backend has no cache);
  - temperature None: the backend's own (make_completer's `temperature`, 0 = greedy by default);
    sample k = 0, 1, ...: the k-th independent draw (the API: a request and cache entry of its own
    for k > 0; local: seeded with k); so a caller that classifies greedily and rewrites at 0.7
    makes one completer at 0.7 and asks `temperature=0.0` for the greedy calls.

`ApiCompleter` wraps cut.llm.client.LLMClient (retries, bounded concurrency, the JSONL answer
cache, the API key from the environment); its `client` is that client. Its `top_logprobs(prompts,
k)` answers each prompt's greedy reply as its tokens, each with the k most probable alternatives the
server lists (`logprobs` / `top_logprobs`, as OpenAI and vLLM's server return them; NO_LOGPROBS from a
server that sends none), through the same cache under keys of their own; `continue_reply=True`
has vLLM continue a started assistant turn (its `continue_final_message`). `LocalCompleter` loads a
causal LM (cut.modeling.loading) and decodes in left-padded batches (cut.modeling.generate); a
prompt is the model's chat template over its messages, or, without a template, the messages'
contents joined by a blank line. Its `model`, `tokenizer`, `chat`, `batch_size`, `max_new_tokens`
and `text(prompt)` are public, for readers of next-token probabilities (cut.evaluation.verdicts);
`complete(..., whole=True)` refuses a prompt that does not fit the context with max_new_tokens
("prompt too long: ...") instead of cutting it from the left.

`LLMOptions` (a cut.args.Options) declares every backend option once, with its default, help and
range: base_url, model, api_key_env, concurrency, timeout, max_retries, backoff, max_tokens,
cache_file (the API's), batch_size, max_new_tokens (the local model's). A tool whose default
differs (cut evaluate's timeout 120) overrides that one field in its own subclass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cut.args import Options, integer, number, opt
from cut.errors import ConfigError
from cut.llm.client import (
    Answer,
    ClientConfig,
    LLMClient,
    Message,
    Progress,
    Prompt,
    as_messages,
    number_problems,
    text_problems,
)

Accept = Callable[[str], bool]
TOP_LOGPROBS = 20  # alternatives per token: OpenAI's most, and vLLM's default max_logprobs
NO_LOGPROBS = "no logprobs in the reply"
Token = tuple[str, list[tuple[str, float]]]  # (the token, [(an alternative, its logprob), ...])

# the largest value of each numeric backend option; the smallest are in NUMBER_RULES
LIMITS = {
    "concurrency": 1024,
    "timeout": 86400.0,  # seconds
    "max_retries": 100,
    "backoff": 3600.0,  # seconds
    "max_tokens": 1_000_000,
    "batch_size": 4096,
    "max_new_tokens": 1_000_000,
}
# their checked argparse types, for every command line that offers them
TYPES = {
    "concurrency": integer(1, LIMITS["concurrency"]),
    "timeout": number(0, LIMITS["timeout"], lo_open=True),
    "max_retries": integer(0, LIMITS["max_retries"]),
    "backoff": number(0, LIMITS["backoff"]),
    "max_tokens": integer(1, LIMITS["max_tokens"]),
    "batch_size": integer(1, LIMITS["batch_size"]),
    "max_new_tokens": integer(1, LIMITS["max_new_tokens"]),
}
NUMBER_RULES = {
    **dict.fromkeys(("concurrency", "max_tokens", "batch_size", "max_new_tokens"), "int>=1"),
    "max_retries": "int>=0",
    "timeout": ">0",
    "backoff": ">=0",
}


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------


@dataclass
class LLMOptions(Options):
    """The options of an LLM backend (an OpenAI-compatible API or a local model), declared once."""

    base_url: str | None = opt(
        None, "openai: the API root, e.g. https://api.openai.com/v1 or http://host:8000/v1"
    )
    model: str | None = opt(None, "openai: the model name; local: a model folder or hub name")
    api_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the API key")
    concurrency: int = opt(8, "openai: requests in flight at most", parse=TYPES["concurrency"])
    timeout: float = opt(60.0, "openai: seconds per request", parse=TYPES["timeout"])
    max_retries: int = opt(5, "openai: retries of a transient fault", parse=TYPES["max_retries"])
    backoff: float = opt(1.0, "openai: first retry delay in seconds (doubles)", parse=TYPES["backoff"])
    max_tokens: int = opt(512, "openai: max_tokens of an answer", parse=TYPES["max_tokens"])
    cache_file: str | None = opt(None, "openai: answer cache ('' for none)")
    batch_size: int = opt(8, "local: prompts per generate call", parse=TYPES["batch_size"])
    max_new_tokens: int = opt(256, "local: tokens per answer at most", parse=TYPES["max_new_tokens"])

    def backend_problems(self, texts: Sequence[str] = ()) -> list[str]:
        """One message per backend option (and per optional text field of a subclass, `texts`)
        that is not of its type or out of its range."""
        optional = ["base_url", "model", *texts, "cache_file"]
        problems = text_problems(self, required=["api_key_env"], optional=optional)
        problems += number_problems(self, NUMBER_RULES)
        return problems + [
            f"{name} must be at most {hi:g}, got {getattr(self, name)!r}"
            for name, hi in LIMITS.items()
            if not any(p.startswith(name + " ") for p in problems) and getattr(self, name) > hi
        ]

    def client_config(self, cache_file: str | None = None, temperature: float = 0.0) -> ClientConfig:
        """The cut.llm client's part (an API backend); cache_file as given."""
        return ClientConfig(
            base_url=self.base_url,
            model=self.model,
            api_key_env=self.api_key_env,
            concurrency=self.concurrency,
            timeout=self.timeout,
            max_retries=self.max_retries,
            backoff=self.backoff,
            max_tokens=self.max_tokens,
            temperature=temperature,
            cache_file=cache_file,
        )

    def backend(self) -> dict[str, Any]:
        """The backend options alone (LLMOptions' fields), of a subclass too."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LLMOptions)}


# --------------------------------------------------------------------------------------------
# the interface and its two backends
# --------------------------------------------------------------------------------------------


class ApiCompleter:
    """An OpenAI-compatible /chat/completions endpoint through cut.llm's client."""

    def __init__(self, config: ClientConfig) -> None:
        self.client = LLMClient(config)
        self.name = f"openai:{config.model}"

    def complete(
        self,
        prompts: Sequence[Prompt],
        progress: Progress | None = None,
        accept: Accept | None = None,
        **call: Any,
    ) -> list[Answer]:
        """The answers; call: temperature=, sample= (see the module doc)."""
        return self.client.complete(list(prompts), progress, accept, **call)

    def top_logprobs(
        self,
        prompts: Sequence[Prompt],
        k: int = TOP_LOGPROBS,
        max_tokens: int | None = None,
        continue_reply: bool = False,
        progress: Progress | None = None,
    ) -> list[Answer]:
        """Per prompt, its greedy reply's tokens each with its k most probable alternatives, as the
        JSON text of [[token, [[candidate, logprob], ...]], ...] (read it with `reply_tokens`), or
        (None, a reason): NO_LOGPROBS when the server sends none. max_tokens None: the config's.
        continue_reply: the prompt's last message is the start of the assistant's reply, which the
        server continues (vLLM's continue_final_message) instead of starting a new turn. Cached,
        retried and run concurrently as complete()'s answers are, under keys of their own."""
        config = self.client.config
        if max_tokens is not None:
            config = dataclasses.replace(config, max_tokens=max_tokens)
        with LogprobsClient(config, k, continue_reply) as client:
            return client.complete(list(prompts), progress, temperature=0.0)

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------------------------
# a reply's top_logprobs (probability verdicts from a served judge: cut.evaluation.verdicts)
# --------------------------------------------------------------------------------------------


class LogprobsClient(LLMClient):
    """cut.llm's client, its requests also asking for `logprobs` and `top_logprobs` (and with
    continue_reply, vLLM's continue_final_message); an answer is the reply's tokens with their
    alternatives as JSON (ApiCompleter.top_logprobs), cached under a key that includes the request."""

    def __init__(self, config: ClientConfig, k: int, continue_reply: bool = False) -> None:
        super().__init__(config)
        self.k, self.continue_reply = k, continue_reply
        self.request: dict[str, Any] = {"logprobs": True, "top_logprobs": k}
        if continue_reply:  # vLLM's chat template options; OpenAI's API has no prefilled reply
            self.request["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}

    def cache_key(self, prompt: Prompt, temperature: float | None = None, sample: int | None = None) -> str:
        plain = super().cache_key(prompt, temperature, sample)
        asked = f"{plain} top_logprobs {self.k} continue_reply {self.continue_reply}"
        return hashlib.sha256(asked.encode()).hexdigest()

    def extra_request(self) -> dict[str, Any]:
        return self.request

    def answer_of(self, body: bytes) -> Answer:
        """The reply's tokens with their alternatives as JSON, or NO_LOGPROBS (or LLMClient's reason)."""
        text, reason = super().answer_of(body)
        if text is None:
            return None, reason
        tokens = _tokens(body)
        return (json.dumps(tokens), None) if tokens else (None, NO_LOGPROBS)


def _tokens(raw: bytes) -> list[Token] | None:
    """choices[0].logprobs.content of a reply as [(token, [(alternative, logprob), ...])], None
    when it has none; an alternative listed twice (vLLM adds the chosen token) counts once."""
    try:
        content = json.loads(raw)["choices"][0]["logprobs"]["content"]
        out = []
        for t in content:
            seen = {(a["token"], float(a["logprob"])): None for a in t.get("top_logprobs") or []}
            out.append((t["token"], list(seen)))
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return out or None


def reply_tokens(text: str) -> list[Token]:
    """The tokens of an answer of ApiCompleter.top_logprobs."""
    return [(t, [(a, p) for a, p in alts]) for t, alts in json.loads(text)]


class LocalCompleter:
    """A transformers causal LM: batched decoding (cut.modeling.generate's) at `temperature` (0:
    greedy), sample k seeded with k. `sampling` is the cut.modeling.generate.Sampling of the call
    under way (set before `generate`, which a caller may wrap)."""

    def __init__(
        self,
        model: str,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        device: str | None = None,
        temperature: float = 0.0,
    ) -> None:
        from cut.modeling.generate import Sampling
        from cut.modeling.loading import check_model_path, load_model, load_tokenizer

        check_model_path(model)
        self.sampling = Sampling(max_new_tokens=max_new_tokens)  # greedy
        self.batch_size = batch_size
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, device=device or "auto")
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.name = f"local:{model}"

    def text(self, prompt: Prompt) -> str:
        """The model's input for a prompt: its chat template, or the turns one after another."""
        messages: list[Message] = as_messages(prompt)
        if self.chat:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages)

    def complete(
        self,
        prompts: Sequence[Prompt],
        progress: Progress | None = None,
        accept: Accept | None = None,
        *,
        temperature: float | None = None,
        sample: int | None = None,
        whole: bool = False,
    ) -> list[Answer]:
        """The model's answers; with whole, a prompt that does not fit its context with
        max_new_tokens is refused with the reason (cutting it could hide the task)."""
        from cut.modeling.generate import Sampling

        t = self.temperature if temperature is None else temperature
        if t == 0 and sample is None:
            self.sampling = Sampling(max_new_tokens=self.max_new_tokens)  # greedy
        else:
            self.sampling = Sampling(self.max_new_tokens, temperature=t, seed=sample or 0)
        texts = [self.text(p) for p in prompts]
        answers: list[Answer] = (
            [(None, r) for r in self.too_long(texts)] if whole else [(None, None)] * len(texts)
        )
        fits = [i for i, (_, reason) in enumerate(answers) if reason is None]
        if progress and len(fits) < len(texts):
            progress(len(texts) - len(fits))
        if not fits:
            return answers
        on_batch = (lambda idx, _texts: progress(len(idx))) if progress else None
        for i, text in zip(fits, self.generate([texts[i] for i in fits], on_batch), strict=True):
            answers[i] = (text, None)
        return answers

    def generate(self, texts: list[str], on_batch=None) -> list[str]:
        """Answers for model inputs (text()'s), decoded with `sampling`."""
        from cut.modeling.generate import generate_texts

        return generate_texts(
            self.model,
            self.tokenizer,
            texts,
            self.sampling,
            add_special_tokens=not self.chat,  # a chat template writes its BOS
            batch_size=self.batch_size,
            on_batch=on_batch,
            progress=False,
        )

    def too_long(self, texts: list[str]) -> list[str | None]:
        """Per model input, why it cannot be asked whole (None: it can)."""
        from cut.modeling.generate import context_length, tokenize_prompts

        limit = context_length(self.model.config, self.tokenizer)
        if limit is None:
            return [None] * len(texts)
        room = limit - self.max_new_tokens
        if room < 1:
            raise ConfigError(
                f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt in the judge's "
                f"context of {limit} tokens"
            )
        rows = tokenize_prompts(self.tokenizer, texts, add_special_tokens=not self.chat)
        return [
            None
            if len(row) <= room
            else f"prompt too long: {len(row)} tokens; it does not fit the judge's context of {limit} "
            f"with max_new_tokens {self.max_new_tokens} (a cut prompt could hide the task)"
            for row in rows
        ]


BACKENDS = ("openai", "local")
Completer = ApiCompleter | LocalCompleter  # the interface: name, complete(...) (the module doc)


def make_completer(
    kind: str, opts: LLMOptions, cache_file: str | None = None, temperature: float = 0.0
) -> ApiCompleter | LocalCompleter:
    """The backend `kind` (openai | local) with opts; an API one caches in cache_file (None: none)
    and answers at `temperature` unless a call says otherwise."""
    if kind == "openai":
        if not (opts.base_url and opts.model):
            raise ConfigError("an openai backend needs base_url and model")
        return ApiCompleter(opts.client_config(cache_file or None, temperature))
    if kind == "local":
        if not opts.model:
            raise ConfigError("a local backend needs model")
        return LocalCompleter(opts.model, opts.batch_size, opts.max_new_tokens, temperature=temperature)
    raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {kind!r}")
