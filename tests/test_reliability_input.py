"""Issue 11: bad options, bad data and unwritable outputs stop early with one named line (exit 2),
and nothing is written; long prompts in generation stay bounded; manifest counts add up."""

from __future__ import annotations

import pytest

from cut.train import main as train_main

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
