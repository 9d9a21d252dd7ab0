"""cut.analysis.inspect: the ratio against a full-logits reference, the lambda curve, the span
metrics by hand, the second model's change, named errors, atomic outputs, and the page in a real
headless browser (skipped where no Chromium is installed)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cut.analysis import ratios as ins
from cut.data.pairs import tokenize_example
from cut.data.records import Example, Record, load_records
from cut.data.templates import load_template
from cut.errors import ConfigError, DataError
from cut.modeling.tiny import build_tiny_model

from conftest import REPO, TINY_RECORDS
from helpers import dump_dom, needs_chromium

# the tiny data with spans on two of its three negatives ("Green ..." has none)
SPANS = {0: ["Lyon"], 2: [[11, 12]]}
RECORDS = [{**r, **({"spans": SPANS[i]} if i in SPANS else {})} for i, r in enumerate(TINY_RECORDS)]


def sharp_model(folder: Path, seed: int, chat: bool = False) -> Path:
    """A tiny model whose output head is scaled up: a random tiny model's distributions are nearly
    flat (every ratio ~1, nothing flagged); a sharp one flags some tokens and not others."""
    from transformers import AutoModelForCausalLM

    build_tiny_model(folder, seed=seed, chat=chat)
    lm = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        lm.lm_head.weight.mul_(40)
    lm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect-models")
    return {
        "before": sharp_model(root / "before", 0),
        "after": sharp_model(root / "after", 1),
        "chat": sharp_model(root / "chat", 2, chat=True),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inspect-data") / "judged.json"
    path.write_text(json.dumps(RECORDS))
    return path


@pytest.fixture(scope="module")
def run(models, data, tmp_path_factory) -> tuple[dict, Path]:
    """One run with a second model, micro-batches of 2 (so sequences of different lengths pad)."""
    out = tmp_path_factory.mktemp("inspect-out") / "out"
    result = ins.inspect_records(
        data_path=str(data),
        model=str(models["before"]),
        after_model=str(models["after"]),
        output_dir=str(out),
        prompt_template_name="alpaca",
        micro_batch_size=2,
        progress=False,
    )
    return result, out


@torch.no_grad()
def reference_logprobs(model_dir: Path, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p of each response token from the model run on this one context alone: full logits,
    fp32 log_softmax, no padding, no target-only head."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    logits = lm(torch.tensor([prompt + response])).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[pos, torch.tensor(response)]


def check_against_reference(result: dict, data: Path, model: Path, template_name: str, after: Path | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    template = load_template(template_name, tokenizer)
    records = {r.index: r for r in load_records(str(data))}
    assert [r["index"] for r in result["records"]] == [0, 2, 4]  # the negatives, in file order
    for rec in result["records"]:
        record = records[rec["index"]]
        feat = tokenize_example(Example(record, record.judgment), template, tokenizer, 4096, True)
        assert rec["ids"] == feat["response_ids"]
        plain = reference_logprobs(model, feat["prompt_ids"], feat["response_ids"])
        judged = reference_logprobs(model, feat["judged_ids"], feat["response_ids"])
        ours_plain, ours_judged = torch.tensor(rec["lp_plain"]), torch.tensor(rec["lp_judged"])
        torch.testing.assert_close(ours_plain, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_judged, judged, rtol=1e-5, atol=1e-5)
        ratio = (ours_judged - ours_plain).exp()
        torch.testing.assert_close(ratio, (judged - plain).exp(), rtol=1e-5, atol=1e-5)
        assert rec["flagged"] == (ratio > 1.1).int().tolist()
        assert rec["n_flagged"] == sum(rec["flagged"])
        # the token texts rebuild the output; the added EOS shows by name
        assert (
            "".join(t for t, s in zip(rec["tokens"], rec["special"], strict=True) if not s) == record.output
        )
        assert rec["tokens"][-1] == tokenizer.eos_token and rec["special"][-1] == 1
        if after is not None:
            before_after = reference_logprobs(after, feat["prompt_ids"], feat["response_ids"])
            torch.testing.assert_close(torch.tensor(rec["lp_after"]), before_after, rtol=1e-5, atol=1e-5)


def test_ratio_matches_full_logits_reference(run, data, models):
    result, _ = run
    check_against_reference(result, data, models["before"], "alpaca", models["after"])
    assert sum(r["n_flagged"] for r in result["records"]) > 0  # the sharp model flags something
    assert sum(r["n_flagged"] for r in result["records"]) < result["counts"]["tokens"]


def test_ratio_matches_reference_chat_template(models, data, tmp_path):
    result = ins.inspect_records(
        data_path=str(data), model=str(models["chat"]), output_dir=str(tmp_path / "o"), progress=False
    )
    assert result["prompt_template"] == "chat"  # auto: the tokenizer has a chat template
    check_against_reference(result, data, models["chat"], "chat", None)
    assert result["after"] is None and "lp_after" not in result["records"][0]


def test_second_model_change(run):
    """moved = mean over a record's flagged tokens of log p_after(y|x) - log p(y|x); the run's
    after-summary is the same mean over all flagged (and over all other) tokens."""
    result, _ = run
    all_flagged, all_other = [], []
    for rec in result["records"]:
        change = [a - b for a, b in zip(rec["lp_after"], rec["lp_plain"], strict=True)]
        flagged = [c for c, f in zip(change, rec["flagged"], strict=True) if f]
        other = [c for c, f in zip(change, rec["flagged"], strict=True) if not f]
        all_flagged += flagged
        all_other += other
        if flagged:
            assert rec["moved"] == pytest.approx(sum(flagged) / len(flagged), abs=1e-5)
        else:
            assert rec["moved"] is None
    assert result["after"]["flagged_logp_change"] == pytest.approx(
        sum(all_flagged) / len(all_flagged), abs=1e-5
    )
    assert result["after"]["other_logp_change"] == pytest.approx(sum(all_other) / len(all_other), abs=1e-5)


def test_lambda_curve_monotone_and_naive_count(run):
    result, out = run
    curve = result["lambda_curve"]
    assert [r["lambda"] for r in curve] == [round(1 + 0.05 * k, 2) for k in range(41)]
    fractions = [r["flagged_fraction"] for r in curve]
    assert all(a >= b for a, b in zip(fractions, fractions[1:], strict=False))
    tokens = [
        (lp, lj)
        for rec in result["records"]
        for lp, lj in zip(rec["lp_plain"], rec["lp_judged"], strict=True)
    ]
    assert result["counts"]["tokens"] == len(tokens)
    for row in curve:
        naive = sum(math.exp(lj - lp) > row["lambda"] for lp, lj in tokens)
        assert row["flagged_tokens"] == naive
        assert row["flagged_fraction"] == pytest.approx(naive / len(tokens))
    saved = json.loads((out / "inspect.json").read_text())
    assert [r["flagged_tokens"] for r in saved["lambda_curve"]] == [r["flagged_tokens"] for r in curve]
    assert saved["at_threshold"]["lambda"] == 1.1 and set(saved["paper_lambdas"]) == {"1.1", "1.2"}
    assert saved["counts"]["span_records"] == 2 and saved["best_f1"] is not None
    assert len(saved["records"][0]["lp_plain"]) == len(saved["records"][0]["tokens"])
    assert (out / "lambda.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def scored(index: int, ratios: list[float], span: list[int], after: list[float] | None = None) -> ins.Scored:
    """A hand-built negative: log p(y|x) = log 0.1 per token, log p(y|x,j) = that + log ratio."""
    n = len(ratios)
    record = Record(f"instruction {index}", "", "x" * n, f"judgment {index}", index=index)
    lp = torch.full((n,), math.log(0.1))
    lj = lp + torch.tensor([math.log(r) for r in ratios])
    la = None if after is None else torch.tensor([math.log(p) for p in after])
    return ins.Scored(
        Example(record, record.judgment), list(range(n)), ["x"] * n, [False] * n, span, lp, lj, la
    )


def test_span_metrics_by_hand():
    """Record A (spans on its first two tokens) has ratios 2.02, 1.03, 1.52, 1.0; record B (no spans)
    has 3.0, 1.5. Precision and recall count A only; the flagged fraction counts all six tokens.

    lambda 1.0:  A flags {0, 1, 2} (a ratio of exactly 1 is not > 1): tp 2, P 2/3, R 1, F1 4/5;
                 B flags both: fraction 5/6
    lambda 1.1:  A flags {0, 2}: tp 1, P 1/2, R 1/2, F1 1/2; fraction 4/6
    lambda 1.6:  A flags {0}: tp 1, P 1, R 1/2, F1 2/3; B flags {0}: fraction 2/6
    lambda 2.5:  A flags none: P undefined, R 0, F1 0; fraction 1/6
    best F1: 4/5 at lambda 1.0
    """
    a, b = scored(0, [2.02, 1.03, 1.52, 1.0], [1, 1, 0, 0]), scored(1, [3.0, 1.5], [])
    curve = {r["lambda"]: r for r in ins.lambda_curve([a, b])}
    expect = {
        1.0: (5 / 6, 2 / 3, 1.0, 4 / 5),
        1.1: (4 / 6, 1 / 2, 1 / 2, 1 / 2),
        1.6: (2 / 6, 1.0, 1 / 2, 2 / 3),
        2.5: (1 / 6, None, 0.0, 0.0),
    }
    for lam, (frac, p, r, f1) in expect.items():
        row = curve[lam]
        assert row["flagged_fraction"] == pytest.approx(frac)
        assert row["precision"] == (None if p is None else pytest.approx(p))
        assert row["recall"] == pytest.approx(r) and row["f1"] == pytest.approx(f1)
    assert curve[1.6]["records_with_flags"] == 1.0 and curve[2.5]["records_with_flags"] == 0.5
    best = ins.best_f1(list(curve.values()))
    assert best["lambda"] == 1.0 and best["f1"] == pytest.approx(0.8)
    # no record with spans: no precision, recall, F1 or best lambda
    assert ins.lambda_curve([b])[0]["f1"] is None and ins.best_f1(ins.lambda_curve([b])) is None


def test_record_summary_by_hand():
    """Ratios 2.0, 1.05, 3.0 at lambda 1.1 flag tokens 0 and 2; p(y|x) = 0.1 before and 0.05, 0.1,
    0.2 after: moved = (log 0.5 + log 2) / 2 = 0, the unflagged token moved log 1 = 0 too; at
    lambda 2.5 only token 2 is flagged: moved = log 2."""
    s = scored(5, [2.0, 1.05, 3.0], [0, 1, 1], after=[0.05, 0.1, 0.2])
    summary = ins.record_summary(s, 1.1)
    assert (summary["n_flagged"], summary["n_span"], summary["n_span_flagged"]) == (2, 2, 1)
    assert summary["moved"] == pytest.approx(0.0, abs=1e-6) and summary["moved_other"] == pytest.approx(
        0, abs=1e-6
    )
    assert ins.record_summary(s, 2.5)["moved"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["max_log_ratio"] == pytest.approx(math.log(3.0), abs=1e-6)


# ---------------------------------------------------------------- bad inputs


@pytest.fixture()
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(ins, "load_model", refuse)


def test_bad_inputs_named_before_any_model_loads(models, data, tmp_path, no_model_loads):
    positives = tmp_path / "positives.json"
    positives.write_text(json.dumps([r for r in TINY_RECORDS if r["judgment"] is None]))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    other_vocab = build_tiny_model(tmp_path / "other", vocab_size=300)
    ok = {"data_path": str(data), "model": str(models["before"]), "output_dir": str(tmp_path / "o")}
    cases = [
        ({"data_path": str(tmp_path / "missing.json")}, DataError, "cannot read"),
        ({"data_path": str(positives)}, DataError, "no negative records"),
        ({"threshold": 0}, ConfigError, "threshold must be > 0"),
        ({"micro_batch_size": 0}, ConfigError, "micro_batch_size"),
        ({"cutoff_len": 1}, ConfigError, "cutoff_len"),
        ({"limit": -1}, ConfigError, "limit"),
        ({"dtype": "fp8"}, ConfigError, "dtype"),
        ({"model": str(tmp_path / "no" / "model")}, ConfigError, "model folder not found"),
        ({"after_model": str(tmp_path / "no" / "after")}, ConfigError, "model folder not found"),
        ({"output_dir": str(a_file)}, ConfigError, "not a folder"),
        ({"prompt_template_name": "nonsense"}, ConfigError, "unknown template"),
        ({"cutoff_len": 4}, DataError, "no negative fits cutoff_len=4"),
        ({"after_model": str(other_vocab)}, ConfigError, "tokenizer differs"),
    ]
    for change, error, text in cases:
        with pytest.raises(error, match=re.escape(text)):
            ins.inspect_records(progress=False, **{**ok, **change})
    assert not (tmp_path / "o").exists()


def test_cli_names_errors_and_helps(data, tmp_path, capsys, no_model_loads):
    rc = ins.main(
        ["--data_path", str(data), "--model", str(tmp_path / "nope" / "m"), "--output_dir", str(tmp_path)]
    )
    assert rc == 2 and "cut.analysis.inspect: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        ins.main(["--help"])
    assert exit_.value.code == 0 and "--after_model" in capsys.readouterr().out
    proc = subprocess.run(
        [sys.executable, "-m", "cut.analysis.inspect", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--threshold" in proc.stdout and "--micro_batch_size" in proc.stdout


def test_limit_scores_the_first_negatives(models, data, tmp_path):
    result = ins.inspect_records(
        data_path=str(data), model=str(models["before"]), output_dir=str(tmp_path), limit=2, progress=False
    )
    assert [r["index"] for r in result["records"]] == [0, 2] and result["counts"]["limited_away"] == 1


# ---------------------------------------------------------------- outputs


def synthetic(n: int = 120, seed: int = 0) -> dict:
    """A result of n hand-built negatives (no model): random ratios, spans on every third record,
    a second model, and the word 'zebra' in records 7 and 77 only."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        t = 4 + k % 9
        ratios = (torch.rand(t, generator=g) * 3 + 0.3).tolist()
        s = scored(
            k,
            ratios,
            [int(i < 2) for i in range(t)] if k % 3 == 0 else [],
            (torch.rand(t, generator=g) * 0.5 + 0.01).tolist(),
        )
        if k in (7, 77):
            r = s.example.record
            s.example = Example(
                Record(r.instruction + " zebra", "", r.output, r.judgment, index=k), r.judgment
            )
        out.append(s)
    meta = {
        "model": "m",
        "model_name": "m",
        "after_model": "a",
        "data_path": "d.json",
        "prompt_template": "alpaca",
    }
    return ins.build_result(out, 1.1, {**meta, "counts": {"records": n}})


def test_outputs_written_atomically(tmp_path, monkeypatch):
    result = synthetic(10)
    paths = ins.write_outputs(result, tmp_path)
    before = {k: p.read_bytes() for k, p in paths.items()}
    html = before["page"].decode()
    assert "<script" in html and not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # no network
    assert not re.search(r"<link|@import", html)

    def broken_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_disk)
    with pytest.raises(OSError, match="No space"):
        ins.write_outputs(synthetic(12, seed=1), tmp_path)
    assert {k: p.read_bytes() for k, p in paths.items()} == before  # the old files, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "inspect.json", "lambda.png"]


# ---------------------------------------------------------------- the page in a real browser


def card_indices(dom: str) -> list[int]:
    return [int(i) for i in re.findall(r'<span class="idx">#(\d+)</span>', dom)]


def token_classes(dom: str) -> list[set[str]]:
    return [set(c.split()) for c in re.findall(r'<span class="(t(?: [a-z]+)*)" data-i=', dom)]


@needs_chromium
def test_browser_renders_the_runs_flags(run, tmp_path):
    result, out = run
    dom = dump_dom(out / "index.html", "", tmp_path / "profile")
    classes = token_classes(dom)
    assert card_indices(dom) == [0, 2, 4]
    assert len(classes) == result["counts"]["tokens"]
    assert sum("flagged" in c for c in classes) == result["counts"]["flagged_tokens"] > 0
    assert sum("span" in c for c in classes) == result["counts"]["span_tokens"] > 0
    assert dom.count('<span class="mv">') == result["counts"]["flagged_tokens"]  # before -> after chips


@needs_chromium
def test_browser_pages_sorts_filters_and_relabels(tmp_path):
    result = synthetic(120)
    ins.write_outputs(result, tmp_path)
    page, profile, recs = tmp_path / "index.html", tmp_path / "profile", result["records"]

    dom = dump_dom(page, "", profile)  # page 1 of 3, by index
    assert card_indices(dom) == list(range(50)) and "1–50 of 120" in dom
    assert sum("flagged" in c for c in token_classes(dom)) == sum(r["n_flagged"] for r in recs[:50])

    dom = dump_dom(page, "page=3", profile)
    assert card_indices(dom) == list(range(100, 120))
    assert sum("flagged" in c for c in token_classes(dom)) == sum(r["n_flagged"] for r in recs[100:])

    dom = dump_dom(page, "sort=flagged&q=zebra", profile)
    assert sorted(card_indices(dom)) == [7, 77] and "(filtered from 120)" in dom
    frac = {7: recs[7]["flagged_fraction"], 77: recs[77]["flagged_fraction"]}
    assert card_indices(dom)[0] == max(frac, key=lambda k: (frac[k], -k))

    dom = dump_dom(page, "lam=2", profile)  # another lambda: the page recomputes the flags
    p = ins.page_records(result)[:50]
    expect = sum(math.exp(lj - lp) > 2 for r in p for lp, lj in zip(r["lp"], r["lj"], strict=True))
    assert sum("flagged" in c for c in token_classes(dom)) == expect < sum(r["n_flagged"] for r in recs[:50])
