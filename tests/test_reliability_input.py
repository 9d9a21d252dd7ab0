"""Issue 11: bad options, bad data and unwritable outputs stop early with one named line (exit 2),
and nothing is written; long prompts in generation stay bounded; manifest counts add up."""

from __future__ import annotations

import json
import logging

import pytest

from cut.training.train import main as train_main

# --------------------------------------------------------------------------------------------
# every training option range-checked before anything loads or is written
# --------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    ("weight_unlike", "nan", "weight_unlike must be a finite number"),
    ("weight_unlike", "-1", "weight_unlike must be >= 0"),
    ("threshold", "nan", "threshold must be a finite number"),
    ("threshold", "0", "threshold must be > 0"),
    ("gamma", "-1", "gamma must be >= 0"),
    ("gamma", "inf", "gamma must be a finite number"),
    ("val_set_size", "-1", "val_set_size must be"),
    ("val_set_size", "2.5", "val_set_size must be"),
    ("num_epochs", "0", "num_epochs must be > 0"),
    ("learning_rate", "-1", "learning_rate must be > 0"),
    ("learning_rate", "nan", "learning_rate must be a finite number"),
    ("learning_rate", "0", "learning_rate must be > 0"),
    ("lora_r", "0", "lora_r must be >= 1"),
    ("lora_alpha", "0", "lora_alpha must be > 0"),
    ("lora_dropout", "1.5", "lora_dropout must be in [0, 1)"),
    ("lora_dropout", "-0.1", "lora_dropout must be in [0, 1)"),
    ("logging_steps", "0", "logging_steps must be >= 1"),
    ("warmup_steps", "-5", "warmup_steps must be >= 0"),
    ("warmup_ratio", "1", "warmup_ratio must be in [0, 1)"),
    ("max_steps", "0", "max_steps must be -1"),
    ("max_steps", "-2", "max_steps must be -1"),
    ("save_steps", "0", "save_steps must be >= 1"),
    ("save_total_limit", "0", "save_total_limit must be >= 1"),
    ("eval_steps", "0", "eval_steps must be >= 1"),
    ("batch_size", "0", "batch_size"),
    ("micro_batch_size", "0", "micro_batch_size"),
    ("cutoff_len", "1", "cutoff_len must be >= 2"),
    ("score_threshold", "nan", "score_threshold must be a finite number"),
    ("downsample", "-0.5", "downsample must be -1"),
    ("downsample", "inf", "downsample must be a finite number"),
    ("weight_decay", "-1", "weight_decay must be >= 0"),
    ("max_grad_norm", "nan", "max_grad_norm must be a finite number"),
    ("seed", "-1", "seed must be in"),
    ("lr_scheduler", "bogus", "lr_scheduler must be one of"),
    ("optim", "sgdd", "optim must be one of"),
    ("lora_target_modules", "[]", "lora_target_modules is empty"),
    ("deepspeed", "no/such/zero9.json", "deepspeed: no such file"),
]


@pytest.mark.parametrize("name, value, message", BAD_OPTIONS, ids=[f"{n}={v}" for n, v, _ in BAD_OPTIONS])
def test_bad_option_is_refused_before_anything_is_written(
    tiny_model, tiny_data, tmp_path, capsys, name, value, message
):
    out = tmp_path / "out"
    argv = ["--base_model", str(tiny_model), "--data_path", str(tiny_data), "--output_dir", str(out)]
    argv += ["--batch_size", "8", "--micro_batch_size", "8", f"--{name}", value]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cut.train: error: ") and message in err
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists(), f"{name}={value} wrote {list(out.iterdir())}"


def test_good_edge_values_pass_validation(tiny_model, tiny_data, tmp_path):
    from test_config import valid

    valid(output_dir=str(tmp_path / "o"), val_set_size=0.5, num_epochs=0, max_steps=3).validate()
    valid(
        output_dir=str(tmp_path / "o"), val_set_size=3, gamma=0, downsample=0, lr_scheduler="linear"
    ).validate()


def test_unwritable_output_dir_is_refused_by_train(tiny_model, tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a folder under a regular file cannot be made, not even by root
    argv = ["--base_model", str(tiny_model), "--data_path", str(tiny_data)]
    argv += ["--output_dir", str(blocker / "out"), "--batch_size", "8", "--micro_batch_size", "8"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"cut.train: error: output_dir {blocker / 'out'}: cannot be written: {blocker} is a file, not a folder"
    )


# --------------------------------------------------------------------------------------------
# data: non-finite scores, duplicates, wrappers, folders without records
# --------------------------------------------------------------------------------------------

RECORD = {"instruction": "Add 3 and 4.", "input": "", "output": "8", "judgment": "Wrong: 7."}


@pytest.mark.parametrize("score", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_score_is_a_named_error(tmp_path, score):
    from cut.data.records import load_records
    from cut.errors import DataError

    path = tmp_path / "d.json"  # json.dumps writes NaN / Infinity as Python's json reads them
    path.write_text(f'[{json.dumps(RECORD)}, {json.dumps(RECORD)[:-1]}, "score": {score}}}]')
    with pytest.raises(DataError) as err:
        load_records(str(path))
    assert str(err.value) == f"{path}: record 1, field 'score': not a finite number ({float(score)})"


def test_non_finite_score_stops_train_before_anything_is_written(tiny_model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "score": float("nan")}) + "\n")
    out = tmp_path / "out"
    argv = ["--base_model", str(tiny_model), "--data_path", str(data), "--output_dir", str(out)]
    assert train_main(argv + ["--batch_size", "8", "--micro_batch_size", "8"]) == 2
    assert "record 1, field 'score': not a finite number" in capsys.readouterr().err
    assert not out.exists()


def test_exact_duplicates_are_kept_and_warned(tmp_path, caplog):
    from cut.data.records import duplicates, load_records

    other = {**RECORD, "output": "7", "judgment": None}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([RECORD, other, RECORD, {**RECORD, "input": "x"}, other]))
    with caplog.at_level(logging.WARNING, logger="cut.data.records"):
        records = load_records(str(path))
    assert len(records) == 5
    assert duplicates(records) == [(0, 2), (1, 4)]
    assert "2 exact duplicate record(s)" in caplog.text and "record 2 repeats record 0" in caplog.text


def test_no_warning_without_duplicates(tmp_path, caplog):
    from cut.data.records import load_records

    path = tmp_path / "d.json"
    path.write_text(json.dumps([RECORD, {**RECORD, "output": "7"}]))
    with caplog.at_level(logging.WARNING, logger="cut.data.records"):
        load_records(str(path))
    assert "duplicate" not in caplog.text


@pytest.mark.parametrize("key", ["train", "data", "records"])
def test_documented_wrapper_is_read_and_logged(tmp_path, caplog, key):
    from cut.data.records import load_records

    path = tmp_path / "d.json"
    path.write_text(json.dumps({key: [RECORD]}))
    with caplog.at_level(logging.INFO, logger="cut.data.records"):
        assert len(load_records(str(path))) == 1
    assert f"reading the 1 records under key '{key}'" in caplog.text


def test_other_wrapper_is_refused_naming_the_list(tmp_path):
    from cut.data.records import load_records
    from cut.errors import DataError

    path = tmp_path / "d.json"
    path.write_text(json.dumps({"test": [RECORD], "meta": {"n": 1}}))
    with pytest.raises(DataError, match="key 'test' holds a list; only a list under train / data / records"):
        load_records(str(path))


def test_folder_of_text_files_says_no_records(tmp_path):
    from cut.data.records import load_records
    from cut.errors import DataError

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("Add 3 and 4.\n")
    (folder / "b.txt").write_text("8\n")
    with pytest.raises(DataError) as err:
        load_records(str(folder))
    assert str(err.value).startswith(f"{folder}: no .json/.jsonl records in folder")
    assert "2 file(s): .txt" in str(err.value)


def test_folder_of_jsonl_files_still_loads(tmp_path):
    from cut.data.records import load_records

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(RECORD) + "\n")
    assert load_records(str(folder))[0].output == "8"


# --------------------------------------------------------------------------------------------
# generation: prompts longer than the model's context are cut from the left
# --------------------------------------------------------------------------------------------


def test_100k_character_instruction_is_cut_to_the_context(tiny_model, tmp_path, monkeypatch, caplog):
    import cut.modeling.generate as gen

    long = ("What is the capital of France? " * 3300)[:100_000]
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"instruction": long}, {"instruction": "Add 3 and 4."}]))
    seen: list[int] = []
    original = gen._generate_batch

    def spy(model, tokenizer, rows, gen_config):
        seen.extend(len(r) for r in rows)
        return original(model, tokenizer, rows, gen_config)

    monkeypatch.setattr(gen, "_generate_batch", spy)
    with caplog.at_level(logging.WARNING, logger="cut.modeling.generate"):
        rows = gen.generate_file(
            str(tiny_model), str(data), str(tmp_path / "a.json"), max_new_tokens=4, batch_size=2,
            progress=False, device="cpu", dtype="float32", prompt_template_name="alpaca",
        )  # fmt: skip
    context = 512  # the tiny Llama's max_position_embeddings; its tokenizer sets no limit
    assert [r["instruction"] for r in rows] == [long, "Add 3 and 4."]
    assert max(seen) == context - 4 and min(seen) < 50
    assert (
        "1 of 2 prompts are longer than the model's context (512 tokens) minus max_new_tokens (4)"
        in caplog.text
    )


def test_fit_prompts_keeps_bos_and_short_prompts():
    from types import SimpleNamespace

    from cut.errors import ConfigError
    from cut.modeling.generate import fit_prompts

    tok = SimpleNamespace(bos_token_id=1)
    rows = [[1, *range(10, 30)], [5, 6, 7], list(range(40, 60))]
    fitted = fit_prompts(rows, context=12, max_new_tokens=4, tokenizer=tok)
    assert fitted == [[1, *range(23, 30)], [5, 6, 7], list(range(52, 60))]
    assert fit_prompts(rows, None, 4, tok) == rows
    with pytest.raises(ConfigError, match="max_new_tokens=12 leaves no room"):
        fit_prompts(rows, context=12, max_new_tokens=12, tokenizer=tok)


def test_context_length_takes_the_smaller_sane_limit():
    from types import SimpleNamespace

    from cut.modeling.generate import context_length

    cfg = SimpleNamespace(max_position_embeddings=2048)
    assert context_length(cfg, SimpleNamespace(model_max_length=int(1e30))) == 2048
    assert context_length(cfg, SimpleNamespace(model_max_length=1024)) == 1024
    assert context_length(SimpleNamespace(), SimpleNamespace(model_max_length=int(1e30))) is None


# --------------------------------------------------------------------------------------------
# clear failures: unwritable outputs, bad adapters, leftovers of killed merges
# --------------------------------------------------------------------------------------------


def _blocked(tmp_path, name: str):
    """A path under a regular file: no one, root included, can create it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return blocker, blocker / name


def test_unwritable_output_file_is_refused_by_generate(tiny_model, tmp_path, capsys, monkeypatch):
    import cut.modeling.generate as gen

    monkeypatch.setattr(gen, "load_tokenizer", lambda *a: pytest.fail("the tokenizer was loaded"))
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"instruction": "Add 3 and 4."}]))
    blocker, out = _blocked(tmp_path, "answers.json")
    assert gen.main(["--model", str(tiny_model), "--data_path", str(data), "--output_file", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"cut.generate: error: output_file {out}: cannot be written: {blocker} is a file, not a folder"
    )


def test_unwritable_output_file_is_refused_by_judge_before_judging(tmp_path, capsys, monkeypatch):
    import cut.judges.judge as judge

    monkeypatch.setattr(judge, "make_judge", lambda *a: pytest.fail("a judge was made"))
    data = tmp_path / "answers.json"
    data.write_text(json.dumps([{"instruction": "Add 3 and 4.", "output": "7", "reference": "7"}]))
    blocker, out = _blocked(tmp_path, "judged.json")
    assert judge.main(["--input_file", str(data), "--output_file", str(out), "--judge", "reference"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cut.judge: error: output_file {out}: cannot be written: {blocker} is a file, not a folder"


def test_check_writable_probes_the_nearest_existing_folder(tmp_path):
    from cut.data.files import check_writable
    from cut.errors import ConfigError

    check_writable(tmp_path / "new" / "deeper" / "out", "output_dir")  # creatable: fine
    assert list(tmp_path.iterdir()) == [], "the check left something behind"
    with pytest.raises(ConfigError, match="cannot be written: /proc"):
        check_writable("/proc/cut-test-out", "output_dir")  # procfs takes no new files, not even root's


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    from cut.training.train import run

    from conftest import TINY_RECORDS
    from test_train import tiny_config

    tmp = tmp_path_factory.mktemp("adapter")
    data = tmp / "d.json"
    data.write_text(json.dumps(TINY_RECORDS))
    run(tiny_config(tiny_model, data, tmp / "adapter", max_steps=1))
    return tmp / "adapter"


def _merge_argv(base, adapter_dir, out) -> list[str]:
    return ["--base_model", str(base), "--adapter", str(adapter_dir), "--output_dir", str(out)]


def test_unwritable_output_is_refused_by_merge(tiny_model, adapter, tmp_path, capsys):
    from cut.modeling.merge import main as merge_main

    blocker, out = _blocked(tmp_path, "merged")
    assert merge_main(_merge_argv(tiny_model, adapter, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cut.merge: error: output_dir {out}: cannot be written: {blocker} is a file, not a folder"


def test_merge_onto_another_base_is_a_named_error(tiny_model, adapter, tmp_path, capsys):
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from cut.modeling.merge import main as merge_main

    other = tmp_path / "wider"  # the same tokenizer, a wider model: every LoRA shape differs
    shutil.copytree(tiny_model, other)
    config = AutoConfig.from_pretrained(other)
    config.hidden_size, config.intermediate_size = 96, 192
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    assert merge_main(_merge_argv(other, adapter, tmp_path / "merged")) == 2
    full = capsys.readouterr().err
    err = full.strip().splitlines()[-1]  # after the progress bar of loading the base
    assert err.startswith(f"cut.merge: error: {adapter}: adapter does not fit base model {other}: ")
    assert "size mismatch" in err
    assert "Traceback" not in full and not (tmp_path / "merged").exists()


def test_merge_of_a_cut_short_adapter_is_a_named_error(tiny_model, adapter, tmp_path, capsys):
    import shutil

    from cut.modeling.merge import main as merge_main

    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert merge_main(_merge_argv(tiny_model, broken, tmp_path / "merged")) == 2
    full = capsys.readouterr().err
    err = full.strip().splitlines()[-1]
    assert err.startswith(f"cut.merge: error: {broken}: cannot read the adapter (cut short or damaged?): ")
    assert "Traceback" not in full and not (tmp_path / "merged").exists()


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_stale_removes_only_folders_of_dead_or_older_merges(tmp_path):
    import os
    import time

    from cut.modeling.merge import OWNER, _start_time, clean_stale

    def folder(name: str, owner: str | None = None, age: float = 0) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("half")
        if owner is not None:
            (tmp_path / name / OWNER).write_text(owner)
        if age:
            then = time.time() - age
            os.utime(tmp_path / name, (then, then))

    me = f"{os.getpid()} {_start_time(os.getpid())}"
    dead = _dead_pid()
    (tmp_path / "merged").mkdir()
    folder(".merged.dead0000", owner=f"{dead} 123")
    folder(".merged.reused00", owner=f"{os.getpid()} 1")  # our pid, but another process's start time
    folder(".merged.alive000", owner=me, age=3600)  # a merge still running: kept however old
    folder(".merged.noowner0", age=3600)  # older than this run, no owner: stale
    folder(".merged.noowner1")  # made after this run started: another merge's, kept
    folder(f".merged.old-{dead}")
    folder(".other.dead0000", owner=f"{dead} 123")  # another output's: not ours to judge
    removed = clean_stale(tmp_path / "merged", run_start=time.time() - 60)
    assert sorted(p.name for p in removed) == sorted(
        [".merged.dead0000", ".merged.reused00", ".merged.noowner0", f".merged.old-{dead}"]
    )
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".merged.alive000", ".merged.noowner1", ".other.dead0000", "merged"]


def test_clean_stale_puts_back_a_model_moved_aside_by_a_killed_merge(tmp_path):
    from cut.modeling.merge import clean_stale

    old = tmp_path / f".merged.old-{_dead_pid()}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    clean_stale(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").exists() and not old.exists()


KILLED_MERGE = """
import sys, time
import cut.modeling.merge as m
load = m.load_tokenizer
def slow(*a, **k):  # the merge stops (to be killed) after its tokenizer is saved
    tok = load(*a, **k)
    save = tok.save_pretrained
    def stall(d, *x, **y):
        out = save(d, *x, **y)
        time.sleep(600)
        return out
    tok.save_pretrained = stall
    return tok
m.load_tokenizer = slow
sys.exit(m.main(sys.argv[1:]))
"""


def test_sigkilled_merge_leftover_is_cleaned_by_the_next_run(tiny_model, adapter, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from cut.modeling.merge import main as merge_main

    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_MERGE, *_merge_argv(tiny_model, adapter, out)], env=env
    )
    deadline = time.time() + 240
    while not list(tmp_path.glob(".merged.*/tokenizer_config.json")):
        assert proc.poll() is None and time.time() < deadline, "the merge ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftover = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    assert len(leftover) == 1 and (leftover[0] / "model.safetensors").exists()
    assert merge_main(_merge_argv(tiny_model, adapter, out)) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")], "the stale folder was kept"
    assert (out / "model.safetensors").exists() and not (out / ".cut_merge_owner").exists()


# --------------------------------------------------------------------------------------------
# online: the build stage's counts add up with the judge stage's
# --------------------------------------------------------------------------------------------


def test_empty_responses_count_as_failed_left_out(tmp_path):
    from cut.judges.judge import Verdict, judge_file
    from cut.loop.online import build_training_file

    responses = [
        {"instruction": "a", "output": "fine"},
        {"instruction": "b", "output": "   "},  # empty: counted failed by the judge, never written
        {"instruction": "c", "output": "wrong"},
        {"instruction": "d", "output": "?"},
    ]
    verdicts = {"fine": Verdict("positive", None, None), "wrong": Verdict("negative", "It is wrong.", None)}

    class Judge:
        name = "stub"

        def judge(self, records, progress=None):
            return [verdicts.get(r["output"], Verdict("failed", None, "timeout")) for r in records]

    (tmp_path / "responses.json").write_text(json.dumps(responses))
    judged = judge_file(str(tmp_path / "responses.json"), str(tmp_path / "judged.json"), Judge())
    assert judged["failed"] == 2 and len(json.loads((tmp_path / "judged.json").read_text())) == 3
    counts = build_training_file(tmp_path / "judged.json", tmp_path / "train.json")["counts"]
    assert counts == {
        "train_records": 2,
        "failed_left_out": 2,
        "empty_responses": 1,
        "train_negatives": 1,
        "train_positives": 1,
    }
    assert counts["failed_left_out"] == judged["failed"]
    assert counts["train_records"] + counts["failed_left_out"] == len(responses)
