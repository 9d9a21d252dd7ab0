"""The real `alpaca_eval` command on `cut generate`'s answers to the shipped held-out file, judged by
a fake OpenAI-compatible server on 127.0.0.1 through the README's recipe (this repo's annotator
config, a client config named by OPENAI_CLIENT_CONFIG_PATH); and the same answers read back by
`cut judge --judge verifier`, which needs their `constraints` as lists again. No network."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cut.data.files import decode_json_fields
from cut.judges.judge import main as judge_main
from cut.modeling.generate import main as generate_main

from helpers import UsageFake

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO / "data" / "instructions_heldout.json"
ANNOTATOR = REPO / "configs" / "alpaca_eval" / "cut_judge" / "configs.yaml"
N = 4
STRONG, WEAK = "Reference answer, strong.", "Reference answer, weak."


def prefer(body: dict) -> str:
    """The judge's taste: the strong reference beats the model, the model beats a weak reference.
    alpaca_eval shuffles which answer is (a), so the reply follows where the reference sits."""
    prompt = body["messages"][-1]["content"]
    a, b = re.search(r"## Output \(a\):\n(.*)\n\n## Output \(b\):\n(.*)\n\nReply", prompt, re.S).groups()
    ref_is_a = a.strip() in (STRONG, WEAK)
    ref = a if ref_is_a else b
    ref_wins = ref.strip() == STRONG
    return "Output (a)" if ref_wins == ref_is_a else "Output (b)"


@pytest.fixture(scope="module")
def answers(tiny_model, tmp_path_factory) -> Path:
    """`cut generate` on the first N held-out records (each with a `constraints` list)."""
    out = tmp_path_factory.mktemp("alpaca") / "answers.json"
    argv = ["--model", str(tiny_model), "--data_path", str(HELDOUT), "--output_file", str(out)]
    argv += ["--limit", str(N), "--max_new_tokens", "6", "--device", "cpu", "--dtype", "fp32"]
    assert generate_main([*argv, "--generator", "tiny"]) == 0
    return out


def test_answers_hold_constraints_as_json_text_that_reads_back(answers):
    heldout = json.loads(HELDOUT.read_text())[:N]
    rows = json.loads(answers.read_text())
    assert len(rows) == N
    for rec, row in zip(heldout, rows, strict=True):
        # every value hashable (what alpaca_eval's pandas needs), the list kept as its JSON text
        assert all(not isinstance(v, (list, dict)) for v in row.values())
        assert row["json_fields"] == "constraints" and isinstance(row["constraints"], str)
        assert row["id"] == rec["id"] and decode_json_fields(row)["constraints"] == rec["constraints"]
        assert "json_fields" not in decode_json_fields(row)


def test_alpaca_eval_command_ranks_cut_answers_against_a_local_judge(answers, tmp_path):
    """Win rate 75: the judge prefers the model's answer to the weak reference (3 records) and the
    strong reference to the model's answer (1 record), whatever order alpaca_eval shows them in."""
    heldout = json.loads(HELDOUT.read_text())[:N]
    ref = tmp_path / "reference.json"
    outputs = [STRONG] + [WEAK] * (N - 1)
    ref.write_text(
        json.dumps(
            [
                {"instruction": r["instruction"], "input": r["input"], "output": o, "generator": "ref"}
                for r, o in zip(heldout, outputs, strict=True)
            ]
        )
    )
    out = tmp_path / "out"
    with UsageFake(default=prefer) as judge:
        clients = tmp_path / "clients.yaml"  # the README's recipe: the key is a placeholder
        clients.write_text(f'default:\n  - base_url: "{judge.base_url}"\n    api_key: "EMPTY"\n')
        env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_API_BASE")}
        env |= {"OPENAI_CLIENT_CONFIG_PATH": str(clients), "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
        cmd = [str(Path(sys.executable).parent / "alpaca_eval"), "--model_outputs", str(answers)]
        cmd += ["--reference_outputs", str(ref), "--annotators_config", str(ANNOTATOR)]
        cmd += ["--fn_metric", "get_winrate", "--sort_by", "win_rate", "--precomputed_leaderboard", "None"]
        cmd += ["--output_path", str(out), "--caching_path", str(tmp_path / "cache.json")]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert sum(judge.hits.values()) == N
        assert judge.bodies[0]["model"] == "judge"
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert len(rows) == 1 and rows[0][""] == "tiny"
    assert float(rows[0]["win_rate"]) == pytest.approx(100 * (N - 1) / N)
    assert int(rows[0]["n_wins"]) == N - 1 and int(rows[0]["n_total"]) == N
    annotations = json.loads((out / "annotations.json").read_text())
    assert len(annotations) == N and all(a["generator_2"] == "tiny" for a in annotations)


def test_verifier_judges_the_answers_with_their_constraints(answers, tmp_path):
    """`cut judge --judge verifier` (the loop's judge on this file) reads the constraints back as
    lists: every record gets a verdict, none fails with 'no constraints to verify'."""
    judged = tmp_path / "judged.json"
    argv = ["--input_file", str(answers), "--output_file", str(judged), "--judge", "verifier"]
    assert judge_main(argv) == 0
    rows = json.loads(judged.read_text())
    heldout = json.loads(HELDOUT.read_text())[:N]
    assert len(rows) == N and not any(r.get("judge_error") for r in rows)
    assert [r["constraints"] for r in rows] == [r["constraints"] for r in heldout]
    assert all("json_fields" not in r for r in rows)
