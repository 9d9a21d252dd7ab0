"""cut.demo: the data builder's pick, the report's accounting against a hand computation on tiny
models, the shipped demo data, and the whole demo end to end on a tiny model (slow)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from cut import demo
from cut.data.pairs import tokenize_example
from cut.data.records import build_examples, load_records
from cut.data.templates import load_template
from cut.modeling.tiny import build_tiny_model
from cut.training.config import TrainConfig

from conftest import REPO, TINY_RECORDS

# the tiny data with spans on two of its three negatives ("Green ..." has none: the ratio decides)
SPANS = {0: [[25, 29]], 2: [[11, 12]]}
RECORDS = [{**r, **({"spans": SPANS[i]} if i in SPANS else {})} for i, r in enumerate(TINY_RECORDS)]


def judged_rows() -> list[dict]:
    """Judged samples of three constraint kinds, 3 samples per prompt, in the verifier's shape."""
    rows = []
    for p, (kind, bad) in enumerate([("no_comma", ","), ("all_lowercase", "A"), ("end_phrase", "!")] * 2):
        for s in range(3):
            out = f"answer {p} sample {s}{bad} " + "x" * (10 + s * 2 % 3)  # sample 0, 2, 1: shortest first
            row = {
                "id": f"p{p}",
                "sample": s,
                "instruction": f"prompt {p}",
                "input": "",
                "output": out,
                "judgment": f'Mistakes: "{bad}".',
                "judge": "verifier",
                "constraints": [{"type": kind, "params": {}}],
                "spans": [[out.index(bad), out.index(bad) + 1]],
            }
            if s == 2 and p % 2:  # a negative without spans: never picked
                row.pop("spans")
            if s == 1 and p >= 3:  # positives
                row.update(output=f"fine {p}", judgment=None)
                row.pop("spans")
            rows.append(row)
    rows.append({**rows[0], "judgment": None, "judge_error": "timeout"})  # a failed judgment
    return rows


def test_select_records_deterministic_spans_only_counts():
    rows = judged_rows()
    before = json.dumps(rows)
    picked = demo.select_records(rows, n_negative=7, n_positive=2)
    assert json.dumps(rows) == before  # the input is not touched
    assert picked == demo.select_records(rows, n_negative=7, n_positive=2)
    neg = [r for r in picked if r.get("judgment") is not None]
    pos = [r for r in picked if r.get("judgment") is None]
    assert len(neg) == 7 and len(pos) == 2 and picked == neg + pos
    assert all(r["spans"] for r in neg) and not any("spans" in r for r in pos)
    assert all(set(r) <= set(demo.KEEP_FIELDS) for r in picked)
    # round-robin over the three kinds: 3 + 2 + 2; the first sample of every prompt before a second
    assert sorted(Counter(demo.constraint_kind(r) for r in neg).values()) == [2, 2, 3]
    assert sum("sample 0" in r["output"] for r in neg) == 6
    # the 7th: all_lowercase's next, the shortest second sample of its prompts (p4's sample 2)
    assert [r["output"] for r in neg if "sample 0" not in r["output"]] == ["answer 4 sample 2A xxxxxxxxxxx"]
    # more than there are: all of them (12 negatives with spans, 3 positives), never a spanless one
    everything = demo.select_records(rows, n_negative=100, n_positive=100)
    assert sum(r.get("judgment") is not None for r in everything) == 12
    spanless = {r["output"] for r in rows if r.get("judgment") and "spans" not in r}
    assert len(spanless) == 3 and not spanless & {r["output"] for r in everything}
    assert sum(r.get("judgment") is None for r in everything) == 3


def test_select_records_bounds_lengths_and_skips_duplicates():
    rows = judged_rows()
    rows.append({**rows[0], "sample": 9})  # the same answer to the same prompt again
    rows.append({**rows[3], "sample": 9, "output": rows[3]["output"] + "y" * 300})  # too long
    long_judgment = {"sample": 9, "output": rows[6]["output"] + " w", "judgment": "Mistakes: " + "z" * 300}
    rows.append({**rows[6], **long_judgment})
    everything = demo.select_records(rows, 100, 100, max_output=200, max_judgment_chars=100)
    assert sum(r.get("judgment") is not None for r in everything) == 12  # none of the three added
    # with no bounds the long ones are eligible; the duplicate never is
    assert sum(r.get("judgment") is not None for r in demo.select_records(rows, 100, 100)) == 14
    # `size` counts in other units (build_data: tokens), here words: every output has 4 or fewer
    in_words = demo.select_records(rows, 100, 100, max_output=4, size=lambda t: len(t.split()))
    unbounded = demo.select_records(rows, 100, 100)
    assert in_words == [r for r in unbounded if len(r["output"].split()) <= 4]
    # tighter bounds keep fewer: outputs of at most 20 characters ("fine p" positives only)
    short = demo.select_records(rows, n_negative=100, n_positive=100, max_output=20)
    assert short and all(len(r["output"]) <= 20 and r.get("judgment") is None for r in short)
    # judgments of at most 5 characters: no negative is left ('Mistakes: ...' is longer)
    assert all(r.get("judgment") is None for r in demo.select_records(rows, 100, 100, max_judgment_chars=5))


def test_build_data_writes_records_cut_reads(tmp_path, tiny_model):
    src, dest = tmp_path / "judged.json", tmp_path / "demo.json"
    src.write_text(json.dumps(judged_rows()))
    picked = demo.build_data(str(src), str(dest), 4, 1, tokenizer=str(tiny_model))
    records = load_records(str(dest))
    assert len(records) == 5 and json.loads(dest.read_text()) == picked
    assert all(r.spans for r in records[:4]) and records[4].judgment is None


def test_shipped_demo_data_has_valid_spans():
    path = REPO / "data" / "demo_judgments.json"
    raw = json.loads(path.read_text())
    records = load_records(str(path))
    examples, counts = build_examples(records)
    assert counts["failed_judgment"] == 0 and counts["negative"] == 16 and counts["positive"] == 6
    kinds = {demo.constraint_kind(r) for r in raw}
    assert len(kinds) >= 4  # several constraint types
    # short, so that the default run takes minutes: bounded outputs and judgments, no duplicates
    if (REPO / demo.DEMO_TOKENIZER).exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(REPO / demo.DEMO_TOKENIZER)
        sizes = [len(tok(r["output"], add_special_tokens=False)["input_ids"]) for r in raw]
        assert max(sizes) <= demo.MAX_OUTPUT_TOKENS
    assert all(len(r.get("judgment") or "") <= demo.MAX_JUDGMENT_CHARS for r in raw)
    assert len({json.dumps([r["instruction"], r["output"]]) for r in raw}) == len(raw)
    for row, ex in zip(raw, examples, strict=True):
        assert set(row) <= set(demo.KEEP_FIELDS) and row["judge"] == "verifier"
        out = ex.record.output
        if not ex.is_negative:
            assert not ex.record.spans
            continue
        assert ex.record.spans, f"negative without spans: {row['judgment']}"
        for a, b in ex.record.spans:
            assert 0 <= a < b <= len(out)
            text = out[a:b]
            assert text and text in out


# ---------------------------------------------------------------- the report's accounting


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Scores of the tiny data under a tiny base model and two other tiny models as 'after'."""
    root = tmp_path_factory.mktemp("demo-report")
    models = {k: build_tiny_model(root / k, seed=s) for k, s in (("base", 0), ("ratio", 1), ("spans", 2))}
    data = root / "data.json"
    data.write_text(json.dumps(RECORDS))
    cfg = {
        **TrainConfig().__dict__,
        "base_model": str(models["base"]),
        "data_path": str(data),
        "prompt_template_name": "alpaca",
        "cutoff_len": 128,
    }
    s = demo.score_demo(cfg, {"ratio": str(models["ratio"]), "spans": str(models["spans"])}, 2)
    return cfg, models, s


@torch.no_grad()
def hand_logprobs(model_dir: Path, cfg: dict) -> tuple[list[list[float]], list[list[float]], list[list[int]]]:
    """Per negative: log p(y_t|x), log p(y_t|x,j) from the model's plain full forward, span mask."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    template = load_template("alpaca", tok)
    examples, _ = build_examples(load_records(cfg["data_path"]))
    plain, judged, spans = [], [], []
    for ex in examples:
        if not ex.is_negative:
            continue
        f = tokenize_example(ex, template, tok, cfg["cutoff_len"], True)
        per_ctx = []
        for prompt in (f["prompt_ids"], f["judged_ids"]):
            ids = torch.tensor([prompt + f["response_ids"]])
            logp = lm(ids).logits[0].log_softmax(-1)
            n = len(prompt)
            per_ctx.append([float(logp[n + k - 1, t]) for k, t in enumerate(f["response_ids"])])
        plain.append(per_ctx[0])
        judged.append(per_ctx[1])
        spans.append(f["span_mask"] or [-1] * len(f["response_ids"]))
    return plain, judged, spans


def test_report_counts_every_token_once_against_hand(scored):
    cfg, models, s = scored
    plain, judged, spans = hand_logprobs(models["base"], cfg)
    after = {run: hand_logprobs(models[run], cfg)[0] for run in ("ratio", "spans")}
    flat = lambda xs: [x for row in xs for x in row]  # noqa: E731
    assert torch.allclose(s.plain, torch.tensor(flat(plain)), atol=1e-4)
    assert torch.allclose(s.judged, torch.tensor(flat(judged)), atol=1e-4)
    assert s.span.tolist() == flat(spans)
    lam = 1.0  # a random tiny model's ratios sit around 1: some tokens flagged, some not
    summary = demo.summarise(s, lam)
    total = len(flat(plain))
    assert summary["negatives"] == 3 and summary["response_tokens"] == total
    for run in ("ratio", "spans"):
        r = summary["runs"][run]
        # by hand: the run's rule, token by token
        flagged, other = [], []
        for rec_plain, rec_judged, rec_span, rec_after in zip(plain, judged, spans, after[run], strict=True):
            for p, j, sp, a in zip(rec_plain, rec_judged, rec_span, rec_after, strict=True):
                by_ratio = j - p > torch.log(torch.tensor(lam)).item()
                flag = by_ratio if run == "ratio" or sp < 0 else sp == 1
                (flagged if flag else other).append((p, a))
        assert r["flagged"]["tokens"] == len(flagged) and r["unflagged"]["tokens"] == len(other)
        assert r["flagged"]["tokens"] + r["unflagged"]["tokens"] == total
        assert 0 < len(flagged) < total
        for key, pairs in (("flagged", flagged), ("unflagged", other)):
            t = r[key]
            assert t["fell"] + t["rose"] + t["unchanged"] == t["tokens"]
            assert t["fell"] == sum(a - b <= -demo.UNCHANGED for b, a in pairs)
            assert t["rose"] == sum(a - b >= demo.UNCHANGED for b, a in pairs)
            assert t["logp_before"] == pytest.approx(sum(b for b, _ in pairs) / len(pairs), abs=1e-4)
            assert t["logp_after"] == pytest.approx(sum(a for _, a in pairs) / len(pairs), abs=1e-4)
        # the span tokens: the same set in both runs; the spans run flags exactly them where marked
        n_span = sum(x == 1 for x in flat(spans))
        assert r["span"]["tokens"] == n_span == summary["span_tokens"] > 0
        # whole responses: one per negative, summed log p
        assert r["responses"]["records"] == 3
        sums = [sum(row) for row in plain]
        assert r["responses"]["logp_before"] == pytest.approx(sum(sums) / 3, abs=1e-3)
        assert r["span_text"]["records"] == 2  # the negatives with a span
    # positives: every token of the 3 positives (the "$ERROR$" record is dropped, the scored one too)
    assert summary["positive_tokens"] == len(s.pos_plain) > 0


def test_run_flags_spans_fall_back_to_ratio():
    s = demo.Scores(
        plain=torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5])),
        judged=torch.log(torch.tensor([0.9, 0.1, 0.9, 0.1])),
        span=torch.tensor([0, 1, -1, -1]),
        record=torch.tensor([0, 0, 1, 1]),
        after={},
        pos_plain=torch.zeros(0),
        pos_after={},
    )
    assert demo.run_flags(s, "ratio", 1.1).tolist() == [True, False, True, False]
    assert demo.run_flags(s, "spans", 1.1).tolist() == [False, True, True, False]
    assert demo.run_flags(s, "both", 1.1).tolist() == [True, True, True, False]


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_demo_trains_both_runs_merges_and_reports(tiny_model, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    conf = {
        "base_model": str(tiny_model),
        "data_path": str(data),
        "output_dir": str(tmp_path / "elsewhere"),
        "batch_size": 4,
        "micro_batch_size": 4,
        "max_steps": 3,
        "learning_rate": 0.01,
        "warmup_steps": 0,
        "lora_target_modules": ["all-linear"],
        "cutoff_len": 128,
        "save_steps": 1000,
        "threshold": 1.0,
    }
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(conf))
    root = tmp_path / "demo"
    # an extra flag goes to cut.train; output_dir and flag_source are the demo's
    assert demo.main(["--config", str(path), "--demo_dir", str(root), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "ratio: loss per step (3 steps)" in out and "spans: loss per step (3 steps)" in out
    assert "flagged tokens" in out and "span tokens" in out
    for run in ("ratio", "spans"):
        assert (root / run / "merged" / "model.safetensors").exists()
        saved = yaml.safe_load((root / run / "adapter" / "cut_config.yaml").read_text())
        assert saved["flag_source"] == run and saved["seed"] == 3
    report = json.loads((root / "report.json").read_text())
    for run in ("ratio", "spans"):
        r = report["runs"][run]
        assert r["flagged"]["tokens"] + r["unflagged"]["tokens"] == report["response_tokens"]
        assert r["steps"] == 3
    assert report["runs"]["spans"]["flagged"]["tokens"] >= report["span_tokens"] > 0
    assert not (tmp_path / "elsewhere").exists()
    # the report alone, from the same folders
    assert demo.main(["--config", str(path), "--demo_dir", str(root), "--skip_train"]) == 0
    with pytest.raises(SystemExit):
        demo.main(["--config", str(path), "--demo_dir", str(root), "--flag_source", "both"])
