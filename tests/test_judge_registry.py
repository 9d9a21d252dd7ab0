"""Tests for cut.judges' registry (a new judge is one class plus one line of JUDGES) and for the
`cut judge` options (JudgeOptions: the flags, --config, the checks)."""

from __future__ import annotations

import json

import pytest

import cut.judges
from cut.judges import JUDGES, JudgeConfig, make_judge
from cut.judges.judge import JudgeOptions, Verdict, main


class LengthJudge:
    """A tiny judge for the test: a response of at most 3 words is right."""

    name = "length"
    requires = ()

    @classmethod
    def from_config(cls, cfg, default_cache_file=None):
        return cls()

    def judge(self, records, progress=None):
        return [
            Verdict("positive", None, None)
            if len(r["output"].split()) <= 3
            else Verdict("negative", "too long", None)
            for r in records
        ]


def test_the_built_in_kinds():
    assert list(JUDGES) == ["openai", "local", "reference", "verifier"]
    assert cut.judges.judge.JUDGE_KINDS == tuple(JUDGES)
    for kind, cls in JUDGES.items():
        assert callable(cls.from_config) and isinstance(cls.requires, tuple), kind


def test_a_registered_judge_runs_through_cut_judge(tmp_path, monkeypatch):
    monkeypatch.setitem(JUDGES, "length", LengthJudge)
    assert isinstance(make_judge(JudgeConfig(kind="length")), LengthJudge)
    src = tmp_path / "gen.json"
    src.write_text(
        json.dumps([{"instruction": "a", "output": "one two"}, {"instruction": "b", "output": "1 2 3 4 5"}])
    )
    out = tmp_path / "judged.json"
    assert main(["--input_file", str(src), "--output_file", str(out), "--judge", "length"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["judgment"], r["judge"]) for r in rows] == [(None, "length"), ("too long", "length")]


def test_an_unknown_judge_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--input_file", "i.json", "--output_file", str(tmp_path / "o.json"), "--judge", "length"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "judge must be one of openai, local, reference, verifier; got 'length'" in err


def test_config_file_and_flags(tmp_path):
    conf = tmp_path / "judge.yaml"
    conf.write_text("judge: openai\nbase_url: http://h/v1\nmodel: m\ntimeout: 5\ninput_file: i.json\n")
    opts = JudgeOptions.parse(
        ["--config", str(conf), "--output_file", "o.json", "--timeout", "7"], prog="cut.judge"
    )
    assert (opts.judge, opts.timeout, opts.max_tokens, opts.cache) == (
        "openai",
        7.0,
        512,
        "o.json.cache.jsonl",
    )
    cfg = opts.config()
    assert (cfg.kind, cfg.base_url, cfg.timeout, cfg.cache_file) == ("openai", "http://h/v1", 7.0, None)
    conf.write_text("judge: reference\ntimout: 5\n")
    with pytest.raises(SystemExit):
        JudgeOptions.parse(["--config", str(conf)], prog="cut.judge")
