"""Tests for cut.config: defaults <- YAML <- flags, coercion, validation and saving."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from cut.errors import ConfigError
from cut.training.config import TrainConfig, load_yaml, parse_config


def write_yaml(tmp_path: Path, data: dict, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def valid(**kw) -> TrainConfig:
    return TrainConfig(**{"base_model": "m", "data_path": "d.json", **kw})


# --------------------------------------------------------------------------------------------
# defaults
# --------------------------------------------------------------------------------------------


def test_defaults_match_the_released_flags():
    cfg = parse_config([])
    assert cfg.batch_size == 128
    assert cfg.micro_batch_size == 8
    assert cfg.learning_rate == 3e-4
    assert cfg.cutoff_len == 4096
    assert cfg.lora_r == 16
    assert cfg.lora_alpha == 16
    assert cfg.lora_dropout == 0.05
    assert cfg.lora_target_modules == ["gate_proj", "down_proj", "up_proj"]
    assert cfg.threshold == 1.1
    assert cfg.weight_unlike == 0.1
    assert cfg.downsample == -1
    assert cfg.prompt_template_name == "alpaca"
    assert cfg == TrainConfig()


def test_default_list_is_not_shared():
    a, b = TrainConfig(), TrainConfig()
    a.lora_target_modules.append("q_proj")
    assert b.lora_target_modules == ["gate_proj", "down_proj", "up_proj"]


# --------------------------------------------------------------------------------------------
# YAML and flags
# --------------------------------------------------------------------------------------------


def test_yaml_keys_fill_the_config(tmp_path):
    path = write_yaml(
        tmp_path,
        {"base_model": "m", "batch_size": 16, "lora_target_modules": ["q_proj", "v_proj"], "num_epochs": 3},
    )
    cfg = parse_config(["--config", path])
    assert cfg.base_model == "m"
    assert cfg.batch_size == 16
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.num_epochs == 3.0 and isinstance(cfg.num_epochs, float)
    assert cfg.micro_batch_size == 8  # untouched keys keep their defaults


def test_flags_override_yaml(tmp_path):
    path = write_yaml(tmp_path, {"batch_size": 16, "learning_rate": 1e-3, "base_model": "yaml"})
    cfg = parse_config(["--batch_size", "32", "--config", path, "--base_model=flag"])
    assert cfg.batch_size == 32
    assert cfg.base_model == "flag"
    assert cfg.learning_rate == 1e-3


def test_equals_and_space_forms():
    assert parse_config(["--lora_r=8"]).lora_r == 8
    assert parse_config(["--lora_r", "8"]).lora_r == 8
    assert parse_config(["--downsample", "-1"]).downsample == -1
    assert parse_config(["--downsample=0.5"]).downsample == 0.5


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--train_on_inputs"], True),
        (["--train_on_inputs", "false"], False),
        (["--train_on_inputs=False"], False),
        (["--train_on_inputs", "true"], True),
        (["--train_on_inputs", "1"], True),
        (["--train_on_inputs", "--lora_r", "4"], True),
        ([], False),
    ],
)
def test_bool_flags(argv, expected):
    assert parse_config(argv).train_on_inputs is expected


def test_bool_flag_false_overrides_yaml_true(tmp_path):
    path = write_yaml(tmp_path, {"add_eos_token": True})
    assert parse_config(["--config", path, "--add_eos_token", "false"]).add_eos_token is False


def test_bad_bool_is_a_config_error():
    with pytest.raises(ConfigError, match="train_on_inputs"):
        parse_config(["--train_on_inputs", "maybe"])


@pytest.mark.parametrize(
    "value",
    ["[q_proj,v_proj]", '["q_proj", "v_proj"]', "q_proj,v_proj", "q_proj, v_proj", "['q_proj','v_proj']"],
)
def test_list_flag_styles(value):
    assert parse_config(["--lora_target_modules", value]).lora_target_modules == ["q_proj", "v_proj"]


def test_single_list_item():
    assert parse_config(["--lora_target_modules=all-linear"]).lora_target_modules == ["all-linear"]


def test_numeric_looking_string_stays_a_string():
    cfg = parse_config(["--wandb_run_name=001"])
    assert cfg.wandb_run_name == "001"
    assert isinstance(cfg.wandb_run_name, str)


def test_num_epochs_becomes_float():
    cfg = parse_config(["--num_epochs", "2"])
    assert cfg.num_epochs == 2.0
    assert isinstance(cfg.num_epochs, float)


def test_int_flags_are_ints():
    cfg = parse_config(["--micro_batch_size", "4", "--batch_size", "1e2"])
    assert cfg.micro_batch_size == 4 and isinstance(cfg.micro_batch_size, int)
    assert cfg.batch_size == 100 and isinstance(cfg.batch_size, int)


@pytest.mark.parametrize("argv", [["--local_rank=1"], ["--local_rank", "0"], ["--local-rank=3"]])
def test_deepspeed_local_rank_is_accepted_and_ignored(argv):
    cfg = parse_config([*argv, "--lora_r", "4"])
    assert cfg.lora_r == 4
    assert "local_rank" not in cfg.to_dict()
    assert cfg == TrainConfig(lora_r=4)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    path = write_yaml(tmp_path, {"batch_size": 8, "micro_batch": 2})
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", path])
    assert path in str(err.value)
    assert "micro_batch" in str(err.value)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping") as err:
        load_yaml(path)
    assert str(path) in str(err.value)


def test_missing_yaml_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read") as err:
        parse_config(["--config", path])
    assert path in str(err.value)


def test_bad_yaml_value_names_the_option(tmp_path):
    path = write_yaml(tmp_path, {"lora_r": "sixteen"})
    with pytest.raises(ConfigError, match="lora_r"):
        load_yaml(path)


@pytest.mark.parametrize("argv", [["--no_such_flag", "1"], ["--lora"], ["--batch-size", "4"]])
def test_unknown_flag_exits(argv, capsys):
    with pytest.raises(SystemExit) as err:
        parse_config(argv)
    assert err.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--micro_batch_size", "abc"], "micro_batch_size"),
        (["--micro_batch_size", "8.5"], "micro_batch_size"),
        (["--learning_rate", "fast"], "learning_rate"),
    ],
)
def test_bad_value_names_the_option(argv, option):
    with pytest.raises(ConfigError, match=option):
        parse_config(argv)


def test_fractional_exponent_int_is_rejected():
    with pytest.raises(ConfigError, match="micro_batch_size"):
        parse_config(["--micro_batch_size", "1.5e0"])


def test_validate_accepts_a_complete_config():
    valid().validate()


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"base_model": ""}, "--base_model"),
        ({"data_path": ""}, "--data_path"),
        ({"batch_size": 4, "micro_batch_size": 8}, "batch_size"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"threshold": 0}, "threshold"),
        ({"threshold": -1.0}, "threshold"),
        ({"combine": "product"}, "combine"),
        ({"on_failed_judgment": "keep"}, "on_failed_judgment"),
        ({"precision": "fp8"}, "precision"),
        ({"downsample": -0.5}, "downsample"),
        ({"weight_unlike": -0.1}, "weight_unlike"),
    ],
)
def test_validate_rejects(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        valid(**kw).validate()


def test_bad_combine_from_the_command_line_fails_validation():
    cfg = parse_config(["--base_model", "m", "--data_path", "d.json", "--combine", "product"])
    with pytest.raises(ConfigError, match="combine"):
        cfg.validate()


def test_combine_sum_is_valid():
    valid(combine="sum").validate()


def test_gradient_accumulation_steps():
    cfg = valid(batch_size=128, micro_batch_size=8)
    assert cfg.gradient_accumulation_steps(2) == 8
    assert cfg.gradient_accumulation_steps(1) == 16
    with pytest.raises(ConfigError, match="not a multiple"):
        cfg.gradient_accumulation_steps(3)
    with pytest.raises(ConfigError, match="not a multiple"):
        valid(batch_size=100, micro_batch_size=8).gradient_accumulation_steps(1)


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------


def test_save_round_trip(tmp_path):
    cfg = parse_config(
        [
            "--base_model=m",
            "--data_path=d.jsonl",
            "--wandb_run_name=001",
            "--resume_from_checkpoint=true",
            "--lora_target_modules=[q_proj,v_proj]",
            "--num_epochs=2",
            "--train_on_inputs",
            "--downsample=0.25",
        ]
    )
    path = tmp_path / "out" / "train_config.yaml"
    cfg.save(path)
    assert path.exists()
    assert list(path.parent.iterdir()) == [path]  # no .tmp left behind
    loaded = TrainConfig(**load_yaml(path))
    assert loaded == cfg
    assert loaded.wandb_run_name == "001"
    assert loaded.resume_from_checkpoint == "true"
    assert set(yaml.safe_load(path.read_text())) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_saved_yaml_feeds_parse_config(tmp_path):
    cfg = valid(lora_r=4, threshold=1.5)
    path = tmp_path / "c.yaml"
    cfg.save(path)
    assert parse_config(["--config", str(path)]) == cfg
    assert parse_config(["--config", str(path), "--lora_r", "2"]).lora_r == 2


# --------------------------------------------------------------------------------------------
# TRL option names
# --------------------------------------------------------------------------------------------


def test_trl_names_set_the_fields_they_mean(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = parse_config(
        [
            "--model_name_or_path=m",
            "--dataset_name=d.json",
            "--num_train_epochs=2",
            "--per_device_train_batch_size=4",
            "--gradient_accumulation_steps=8",
            "--bf16",
            "--max_length=512",
            "--lr_scheduler_type=linear",
            "--run_name=001",
            "--use_peft=false",
            "--completion_only_loss=false",
        ]
    )
    assert (cfg.base_model, cfg.data_path, cfg.num_epochs, cfg.micro_batch_size) == ("m", "d.json", 2.0, 4)
    assert (cfg.batch_size, cfg.precision, cfg.cutoff_len, cfg.lr_scheduler) == (32, "bf16", 512, "linear")
    assert (cfg.wandb_run_name, cfg.full_finetune, cfg.train_on_inputs) == ("001", True, True)


def test_gradient_accumulation_counts_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = parse_config(["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3"])
    assert cfg.batch_size == 24
    assert cfg.gradient_accumulation_steps(4) == 3  # what the Trainer gets back


def test_gradient_accumulation_must_agree_with_batch_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--micro_batch_size", "4", "--gradient_accumulation_steps", "2"]
    assert parse_config([*argv, "--batch_size", "16"]).batch_size == 16
    with pytest.raises(ConfigError, match=r"batch_size 32 disagrees.*4 x 2 x 2 process\(es\) = 16"):
        parse_config([*argv, "--batch_size", "32"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be a whole number >= 1"):
        parse_config(["--gradient_accumulation_steps", "0"])


def test_flags_replace_yaml_batch_size_or_accumulation(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = write_yaml(tmp_path, {"gradient_accumulation_steps": 4, "per_device_train_batch_size": 2})
    assert parse_config(["--config", path]).batch_size == 8
    assert parse_config(["--config", path, "--batch_size", "6"]).batch_size == 6  # flag wins
    path = write_yaml(tmp_path, {"batch_size": 64, "micro_batch_size": 2}, "b.yaml")
    assert parse_config(["--config", path, "--gradient_accumulation_steps", "3"]).batch_size == 6


def test_trl_names_in_yaml(tmp_path):
    path = write_yaml(tmp_path, {"num_train_epochs": 3, "fp16": True, "max_seq_length": 256})
    cfg = parse_config(["--config", path])
    assert (cfg.num_epochs, cfg.precision, cfg.cutoff_len) == (3.0, "fp16", 256)
    assert load_yaml(path) == {"num_epochs": 3.0, "precision": "fp16", "cutoff_len": 256}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--bf16", "false"], "fp32"),
        (["--bf16", "false", "--fp16"], "fp16"),
        (["--torch_dtype", "bfloat16"], "bf16"),
        (["--dtype", "torch.float16"], "fp16"),
        (["--bf16", "--precision", "bfloat16"], "bf16"),
    ],
)
def test_bf16_fp16_map_onto_precision(argv, expected):
    assert parse_config(argv).precision == expected


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--bf16", "--fp16"], "fp16 .* and bf16 .* set precision to different values"),
        (["--bf16", "--precision", "fp32"], "set precision to different values"),
        (["--num_epochs", "1", "--num_train_epochs", "2"], "num_train_epochs .* and num_epochs"),
        (["--precision", "bf16", "--bf16", "false"], "precision is bf16 but bf16 is set false"),
    ],
)
def test_one_option_under_two_names_must_agree(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


@pytest.mark.parametrize("name", ["push_to_hub", "hub_model_id", "dataset_text_field", "eval_strategy"])
def test_trl_options_without_meaning_say_what_to_do(name, tmp_path):
    with pytest.raises(ConfigError, match=f"option {name} \\(TRL\\) has no meaning in cut: .+"):
        parse_config([f"--{name}", "x"])
    path = write_yaml(tmp_path, {name: "x"})
    with pytest.raises(ConfigError, match=f"{path}: option {name}"):
        load_yaml(path)


def test_help_lists_the_trl_names(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    out = capsys.readouterr().out
    assert "TRL option names" in out
    for name in ("--num_train_epochs", "--per_device_train_batch_size", "--gradient_accumulation_steps"):
        assert name in out
    assert "--push_to_hub" in out and "refused: cut does not upload" in out


def test_dataset_config_and_split_options():
    cfg = parse_config(
        ["--dataset_name", "org/data", "--dataset_config", "alt", "--dataset_train_split", "test"]
    )
    assert (cfg.data_path, cfg.dataset_config, cfg.dataset_split) == ("org/data", "alt", "test")
    assert TrainConfig().dataset_split == "train"


def test_ranges_and_choices_are_declared_on_the_fields():
    """TrainConfig is a cut.args Options: each field's range / choices are checked by the generic
    layer; `rules` keeps what no single declaration says; required paths are validate's."""
    from cut.args import Options

    assert issubclass(TrainConfig, Options)
    assert TrainConfig.option_fields()["lora_dropout"][0].metadata["hi_open"] is True
    with pytest.raises(ConfigError, match=r"lora_dropout must be in \[0, 1\), got 1.0"):
        valid(lora_dropout=1.0).check_values()
    with pytest.raises(ConfigError, match="combine must be one of mean, sum; got 'x'"):
        valid(combine="x").check_values()
    with pytest.raises(ConfigError, match="downsample must be -1"):
        valid(downsample=-2).check_values()
    TrainConfig(base_model="").check_values()  # values alone: the missing paths are validate's
    with pytest.raises(ConfigError, match="missing required option"):
        TrainConfig(base_model="").validate()
    assert TrainConfig.parse(["--lora_r", "4", "--num_train_epochs", "2"], prog="t") == TrainConfig(
        lora_r=4, num_epochs=2
    )
