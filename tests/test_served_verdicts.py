"""Probability verdicts from a served judge (cut.evaluation.verdicts.ServedProbabilityAsker through
cut.llm's ApiCompleter.top_logprobs), against the fault-injection server tests/fake_openai.py made
to return top_logprobs.

Every reading is checked against a reference worked out here from the same numbers the server sent:
p_i = the summed exp(logprob) of the alternatives whose text is option i (spaces and a quote
around it), score = sum(i * p_i) / sum(p_i), mass = sum(p_i), winner = argmax p_i. Also: options
missing from the top K, a reply that never reaches a verdict, a server without logprobs (a clear
error), the cache (a rerun sends nothing; a generated verdict is another request), retries,
concurrency, and what a continued reply sends. The real server (vLLM's) is tests/test_vllm_server.py.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from cut.errors import ConfigError
from cut.evaluation.aspects import SCORE_ASPECTS
from cut.evaluation.evaluate import EvaluateConfig, main, run_judged
from cut.evaluation.verdicts import WINNERS, option_of, options, served_reading
from cut.judges.judge import JudgeConfig

from fake_openai import FakeOpenAI
from helpers import cli_args, write

N = 4  # records


def answers(n: int = N) -> list[dict]:
    return [{"instruction": f"Name fact {i}.", "input": "", "output": f"Fact {i} holds."} for i in range(n)]


def record_of(body: dict) -> int:
    """Which record a request is about (its answer's number in the user message)."""
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return int(re.search(r"Fact (\d+) holds", user).group(1))


def slot_alternatives(i: int, aspect: int) -> dict[str, float]:
    """Record i's, aspect's alternatives at the score's slot: options with and without the leading
    space, and text that is no option (a quote, a word); record 3's leave out 1, 2 and 3."""
    p = {" 4": 0.30 + 0.05 * i, " 3": 0.20, "5": 0.10 + 0.02 * aspect, " 1": 0.05, "2": 0.04}
    p.update({' "': 0.06, " N": 0.03})
    if i == 3:
        p = {" 5": 0.45, " 4": 0.15, " very": 0.20}
    return {a: math.log(x) for a, x in p.items()}


def score_tokens(i: int, aspects=SCORE_ASPECTS) -> list[tuple[str, dict[str, float]]]:
    """The reply a judge writes, as tokens with alternatives: a reason before every score."""
    tokens: list[tuple[str, dict[str, float]]] = [("{", {})]
    for n, aspect in enumerate(aspects):
        alts = slot_alternatives(i, n)
        lead = (", " if n else "") + f'"{aspect}": {{"reason": "It is fine.", "score":'
        tokens += [(lead, {"x": -9.0}), (max(alts, key=alts.get), alts), ("}", {})]
    return [*tokens, ("}", {})]


def reference(alternatives: dict[str, float], names) -> tuple[list[float], float]:
    """The options' probabilities renormalised and their mass, straight from the numbers."""
    p = [sum(math.exp(lp) for a, lp in alternatives.items() if a.strip().strip('"') == n) for n in names]
    return [x / sum(p) for x in p], sum(p)


def serving(tokens_of=score_tokens, **kw) -> FakeOpenAI:
    """A fake judge replying record i with tokens_of(i), its text and its top_logprobs."""
    return FakeOpenAI(
        default=lambda body: "".join(t for t, _ in tokens_of(record_of(body))),
        logprobs=lambda body: tokens_of(record_of(body)),
        key=lambda body: f"record {record_of(body)}",
        **kw,
    )


def judge_of(fake: FakeOpenAI, **kw) -> JudgeConfig:
    options_ = {"model": "judge-m", "max_retries": 0, "backoff": 0.01, "timeout": 5.0, **kw}
    return JudgeConfig(kind="openai", base_url=fake.base_url, **options_)


def score_config(tmp_path, out: str = "run", **kw) -> EvaluateConfig:
    inp = write(tmp_path / "gen.json", answers())
    return EvaluateConfig(
        mode="score",
        output_dir=str(tmp_path / out),
        input_file=inp,
        verdict="probabilities",
        resamples=200,
        **kw,
    )


def records(tmp_path, out: str = "run") -> list[dict]:
    return json.loads((tmp_path / out / "results.json").read_text())["records"]


def test_scores_and_mass_are_those_of_the_servers_top_logprobs(tmp_path):
    with serving() as fake:
        summary = run_judged(score_config(tmp_path), judge_of(fake))
        bodies = list(fake.bodies)
    assert summary["setup"]["judge"] == "openai:judge-m/probabilities"
    # one request per record, asking for the logprobs, greedy, with the config's max_tokens
    assert len(bodies) == N
    assert all(b["logprobs"] is True and b["top_logprobs"] == 20 and b["temperature"] == 0 for b in bodies)
    assert all(b["messages"][-1]["role"] == "user" for b in bodies)
    names = options("score")
    for i, rec in enumerate(records(tmp_path)):
        ev = rec["evaluation"]
        assert ev["status"] == "ok" and ev["attempts"] == 1
        for n, aspect in enumerate(SCORE_ASPECTS):
            probs, mass = reference(slot_alternatives(i, n), names)
            assert ev["scores"][aspect] == round(
                sum(int(k) * p for k, p in zip(names, probs, strict=True)), 2
            )
            shown = ", ".join(f"{k} {p:.2f}" for k, p in zip(names, probs, strict=True))
            assert ev["reasons"][aspect] == (
                f"next-token probabilities: {shown} ({mass:.2f} of the judge's mass on these)"
            )
            assert 0 < mass <= 1 and math.isclose(sum(probs), 1)
    # record 3's top K hold only 4 and 5 (and a word): 1-3 count 0, the mass says 0.60 was read
    last = records(tmp_path)[3]["evaluation"]
    assert last["reasons"]["helpfulness"].startswith("next-token probabilities: 1 0.00, 2 0.00, 3 0.00")
    assert "(0.60 of the judge's mass" in last["reasons"]["helpfulness"]
    assert last["scores"]["helpfulness"] == round((5 * 0.45 + 4 * 0.15) / 0.60, 2)


def test_a_rerun_takes_the_cache_and_a_generated_verdict_is_another_request(tmp_path):
    cache = str(tmp_path / "shared-cache.jsonl")
    with serving() as fake:
        run_judged(score_config(tmp_path, "one"), judge_of(fake, cache_file=cache))
        assert sum(fake.hits.values()) == N
        run_judged(score_config(tmp_path, "two"), judge_of(fake, cache_file=cache))
        assert sum(fake.hits.values()) == N  # nothing sent
        assert records(tmp_path, "one") == records(tmp_path, "two")
        # the same prompts without the logprobs request are not answered from that cache
        plain = EvaluateConfig(
            mode="score",
            output_dir=str(tmp_path / "plain"),
            input_file=str(tmp_path / "gen.json"),
            resamples=200,
        )
        run_judged(plain, judge_of(fake, cache_file=cache))
        assert sum(fake.hits.values()) == 2 * N
        assert "logprobs" not in fake.bodies[-1]


def test_transient_faults_are_retried_and_requests_run_concurrently(tmp_path):
    scripts = {"record 0": ["500", "ok"], "record 2": [(503, {"Retry-After": "0"}), "ok"]}
    with serving(scripts=scripts, delay=0.2) as fake:
        summary = run_judged(score_config(tmp_path), judge_of(fake, max_retries=2, concurrency=2))
        assert fake.hits["record 0"] == 2 and fake.hits["record 2"] == 2
        assert fake.max_inflight == 2
    assert summary["n_failed"] == 0


def test_a_reply_without_the_verdict_or_without_an_option_fails_that_record(tmp_path):
    def tokens_of(i: int):
        if i == 0:  # prose, no JSON
            return [("The answer", {"The": -0.1}), (" is good.", {" is": -0.2})]
        if i == 1:  # the last aspect's slot lists no option
            tokens = score_tokens(1)
            tokens[-3] = (" very", {" very": -0.2, " quite": -1.9})
            return tokens
        return score_tokens(i)

    with serving(tokens_of) as fake:
        summary = run_judged(score_config(tmp_path), judge_of(fake))
    recs = records(tmp_path)
    assert "the reply never reached helpfulness's verdict" in recs[0]["evaluation"]["error"]
    assert (
        "no option of engagement's verdict among the server's top 2 tokens" in recs[1]["evaluation"]["error"]
    )
    assert [r["evaluation"]["status"] for r in recs[2:]] == ["ok", "ok"]
    assert summary["n_failed"] == 2


def test_a_server_without_logprobs_is_a_clear_error(tmp_path, capsys):
    with FakeOpenAI(default='{"helpfulness": {"reason": "ok", "score": 4}}') as fake:
        with pytest.raises(ConfigError, match="sent no logprobs for model 'judge-m'"):
            run_judged(score_config(tmp_path), judge_of(fake))
        assert fake.bodies[0]["logprobs"] is True
        inp = str(tmp_path / "gen.json")
        args = cli_args(mode="score", input_file=inp, output_dir=tmp_path / "cli", verdict="probabilities")
        code = main([*args, "--judge", "openai", "--base_url", fake.base_url, "--model", "judge-m"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"the server at {fake.base_url} sent no logprobs" in err and "use --verdict generate" in err
    assert "Traceback" not in err
    assert not (tmp_path / "cli" / "results.json").exists()


def pair_tokens(i: int) -> list[tuple[str, dict[str, float]]]:
    """A pairwise reply whose winner token carries its quote (' "B'), as many tokenizers merge it."""
    alts = {' "A': math.log(0.2 + 0.1 * i), ' "B': math.log(0.5), ' "tie': math.log(0.1), ' "': math.log(0.1)}
    return [("{", {}), ('"depth": {"reason": "B says more.", "winner":', {}), (max(alts, key=alts.get), alts)]


def listed(tokens):
    """Tokens as cut.llm.completer.reply_tokens gives them: alternatives as (text, logprob) pairs."""
    return [(t, list(alts.items())) for t, alts in tokens]


def test_a_pairwise_winner_read_from_a_token_with_its_quote():
    for i in range(3):
        tokens = pair_tokens(i)
        probs, mass = served_reading(listed(tokens), "pairwise", "depth")
        want, want_mass = reference(tokens[-1][1], WINNERS)
        assert probs == pytest.approx(want) and mass == pytest.approx(want_mass)
    # read at the token after the quote when the quote is a token of its own
    tokens = [('{"depth": {"winner": "', {}), ("tie", {"tie": -0.5, "A": -1.5, "t": -2.0, "C": -1.0})]
    probs, mass = served_reading(listed(tokens), "pairwise", "depth")
    p = {w: math.exp(lp) for w, lp in tokens[1][1].items()}
    tie = p["tie"] + p["t"]  # "t" starts only "tie": the first token of a split option
    assert mass == pytest.approx(p["A"] + tie)
    assert probs == pytest.approx([p["A"] / mass, 0, tie / mass])


def test_what_counts_as_an_option():
    names = options("score")
    assert [option_of(v, names) for v in (" 4", "4", ' "4', " 4,", "4}", " 45", " 4a", " ", " N")] == [
        "4", "4", "4", "4", "4", None, None, None, None,
    ]  # fmt: skip
    assert [option_of(v, WINNERS) for v in (' "A', "B", ' "tie"', " t", "ti", "Ab", '"')] == [
        "A", "B", "tie", "tie", "tie", None, None,
    ]  # fmt: skip


def test_a_continued_reply_sends_the_started_reply_per_aspect(tmp_path):
    def tokens_of(i: int):  # the judge adds the score's token after the started reply
        return [(" 4" if i % 2 else " 3", {" 3": math.log(0.5), " 4": math.log(0.3), "\n": math.log(0.1)})]

    aspects = ("helpfulness", "clarity")
    with serving(tokens_of) as fake:
        cfg = score_config(tmp_path, aspects=aspects, continue_reply=True)
        summary = run_judged(cfg, judge_of(fake))
        bodies = list(fake.bodies)
    assert summary["setup"]["judge"] == "openai:judge-m/probabilities-continued"
    assert len(bodies) == N * len(aspects)
    started = sorted({b["messages"][-1]["content"] for b in bodies})
    assert started == ['{"clarity": {"score":', '{"helpfulness": {"score":']
    for b in bodies:
        assert b["messages"][-1]["role"] == "assistant" and b["max_tokens"] == 4
        assert b["continue_final_message"] is True and b["add_generation_prompt"] is False
    for rec in records(tmp_path):
        assert rec["evaluation"]["scores"] == dict.fromkeys(aspects, round((3 * 0.5 + 4 * 0.3) / 0.8, 2))


def test_continue_reply_goes_with_a_served_judge_and_probabilities(tmp_path):
    with pytest.raises(ConfigError, match="--verdict probabilities only"):
        EvaluateConfig(
            mode="score",
            output_dir="x",
            input_file=write(tmp_path / "g.json", answers()),
            continue_reply=True,
        )
    with pytest.raises(ConfigError, match="use --judge openai"):
        run_judged(
            score_config(tmp_path, continue_reply=True), JudgeConfig(kind="local", model=str(tmp_path))
        )
