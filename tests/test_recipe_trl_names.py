"""TRL's option names in the preference baselines: `cut dpo` / `cut kto` take every name `cut train`
takes (cut.training.config.TRL_ALIASES, gradient_accumulation_steps, the refused ones), plus their
own: DPOConfig's / KTOConfig's beta is --dpo_beta / --kto_beta, KTOConfig's desirable_weight is
KTOOptions', and loss_type / undesirable_weight are taken only at the value the recipe trains."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml

from cut import cli
from cut.errors import ConfigError
from cut.training import config, dpo, kto

RECIPES = {"dpo": (dpo.parse_config, "--dpo_beta"), "kto": (kto.parse, "--kto_beta")}


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def yaml_file(tmp_path, data: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_trl_command_line_sets_what_it_means(recipe):
    parse, _ = RECIPES[recipe]
    cfg, opts = parse(
        [
            *("--num_train_epochs", "1", "--per_device_train_batch_size", "2"),
            *("--gradient_accumulation_steps", "4", "--bf16", "--beta", "0.2"),
            *("--model_name_or_path", "M", "--dataset_name", "D", "--max_length", "256"),
            *("--lr_scheduler_type", "linear", "--run_name", "r1", "--dataset_train_split", "dev"),
        ]
    )
    assert (cfg.num_epochs, cfg.micro_batch_size, cfg.batch_size, cfg.precision) == (1.0, 2, 8, "bf16")
    assert (cfg.base_model, cfg.data_path, cfg.cutoff_len, cfg.lr_scheduler) == ("M", "D", 256, "linear")
    assert (cfg.wandb_run_name, cfg.dataset_split, opts.beta) == ("r1", "dev", 0.2)
    assert cfg.gradient_accumulation_steps(1) == 4  # what TRL's trainer gets back


@pytest.mark.parametrize("recipe", RECIPES)
def test_trl_names_in_the_yaml_and_flags_over_them(recipe, tmp_path):
    parse, own = RECIPES[recipe]
    path = yaml_file(
        tmp_path,
        {"beta": 0.3, "fp16": True, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
         "use_peft": True, "max_seq_length": 64, "rejected_tokens": "spans"},
    )  # fmt: skip
    cfg, opts = parse(["--config", path])
    assert (opts.beta, opts.rejected_tokens, cfg.precision, cfg.batch_size) == (0.3, "spans", "fp16", 8)
    assert (cfg.full_finetune, cfg.cutoff_len) == (False, 64)
    assert parse(["--config", path, own, "0.05"])[1].beta == 0.05  # a flag over the YAML's TRL name
    assert parse(["--config", path, "--batch_size", "4"])[0].batch_size == 4  # replaces the accumulation


@pytest.mark.parametrize("recipe", RECIPES)
def test_one_option_under_two_names_must_agree(recipe, tmp_path):
    parse, own = RECIPES[recipe]
    key = own[2:]
    with pytest.raises(
        ConfigError, match=rf"flags: {key} \('0.3'\) and beta \('0.2'\) set beta to different"
    ):
        parse(["--beta", "0.2", own, "0.3"])
    assert parse(["--beta", "0.2", own, "0.20"])[1].beta == 0.2  # one value, two spellings
    path = yaml_file(tmp_path, {"beta": 0.2, key: 0.3})
    with pytest.raises(ConfigError, match=rf"{path}: {key} \(0.3\) and beta \(0.2\) set beta"):
        parse(["--config", path])
    with pytest.raises(ConfigError, match="num_train_epochs .* and num_epochs .* set num_epochs"):
        parse(["--num_epochs", "1", "--num_train_epochs", "2"])
    with pytest.raises(ConfigError, match="fp16 .* and bf16 .* set precision to different values"):
        parse(["--bf16", "--fp16"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_gradient_accumulation_counts_the_processes(recipe, monkeypatch):
    parse, _ = RECIPES[recipe]
    monkeypatch.setenv("WORLD_SIZE", "4")
    argv = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3"]
    cfg, _ = parse(argv)
    assert cfg.batch_size == 24 and cfg.gradient_accumulation_steps(4) == 3
    assert parse([*argv, "--batch_size", "24"])[0].batch_size == 24
    with pytest.raises(ConfigError, match=r"batch_size 32 disagrees.*2 x 3 x 4 process\(es\) = 24"):
        parse([*argv, "--batch_size", "32"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be a whole number >= 1"):
        parse(["--gradient_accumulation_steps", "0"])


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", ["push_to_hub", "hub_model_id", "eval_strategy", "load_in_4bit"])
def test_trl_options_without_meaning_say_what_to_do(recipe, name, tmp_path):
    parse, _ = RECIPES[recipe]
    hint = config.TRL_REFUSED[name]
    with pytest.raises(ConfigError, match=rf"option {name} \(TRL\) has no meaning in cut: {re.escape(hint)}"):
        parse([f"--{name}", "x"])
    path = yaml_file(tmp_path, {name: "x"})
    with pytest.raises(ConfigError, match=f"{path}: option {name}"):
        parse(["--config", path])


def test_dpo_takes_loss_type_only_as_the_loss_it_trains(tmp_path):
    assert dpo.parse_config(["--loss_type", "sigmoid"])[1] == dpo.DPOOptions()
    assert (
        dpo.parse_config(["--config", yaml_file(tmp_path, {"loss_type": ["sigmoid"]})])[1] == dpo.DPOOptions()
    )
    with pytest.raises(ConfigError) as err:
        dpo.parse_config(["--loss_type", "ipo"])
    message = str(err.value)
    assert "option loss_type (TRL) must be 'sigmoid' here, got 'ipo'" in message
    assert "sigmoid DPO loss" in message and "trl dpo" in message
    assert "--combine" not in message  # not cut train's hint: the objective here is DPO
    with pytest.raises(ConfigError, match="must be 'sigmoid' here, got \\['sigmoid', 'sft'\\]"):
        dpo.parse_config(["--config", yaml_file(tmp_path, {"loss_type": ["sigmoid", "sft"]})])
    # cut train keeps its own refusals of the recipes' names
    with pytest.raises(ConfigError, match="loss_type .* its knobs are --combine"):
        config.parse_config(["--loss_type", "ipo"])
    with pytest.raises(ConfigError, match="CUT has no DPO beta"):
        config.parse_config(["--beta", "0.1"])


def test_kto_weights_and_loss_type(tmp_path):
    _, opts = kto.parse(["--desirable_weight", "1.5", "--undesirable_weight", "1", "--loss_type", "kto"])
    assert (opts.desirable_weight, opts.beta) == (1.5, 0.1)
    with pytest.raises(
        ConfigError, match="undesirable_weight .* must be 1.0 here, got '2'.*--desirable_weight"
    ):
        kto.parse(["--undesirable_weight", "2"])
    with pytest.raises(ConfigError, match="loss_type .* must be 'kto' here, got 'apo_zero_unpaired'"):
        kto.parse(["--config", yaml_file(tmp_path, {"loss_type": "apo_zero_unpaired"})])
    with pytest.raises(SystemExit):  # DPO's loss has no place in KTO: an unknown option
        kto.parse(["--dpo_beta", "0.1"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_help_lists_the_trl_names(recipe, capsys):
    parse, own = RECIPES[recipe]
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = capsys.readouterr().out
    recipe_part, trl_part = out.split("\nrecipe:")[1].split("\nTRL option names:")
    assert f"  {own} BETA" in recipe_part and "--beta" not in recipe_part
    for name in ("--num_train_epochs", "--per_device_train_batch_size", "--gradient_accumulation_steps"):
        assert name in trl_part
    assert "--push_to_hub" in trl_part and "refused: cut does not upload" in trl_part
    assert re.search(rf"--beta BETA\s+= {own}\n", trl_part) and "--loss_type LOSS_TYPE" in trl_part
    assert "CUT has no DPO beta" not in out and "its knobs are --combine" not in out


def test_cut_dpo_with_trl_names_end_to_end(tiny_model, tiny_data, tmp_path):
    """A TRL user's command line through `cut dpo`: the saved configs hold what the names mean."""
    out = tmp_path / "dpo"
    path = yaml_file(
        tmp_path,
        {"lora_target_modules": ["all-linear"], "lora_dropout": 0.0, "seed": 0, "warmup_steps": 0,
         "lr_scheduler_type": "constant", "max_length": 128},
    )  # fmt: skip
    argv = [
        *("dpo", "--config", path, "--model_name_or_path", str(tiny_model), "--dataset_name", str(tiny_data)),
        *(
            "--output_dir",
            str(out),
            "--per_device_train_batch_size",
            "1",
            "--gradient_accumulation_steps",
            "2",
        ),
        *("--max_steps", "2", "--learning_rate", "5e-3", "--beta", "0.2", "--loss_type", "sigmoid"),
        *("--run_name", "trl-names", "--bf16", "false", "--use_peft"),
    ]
    assert cli.main(argv) == 0
    saved = yaml.safe_load((out / "cut_config.yaml").read_text())
    assert (saved["base_model"], saved["data_path"]) == (str(tiny_model), str(tiny_data))
    assert (saved["micro_batch_size"], saved["batch_size"], saved["max_steps"]) == (1, 2, 2)
    assert (saved["cutoff_len"], saved["lr_scheduler"], saved["wandb_run_name"]) == (
        128,
        "constant",
        "trl-names",
    )
    assert (saved["precision"], saved["full_finetune"]) == ("fp32", False)
    assert yaml.safe_load((out / "dpo_config.yaml").read_text())["beta"] == 0.2
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [h for h in metrics["log_history"] if "loss" in h]
    assert metrics["beta"] == 0.2 and len(steps) == 2 and all(math.isfinite(h["loss"]) for h in steps)
    # gradient_accumulation_steps 2 reached TRL: the first optimiser step took 2 of the 3 pairs (1 each: 1/3)
    assert steps[0]["epoch"] == pytest.approx(2 / 3, abs=1e-3)
