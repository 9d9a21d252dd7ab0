"""Tests for cut.judge: verdict parsing, the reference judge, the OpenAI-compatible client against a
real HTTP server with scripted faults, the local judge on a tiny model, and the output file."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from cut.data.records import build_examples, load_records
from cut.errors import ConfigError, DataError
from cut.judges.judge import (
    DEFAULT_PROMPT,
    JudgeConfig,
    LocalJudge,
    OpenAIJudge,
    ReferenceJudge,
    Verdict,
    build_parser,
    judge_file,
    judged_record,
    load_prompt,
    main,
    make_judge,
    parse_verdict,
    render_prompt,
)
from cut.llm.client import read_cache

from conftest import REPO
from fake_openai import FakeOpenAI

KEY_ENV = "CUT_JUDGE_TEST_KEY"
KEY = "sk-test-7f3a9c1e5b2d4680aa11"


# --------------------------------------------------------------------------------------------
# a chat-completions server with a fault plan per task
# --------------------------------------------------------------------------------------------


def task_of(body: dict) -> str:
    return re.search(r"task-\d+", body["messages"][0]["content"]).group(0)


def fake_chat(plan=None, answers=None, delay: float = 0.0) -> FakeOpenAI:
    """The fake server, a script per prompt's 'task-N': faults for its first attempts, then it
    answers answers[task] (default "Perfect."); a slow answer comes after 0.8 s."""
    return FakeOpenAI(plan, answers, default="Perfect.", key=task_of, delay=delay, slow=0.8)


RATE_LIMITED = (429, {"Retry-After": "0.05"})


@pytest.fixture()
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def task_records(n: int) -> list[dict]:
    return [
        {
            "id": f"r{i}",
            "instruction": f"task-{i}: what is {i} + 2?",
            "input": "",
            "output": f"It is {i + 2}.",
        }
        for i in range(n)
    ]


def write_records(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


# --------------------------------------------------------------------------------------------
# verdicts and the prompt
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, kind, judgment",
    [
        ("Perfect.", "positive", None),
        ("perfect", "positive", None),
        ("  Perfect!\n", "positive", None),
        ("Mistakes: 2+2 is 4, not 5.", "negative", "2+2 is 4, not 5."),
        (
            "MISTAKES:\n  'Lyon' is wrong; the capital is Paris. ",
            "negative",
            "'Lyon' is wrong; the capital is Paris.",
        ),
        ("mistakes:   ", "failed", None),
        ("Mistakes: none.", "failed", None),
        ("The answer looks fine", "failed", None),
        ("", "failed", None),
    ],
)
def test_parse_verdict(text, kind, judgment):
    verdict = parse_verdict(text)
    assert (verdict.kind, verdict.judgment) == (kind, judgment)
    if kind == "failed":
        assert verdict.error.startswith("unparseable verdict: ")
    else:
        assert verdict.error is None


def test_parse_verdict_failure_quotes_first_60_chars():
    text = "The answer looks fine to me, although I would have phrased it differently in the end."
    assert parse_verdict(text).error == "unparseable verdict: " + text[:60]


def test_default_prompt_is_the_packaged_file_and_renders_fields(tmp_path):
    assert load_prompt(str(REPO / "cut" / "resources" / "judge_prompt.txt")) == DEFAULT_PROMPT
    assert DEFAULT_PROMPT.startswith("You are checking") and "{response}" in DEFAULT_PROMPT
    record = {"instruction": "Add the numbers.", "input": "3 and 4", "output": "The sum is 8."}
    text = render_prompt(DEFAULT_PROMPT, record)
    assert "Add the numbers." in text and "3 and 4" in text and "The sum is 8." in text
    assert "(none)" in render_prompt(DEFAULT_PROMPT, {**record, "input": ""})
    bad = tmp_path / "bad.txt"
    bad.write_text("Judge {instruction} / {response} with {rubric}")
    with pytest.raises(ValueError, match="rubric"):
        load_prompt(str(bad))
    bad.write_text("Judge {instruction} and {input}")
    with pytest.raises(ValueError, match="response"):
        load_prompt(str(bad))


# --------------------------------------------------------------------------------------------
# reference judge
# --------------------------------------------------------------------------------------------


def test_reference_judge():
    rows = [
        {"instruction": "What is 9 + 9?", "output": "9 + 9 = 18, so the answer is 18.", "reference": "18"},
        {"instruction": "What is 9 + 9?", "output": "The answer is 17.", "reference": "18"},
        {"instruction": "What is 9 + 9?", "output": "I am not sure.", "reference": 18},
        {"instruction": "What is 9 + 9?", "output": "18"},
    ]
    seen = []
    verdicts = ReferenceJudge().judge(rows, seen.append)
    assert verdicts == [
        Verdict("positive", None, None),
        Verdict("negative", "The final answer 17 is wrong; the correct answer is 18.", None, ((14, 16),)),
        Verdict("negative", "The response does not state a final answer; the correct answer is 18.", None),
        Verdict("failed", None, "no reference answer"),
    ]
    assert sum(seen) == len(rows)
    assert rows[1]["output"][14:16] == "17"


def test_judged_records_carry_spans_that_cut_records_reads(tmp_path):
    """The reference judge marks the wrong number; an LLM judgment's verbatim quotes become spans."""
    rows = [
        {
            "instruction": "What is 9 + 9?",
            "output": "9 + 9 is 17, so 17.",
            "reference": "18",
            "spans": [[0, 1]],
        },
        {"instruction": "Say hi.", "output": "Hello, World!", "spans": [[0, 1]]},
    ]
    wrong = judged_record(rows[0], ReferenceJudge().judge(rows[:1])[0], "reference")
    assert wrong["spans"] == [[16, 18]]  # the final answer, not the earlier 17; the stale span is gone
    quoted = judged_record(
        rows[1], parse_verdict("Mistakes: 'Hello, World!' uses a comma; write 'Hello World!'"), "x"
    )
    assert quoted["spans"] == [[0, 13]]
    unquoted = judged_record(rows[1], parse_verdict("Mistakes: it uses a comma."), "x")
    assert "spans" not in unquoted
    path = tmp_path / "judged.json"
    path.write_text(json.dumps([wrong, quoted, unquoted]))
    assert [r.spans for r in load_records(str(path))] == [((16, 18),), ((0, 13),), ()]


# --------------------------------------------------------------------------------------------
# OpenAI-compatible client against a real server
# --------------------------------------------------------------------------------------------

FAULT_PLAN = {
    "task-1": [RATE_LIMITED, "500", "503"],
    "task-2": ["slow"],
    "task-3": ["notjson", "nochoices"],
    "task-4": ["500"] * 4,  # every attempt of the first run fails
    "task-5": ["400"],
    "task-6": ["401"],
    "task-8": ["slow"] * 4,
    "task-9": ["notjson"] * 4,
}
ANSWERS = {"task-1": "Mistakes: 1 + 2 is 3, not 4.", "task-7": "The answer looks fine"}


def test_openai_judge_faults_retries_key_and_cache(tmp_path, monkeypatch, caplog, capsys, no_proxy):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, KEY)
    fake = fake_chat(FAULT_PLAN, ANSWERS)
    src = write_records(tmp_path / "gen.json", task_records(10))
    out, cache = tmp_path / "judged.json", tmp_path / "judged.cache.jsonl"

    def run() -> dict:
        judge = OpenAIJudge(
            fake.base_url,
            "judge-model",
            api_key_env=KEY_ENV,
            concurrency=4,
            timeout=0.3,
            max_retries=3,
            backoff=0.01,
            cache_file=str(cache),
        )
        return judge_file(src, str(out), judge)

    try:
        counts = run()
        first_hits = Counter(fake.hits)
        rows = json.loads(out.read_text())
        # retries got through transient faults; the rest failed with a reason and no judgment
        assert [r["id"] for r in rows] == [f"r{i}" for i in range(10)]
        by_task = {r["instruction"].split(":")[0]: r for r in rows}
        assert by_task["task-1"]["judgment"] == "1 + 2 is 3, not 4."
        for ok in ("task-0", "task-1", "task-2", "task-3"):
            assert "judge_error" not in by_task[ok]
        assert first_hits["task-1"] == 4 and first_hits["task-2"] == 2 and first_hits["task-3"] == 3
        errors = {t: r.get("judge_error") for t, r in by_task.items() if r.get("judge_error")}
        assert errors == {
            "task-4": "http 500 after 3 retries",
            "task-5": "http 400",
            "task-6": "http 401",
            "task-7": "unparseable verdict: The answer looks fine",
            "task-8": "timeout after 3 retries",
            "task-9": "malformed response body after 3 retries",
        }
        assert all(by_task[t]["judgment"] is None for t in errors)
        assert first_hits["task-5"] == 1 and first_hits["task-6"] == 1, "a 4xx was retried"
        assert first_hits["task-4"] == 4 and first_hits["task-9"] == 4
        assert counts["positive"] == 3 and counts["negative"] == 1 and counts["failed"] == 6
        assert (
            counts["failed_reasons"]["http 400"] == 1 and counts["failed_reasons"]["unparseable verdict"] == 1
        )
        body = fake.bodies[0]
        assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 512
        assert set(fake.auth) == {f"Bearer {KEY}"}
        cached = [json.loads(line) for line in cache.read_text().splitlines()]
        assert len(cached) == 4 and all(isinstance(c["content"], str) for c in cached), (
            "an HTTP failure or an unreadable verdict was cached"
        )

        # a rerun asks again for every failure, an unreadable verdict included: it is not an answer
        counts = run()
        new = fake.hits - first_hits
        assert set(new) == {"task-4", "task-5", "task-6", "task-7", "task-8", "task-9"}
        assert all(n == 1 for n in new.values())
        assert counts["failed_reasons"] == {"unparseable verdict": 1}
        assert counts["positive"] == 8
    finally:
        fake.close()

    captured = capsys.readouterr()
    for text in (caplog.text, captured.out, captured.err, out.read_text(), cache.read_text()):
        assert KEY not in text
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_concurrency_is_bounded_and_no_key_means_no_header(tmp_path, monkeypatch, caplog, no_proxy):
    caplog.set_level(logging.INFO)
    monkeypatch.delenv(KEY_ENV, raising=False)
    fake = fake_chat(delay=0.05)
    rows = task_records(18) + task_records(2)  # the last two repeat prompts: asked once each
    try:
        judge = OpenAIJudge(fake.base_url, "m", api_key_env=KEY_ENV, concurrency=3, timeout=5, backoff=0.01)
        verdicts = judge.judge(rows)
    finally:
        fake.close()
    assert [v.kind for v in verdicts] == ["positive"] * 20
    assert 2 <= fake.max_inflight <= 3
    assert sum(fake.hits.values()) == 18
    assert set(fake.auth) == {None}
    assert f"{KEY_ENV} is not set" in caplog.text


def test_retry_after_overrides_backoff(no_proxy):
    fake = fake_chat({"task-0": [RATE_LIMITED, RATE_LIMITED]})
    try:
        judge = OpenAIJudge(fake.base_url, "m", concurrency=1, timeout=5, backoff=3.0)
        start = time.monotonic()
        verdicts = judge.judge(task_records(1))
    finally:
        fake.close()
    assert verdicts[0].kind == "positive" and fake.hits["task-0"] == 3
    # backoff would wait >= 1.5 s, openai's own schedule >= 1.1 s
    assert time.monotonic() - start < 1.0, "Retry-After: 0.05 was not honoured"


def test_stop_event_ends_retries_at_once(no_proxy):
    fake = fake_chat({"task-0": ["500"] * 9})
    try:
        judge = OpenAIJudge(fake.base_url, "m", timeout=5, backoff=30.0)
        stop = threading.Event()
        stop.set()  # as judge() does on ctrl-c
        prompt = render_prompt(judge.prompt, task_records(1)[0])
        assert judge.client.ask(prompt, stop) == (None, "interrupted")
    finally:
        fake.close()
    assert fake.hits["task-0"] == 1


def test_connection_refused_is_retried_then_fails(no_proxy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", timeout=1, max_retries=1, backoff=0.01)
    assert judge.judge(task_records(1)) == [Verdict("failed", None, "connection error after 1 retries")]


def test_torn_cache_line_is_skipped_and_not_glued_to_the_next(tmp_path, no_proxy):
    fake = fake_chat(answers={"task-1": "Mistakes: 1 + 2 is 3."})
    cache = tmp_path / "c.jsonl"
    try:
        judge = OpenAIJudge(fake.base_url, "m", timeout=5, backoff=0.01, cache_file=str(cache))
        rows = task_records(2)
        key0 = judge.cache_key(render_prompt(judge.prompt, rows[0]))
        cache.write_text(json.dumps({"key": key0, "content": "Perfect."}) + "\n" + '{"key": "ab')
        verdicts = judge.judge(rows)
    finally:
        fake.close()
    assert [v.kind for v in verdicts] == ["positive", "negative"]
    assert fake.hits == {"task-1": 1}
    assert len(read_cache(str(cache))) == 2


# --------------------------------------------------------------------------------------------
# local judge
# --------------------------------------------------------------------------------------------


def test_local_judge_on_tiny_model_gives_verdicts_or_failures(tiny_model):
    judge = LocalJudge(str(tiny_model), batch_size=2, max_new_tokens=6, device="cpu")  # fp32: exact compare
    assert not judge.chat
    rows = task_records(3)
    rows[0]["input"] = "Show every step of the working and state the final answer."  # unequal lengths
    verdicts = judge.judge(rows)
    # left padding changes nothing: a batch decodes as each prompt alone
    texts = [judge.text(r) for r in rows]
    assert judge.generate(texts) == [judge.generate([t])[0] for t in texts]
    assert len(verdicts) == 3
    for v in verdicts:
        assert v.kind in ("positive", "negative", "failed")
        if v.kind == "failed":
            assert v.judgment is None and v.error.startswith("unparseable verdict: ")
        elif v.kind == "negative":
            assert v.judgment and v.error is None


def test_local_judge_decodes_only_new_tokens_in_record_order(tiny_chat_model, monkeypatch):
    """Generation is scripted per prompt: answers must come back to their own records."""

    judge = LocalJudge(str(tiny_chat_model), batch_size=2, max_new_tokens=32)
    tok = judge.tokenizer
    answers = {0: "Perfect.", 1: "Mistakes: 1 + 2 is 3.", 2: "no idea", 3: "Mistakes: 3 + 2 is 5, not 6."}
    rows = task_records(4)
    rows[1]["instruction"] += " Explain your reasoning at length, step by step."  # unequal lengths

    def decode(model, input_ids, mask, gen_config, eos, stop=None):
        # cut.generate's decoder: left-padded prompts in, the new tokens of each row out
        assert mask[:, -1].all(), "prompts are not left padded"
        out = []
        for ids in input_ids:
            text = tok.decode(ids, skip_special_tokens=False)
            assert text.rstrip().endswith("assistant"), "no chat template"
            out.append(
                tok.encode(answers[int(re.search(r"task-(\d+)", text).group(1))], add_special_tokens=False)
            )
        return out

    import cut.modeling.generate as gen

    monkeypatch.setattr(gen, "compacting_decode", decode)
    verdicts = judge.judge(rows)
    assert [v.kind for v in verdicts] == ["positive", "negative", "failed", "negative"]
    assert verdicts[1].judgment == "1 + 2 is 3." and verdicts[3].judgment == "3 + 2 is 5, not 6."
    assert verdicts[2] == Verdict("failed", None, "unparseable verdict: no idea")


# --------------------------------------------------------------------------------------------
# judge_file and the command line
# --------------------------------------------------------------------------------------------


def reference_rows() -> list[dict]:
    return [
        {
            "id": "a",
            "instruction": "What is 2 + 3?",
            "output": "It is 5.",
            "reference": "5",
            "generator": "g",
        },
        {"id": "b", "instruction": "What is 2 + 3?", "input": "", "output": "It is 6.", "reference": "5"},
        {"id": "c", "instruction": "What is 2 + 3?", "output": "Five.", "score": 9},  # no reference
        {"id": "d", "instruction": "What is 2 + 3?", "output": "  ", "reference": "5"},  # empty response
    ]


def test_judge_file_output_loads_and_failures_count_as_failed_judgment(tmp_path):
    src = write_records(tmp_path / "gen.json", reference_rows())
    out = tmp_path / "judged.json"
    counts = judge_file(src, str(out), ReferenceJudge())
    assert counts == {
        "records": 4,
        "positive": 1,
        "negative": 1,
        "failed": 2,
        "failed_reasons": {"no reference answer": 1, "empty response": 1},
    }
    rows = json.loads(out.read_text())
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["generator"] == "g" and rows[0]["judge"] == "reference" and rows[0]["judgment"] is None
    assert rows[2]["judge_error"] == "no reference answer" and rows[2]["judgment"] is None
    assert "score" not in rows[2], "a stale score would turn the failure into a positive"
    examples, stats = build_examples(load_records(str(out)))
    assert stats["failed_judgment"] == 1 and stats["positive"] == 1 and stats["negative"] == 1
    assert [e.judgment for e in examples] == [None, "The final answer 6 is wrong; the correct answer is 5."]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.json", "judged.json"]


def test_judge_file_crash_leaves_no_output_or_temp_file(tmp_path):
    class Broken:
        name = "broken"

        def judge(self, records, progress=None):
            return [Verdict("positive", None, None)]  # one verdict short

    src = write_records(tmp_path / "gen.json", reference_rows())
    with pytest.raises(ValueError):
        judge_file(src, str(tmp_path / "judged.json"), Broken())
    assert [p.name for p in tmp_path.iterdir()] == ["gen.json"]


def test_bad_input_names_file_record_and_field(tmp_path):
    rows = reference_rows()
    rows[1]["instruction"] = ""
    src = write_records(tmp_path / "gen.json", rows)
    with pytest.raises(DataError, match=r"gen\.json: record 1, field 'instruction': empty"):
        judge_file(src, str(tmp_path / "judged.json"), ReferenceJudge())
    rows[1] = {"instruction": "x", "output": 3}
    src = write_records(tmp_path / "gen.json", rows)
    with pytest.raises(DataError, match=r"record 1, field 'output': expected a string"):
        judge_file(src, str(tmp_path / "judged.json"), ReferenceJudge())


def test_cli_reference_run_and_exit_2_on_bad_input(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    src = tmp_path / "gen.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in reference_rows()) + "\n")
    out = tmp_path / "judged.json"
    assert main(["--input_file", str(src), "--output_file", str(out), "--judge", "reference"]) == 0
    assert "1 positive, 1 negative, 2 failed (no reference answer: 1, empty response: 1)" in caplog.text
    assert len(load_records(str(out))) == 3

    src.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"\n')
    assert main(["--input_file", str(src), "--output_file", str(out), "--judge", "reference"]) == 2
    assert "gen.jsonl: line 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--input_file", str(src), "--output_file", str(out), "--judge", "openai", "--model", "m"])
    assert exc.value.code == 2 and "base_url" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# JudgeConfig and make_judge
# --------------------------------------------------------------------------------------------


def test_judge_config_fields_are_the_cli_options():
    dests = {a.dest for a in build_parser()._actions} - {
        "help",
        "config",
        "input_file",
        "output_file",
        "judge",
    }
    assert {f.name for f in dataclasses.fields(JudgeConfig)} == dests | {"kind"}
    args = build_parser().parse_args(
        ["--input_file", "i", "--output_file", "o.json", "--judge", "openai", "--base_url", "http://h/v1"]
        + ["--model", "m", "--concurrency", "3", "--cache_file", ""]
    )
    cfg = JudgeConfig.from_args(args)
    assert (cfg.kind, cfg.concurrency, cfg.cache_file, cfg.max_new_tokens) == ("openai", 3, "", 256)
    client = cfg.client_config("c.jsonl")
    assert (client.base_url, client.model, client.concurrency, client.cache_file) == (
        "http://h/v1",
        "m",
        3,
        "c.jsonl",
    )
    assert client.temperature == 0.0


@pytest.mark.parametrize(
    "options, match",
    [
        ({"kind": "gpt"}, "kind must be one of openai, local, reference"),
        ({"kind": "openai", "model": "m"}, "needs base_url and model"),
        ({"kind": "local"}, "needs model"),
        ({"kind": "openai", "base_url": "localhost:8000/v1", "model": "m"}, "base_url must start with http"),
        ({"concurrency": 0}, "concurrency must be an integer >= 1, got 0"),
        ({"timeout": float("inf")}, "timeout must be a finite number > 0"),
        ({"max_retries": -1, "backoff": -0.5}, "max_retries must be .*; backoff must be"),
        ({"batch_size": "8"}, "batch_size must be an integer >= 1, got '8'"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
        ({"api_key_env": ""}, "api_key_env must be a non-empty string"),
        ({"prompt_file": 3}, "prompt_file must be a string"),
    ],
)
def test_judge_config_rejects_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        JudgeConfig(**options)


def test_judge_config_from_dict_names_source_and_unknown_keys():
    cfg = JudgeConfig.from_dict(
        {"kind": "openai", "base_url": "https://api.example/v1", "model": "m"}, "x.yaml"
    )
    assert cfg == JudgeConfig(kind="openai", base_url="https://api.example/v1", model="m")
    assert JudgeConfig.from_dict({}) == JudgeConfig()  # the reference judge
    with pytest.raises(
        ConfigError, match=r"^x\.yaml: judge: unknown key\(s\) kinds, temprature; known: kind, "
    ):
        JudgeConfig.from_dict({"kinds": "openai", "temprature": 0}, "x.yaml: judge")
    with pytest.raises(ConfigError, match=r"^x\.yaml: judge openai needs base_url and model$"):
        JudgeConfig.from_dict({"kind": "openai"}, "x.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        JudgeConfig.from_dict(["openai"], "x.yaml")


def test_make_judge_kinds_and_cache_file(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert isinstance(make_judge(JudgeConfig()), ReferenceJudge)
    prompt = tmp_path / "p.txt"
    prompt.write_text("Judge {instruction} / {input} / {response}")
    base = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "prompt_file": str(prompt)}
    judge = make_judge(JudgeConfig(**base, concurrency=2), "default.jsonl")
    assert isinstance(judge, OpenAIJudge) and judge.name == "openai:m"
    assert judge.prompt == prompt.read_text()
    assert judge.client.config.cache_file == "default.jsonl" and judge.client.config.concurrency == 2
    assert make_judge(JudgeConfig(**base, cache_file=""), "default.jsonl").client.config.cache_file is None
    assert (
        make_judge(JudgeConfig(**base, cache_file="c.jsonl"), "default.jsonl").client.config.cache_file
        == "c.jsonl"
    )
    with pytest.raises(ValueError, match="cannot read the judge prompt"):
        make_judge(JudgeConfig(**{**base, "prompt_file": str(tmp_path / "none.txt")}))
