"""Verifiable constraints: IFEval's checks (strict and loose), the critiques' quotes and spans,
sampling, wordings, validation and conflicts."""

from __future__ import annotations

import json
import random

import pytest

from cut.errors import DataError
from cut.tasks.constraints import (
    TYPES,
    BulletCount,
    HighlightedSections,
    check,
    compatible,
    count_words,
    loose_variants,
    sentence_spans,
    validate,
    violations,
)

# name -> (params, a response that complies, one that does not); responses avoid apostrophes so the
# critique's single-quoted text can be read back
CASES = {
    "no_comma": ({}, "Apples and pears are fruit.", "Apples, pears and plums."),
    "all_lowercase": ({}, "hello there friend.", "hello There Friend."),
    "all_uppercase": ({}, "HELLO THERE 42.", "HELLO there."),
    "capital_words": ({"relation": "at least", "n": 2}, "I LOVE the sun.", "I love the sun."),
    "end_phrase": (
        {"phrase": "Any other questions?"},
        "Here it is. Any other questions?",
        "Here it is. Have a nice day.",
    ),
    "start_phrase": ({"phrase": "Short answer:"}, "Short answer: yes.", "Well the answer is yes."),
    "wrap_in_quotes": ({}, '"Hello there."', "Hello there."),
    "include_keywords": (
        {"keywords": ["river", "garden"]},
        "The River runs by the garden.",
        "The river runs by the house.",
    ),
    "forbidden_words": (
        {"words": ["very"]},
        "It is quite nice, everything.",
        "It is very nice and Very calm.",
    ),
    "keyword_frequency": (
        {"word": "water", "relation": "at least", "n": 2},
        "Water is water.",
        "Water is wet.",
    ),
    "letter_frequency": (
        {"letter": "z", "relation": "less than", "n": 2},
        "A calm day.",
        "The lazy zebra dozed.",
    ),
    "word_count": ({"relation": "less than", "n": 5}, "One two three four.", "One two three four five six."),
    "sentence_count": ({"relation": "less than", "n": 3}, "One. Two.", "One. Two. Three. Four."),
    "paragraph_count": ({"n": 2}, "First part.\n***\nSecond part.", "First.\n***\nSecond.\n***\nThird."),
    "bullet_count": ({"n": 2}, "Two things:\n* one\n* two", "* one\n* two\n- three"),
    "title": ({}, "<<My Day>>\nIt was fine.", "My Day\nIt was fine."),
    "json_format": ({}, '```json\n{"a": [1, 2]}\n```', '{"a": 1,}'),
    "highlighted_sections": ({"n": 2}, "*one* and **two**", "*one* only"),
    "sections": (
        {"splitter": "SECTION", "n": 2},
        "SECTION 1\nIntro.\nSECTION 2\nMore.",
        "SECTION 1\nIntro only.",
    ),
    "postscript": ({"marker": "P.S."}, "Hello.\nP.S. Bye.", "Hello. Bye."),
    "placeholders": ({"n": 2}, "Dear [name] at [address].", "Dear [name]."),
    "repeat_request": (
        {"request": "Explain why the sky looks blue."},
        "explain why the sky looks blue. Light scatters.",
        "Explain why the sea looks blue. Light scatters.",
    ),
    "two_responses": ({}, "Yes it is.\n******\nNo it is not.", "Yes it is.\n******\nYes it is."),
    "yes_no_answer": ({}, "I think so. My answer is yes.", "I think so. My answer is yes"),
    "first_word": ({"word": "Imagine"}, '"Imagine, a world."', "Picture a world."),
}


def _quoted(message: str) -> list[str]:
    """The response text a critique quotes: between single quotes, '...' marking a cut."""
    return [q.removeprefix("...").removesuffix("...") for q in message.split("'")[1::2]]


def _spans_ok(response: str, vs) -> None:
    for v in vs:
        assert v.message.startswith("it ")
        for s, e in v.spans:
            assert 0 <= s < e <= len(response), (v, response)
        for q in _quoted(v.message):
            assert q in response, (q, v.message)


@pytest.mark.parametrize("name", sorted(TYPES))
def test_every_type_passes_and_fails(name):
    params, good, bad = CASES[name]  # a new type without a case fails here
    c = {"type": name, "params": params}
    assert violations(good, [c]) == [] and check(good, c)
    vs = violations(bad, [c])
    assert len(vs) == 1 and vs[0].type == name and not check(bad, c)
    _spans_ok(bad, vs)


@pytest.mark.parametrize("name", sorted(TYPES))
def test_sample_validates_and_describe_mentions_params(name):
    t = TYPES[name]
    assert len(t.train) >= 3 and len(t.heldout) >= 2 and not set(t.train) & set(t.heldout)
    for seed in range(12):
        params = t.sample(random.Random(seed))
        assert params == t.sample(random.Random(seed))
        c = {"type": name, "params": params}
        assert validate(json.loads(json.dumps(c)), "x") == c
        for split in ("train", "heldout"):
            text = t.describe(params, random.Random(seed), split)
            assert text and text[0].isupper() and "{" not in text
            for key, v in params.items():
                if key == "request":  # the prompt's own question, not restated
                    continue
                if key == "relation":
                    assert ("fewer than" if v == "less than" else "at least") in text
                    continue
                for item in v if isinstance(v, list) else [v]:
                    assert str(item) in text, (key, item, text)
        heldout = {tpl.format(**t._fields(params)) for tpl in t.heldout}
        assert all(tpl.format(**t._fields(params)) not in heldout for tpl in t.train)


def test_wordings_are_not_ifevals():
    ifeval = [
        "refrain from the use of any commas",
        "entire response should be in english",
        "such as <<poem of joy>>",
        "highlight at least",
        "answer with one of the following options",
        "finish your response with this exact phrase",
        "repeat the request word for word without change",
        "wrap your entire response with double quotation marks",
        "entire output should be wrapped in json format",
        "paragraphs are separated with the markdown divider",
        "explicitly add a postscript",
        "placeholders represented by square brackets",
        "responses and only responses should be separated",
    ]
    for t in TYPES.values():
        for tpl in t.train + t.heldout:
            assert not [f for f in ifeval if f in tpl.lower()], tpl


def test_sampled_word_pools_do_not_clash():
    # include / forbidden / frequency keywords are matched as substrings: one pool must not hide another
    include, forbidden = TYPES["include_keywords"].pool, TYPES["forbidden_words"].pool
    freq = TYPES["keyword_frequency"].pool
    for a, b in [(include, forbidden), (include, freq), (forbidden, freq)]:
        assert not [(x, y) for x in a for y in b if x in y or y in x]
    phrases = TYPES["end_phrase"].phrases + TYPES["start_phrase"].phrases
    assert not [w for w in forbidden for p in phrases if w in p.lower().split()]
    assert not [p for p in phrases if "," in p]


def test_critiques_quote_and_point_at_the_offending_text():
    def one(response, c):
        (v,) = violations(response, [c])
        _spans_ok(response, [v])
        return v, [response[s:e] for s, e in v.spans]

    v, texts = one("Apples, pears, and plums.", {"type": "no_comma"})
    assert texts == ["Apples,", "pears,"] and "'Apples, pears'" in v.message and "2 commas" in v.message
    v, texts = one("hello There Friend.", {"type": "all_lowercase"})
    assert texts == ["There", "Friend."] and "'There'" in v.message
    v, texts = one(
        "Here it is. Have a nice day.", {"type": "end_phrase", "params": {"phrase": "Any other questions?"}}
    )
    assert texts == ["Have a nice day."]
    assert v.message == "it must end with \"Any other questions?\" but ends with 'Have a nice day.'"
    v, texts = one(
        "Any other questions? Bye now.", {"type": "end_phrase", "params": {"phrase": "Any other questions?"}}
    )
    assert texts == ["Bye now."] and "after it" in v.message
    long = "I think this is a fine answer to give. " * 3 + "The day ends well for all."
    v, texts = one(long, {"type": "end_phrase", "params": {"phrase": "Bye."}})
    assert texts == ["The day ends well for all."]
    v, texts = one(
        "It is very nice and Very calm.", {"type": "forbidden_words", "params": {"words": ["very"]}}
    )
    assert texts == ["very", "Very"] and "(2 times)" in v.message
    v, texts = one(
        "One two three four five six.", {"type": "word_count", "params": {"relation": "less than", "n": 5}}
    )
    assert texts == ["five six."] and "6 words" in v.message
    v, texts = one(
        "One. Two. Three. Four.", {"type": "sentence_count", "params": {"relation": "less than", "n": 3}}
    )
    assert texts == ["Three. Four."]
    v, texts = one("* a\n* b\n* c\n* d", {"type": "bullet_count", "params": {"n": 2}})
    assert texts == ["* c", "* d"] and "4 bullet points" in v.message
    v, texts = one(
        "I SAW NASA and the USA.", {"type": "capital_words", "params": {"relation": "less than", "n": 2}}
    )
    assert texts == ["I", "SAW", "NASA", "USA"]
    v, texts = one(
        "Fizz buzz.", {"type": "letter_frequency", "params": {"letter": "z", "relation": "less than", "n": 3}}
    )
    assert texts == ["z"] * 4
    v, texts = one("Hello there.", {"type": "wrap_in_quotes"})
    assert texts == ["Hello", "there."]
    v, texts = one('{"a": 1,}', {"type": "json_format"})
    assert texts and texts[0].startswith("}")
    v, texts = one(
        "Explain why the sea is blue.",
        {"type": "repeat_request", "params": {"request": "Explain why the sky is blue."}},
    )
    assert texts == ["sea"]
    v, texts = one("Picture it.", {"type": "first_word", "params": {"word": "Imagine"}})
    assert texts == ["Picture"]
    # missing things: no quote, no span
    for c, r in [({"type": "title"}, "No title."), ({"type": "placeholders", "params": {"n": 2}}, "[one]")]:
        v, texts = one(r, c)
        assert texts == [] and "'" not in v.message


def test_violations_keep_constraint_order_and_skip_kept_ones():
    cs = [
        {"type": "end_phrase", "params": {"phrase": "Bye."}},
        {"type": "all_lowercase"},
        {"type": "no_comma"},
    ]
    vs = violations("Hello, world.", cs)
    assert [v.type for v in vs] == ["end_phrase", "all_lowercase", "no_comma"]
    assert [v.type for v in violations("hello, world. bye.", cs)] == ["no_comma"]


def test_loose_variants_are_ifevals_eight():
    assert loose_variants("A\n*b*\nC") == [
        "A\n*b*\nC",
        "A\nb\nC",
        "*b*\nC",
        "A\n*b*",
        "*b*",
        "b\nC",
        "A\nb",
        "b",
    ]


@pytest.mark.parametrize(
    "response, c",
    [
        ("Sure, here it is:\nhello there friend.", {"type": "all_lowercase"}),  # preamble line
        (
            "Here it is. **Any other questions?**",
            {"type": "end_phrase", "params": {"phrase": "Any other questions?"}},
        ),
        ("the answer is yes.\nHope This Helps!", {"type": "all_lowercase"}),  # sign-off line
        ("Okay:\n<<Title>>", {"type": "title"}),  # strict already passes: loose must too
    ],
)
def test_loose_forgives_a_first_or_last_line_and_asterisks(response, c):
    if c["type"] != "title":
        assert not check(response, c)
    assert check(response, c, loose=True)


def test_loose_still_fails_real_violations_and_empty_variants():
    assert not check("Hello, world.\nYes, really.\nFine, ok.", {"type": "no_comma"}, loose=True)
    # the middle-only variant of a two-line response is empty and must not count as passing
    assert not check("A, b\nc, d", {"type": "no_comma"}, loose=True)


def test_ifeval_word_and_sentence_counts():
    assert count_words("Hello, world! It's 3.5 o'clock.") == 8  # Hello world It s 3 5 o clock
    text = "Dr. Smith arrived at 3.5 p.m. today. Was he late? No! and then"
    assert [text[s:e] for s, e in sentence_spans(text)] == [
        "Dr. Smith arrived at 3.5 p.m. today.",
        "Was he late?",
        "No!",
        "and then",
    ]
    assert sentence_spans("  \n ") == []


def test_ifeval_bullets_highlights_paragraphs():
    # "* a", "- b", "  * c", "-- d" count; "** bold" and the "***" divider do not
    assert len(BulletCount.bullets("* a\n- b\n** bold\n***\n  * c\n-- d")) == 4
    assert HighlightedSections.count("*a* **b** ** ** *\n*") == 2
    para = {"type": "paragraph_count", "params": {"n": 2}}
    assert check("***\nA\n***\nB\n***", para)  # empty first / last pieces do not count
    vs = violations("A\n***\n\n***\nB", [para])  # an empty middle one fails
    assert len(vs) == 1 and "empty" in vs[0].message
    assert not check("A\n***\nB\n******\nC", {"type": "paragraph_count", "params": {"n": 3}})


def test_ifeval_json_postscript_sections_quotes():
    js = {"type": "json_format"}
    assert check('```json\n{"a": [1, 2]}\n```', js) and check("```\n[1]\n```", js) and check(" 3 ", js)
    assert not check('Here: {"a": 1}', js) and not check("```json\n```", js)
    ps, pps = (
        {"type": "postscript", "params": {"marker": "P.S."}},
        {"type": "postscript", "params": {"marker": "P.P.S"}},
    )
    assert check("Thanks.\n\nP.S. see you", ps) and check("Thanks. p. s. see you", ps)
    assert not check("Thanks. PS see you", ps)
    assert check("Bye.\nP.P.S more", pps) and not check("Bye.\nP.S. more", pps)
    sec = {"type": "sections", "params": {"splitter": "Section", "n": 3}}
    assert check("Section 1 a Section 2 b Section 3 c", sec) and not check("section 1 a Section 2 b", sec)
    q = {"type": "wrap_in_quotes"}
    assert check('  "hi"\n', q) and not check('"', q) and not check('"hi', q)
    two = {"type": "two_responses"}
    assert check("A ****** B", two) and check("****** A ****** B", two)
    assert (
        not check("A ****** ****** B", two) and not check("A ****** B ****** C", two) and not check("A", two)
    )
    yn = {"type": "yes_no_answer"}
    assert check("My answer is maybe.", yn) and not check("my answer is yes.", yn)
    end = {"type": "end_phrase", "params": {"phrase": "Bye now."}}
    assert check('"Well. bye now."  ', end)  # IFEval ignores case and wrapping quotes
    kw = {"type": "include_keywords", "params": {"keywords": ["plan"]}}
    assert check("A planet.", kw)  # IFEval matches substrings
    assert check(
        "A planet.", {"type": "forbidden_words", "params": {"words": ["plan"]}}
    )  # but forbids whole words


@pytest.mark.parametrize(
    "c, field",
    [
        (["no_comma"], "mapping"),
        ({"type": "nope"}, "no_comma"),  # lists the known types
        ({"type": "no_comma", "params": {}, "extra": 1}, "extra"),
        ({"type": "word_count", "params": {"n": 5}}, "relation"),
        ({"type": "word_count", "params": {"n": 5, "relation": "at least", "foo": 1}}, "foo"),
        ({"type": "word_count", "params": {"n": "5", "relation": "at least"}}, "params.n"),
        ({"type": "word_count", "params": {"n": True, "relation": "at least"}}, "params.n"),
        ({"type": "word_count", "params": {"n": 5, "relation": "at most"}}, "params.relation"),
        ({"type": "include_keywords", "params": {"keywords": "river"}}, "params.keywords"),
        (
            {"type": "letter_frequency", "params": {"letter": "ab", "relation": "at least", "n": 2}},
            "params.letter",
        ),
        ({"type": "postscript", "params": {"marker": "PS"}}, "params.marker"),
        ({"type": "title", "params": []}, "params"),
    ],
)
def test_validate_names_what_is_wrong(c, field):
    with pytest.raises(DataError, match=r"^rec 3: .*" + field.replace(".", r"\.")):
        validate(c, "rec 3")


def test_validate_normalises():
    assert validate({"type": "title"}, "x") == {"type": "title", "params": {}}
    c = {"type": "letter_frequency", "params": {"letter": "E", "relation": "at least", "n": 3}}
    assert validate(c, "x")["params"]["letter"] == "e"
    assert check("eee", c) and not check("ee", c)


def test_compatible_refuses_conflicts_and_duplicates():
    assert compatible(["no_comma", "title", "word_count"])
    assert not compatible(["all_lowercase", "all_uppercase"]) and not compatible(
        ["all_uppercase", "all_lowercase"]
    )
    assert not compatible(["json_format", "title"]) and not compatible(["start_phrase", "wrap_in_quotes"])
    assert not compatible(["no_comma", "no_comma"])
    for name, t in TYPES.items():
        assert t.conflicts <= set(TYPES) and name not in t.conflicts
        assert all(name in TYPES[o].conflicts for o in t.conflicts)  # symmetric


@pytest.mark.parametrize(
    "name, extra, at_n",
    [
        ("word_count", {}, "one two three"),
        ("sentence_count", {}, "One. Two. Three"),
        ("capital_words", {}, "I SAW NASA today."),
        ("keyword_frequency", {"word": "plan"}, "Plan a plan for the planet."),  # substrings count
        ("letter_frequency", {"letter": "z"}, "Zip zap zoo."),
    ],
)
def test_relations_at_the_threshold(name, extra, at_n):
    # IFEval: "less than" n is k < n, "at least" n is k >= n; the text has exactly 3
    def c(relation, n):
        return {"type": name, "params": {**extra, "relation": relation, "n": n}}

    assert not check(at_n, c("less than", 3)) and check(at_n, c("less than", 4))
    assert check(at_n, c("at least", 3)) and not check(at_n, c("at least", 4))
