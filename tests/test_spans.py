"""Spans: the wrong text of a response, in the data (offsets or quotes) and as response tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from cut.data.pairs import tokenize_example
from cut.data.records import Example, Record, quoted_spans, validate
from cut.data.templates import load_template
from cut.errors import DataError

OUTPUT = "She doesn't likes apples, pears, and plums."


def _record(spans) -> dict:
    return {"instruction": "Fix it.", "output": OUTPUT, "judgment": "Wrong verb.", "spans": spans}


def test_offsets_and_quotes_resolve_sorted_and_merged():
    (rec,) = validate([_record([[12, 17], "apples, pears", ","])], "f.json")
    # ',' marks every comma; the one inside 'apples, pears' merges with it
    assert rec.spans == ((12, 17), (18, 32))
    assert OUTPUT[12:17] == "likes" and OUTPUT[18:32] == "apples, pears,"


@pytest.mark.parametrize(
    "spans, message",
    [
        (["kiwi"], "record 0, field 'spans', item 0: the quote 'kiwi' is not in the output"),
        ([[5, 100]], "item 0: expected a quoted string or [start, end]"),
        ([[7, 7]], "item 0: expected"),
        ([[-1, 3]], "item 0: expected"),
        ([[True, 3]], "item 0: expected"),
        ("likes", "expected a list"),
        ([["a", "b"]], "item 0: expected"),
    ],
)
def test_bad_spans_name_file_record_field(spans, message):
    with pytest.raises(DataError, match="f.json") as err:
        validate([_record(spans)], "f.json")
    assert message in str(err.value)


def test_quoted_spans_takes_only_verbatim_quotes():
    judgment = "It says 'doesn't likes' where \"does not like\" is right; also `plums`; don't."
    spans = quoted_spans(judgment, OUTPUT)
    assert [OUTPUT[a:b] for a, b in spans] == ["doesn't likes", "plums"]  # the correction is not in it
    assert quoted_spans("No quotes here, it's fine.", OUTPUT) == ()
    assert quoted_spans("curly \u201capples\u201d", OUTPUT) == ((18, 24),)


def _reference_mask(tok, response: list[int], spans, n_text: int) -> list[int]:
    """Naive: the text of each token from decoding growing prefixes; overlap by character sets."""
    marked = {c for a, b in spans for c in range(a, b)}
    ends = [len(tok.decode(response[: k + 1])) for k in range(n_text)]
    starts = [0, *ends[:-1]]
    mask = [int(any(c in marked for c in range(s, e))) for s, e in zip(starts, ends, strict=True)]
    return mask + [0] * (len(response) - n_text)


@pytest.mark.parametrize("template_name", ["alpaca", "chat"])
@pytest.mark.parametrize("spans", [[[12, 17]], ["apples, pears"], [","], [[0, 1], "plums."]])
def test_span_mask_is_exactly_the_overlapping_tokens(tiny_model, tiny_chat_model, template_name, spans):
    model = tiny_chat_model if template_name == "chat" else tiny_model
    tok = AutoTokenizer.from_pretrained(model)
    template = load_template(template_name, tok)
    (rec,) = validate([_record(spans)], "f.json")
    feat = tokenize_example(Example(rec, rec.judgment), template, tok, 512, add_eos_token=True)
    response = feat["response_ids"]
    n_text = len(response) - (response[-1] == tok.eos_token_id)
    assert tok.decode(response[:n_text]) == OUTPUT
    assert feat["span_mask"] == _reference_mask(tok, response, rec.spans, n_text)
    assert 0 < sum(feat["span_mask"]) < n_text
    assert feat["span_mask"][-1] == 0  # the EOS is never wrong text


def test_no_spans_no_mask(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rec = Record("Fix it.", "", OUTPUT, "Wrong verb.")
    feat = tokenize_example(Example(rec, rec.judgment), load_template("alpaca", tok), tok, 512)
    assert feat["span_mask"] == []


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("template_name", ["alpaca", "chat"])
def test_span_flags_in_training_are_exactly_the_span_tokens(
    tiny_model, tiny_chat_model, template_name, packing
):
    """flag_source=spans through the collator and the CUT forward: with the ratio switched off
    (threshold 1e9), the flagged tokens are exactly the span tokens; a record without spans keeps
    the ratio (here: nothing flagged)."""
    import torch
    from transformers import AutoModelForCausalLM

    from cut.data.pairs import CUTCollator
    from cut.training.loss import Role
    from cut.training.trainer import install_cut_forward

    model_dir = tiny_chat_model if template_name == "chat" else tiny_model
    tok = AutoTokenizer.from_pretrained(model_dir)
    template = load_template(template_name, tok)
    rows = [
        _record(["likes"]),
        {**_record([","]), "instruction": "List fruit."},
        {**_record(None), "instruction": "No spans here."},
        {"instruction": "Say hi.", "output": "Hi."},
    ]
    records = validate(rows, "f.json")
    feats = [tokenize_example(Example(r, r.judgment), template, tok, 512) for r in records]
    batch = CUTCollator(tok.pad_token_id or 0, packing=packing)(feats)
    plain = batch["tgt_role"] == Role.MISALIGN_N
    expected = feats[0]["span_mask"] + feats[1]["span_mask"] + [-1] * len(feats[2]["response_ids"])
    assert batch["tgt_span"][plain].tolist() == expected
    assert (batch["tgt_span"][~plain] == -1).all()

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    install_cut_forward(lm, threshold=1e9, weight_unlike=1.0, flag_source="spans", check_head=False)
    with torch.no_grad():
        out = lm(**batch)
    n_marked = sum(feats[0]["span_mask"]) + sum(feats[1]["span_mask"])
    assert n_marked > 0
    assert out["flagged"].item() == pytest.approx(n_marked / int(plain.sum()))


def test_flag_source_is_an_option_saved_with_the_run(tmp_path):
    import yaml

    from cut.errors import ConfigError
    from cut.training.config import TrainConfig, parse_config

    cfg = parse_config(["--base_model=m", "--data_path=d", "--flag_source=both"])
    cfg.save(tmp_path / "cut_config.yaml")
    assert yaml.safe_load((tmp_path / "cut_config.yaml").read_text())["flag_source"] == "both"
    with pytest.raises(ConfigError, match="flag_source must be one of"):
        TrainConfig(base_model="m", data_path="d", flag_source="quotes").validate()
