"""`cut judge`, `cut evaluate` and `cut realign` end to end, through their CLIs, against a real
OpenAI-compatible server: `transformers serve` on 127.0.0.1 (tests/served.py), started once for
the module, loading tiny models built here from local folders (HF_HUB_OFFLINE=1), and the embedded
SmolLM2 where saved_models/ has it. tests/fake_openai.py stays for fault injection.

A random tiny model answers garbage, so with it the tests assert what is true of any reply: the
requests succeed, every record gets its verdict or a named failure as the tool's rules say, the
outputs are well-formed, nothing hangs, and the API key is written nowhere. Tiny models *steered*
to one fixed reply (served.steer: their generation_config's sequence_bias) carry a real verdict,
score or rewrite through the server and the whole CLI path.

Probability verdicts: `transformers serve` (5.x) returns no `logprobs` / `top_logprobs` (asserted
below, so a release that adds them shows here), so `--verdict probabilities` with it as the judge
stops with an error naming the server and --judge local; a server that returns them is read in
tests/test_served_verdicts.py (the fake server) and tests/test_vllm_server.py (vLLM's, opt-in).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="transformers serve needs fastapi (the dev extra)")
pytest.importorskip("uvicorn", reason="transformers serve needs uvicorn (the dev extra)")

from served import LOOPBACK, TransformersServer, steer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from cut.data.records import load_records  # noqa: E402
from cut.modeling.tiny import build_tiny_model  # noqa: E402

from conftest import REPO, TINY_RECORDS  # noqa: E402

pytestmark = pytest.mark.slow

CUT = Path(sys.executable).with_name("cut")
SMOLLM = REPO / "saved_models" / "SmolLM2-135M-Instruct"
KEY = "sk-served-" + secrets.token_hex(12)  # a fresh key per run: a hit in a file can only be a leak
RUN_TIMEOUT = 300  # seconds for one CLI run: a hang fails the test, never the suite

PERFECT = "Perfect."
MISTAKES = 'Mistakes: "Lyon" is wrong; the capital of France is Paris.'
SCORES = {"helpfulness": 4, "clarity": 5, "factuality": 4, "depth": 3, "engagement": 3}
SCORE_REPLY = json.dumps({k: {"reason": f"{k} is fine.", "score": v} for k, v in SCORES.items()})
STEPS = "Boil the water, add the pasta and cook it for ten minutes before you drain it."
REVISED = "1. Boil the water.\n2. Add the pasta.\n3. Cook it for ten minutes.\n4. Drain it."
REWRITE_REPLY = f"Reasoning: the steps read better as a list.\nDecision: REWRITE\nRevised response: {REVISED}"

# three of the tiny records, as answers: the wrong city, a right sum, a right colour
ANSWERS = [{k: TINY_RECORDS[i][k] for k in ("instruction", "input", "output")} for i in (0, 1, 3)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served_models")
    folders = {"random": build_tiny_model(root / "random", chat=True)}
    tokenizer = AutoTokenizer.from_pretrained(folders["random"])
    for name, reply in [
        ("perfect", PERFECT),
        ("mistakes", MISTAKES),
        ("scores", SCORE_REPLY),
        ("rewrite", REWRITE_REPLY),
    ]:
        folders[name] = steer(build_tiny_model(root / name, chat=True), tokenizer, reply)
    return folders


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with TransformersServer(tmp_path_factory.mktemp("server") / "serve.log") as srv:
        yield srv
    assert srv.proc.returncode is not None  # terminated, not left running


def chat(server: TransformersServer, model: Path, content: str, **extra) -> dict:
    body = {
        "model": str(model),
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 64,
        **extra,
    }
    request = urllib.request.Request(
        server.base_url + "/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with LOOPBACK.open(request, timeout=120) as r:
        return json.loads(r.read())


def cut(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {"PATH": str(CUT.parent) + ":/usr/bin:/bin", "HOME": str(tmp_path), "OPENAI_API_KEY": KEY}
    env |= {"NO_PROXY": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [str(CUT), *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )


def openai_args(server: TransformersServer, model: Path, max_tokens: int = 48) -> list[str]:
    return [
        "--base_url",
        server.base_url,
        "--model",
        str(model),
        "--max_tokens",
        str(max_tokens),
        "--timeout",
        "120",
    ]


def write(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps(rows, indent=1))
    return str(path)


def assert_key_not_written(folder: Path) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert KEY not in path.read_text(errors="replace"), path


def test_the_server_returns_no_logprobs(server, models):
    """What cut could read probability verdicts from: transformers serve answers, but without
    `logprobs` / `top_logprobs` (vLLM's server returns them)."""
    reply = chat(server, models["perfect"], "Is 2 + 2 = 4?", logprobs=True, top_logprobs=5)
    choice = reply["choices"][0]
    assert choice["message"]["content"] == PERFECT  # the steering holds through the server
    assert not choice.get("logprobs")


def test_probability_verdicts_through_a_served_judge_fail_clearly(server, models, tmp_path):
    inp = write(tmp_path / "gen.json", ANSWERS)
    run = cut(
        tmp_path,
        "evaluate",
        "--mode", "score",
        "--input_file", inp,
        "--output_dir", "eval",
        "--judge", "openai",
        *openai_args(server, models["scores"]),
        "--verdict", "probabilities",
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "--verdict probabilities" in run.stderr and "--judge local" in run.stderr
    assert not (tmp_path / "eval" / "results.json").exists()


def test_judge_writes_positives_from_a_served_judge(server, models, tmp_path):
    inp = write(tmp_path / "gen.json", ANSWERS)
    run = cut(tmp_path, "judge", "--input_file", inp, "--output_file", "judged.json", "--judge", "openai",
              *openai_args(server, models["perfect"]))  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "judged.json").read_text())
    assert [r["output"] for r in rows] == [a["output"] for a in ANSWERS]
    assert all(r["judgment"] is None and "judge_error" not in r for r in rows)
    assert {r["judge"] for r in rows} == {f"openai:{models['perfect']}"}
    assert len(load_records(str(tmp_path / "judged.json"))) == 3  # the training format
    cached = [json.loads(line) for line in (tmp_path / "judged.json.cache.jsonl").read_text().splitlines()]
    assert len(cached) == 3
    assert_key_not_written(tmp_path)


def test_judge_writes_critiques_from_a_served_judge(server, models, tmp_path):
    inp = write(tmp_path / "gen.json", ANSWERS[:2])
    run = cut(tmp_path, "judge", "--input_file", inp, "--output_file", "judged.json", "--judge", "openai",
              *openai_args(server, models["mistakes"]))  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "judged.json").read_text())
    assert len(rows) == 2 and all(r["judgment"] and "Lyon" in r["judgment"] for r in rows)
    assert all("judge_error" not in r for r in rows)
    assert_key_not_written(tmp_path)


def test_judge_with_a_random_served_model_fails_every_judgment_by_name(server, models, tmp_path):
    """Garbage is no verdict: every judgment fails as unparseable, nothing is written (exit 2),
    and no unreadable answer is cached, so a rerun asks again."""
    inp = write(tmp_path / "gen.json", ANSWERS)
    run = cut(tmp_path, "judge", "--input_file", inp, "--output_file", "judged.json", "--judge", "openai",
              *openai_args(server, models["random"], max_tokens=16))  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "every judgment failed (unparseable verdict: 3)" in run.stderr
    assert not (tmp_path / "judged.json").exists()
    assert (tmp_path / "judged.json.cache.jsonl").read_text() == ""
    assert_key_not_written(tmp_path)


def test_evaluate_scores_from_a_served_judge(server, models, tmp_path):
    inp = write(tmp_path / "gen.json", ANSWERS)
    run = cut(tmp_path, "evaluate", "--mode", "score", "--input_file", inp, "--output_dir", "eval",
              "--judge", "openai", *openai_args(server, models["scores"], max_tokens=400),
              "--resamples", "100", "--group_by", "none")  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert (summary["n"], summary["n_ok"], summary["n_failed"]) == (3, 3, 0)
    assert {k: v["mean"] for k, v in summary["aspects"].items()} == SCORES
    records = json.loads((tmp_path / "eval" / "results.json").read_text())["records"]
    assert all(r["evaluation"]["status"] == "ok" and r["evaluation"]["scores"] == SCORES for r in records)
    assert (tmp_path / "eval" / "report.md").stat().st_size > 0
    assert_key_not_written(tmp_path)


def test_evaluate_with_a_random_served_model_records_named_failures(server, models, tmp_path):
    inp = write(tmp_path / "gen.json", ANSWERS)
    run = cut(tmp_path, "evaluate", "--mode", "score", "--input_file", inp, "--output_dir", "eval",
              "--judge", "openai", *openai_args(server, models["random"], max_tokens=16),
              "--resamples", "100", "--group_by", "none", "--parse_retries", "1")  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert (summary["n"], summary["n_ok"], summary["n_failed"]) == (3, 0, 3)
    assert summary["failed_reasons"] == {"unparseable": 3}
    assert all(v["mean"] is None and v["n"] == 0 for v in summary["aspects"].values())  # never averaged
    for r in json.loads((tmp_path / "eval" / "results.json").read_text())["records"]:
        assert r["evaluation"]["status"] == "failed" and r["evaluation"]["error"].startswith("unparseable")
        assert r["evaluation"]["attempts"] == 2
    assert_key_not_written(tmp_path)


def test_realign_rewrites_through_a_served_rewriter(server, models, tmp_path):
    rows = [
        {"instruction": "How do I cook pasta?", "input": "", "output": STEPS, "category": "how_to_generation"}
    ]
    inp = write(tmp_path / "data.json", rows)
    run = cut(tmp_path, "realign", "--input_file", inp, "--output_file", "realigned.json", "--rewriter", "openai",
              *openai_args(server, models["rewrite"], max_tokens=200), "--task_field", "category")  # fmt: skip
    assert run.returncode == 0, run.stderr
    [row] = json.loads((tmp_path / "realigned.json").read_text())
    assert row["rewritten"] is True, row
    assert (row["output"], row["original_output"], row["task"]) == (REVISED, STEPS, "how_to_generation")
    assert_key_not_written(tmp_path)


def test_realign_with_a_random_served_model_keeps_every_original(server, models, tmp_path):
    """Tasks asked of the model (no --task_field) come back as no task: the fallback, passed through;
    a rewrite asked for a rewritable task fails with its reason; every original is kept."""
    rows = [{**a, "category": "how_to_generation"} for a in ANSWERS]
    inp = write(tmp_path / "data.json", rows)
    common = ["--rewriter", "openai", *openai_args(server, models["random"], max_tokens=16)]
    run = cut(tmp_path, "realign", "--input_file", inp, "--output_file", "classified.json", *common)
    assert run.returncode == 0, run.stderr
    out = json.loads((tmp_path / "classified.json").read_text())
    assert all(r["rewritten"] is False and r["task"] == "default" and r["rewrite_skipped"] for r in out)
    run = cut(tmp_path, "realign", "--input_file", inp, "--output_file", "rewritten.json", *common,
              "--task_field", "category")  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads((tmp_path / "rewritten.json").read_text())
    assert [r["output"] for r in out] == [a["output"] for a in ANSWERS]
    assert all(r["rewritten"] is False and r["rewrite_error"].startswith("rewrite: ") for r in out)
    assert_key_not_written(tmp_path)


@pytest.mark.skipif(not (SMOLLM / "config.json").exists(), reason="no embedded SmolLM2 in saved_models/")
def test_judge_and_evaluate_with_the_served_smollm2(server, tmp_path):
    """The embedded SmolLM2-135M-Instruct served from its folder: real words come back, and each
    record gets a verdict or a named failure by the tool's rules."""
    inp = write(tmp_path / "gen.json", ANSWERS[:2])
    run = cut(tmp_path, "judge", "--input_file", inp, "--output_file", "judged.json", "--judge", "openai",
              *openai_args(server, SMOLLM, max_tokens=24))  # fmt: skip
    if run.returncode == 0:
        rows = json.loads((tmp_path / "judged.json").read_text())
        assert 1 <= len(rows) <= 2
        for r in rows:  # a positive, a critique, or a failed judgment that says why
            assert r["judgment"] is None or r["judgment"].strip()
            assert "judge_error" not in r or (r["judgment"] is None and r["judge_error"])
    else:
        assert run.returncode == 2 and "every judgment failed" in run.stderr, run.stderr
    run = cut(tmp_path, "evaluate", "--mode", "score", "--input_file", inp, "--output_dir", "eval",
              "--judge", "openai", *openai_args(server, SMOLLM, max_tokens=64),
              "--resamples", "100", "--group_by", "none", "--parse_retries", "0")  # fmt: skip
    assert run.returncode == 0, run.stderr
    records = json.loads((tmp_path / "eval" / "results.json").read_text())["records"]
    assert len(records) == 2
    for r in records:
        ev = r["evaluation"]
        if ev["status"] == "ok":
            assert all(1 <= v <= 5 for v in ev["scores"].values() if v is not None)
        else:
            assert ev["status"] == "failed" and ev["error"]
            if "reply" in ev:  # the model's own words, not a random model's bytes
                assert sum(c.isalpha() for c in ev["reply"]) >= 10
    assert_key_not_written(tmp_path)
