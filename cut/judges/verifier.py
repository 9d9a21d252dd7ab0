"""The `verifier` judge: the record's verifiable `constraints` (cut.tasks.constraints, e.g. what
`python -m cut.tasks.instructions` writes), checked by rules: positive when every constraint holds
(strictly), else `Mistakes:` with one critique per broken constraint that quotes the offending
text, and `spans` marking it (offline, deterministic)."""

from __future__ import annotations

from cut.data.records import merge_spans
from cut.errors import DataError
from cut.judges.verdict import RuleJudge, Verdict


def verifier_verdict(record: dict) -> Verdict:
    """Positive when every constraint holds strictly; else one critique per broken constraint."""
    from cut.tasks.constraints import validate, violations

    raw = record.get("constraints")
    if not isinstance(raw, list) or not raw:
        return Verdict("failed", None, "no constraints to verify")
    try:
        constraints = [validate(c, "constraints") for c in raw]
    except DataError as err:
        return Verdict("failed", None, f"bad constraints: {err}")
    broken = violations(record["output"], constraints)
    if not broken:
        return Verdict("positive", None, None)
    n = len(constraints)
    head = f"the response breaks {len(broken)} of its {n} instructions" if n > 1 else ""
    body = "; ".join(v.message for v in broken)
    judgment = f"Mistakes: {head + ': ' if head else ''}{body}."
    spans = merge_spans(s for v in broken for s in v.spans)
    return Verdict("negative", judgment, None, spans)


class VerifierJudge(RuleJudge):
    name = "verifier"
    verdict = staticmethod(verifier_verdict)
