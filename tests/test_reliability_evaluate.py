"""Issue 23, the evaluation's part: `cut evaluate` and `cut judge` refuse bad options at parse time
(one line naming the option, exit 2, nothing written, no model loaded, no request sent), never write
an output over an input, escape record text in their Markdown, read any judge reply in linear time,
retry on a rerun what failed (cached failures are not answers), refuse a local judge prompt longer
than the judge's context, and name the file and field of a malformed summary.json."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

import cut.evaluation.evaluate as evaluate
import cut.judges.judge as judge
from cut.errors import ConfigError, DataError
from cut.evaluation.aspects import PAIRWISE_ASPECTS, SCORE_ASPECTS, ParseError, extract_json, parse_scores
from cut.evaluation.evaluate import EvaluateConfig, run_judged
from cut.evaluation.report import esc
from cut.judges.judge import JudgeConfig, OpenAIJudge, judge_file
from cut.llm.completer import NUMBER_RULES, LocalCompleter

from fake_openai import FakeOpenAI
from helpers import cli_args, task_key, write

ASPECTS = SCORE_ASPECTS
GOOD = {a: {"reason": f"why {a}", "score": 4} for a in ASPECTS}


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def answers(n: int, **extra) -> list[dict]:
    return [
        {"instruction": f"task-{i}: explain item {i}", "output": f"Answer {i}.", **extra} for i in range(n)
    ]


def good_reply(body: dict) -> str:
    return json.dumps(GOOD)


def judge_server(default=good_reply) -> FakeOpenAI:
    return FakeOpenAI(default=default, key=task_key)


def judge_cfg(fake: FakeOpenAI, **kw) -> JudgeConfig:
    options = {"model": "judge-m", "max_retries": 0, "backoff": 0.01, "timeout": 5.0, "concurrency": 2, **kw}
    return JudgeConfig(kind="openai", base_url=fake.base_url, **options)


def one_line(err: str, option: str) -> None:
    err = err.strip()
    assert "\n" not in err, err
    assert option in err and "Traceback" not in err, err


def no_model(monkeypatch) -> None:
    """Any model load, or any judge made, fails the test."""
    import cut.modeling.loading

    def fail(*a, **k):
        pytest.fail("a model was loaded or a judge made")

    monkeypatch.setattr(cut.modeling.loading, "load_model", fail)
    monkeypatch.setattr(cut.modeling.loading, "load_tokenizer", fail)
    monkeypatch.setattr(judge, "make_judge", fail)
    monkeypatch.setattr(evaluate, "make_completer", fail)


# --------------------------------------------------------------------------------------------
# every numeric option of both parsers: the same bad-value table (issue cases 13 and the table)
# --------------------------------------------------------------------------------------------

BAD = ["nan", "inf", "-1", "abc", "99999999999999999999"]
# option -> whether 0 is a bad value for it too; the judge's: every number of cut.llm's backend options
JUDGE_NUMBERS = {name: rule in ("int>=1", ">0") for name, rule in NUMBER_RULES.items()}
EVALUATE_NUMBERS = {
    "parse_retries": False,
    "seed": False,
    "resamples": True,
    "limit": True,
    "min_score": True,
    "positive_score": True,
    **JUDGE_NUMBERS,
    "na_score": True,  # a number in [1, 5], or skip / fail
}


def table(options: dict[str, bool]) -> list[tuple[str, str]]:
    return [(o, v) for o, zero in options.items() for v in BAD + (["0"] if zero else [])]


@pytest.fixture(scope="module")
def fake():
    with judge_server() as server:
        yield server


NUMBER_CASES = [("evaluate", *case) for case in table(EVALUATE_NUMBERS)]
NUMBER_CASES += [("judge", *case) for case in table(JUDGE_NUMBERS)]


@pytest.mark.parametrize("tool, option, value", NUMBER_CASES, ids=lambda x: str(x))
def test_a_bad_number_is_refused_at_parse_time(tool, option, value, fake, tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    inp = write(tmp_path / "gen.json", answers(2))
    out = tmp_path / "out"
    if tool == "evaluate":
        main, argv = evaluate.main, ["--mode", "score", "--input_file", inp, "--output_dir", str(out)]
    else:
        main, argv = judge.main, ["--input_file", inp, "--output_file", str(out / "judged.json")]
    argv += ["--judge", "openai", "--base_url", fake.base_url, "--model", "m", f"--{option}", value]
    before = sum(fake.hits.values())
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    one_line(capsys.readouterr().err, f"--{option}")
    assert not out.exists() and sum(fake.hits.values()) == before, "written or asked"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.json"]


def test_edge_values_still_parse():
    ok = ["--parse_retries", "0", "--seed", "0", "--max_retries", "0", "--backoff", "0"]
    ok += ["--min_score", "1", "--positive_score", "5", "--seed", str(2**32 - 1), "--limit", "1"]
    args = evaluate.EvaluateOptions.build_parser("cut.evaluate").parse_args(
        ["--mode", "score", "--output_dir", "o", *ok]
    )
    assert (args.seed, args.parse_retries, args.backoff, args.min_score) == (2**32 - 1, 0, 0.0, 1.0)
    args = judge.build_parser().parse_args(
        ["--input_file", "i", "--output_file", "o.json", "--judge", "reference", "--max_retries", "0"]
    )
    assert args.max_retries == 0 and args.timeout == 60.0  # the defaults are kept


def test_seed_minus_one_is_refused_before_any_request(fake, tmp_path, capsys, monkeypatch):
    """Case 13: --seed -1 made 6 judge requests, then failed without naming the option."""
    no_model(monkeypatch)
    inp = write(tmp_path / "gen.json", answers(3))
    before = sum(fake.hits.values())
    for mode in (["--mode", "score", "--input_file", inp], ["--mode", "compare", "--runs", "a", "b"]):
        argv = [*mode, "--output_dir", str(tmp_path / "o"), "--seed", "-1"]
        argv += ["--judge", "openai", "--base_url", fake.base_url, "--model", "m"]
        with pytest.raises(SystemExit) as exc:
            evaluate.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        one_line(err, "--seed")
        assert "must be in [0, 4294967295], got '-1'" in err
    assert sum(fake.hits.values()) == before and not (tmp_path / "o").exists()
    # the library path too: the config refuses it before anything is asked
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 4294967295\], got -1"):
        EvaluateConfig(mode="score", output_dir=str(tmp_path / "o"), input_file=inp, seed=-1)


# --------------------------------------------------------------------------------------------
# case 1: an output is never an input of the same run
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, target",
    [
        ("--to_judgments", "input"),
        ("--to_judgments", "link"),
        ("--to_judgments", "summary"),
        ("--cache_file", "input"),
        ("--to_judgments", "prompt"),
    ],
)
def test_an_output_naming_an_input_is_refused_before_any_work(
    flag, target, fake, tmp_path, capsys, monkeypatch
):
    inp = tmp_path / "gen.json"
    write(inp, answers(3))
    original = inp.read_bytes()
    prompt = tmp_path / "prompt.json"
    prompt.write_text("Task {instruction} / {input} / answer {response}; reply in JSON.")
    (tmp_path / "link.json").symlink_to(inp)
    out = tmp_path / "run"
    paths = {
        "input": inp,
        "link": tmp_path / "link.json",
        "summary": out / "summary.json",
        "prompt": prompt,
    }
    argv = ["--mode", "score", "--input_file", str(inp), "--output_dir", str(out)]
    argv += ["--prompt_file", str(prompt), "--judge", "openai", "--base_url", fake.base_url, "--model", "m"]
    argv += [flag, str(paths[target])]
    before = sum(fake.hits.values())
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    one_line(err, flag)
    assert "outputs are never inputs" in err
    assert inp.read_bytes() == original and prompt.read_text().startswith("Task")
    assert not out.exists() and sum(fake.hits.values()) == before


def test_judge_output_or_cache_naming_its_input_is_refused(tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    inp = tmp_path / "gen.json"
    write(inp, [{**r, "reference": "1"} for r in answers(2)])
    original = inp.read_bytes()
    base = ["--input_file", str(inp), "--judge", "reference"]
    assert judge.main([*base, "--output_file", str(inp)]) == 2
    one_line(capsys.readouterr().err, "--output_file")
    argv = ["--input_file", str(inp), "--output_file", str(tmp_path / "j.json"), "--judge", "openai"]
    argv += ["--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--cache_file", str(inp)]
    assert judge.main(argv) == 2
    one_line(capsys.readouterr().err, "--cache_file")
    assert inp.read_bytes() == original and not (tmp_path / "j.json").exists()
    with pytest.raises(ConfigError, match="outputs are never inputs"):
        judge_file(str(inp), str(inp), judge.ReferenceJudge())


# --------------------------------------------------------------------------------------------
# case 6: record text in the Markdown reports is escaped
# --------------------------------------------------------------------------------------------

NASTY = ["a|b", "<b>bold</b>", "x & y", "two\nlines", "[link](javascript:alert(1))"]


def table_widths(md: str) -> list[set[int]]:
    """Per table, the set of cell counts of its rows (a bare | splits a cell)."""
    tables, current = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            current = current if current is not None else set()
            current.add(len(re.findall(r"(?<!\\)\|", line)))
        elif current is not None:
            tables.append(current)
            current = None
    if current is not None:
        tables.append(current)
    return tables


def test_esc_neutralises_markdown_and_html():
    assert esc("a|b") == "a&#124;b"
    assert esc("<b>x</b> & y") == "&lt;b&gt;x&lt;/b&gt; &amp; y"
    assert esc("one\r\ntwo\nthree") == "one<br>two<br>three"
    assert esc("[x](y) *e* _u_ `c`") == "\\[x\\](y) \\*e\\* \\_u\\_ \\`c\\`"
    assert esc(3) == "3"


def test_score_and_compare_reports_escape_record_text(tmp_path):
    rows = [{**r, "task": NASTY[i % len(NASTY)]} for i, r in enumerate(answers(10))]
    inp = write(tmp_path / "gen.json", rows)
    with judge_server() as fake:
        for name in ("r1", "r2"):
            cfg = EvaluateConfig(
                mode="score",
                output_dir=str(tmp_path / name),
                input_file=inp,
                resamples=200,
                group_by=("task",),
            )
            run_judged(cfg, judge_cfg(fake, model="judge<i>|m"))
    md = (tmp_path / "r1" / "report.md").read_text()
    assert "## By task" in md
    for bad in ("<b>", "<i>", "[link](", "two\nlines", "a|b"):
        assert bad not in md, bad
    assert "&lt;b&gt;bold&lt;/b&gt;" in md and "a&#124;b" in md and "two<br>lines" in md
    assert "\\[link\\](javascript" in md  # shown as text, not a link
    assert all(len(widths) == 1 for widths in table_widths(md)), table_widths(md)
    evaluate.main(
        ["--mode", "compare", "--runs", str(tmp_path / "r1"), str(tmp_path / "r2")]
        + ["--output_dir", str(tmp_path / "cmp"), "--labels", "<script>x</script>,a|b"]
    )
    cmp = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "<script>" not in cmp and "&lt;script&gt;" in cmp and "a&#124;b" in cmp
    assert all(len(widths) == 1 for widths in table_widths(cmp)), table_widths(cmp)


def test_pairwise_report_escapes_generators_and_groups(tmp_path):
    a = write(tmp_path / "a.json", [{**r, "generator": "<b>A</b>", "task": "x|y"} for r in answers(4)])
    b = write(tmp_path / "b.json", [{**r, "generator": "B&co"} for r in answers(4)])
    reply = json.dumps({x: {"reason": "r", "winner": "A"} for x in PAIRWISE_ASPECTS})
    with judge_server(default=lambda body: reply) as fake:
        cfg = EvaluateConfig(
            mode="pairwise", output_dir=str(tmp_path / "pw"), output_a=a, output_b=b, group_by=("task",)
        )
        run_judged(cfg, judge_cfg(fake))
    md = (tmp_path / "pw" / "report.md").read_text()
    assert "<b>" not in md and "&lt;b&gt;A&lt;/b&gt;" in md and "B&amp;co" in md and "x&#124;y" in md
    assert all(len(widths) == 1 for widths in table_widths(md))


# --------------------------------------------------------------------------------------------
# case 7: reading a judge reply is linear in its length
# --------------------------------------------------------------------------------------------

ADVERSARIAL = {
    "open_lists": "[" * 10_000,
    "open_objects": '{"a":' * 3000,
    "closed_around_junk": "[" * 5000 + "x" + "]" * 5000,
    "mixed_open": '[{"a": [' * 1500 + "x",
    "nested_names": ("[1," * 15 + "x" + "]" * 15 + ",") * 700,
    "quotes": '{"\\"' * 4000,
    "apostrophes": "{'" * 8000,
    "alternating": "[]{" * 5000,
    "python_junk": "{'a': [" * 1500 + "True, x" + "]}" * 1500,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_nested_bracket_replies_are_read_in_linear_time(name):
    """Before: 4,000 characters took 22 s, 8,000 took 118 s. CPU seconds, not wall time: the test
    machine may be shared (each takes well under 0.2 s alone)."""
    text = ADVERSARIAL[name]
    assert len(text) >= 10_000
    start = time.process_time()
    with pytest.raises(ParseError):
        parse_scores(text, ASPECTS)
    assert time.process_time() - start < 2.0


def test_a_good_object_after_adversarial_brackets_is_still_found():
    for prefix in ("[" * 5000, '{"a":' * 2000, "the students' [" * 500):
        start = time.process_time()
        assert extract_json(prefix + " " + json.dumps(GOOD)) == GOOD
        assert time.process_time() - start < 2.0
    # the shapes read before are still read
    assert extract_json("{'a': true, 'b': null, 'c': -1, 'd': (1, 2),}") == {
        "a": True,
        "b": None,
        "c": -1,
        "d": (1, 2),
    }
    assert extract_json('I can\'t say [1]; {"a": 1}') == {"a": 1}


def test_an_evaluation_with_adversarial_replies_finishes_quickly(tmp_path):
    """The issue's run: a 10 KB reply of brackets for 3 records took 9.5 minutes."""
    inp = write(tmp_path / "gen.json", answers(3))
    reply = {"text": json.dumps(GOOD)}
    with judge_server(default=lambda body: reply["text"]) as fake:

        def run(name: str) -> dict:
            cfg = EvaluateConfig(
                mode="score", output_dir=str(tmp_path / name), input_file=inp, parse_retries=1
            )
            return run_judged(cfg, judge_cfg(fake))

        run("warm")  # imports (openai, matplotlib) out of the measurement
        reply["text"] = "[" * 5000 + '{"a":' * 1000
        start = time.process_time()  # CPU seconds of every thread here, the fake server's included
        summary = run("adversarial")
        used = time.process_time() - start
    assert summary["n_failed"] == 3 and summary["failed_reasons"] == {"unparseable": 3}
    assert used < 5.0, used


# --------------------------------------------------------------------------------------------
# case 8: a rerun retries what failed; a cached failure is not an answer
# --------------------------------------------------------------------------------------------


class Switch:
    """A reply function whose answer is changed between runs (the endpoint gets fixed)."""

    def __init__(self, reply):
        self.reply = reply

    def __call__(self, body: dict) -> str:
        return self.reply(body)


def test_evaluate_rerun_asks_again_after_unreadable_replies(tmp_path):
    inp = write(tmp_path / "gen.json", answers(4))
    switch = Switch(lambda body: "I would say it is fine, four out of five.")
    cfg = EvaluateConfig(mode="score", output_dir=str(tmp_path / "r"), input_file=inp, parse_retries=1)
    with judge_server(default=switch) as fake:
        first = run_judged(cfg, judge_cfg(fake))
        assert first["n_failed"] == 4 and first["failed_reasons"] == {"unparseable": 4}
        asked = sum(fake.hits.values())
        assert asked == 8  # each question and its one re-ask
        switch.reply = good_reply  # the endpoint is fixed
        second = run_judged(cfg, judge_cfg(fake))
        assert sum(fake.hits.values()) - asked == 4, "the failed questions were not asked again"
    assert second["n_ok"] == 4 and second["n_failed"] == 0
    cached = [
        json.loads(line)["content"] for line in (tmp_path / "r" / "cache.jsonl").read_text().splitlines()
    ]
    assert cached == [json.dumps(GOOD)] * 4, "an unreadable reply was cached"


def test_evaluate_ignores_unreadable_replies_cached_by_an_earlier_version(tmp_path):
    inp = write(tmp_path / "gen.json", answers(2))
    cfg = EvaluateConfig(mode="score", output_dir=str(tmp_path / "r"), input_file=inp, parse_retries=0)
    with judge_server() as fake:
        client = evaluate.make_asker(judge_cfg(fake), str(tmp_path / "r" / "cache.jsonl")).completer.client
        prompts = [
            [{"role": "user", "content": q}]
            for q in evaluate.score_job(cfg, evaluate.rubric("score"), []).questions
        ]
        (tmp_path / "r").mkdir()
        with (tmp_path / "r" / "cache.jsonl").open("w") as f:
            for p in prompts:
                f.write(json.dumps({"key": client.cache_key(p), "content": "garbage"}) + "\n")
        summary = run_judged(cfg, judge_cfg(fake))
        assert sum(fake.hits.values()) == 2
    assert summary["n_ok"] == 2


def unreadable_then_fixed():
    switch = Switch(lambda body: "The answer looks fine to me.")  # neither Perfect. nor Mistakes:
    return switch, FakeOpenAI(default=switch)


def test_judge_rerun_asks_again_after_every_verdict_failed(tmp_path):
    inp = write(tmp_path / "gen.json", answers(3))
    out, cache = tmp_path / "judged.json", tmp_path / "judged.cache.jsonl"
    switch, fake = unreadable_then_fixed()
    with fake:
        make = lambda: OpenAIJudge(fake.base_url, "m", max_retries=0, cache_file=str(cache))  # noqa: E731
        with pytest.raises(
            DataError, match=r"every judgment failed \(unparseable verdict: 3\); nothing written"
        ):
            judge_file(inp, str(out), make())
        assert not out.exists() and sum(fake.hits.values()) == 3
        switch.reply = lambda body: "Perfect."
        counts = judge_file(inp, str(out), make())
        assert sum(fake.hits.values()) == 6, "the failed verdicts were not asked again"
    assert counts["positive"] == 3 and counts["failed"] == 0
    assert all(r["judgment"] is None and "judge_error" not in r for r in json.loads(out.read_text()))


def test_judge_cli_exits_2_when_every_verdict_failed(tmp_path, capsys):
    inp = write(tmp_path / "gen.json", answers(2))
    out = tmp_path / "judged.json"
    with FakeOpenAI(default=lambda body: "no idea") as fake:
        argv = ["--input_file", inp, "--output_file", str(out), "--judge", "openai"]
        argv += ["--base_url", fake.base_url, "--model", "m", "--max_retries", "0"]
        assert judge.main(argv) == 2
    one_line(capsys.readouterr().err, "every judgment failed")
    assert not out.exists()


def test_online_round_whose_every_judgment_failed_is_judged_again_on_rerun(tmp_path):
    """The loop's trap: the judge stage was marked done with every judgment failed, so "fix it and
    rerun" reused the failures. Now the stage stops, stays undone, and its rerun asks again."""
    from cut.loop.online import Round

    rnd = Round(tmp_path, 1, "model-in", "settings")
    write(rnd.dir / "responses.json", answers(3))
    switch, fake = unreadable_then_fixed()

    def judge_stage():
        j = judge.make_judge(
            JudgeConfig(kind="openai", base_url=fake.base_url, model="m", max_retries=0),
            str(rnd.dir / "judge_cache.jsonl"),
        )
        counts = judge_file(str(rnd.dir / "responses.json"), str(rnd.dir / "judged.json"), j)
        return {
            "counts": {"positive": counts["positive"]},
            "outputs": {"judged": str(rnd.dir / "judged.json")},
        }

    with fake:
        with pytest.raises(DataError, match="every judgment failed"):
            rnd.run("judge", judge_stage)
        assert not rnd.done("judge")
        switch.reply = lambda body: "Mistakes: the answer is too short."
        rnd = Round(tmp_path, 1, "model-in", "settings")  # the rerun
        rnd.run("judge", judge_stage)
        assert sum(fake.hits.values()) == 6
    assert rnd.done("judge") and rnd.manifest["counts"]["positive"] == 0
    rows = json.loads((rnd.dir / "judged.json").read_text())
    assert [r["judgment"] for r in rows] == ["the answer is too short."] * 3


# --------------------------------------------------------------------------------------------
# case 14: compare on a malformed summary.json names the file and the field
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    inp = write(root / "gen.json", answers(4))
    with judge_server() as fake:
        for name in ("r1", "r2"):
            run_judged(
                EvaluateConfig(mode="score", output_dir=str(root / name), input_file=inp, resamples=100),
                judge_cfg(fake),
            )
    return root


@pytest.fixture()
def runs(two_runs, tmp_path) -> Path:
    """A copy of the two scored runs (r1, r2) to break."""
    shutil.copytree(two_runs, tmp_path / "runs")
    return tmp_path / "runs"


def compare_refused(runs: Path, out: Path, capsys, named: Path) -> str:
    """cut.evaluate --mode compare of r1 and r2 exits 2 with one line naming the file `named`."""
    assert evaluate.main(cli_args(mode="compare", runs=[runs / "r1", runs / "r2"], output_dir=out)) == 2
    err = capsys.readouterr().err
    one_line(err, str(named))
    return err


def _set(d: dict, dotted: str, value) -> dict:
    *head, last = dotted.split(".")
    for k in head:
        d = d[k]
    if value is DELETE:
        del d[last]
    else:
        d[last] = value
    return d


DELETE = object()
MALFORMED_SUMMARY = [
    ("setup", "x", "'setup'"),
    ("setup.judge", DELETE, "'setup.judge'"),
    ("setup.mode", "pairwise", "mode 'pairwise'"),
    ("n", "3", "'n'"),
    ("n_failed", -1, "'n_failed'"),
    ("length", DELETE, "'length'"),
    ("length.words", "many", "'length.words'"),
    ("aspects", {}, "'aspects'"),
    ("aspects.depth", 3, "'aspects.depth'"),
    ("aspects.depth.mean", "high", "'aspects.depth.mean'"),
    ("aspects.depth.ci", [1], "'aspects.depth.ci'"),
    ("aspects.depth.n", None, "'aspects.depth.n'"),
    ("input_file", 7, "'input_file'"),
]


@pytest.mark.parametrize(
    "field, value, named", MALFORMED_SUMMARY, ids=[m[0] + "-" + str(m[1])[:8] for m in MALFORMED_SUMMARY]
)
def test_compare_names_the_file_and_field_of_a_malformed_summary(field, value, named, runs, tmp_path, capsys):
    path = runs / "r2" / "summary.json"
    summary = json.loads(path.read_text())
    _set(summary, field, value)
    path.write_text(json.dumps(summary))
    assert named in compare_refused(runs, tmp_path / "c", capsys, path)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "text, named",
    [("[]", "expected a JSON object"), ("{", "not valid JSON"), ("[" * 100_000, "nested too deep")],
)
def test_compare_on_a_summary_that_is_not_an_object(text, named, runs, tmp_path, capsys):
    (runs / "r1" / "summary.json").write_text(text)
    assert named in compare_refused(runs, tmp_path / "c", capsys, runs / "r1" / "summary.json")


def test_compare_names_a_malformed_results_record(runs, tmp_path, capsys):
    path = runs / "r2" / "results.json"
    results = json.loads(path.read_text())
    del results["records"][2]["evaluation"]["scores"]["depth"]
    path.write_text(json.dumps(results))
    assert "'records[2].evaluation.scores.depth'" in compare_refused(runs, tmp_path / "c", capsys, path)


# --------------------------------------------------------------------------------------------
# also: a local judge's prompt longer than its context is refused, never cut from the left
# --------------------------------------------------------------------------------------------


def test_local_judge_refuses_a_prompt_longer_than_its_context(tmp_path, tiny_chat_model, monkeypatch):
    short = tmp_path / "short.txt"
    short.write_text(
        "Task: {instruction}\nInput: {input}\nAnswer: {response}\nScore each aspect 1-5 in JSON."
    )
    rows = answers(3)
    rows[1]["output"] = "word " * 2000  # thousands of tokens; the tiny judge reads 512
    inp = write(tmp_path / "gen.json", rows)
    asked: list[str] = []
    original = LocalCompleter.generate

    def spy(self, texts, on_batch=None):
        asked.extend(texts)
        return original(self, texts, on_batch)

    monkeypatch.setattr(LocalCompleter, "generate", spy)
    cfg = EvaluateConfig(
        mode="score", output_dir=str(tmp_path / "r"), input_file=inp, prompt_file=str(short), parse_retries=0
    )
    summary = run_judged(cfg, JudgeConfig(kind="local", model=str(tiny_chat_model), max_new_tokens=8))
    recs = json.loads((tmp_path / "r" / "results.json").read_text())["records"]
    error = recs[1]["evaluation"]["error"]
    assert error.startswith("prompt too long: ") and "context of 512 with max_new_tokens 8" in error
    assert recs[1]["evaluation"]["attempts"] == 1 and "reply" not in recs[1]["evaluation"]
    assert len(asked) == 2 and all("word word" not in t for t in asked), "the long prompt was cut and asked"
    assert summary["failed_reasons"]["prompt too long"] == 1
    # the default rubric does not fit the tiny judge at all: every record is refused, none generated
    asked.clear()
    cfg = EvaluateConfig(mode="score", output_dir=str(tmp_path / "d"), input_file=inp, parse_retries=0)
    summary = run_judged(cfg, JudgeConfig(kind="local", model=str(tiny_chat_model), max_new_tokens=8))
    assert asked == [] and summary["failed_reasons"] == {"prompt too long": 3}
    assert os.path.exists(tmp_path / "d" / "report.md")
