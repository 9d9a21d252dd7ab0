"""The verifier judge: verdicts, critiques in the house format, spans on the offending text."""

from __future__ import annotations

import json

import pytest

from cut.data.records import QUOTES
from cut.judges.judge import JudgeConfig, judge_file, make_judge, verifier_verdict
from cut.tasks.constraints import TYPES, violations

NO_COMMA = {"type": "no_comma", "params": {}}
LOWER = {"type": "all_lowercase", "params": {}}
END = {"type": "end_phrase", "params": {"phrase": "Any other questions?"}}


def record(output, *constraints):
    return {
        "instruction": "Write two lines about fruit.",
        "input": "",
        "output": output,
        "constraints": list(constraints),
    }


def test_positive_when_every_constraint_holds():
    v = verifier_verdict(record("i like apples and pears. Any other questions?", NO_COMMA, END))
    assert v.kind == "positive" and v.judgment is None and v.spans == ()


def test_one_critique_per_broken_constraint_with_spans_on_the_offending_text():
    out = "I like apples, pears and plums. Have a nice day."
    v = verifier_verdict(record(out, NO_COMMA, LOWER, END))
    assert v.kind == "negative"
    assert v.judgment.startswith("Mistakes: the response breaks 3 of its 3 instructions: ")
    assert v.judgment.count(";") >= 2
    assert "apples," in "".join(out[a:b] for a, b in v.spans)  # the comma and the word before it
    assert "I" in [out[a:b] for a, b in v.spans] or any(out[a:b].startswith("I") for a, b in v.spans)
    # every single-quoted text in the critique is the response's own text
    for m in QUOTES.finditer(v.judgment):
        q = next(g for g in m.groups() if g)
        if m.group(0).startswith("'"):
            assert q.replace("...", "") in out or all(part in out for part in q.split("...") if part)
    # the spans are exactly the union of the violations' spans
    want = sorted(s for viol in violations(out, [NO_COMMA, LOWER, END]) for s in viol.spans)
    covered = {i for a, b in want for i in range(a, b)}
    assert covered == {i for a, b in v.spans for i in range(a, b)}


def test_a_single_broken_constraint_has_no_count_prefix():
    v = verifier_verdict(record("Apples, pears.", NO_COMMA))
    assert v.kind == "negative" and v.judgment.startswith("Mistakes: it ")


@pytest.mark.parametrize(
    "constraints,reason",
    [(None, "no constraints"), ([], "no constraints"), ([{"type": "no_such_type"}], "bad constraints")],
)
def test_records_without_valid_constraints_fail_and_never_train(constraints, reason):
    rec = record("text")
    rec["constraints"] = constraints
    v = verifier_verdict(rec)
    assert v.kind == "failed" and v.judgment is None and reason in v.error


def test_judge_file_writes_spans_and_keeps_constraints(tmp_path):
    rows = [
        record("i like apples and pears. Any other questions?", NO_COMMA, END),
        record("I like apples, pears.", NO_COMMA, LOWER),
        record("fine", {"type": "nope", "params": {}}),
    ]
    src = tmp_path / "gen.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "judged.json"
    counts = judge_file(str(src), str(out), make_judge(JudgeConfig(kind="verifier")))
    assert (counts["positive"], counts["negative"], counts["failed"]) == (1, 1, 1)
    judged = json.loads(out.read_text())
    neg = judged[1]
    assert neg["judge"] == "verifier" and neg["constraints"] == rows[1]["constraints"]
    assert [neg["output"][a:b] for a, b in neg["spans"]][0].startswith("I")
    assert judged[2]["judge_error"].startswith("bad constraints") and judged[2]["judgment"] is None


def test_verdicts_are_deterministic_for_every_type():
    import random

    for name, t in TYPES.items():
        params = t.sample(random.Random(0))
        rec = record("Hello, World. This is a reply, with commas.", {"type": name, "params": params})
        assert verifier_verdict(rec) == verifier_verdict(rec)
