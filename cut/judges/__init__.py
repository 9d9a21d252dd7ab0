"""Judges: one verdict per (instruction, response) record. Each kind is a file here (api: openai,
local, reference, verifier) and one line of JUDGES (cut.judges.registry); cut.judges.judge is the
`cut judge` stage that judges a file."""

from cut.judges.registry import JUDGES, JudgeConfig, make_judge

__all__ = ["JUDGES", "JudgeConfig", "make_judge"]
