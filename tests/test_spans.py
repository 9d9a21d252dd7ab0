"""Spans: the wrong text of a response, in the data (offsets or quotes) and as response tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from cut.errors import DataError
from cut.pairs import tokenize_example
from cut.records import Example, Record, quoted_spans, validate
from cut.templates import load_template

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
