"""cut lm-eval (cut.recipes.harness): a merged cut model and a cut.train adapter scored by
EleutherAI's harness on a local multiple-choice task of our own; accuracy checked against the
log-likelihoods worked out here with the model itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed: pip install -c .venv/constraints.txt -e '.[eval]'"
)

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from cut.cli import main as cut_main  # noqa: E402
from cut.recipes.harness import PAPER_TASKS, model_args, parse_tasks  # noqa: E402

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Lyon", "Nice"], 0),
    ("Add the numbers 3 and 4.", ["8", "7", "6"], 1),
    ("Name a primary colour.", ["Green", "Purple", "Red"], 2),
    ("Which number is wrong?", ["The answer 8", "The answer 7"], 0),
    ("What does the judgment say?", ["The response is perfect.", "The number is wrong."], 1),
    ("Which city is not the capital?", ["Lyon", "Paris"], 0),
]
TASK = """task: cut_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture()
def local_task(tmp_path) -> Path:
    """A folder holding an lm-eval task YAML and its local JSONL of multiple-choice questions."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "questions.jsonl"
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "cut_tiny_mc.yaml").write_text(TASK.format(data=data))
    return folder


def reference_choices(model_dir: Path) -> list[int]:
    """The choice of highest log p(" " + choice | "Question: q\\nAnswer:"), summed over the choice's
    tokens: the continuation tokens are those of context + continuation after the context's own."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    picks = []
    for question, choices, _ in QUESTIONS:
        context = f"Question: {question}\nAnswer:"
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in choices:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            assert whole[: len(ctx)] == ctx
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            cont = range(len(ctx), len(whole))
            scores.append(sum(logp[i - 1, whole[i]].item() for i in cont))
        picks.append(max(range(len(choices)), key=scores.__getitem__))
    return picks


def accuracy(picks: list[int]) -> float:
    return sum(p == a for p, (_, _, a) in zip(picks, QUESTIONS, strict=True)) / len(QUESTIONS)


def run_cli(model: Path | str, local_task: Path, out: Path) -> dict:
    argv = ["lm-eval", "--model", str(model), "--tasks", "cut_tiny_mc", "--include_path", str(local_task)]
    argv += ["--output_file", str(out), "--device", "cpu", "--dtype", "fp32", "--batch_size", "4"]
    assert cut_main(argv) == 0
    return json.loads(out.read_text())


def test_paper_tasks_and_task_lists():
    assert parse_tasks("paper") == {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0}
    assert parse_tasks("a:3, b") == {"a": 3, "b": None}
    assert PAPER_TASKS["truthfulqa_mc2"][1] == "acc"


def test_merged_model_scores_the_local_task_as_its_own_loglikelihoods(tiny_model, local_task, tmp_path):
    got = run_cli(tiny_model, local_task, tmp_path / "merged.json")
    want = accuracy(reference_choices(tiny_model))
    assert got["results"]["cut_tiny_mc"]["acc,none"] == pytest.approx(want)
    assert got["headline"]["cut_tiny_mc"] == {"metric": "acc", "value": pytest.approx(want)}
    assert got["model_args"]["pretrained"] == str(tiny_model) and "peft" not in got["model_args"]
    assert not list(tmp_path.glob("*.tmp"))


def test_adapter_scores_as_its_merged_model(tiny_model, local_task, tmp_path):
    from peft import LoraConfig, get_peft_model

    from cut.modeling.merge import merge

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules="all-linear"))
    with torch.no_grad():  # a fresh LoRA has B = 0: give it weights, so the adapter changes the model
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(adapter)  # as cut.train saves it
    merged = merge(str(tiny_model), str(adapter), str(tmp_path / "merged"), "fp32")
    assert model_args(str(adapter), "fp32", "cpu")["peft"] == str(adapter)

    picks = reference_choices(merged)
    assert picks != reference_choices(tiny_model), "the adapter changed no answer; the test shows nothing"
    via_adapter = run_cli(adapter, local_task, tmp_path / "adapter.json")
    via_merged = run_cli(merged, local_task, tmp_path / "merged.json")
    assert via_adapter["model_args"]["pretrained"] == str(tiny_model)
    for got in (via_adapter, via_merged):
        assert got["results"]["cut_tiny_mc"]["acc,none"] == pytest.approx(accuracy(picks))


def test_bad_options_fail_before_any_model_loads(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cut_main(["lm-eval", "--model", str(tmp_path / "none"), "--output_file", str(out)]) == 2
    assert "none: model folder not found" in capsys.readouterr().err
    assert cut_main(["lm-eval", "--model", "m", "--tasks", "a:x", "--output_file", str(out)]) == 2
    assert "shots of a must be a whole number" in capsys.readouterr().err
    assert not out.exists()
