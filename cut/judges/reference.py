"""The `reference` judge: the response's final number against the record's `reference`
(cut.tasks.arithmetic); deterministic and offline."""

from __future__ import annotations

from cut.judges.verdict import RuleJudge, Verdict
from cut.tasks.arithmetic import answers_match, extract_final_answer


def reference_verdict(record: dict) -> Verdict:
    ref = record.get("reference")
    if isinstance(ref, (int, float)) and not isinstance(ref, bool):
        ref = str(ref)
    if not isinstance(ref, str) or not ref.strip():
        return Verdict("failed", None, "no reference answer")
    ref = ref.strip()
    if not answers_match(ref, ref):  # only a non-number fails to match itself
        return Verdict("failed", None, "reference answer is not a number")
    got = extract_final_answer(record["output"])
    if answers_match(got, ref):
        return Verdict("positive", None, None)
    if got is None:
        return Verdict(
            "negative", f"The response does not state a final answer; the correct answer is {ref}.", None
        )
    at = record["output"].rfind(got)  # the final answer is the last place the number stands
    spans = ((at, at + len(got)),) if at >= 0 else ()
    return Verdict("negative", f"The final answer {got} is wrong; the correct answer is {ref}.", None, spans)


class ReferenceJudge(RuleJudge):
    name = "reference"
    verdict = staticmethod(reference_verdict)
