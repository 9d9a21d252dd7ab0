"""Issue 23, the loop's tools: realign, online, compare, tune and the preference baselines refuse bad
settings before any model loads, any request is sent or anything is written, in one line naming
the option (exit 2); outputs are never the inputs; a refused rerun leaves the run it found as it was;
names from config files never become paths outside their folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import pytest
import yaml

from cut.data.files import write_json_atomic

from fake_openai import FakeOpenAI
from helpers import write_online_config

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Any model or tokenizer load fails the test: refusals come before them."""
    import transformers

    from cut import models

    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded: {args[:1]}")

    for owner, name in (
        (models, "load_model"),
        (models, "load_tokenizer"),
        (transformers.AutoModelForCausalLM, "from_pretrained"),
        (transformers.AutoTokenizer, "from_pretrained"),
    ):
        monkeypatch.setattr(owner, name, refuse)


@pytest.fixture()
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def call(main, argv: list[str]) -> int:
    """A tool's main: its return code, or the code of the SystemExit its parser raised."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def refused_in_one_line(capsys, option: str) -> str:
    """stderr is one line naming `option` (not as part of a longer name), no traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert re.search(rf"(?<![A-Za-z_]){re.escape(option)}(?![A-Za-z_])", err), (option, err)
    return err


def online_config(tmp: Path, model: str, pool_size: int = 10, **changes) -> Path:
    """The arithmetic loop on a small pool, with `changes` applied to the YAML."""
    from cut.tasks.arithmetic import make_problems

    pool, heldout = make_problems(pool_size, seed=3), make_problems(4, seed=4)
    loop = {"rounds": 2, "instructions_per_round": 4, "seed": 1, **changes}
    return write_online_config(tmp, model, pool, heldout, **loop)


# --------------------------------------------------------------------------------------------
# case 2: realign's output is never its input
# --------------------------------------------------------------------------------------------


def test_realign_refuses_output_equal_to_input_and_leaves_it_intact(tmp_path, capsys, no_proxy):
    """The input is an earlier realign output (accepted before); a rerun with other settings into the
    same file would have rewritten it with only the rows done so far after each chunk."""
    from cut.methods.realign import RealignConfig, main, realign_file

    class Stub:
        name = "stub"

        def complete(self, prompts, progress=None, sample=None):
            return [
                ("how_to" if p.startswith("Decide") else f"Revised response:\nSteps:\n\n1. {i}. Done.", None)
                for i, p in enumerate(prompts)
            ]

    rows = [
        {"instruction": f"How do I do thing {i}?", "output": f"Do thing {i} carefully, then stop."}
        for i in range(6)
    ]
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows))
    earlier = tmp_path / "realigned.json"
    realign_file(str(src), str(earlier), Stub(), RealignConfig(chunk_size=2, min_length_ratio=0.1))
    before = earlier.read_bytes()
    link = tmp_path / "same.json"
    link.symlink_to(earlier)
    with FakeOpenAI() as fake:
        for out in (earlier, link):
            argv = ["--input_file", str(earlier), "--output_file", str(out), "--rewriter", "openai"]
            argv += ["--base_url", fake.base_url, "--model", "m", "--chunk_size", "2", "--max_retries", "0"]
            assert call(main, argv) == 2
            refused_in_one_line(capsys, "--output_file")
        assert not fake.hits  # no request was sent
    assert earlier.read_bytes() == before
    assert not Path(str(earlier) + ".cache.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json", "realigned.json", "same.json"]


# --------------------------------------------------------------------------------------------
# case 3: a refused online rerun leaves the run it found as it was
# --------------------------------------------------------------------------------------------


def start_run(config: Path) -> Path:
    """What a started run leaves, made by the loop's own code: online_config.json, round 0's
    evaluation and round 1's manifest."""
    from cut.loop.online import Round, fingerprint, load_config

    cfg = load_config(str(config), {})
    root = Path(cfg.output_dir)
    root.mkdir()
    write_json_atomic(root / "online_config.json", dataclasses.asdict(cfg))
    answers = [{"instruction": "q", "output": "a", "correct": False}] * 4
    write_json_atomic(
        root / "round_0" / "eval.json", {"accuracy": 0.25, "correct": 1, "total": 4, "answers": answers}
    )
    Round(root, 1, cfg.base_model, fingerprint(cfg)).save()
    return root


@pytest.mark.parametrize("change, option", [({"seed": 99}, "seed"), ({"heldout": "other.json"}, "heldout")])
def test_refused_online_rerun_writes_nothing_and_shows_no_old_score(
    tiny_model, tmp_path, capsys, no_model_loads, change, option
):
    from cut.loop.online import main

    root = start_run(online_config(tmp_path, str(tiny_model)))
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    if option == "heldout":
        (tmp_path / "other.json").write_text((tmp_path / "heldout.json").read_text())
        change = {"heldout": str(tmp_path / "other.json")}
    config = online_config(tmp_path, str(tiny_model), **change)
    assert main(["--config", str(config)]) == 2
    out = capsys.readouterr()
    assert "round 0" not in out.out
    assert "other settings" in out.err and re.search(rf"\b{option}\b", out.err)
    assert "\n" not in out.err.strip() and "Traceback" not in out.err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files


def test_same_settings_resume_and_older_runs_are_checked_by_their_manifests(tiny_model, tmp_path):
    from cut.errors import ConfigError
    from cut.loop.online import check_same_run, load_config

    root = start_run(online_config(tmp_path, str(tiny_model)))
    same = load_config(str(online_config(tmp_path, str(tiny_model), rounds=5)), {})  # more rounds
    check_same_run(same)
    # online_config.json overwritten by a refused rerun before this fix: the manifests decide
    other = load_config(str(online_config(tmp_path, str(tiny_model), seed=99)), {})
    (root / "online_config.json").write_text(json.dumps(dataclasses.asdict(other)))
    check_same_run(same)
    with pytest.raises(ConfigError, match=r"round_1/manifest.json: was started with other settings; use"):
        check_same_run(other)
    (root / "online_config.json").unlink()  # a run from before the file was written
    with pytest.raises(ConfigError, match=r"round_1/manifest.json: was started with other settings"):
        check_same_run(other)
    # no round started yet, round 0 evaluated: online_config.json decides
    (root / "round_1" / "manifest.json").unlink()
    write_json_atomic(root / "online_config.json", dataclasses.asdict(same))
    with pytest.raises(ConfigError, match=r"holds a run started with other settings \(generate, seed\)"):
        check_same_run(other)
    check_same_run(same)


def test_compare_and_tune_reruns_accept_the_runs_they_made(tmp_path, no_model_loads):
    """The folders are checked before any objective runs, with the config run() gets: a trial's
    `weight_unflagged: 0` (an int the train section's validation makes 0.0) keeps its fingerprint."""
    from test_tune import write_config, write_trials

    from cut.loop.compare import preflight, variant_config
    from cut.loop.online import Round, fingerprint
    from cut.loop.tune import prepare

    trials = {"cut": {}, "cut_no_unflagged": {"train": {"weight_unflagged": 0}, "positive_share": 0.5}}
    base, variants = prepare(str(write_config(tmp_path, "unused-model")), str(write_trials(tmp_path, trials)))
    for name in variants:  # what run_all's run(cfg) leaves after round 1
        cfg = dataclasses.replace(variant_config(base, name, variants), rounds=1)
        write_json_atomic(Path(cfg.output_dir) / "online_config.json", dataclasses.asdict(cfg))
        Round(Path(cfg.output_dir), 1, cfg.base_model, fingerprint(cfg)).save()
    preflight(base, list(variants), variants)


# --------------------------------------------------------------------------------------------
# case 5: a report of nothing is refused
# --------------------------------------------------------------------------------------------


def test_compare_report_only_without_runs_is_refused(tmp_path, capsys):
    from cut.loop.compare import main

    config = online_config(tmp_path, "unused-model")
    assert main(["--config", str(config), "--objectives", "cut,sft", "--report_only"]) == 2
    err = refused_in_one_line(capsys, "--report_only")
    assert "holds no run" in err
    assert not (tmp_path / "online").exists()

    # one objective with a round: the report is written
    root = tmp_path / "online"
    ev = {"accuracy": 0.5, "correct": 1, "total": 2, "answers": [{"correct": True}, {"correct": False}]}
    for rel in ("cut/round_0/eval.json", "cut/round_1/eval.json"):
        write_json_atomic(root / rel, ev)
    write_json_atomic(root / "cut" / "round_1" / "manifest.json", {"stages": {}, "counts": {}})
    assert main(["--config", str(config), "--objectives", "cut,sft", "--report_only", "--rounds", "1"]) == 0
    assert (
        json.loads((root / "comparison.json").read_text())["objectives"]["cut"]["rounds"][0]["accuracy"]
        == 0.5
    )


def test_tune_report_only_without_runs_is_refused_and_writes_nothing(tmp_path, capsys):
    from test_tune import write_config, write_trials

    from cut.loop.tune import main

    cfg = write_config(tmp_path, "unused-model")
    trials = write_trials(tmp_path, {"cut": {}, "sft": {"objective": "sft"}})
    assert main(["--config", str(cfg), "--trials", str(trials), "--report_only"]) == 2
    refused_in_one_line(capsys, "--report_only")
    assert not (tmp_path / "tune").exists()  # not even the validation split


# --------------------------------------------------------------------------------------------
# case 16: online settings checked, with their types, before any model loads
# --------------------------------------------------------------------------------------------

ONLINE_BAD = [
    ({"rounds": "2"}, "rounds"),
    ({"rounds": 1.5}, "rounds"),
    ({"rounds": True}, "rounds"),
    ({"nproc_per_node": 0}, "nproc_per_node"),
    ({"eval_max_new_tokens": 0}, "eval_max_new_tokens"),
    ({"eval_max_new_tokens": -5}, "eval_max_new_tokens"),
    ({"eval_max_new_tokens": "six"}, "eval_max_new_tokens"),
    ({"eval_batch_size": 0}, "eval_batch_size"),
    ({"merge_dtype": "fp8"}, "merge_dtype"),
    ({"merge_dtype": 16}, "merge_dtype"),
    ({"instructions_per_round": "4"}, "instructions_per_round"),
    ({"samples_per_instruction": 0}, "samples_per_instruction"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"seed": "1"}, "seed"),
    ({"refine_tries": 2.0}, "refine_tries"),
    ({"base_model": 123}, "base_model"),
    ({"pool": ["a.json"]}, "pool"),
    ({"heldout": 5}, "heldout"),
    ({"output_dir": 7}, "output_dir"),
    ({"task": None}, "task"),
    ({"train": "lora"}, "train"),
    ({"generate": [1]}, "generate"),
    ({"judge": "reference"}, "judge"),
    ({"rounds": 100}, "rounds"),  # a 10-instruction pool: refused before round 1, not after two
]


@pytest.mark.parametrize(
    "change, option", ONLINE_BAD, ids=[f"{k}={v!r}" for c, _ in ONLINE_BAD for k, v in c.items()]
)
def test_online_setting_is_refused_before_any_model_loads(tmp_path, capsys, no_model_loads, change, option):
    from cut.loop.online import main

    config = online_config(tmp_path, str(tmp_path / "model"), **change)
    assert main(["--config", str(config)]) == 2
    err = refused_in_one_line(capsys, option)
    assert err.startswith("cut.online: error: ")
    assert not (tmp_path / "online").exists()
    if option == "rounds" and change["rounds"] == 100:
        assert "pool" in err and "need 400" in err


# --------------------------------------------------------------------------------------------
# case 17: tune's trials file
# --------------------------------------------------------------------------------------------

BAD_TRIALS = [
    ("trials:\n  1: {}\n", "trial 1"),
    ("trials:\n  null: {}\n", "trial None"),
    ("trials:\n  ../../x: {}\n", "trial '../../x'"),
    ("trials:\n  a/b: {}\n", "trial 'a/b'"),
    ("trials:\n  '..': {}\n", "trial '..'"),
    ("trials:\n  '': {}\n", "trial ''"),
    ("trials:\n  .hidden: {}\n", "trial '.hidden'"),
    ("trials:\n  /abs: {}\n", "trial '/abs'"),
    ("validation_size: abc\ntrials:\n  cut: {}\n", "validation_size"),
    ("validation_size: .nan\ntrials:\n  cut: {}\n", "validation_size"),
    ("validation_size: 1.5\ntrials:\n  cut: {}\n", "validation_size"),
    ("validation_size: true\ntrials:\n  cut: {}\n", "validation_size"),
    ("output_dir: [a]\ntrials:\n  cut: {}\n", "output_dir"),
    ("- cut\n", "trials file"),
    ("1: 2\n", "unknown option"),
]


@pytest.mark.parametrize(
    "text, what", BAD_TRIALS, ids=[t.split("\n")[0] + t.split("\n")[1] for t, _ in BAD_TRIALS]
)
def test_bad_trials_file_is_one_line_naming_file_and_trial(tmp_path, capsys, no_model_loads, text, what):
    from test_tune import write_config

    from cut.loop.tune import main

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    cfg = write_config(work, "unused-model")
    trials = work / "trials.yaml"
    trials.write_text(
        f"output_dir: {work / 'tune'}\n" * ("output_dir" not in text and not text.startswith("-")) + text
    )
    assert main(["--config", str(cfg), "--trials", str(trials)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(trials) in err and what in err, err
    assert not (work / "tune").exists() and not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "a",
        "b",
        "online.yaml",
        "pool.json",
        "trials.yaml",
    ]


def test_tune_into_a_read_only_folder_is_refused_before_anything(tmp_path, capsys, no_model_loads):
    from test_tune import write_config, write_trials

    from cut.loop.tune import main

    if os.geteuid() == 0:  # root writes through file modes; /sys is a read-only file system
        with pytest.raises(OSError):
            tempfile.mkstemp(dir="/sys")
        out = Path("/sys/cut-tune-test")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "tune"
    cfg = write_config(tmp_path, "unused-model")
    trials = write_trials(tmp_path, {"cut": {}})
    assert main(["--config", str(cfg), "--trials", str(trials), "--output_dir", str(out)]) == 2
    err = refused_in_one_line(capsys, "output_dir")
    assert "cannot be written" in err and not out.exists()


# --------------------------------------------------------------------------------------------
# case 18: the advice after a killed DPO / KTO run fits the tool
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_killed_preference_run_advice_is_overwrite_not_resume(tmp_path, capsys, no_model_loads, objective):
    from cut.baselines import dpo, kto
    from cut.errors import DataError

    parse = dpo.parse_config if objective == "dpo" else kto.parse
    out = tmp_path / "out"
    out.mkdir()  # what a run killed while training leaves: its configs and a dead trainer's lock
    (out / "cut_config.yaml").write_text("{}")
    (out / f"{objective}_config.yaml").write_text(f"objective: {objective}\n")
    (out / ".cut.lock").write_text("999999999\n")
    argv = ["--base_model", str(tmp_path / "m"), "--data_path", "d.json", "--output_dir", str(out)]
    assert dpo.main(argv, parse, objective=objective) == 2
    err = refused_in_one_line(capsys, "--overwrite_output_dir true")
    assert "resume_from_checkpoint" not in err and "holds another run" in err

    def build(cfg, opts):  # the folder check passed: stop before any model is loaded
        raise DataError("built")

    assert dpo.main([*argv, "--overwrite_output_dir", "true"], parse, build, objective) == 2
    assert capsys.readouterr().err.strip().endswith("built")


def test_cut_train_still_advises_resuming(tiny_model, tiny_data, tmp_path, capsys, no_model_loads):
    from cut.training.train import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "cut_config.yaml").write_text("{}")
    argv = ["--base_model", str(tiny_model), "--data_path", str(tiny_data), "--output_dir", str(out)]
    assert main(argv) == 2
    err = refused_in_one_line(capsys, "--resume_from_checkpoint true")
    assert "--overwrite_output_dir true" in err


# --------------------------------------------------------------------------------------------
# the bad-value table: every numeric option of every loop tool
# --------------------------------------------------------------------------------------------

BAD_VALUES = ["nan", "inf", "-1", "0", "abc", "99999999999999999999"]


def train_numbers() -> list[str]:
    """Every int / float option of cut.train (and the launcher's --local_rank)."""
    import typing

    from cut.training.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return [f.name for f in dataclasses.fields(TrainConfig) if hints[f.name] in (int, float)] + ["local_rank"]


# where -1 or 0 is a valid value of the option, it is not in the table
VALID = {
    "-1": {"max_steps", "downsample", "score_threshold"},
    "0": {
        "val_set_size",
        "warmup_steps",
        "warmup_ratio",
        "lora_dropout",
        "weight_unlike",
        "weight_unflagged",
        "weight_align_n",
        "gamma",
        "downsample",
        "score_threshold",
        "seed",
        "weight_decay",
        "max_grad_norm",
        "logits_chunk_size",
        "dataloader_num_workers",
        "local_rank",
        "max_pairs_per_prompt",
        "desirable_weight",
        "short_answer_words",
        "min_length_ratio",
        "max_retries",
        "backoff",
        "temperature",  # realign: greedy with --samples 1 (refused with the default 2, by that rule)
    },
}


def table(tool: str, options: list[str]) -> list[tuple[str, str, str]]:
    return [(tool, o, v) for o in options for v in BAD_VALUES if o not in VALID.get(v, ())]


REALIGN_NUMBERS = [
    "samples",
    "temperature",
    "min_length_ratio",
    "short_answer_words",
    "chunk_size",
    "concurrency",
    "timeout",
    "max_retries",
    "backoff",
    "max_tokens",
    "batch_size",
    "max_new_tokens",
]
CLI_TABLE = (
    table("train", train_numbers())
    + table("dpo", [*train_numbers(), "beta", "dpo_beta", "max_pairs_per_prompt"])
    + table("kto", [*train_numbers(), "beta", "kto_beta", "desirable_weight"])
    + table("realign", REALIGN_NUMBERS)
    + table("online", ["rounds"])
    + table("compare", ["rounds"])
)


@pytest.mark.parametrize("tool, option, value", CLI_TABLE, ids=[f"{t}-{o}={v}" for t, o, v in CLI_TABLE])
def test_every_numeric_option_refuses_bad_values(
    tool, option, value, tiny_data, tmp_path, capsys, caplog, monkeypatch, no_model_loads
):
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    flag = [f"--{option}", value]
    if tool in ("train", "dpo", "kto"):
        from cut.baselines import dpo, kto
        from cut.training.train import main as train_main

        main = {"train": train_main, "dpo": dpo.main, "kto": kto.main}[tool]
        argv = ["--base_model", str(tmp_path / "m"), "--data_path", str(tiny_data), "--output_dir", str(out)]
        argv += ["--batch_size", "8", "--micro_batch_size", "8"]
    elif tool == "realign":
        from cut import realign

        def no_rewriter(*args, **kwargs):
            raise AssertionError("a rewriter was made")

        monkeypatch.setattr(realign, "make_rewriter", no_rewriter)
        main, out = realign.main, tmp_path / "out.json"
        argv = ["--input_file", str(tiny_data), "--output_file", str(out), "--rewriter", "openai"]
        argv += ["--base_url", "http://127.0.0.1:9/v1", "--model", "m"]
    else:
        from cut.loop.compare import main as compare_main
        from cut.loop.online import main as online_main

        main = {"online": online_main, "compare": compare_main}[tool]
        argv = ["--config", str(online_config(tmp_path, str(tmp_path / "m"))), "--output_dir", str(out)]
    assert call(main, argv + flag) == 2
    name = option.replace("dpo_", "").replace("kto_", "") if tool != "realign" else option
    refused_in_one_line(capsys, name)
    assert not out.exists()
    assert not [r for r in caplog.records if r.name.startswith("cut")], [
        r.getMessage() for r in caplog.records
    ]


ONLINE_NUMBERS = [
    "rounds",
    "instructions_per_round",
    "samples_per_instruction",
    "seed",
    "nproc_per_node",
    "eval_max_new_tokens",
    "eval_batch_size",
    "refine_tries",
    "positive_share",
]
YAML_VALUES = {
    "nan": ".nan",
    "inf": ".inf",
    "-1": "-1",
    "0": "0",
    "abc": "abc",
    "99999999999999999999": "99999999999999999999",
}
YAML_TABLE = [
    (o, v) for o in ONLINE_NUMBERS for v in BAD_VALUES if not (v == "0" and o in ("seed", "positive_share"))
] + [("validation_size", v) for v in BAD_VALUES]


@pytest.mark.parametrize("option, value", YAML_TABLE, ids=[f"{o}={v}" for o, v in YAML_TABLE])
def test_every_numeric_config_value_refuses_bad_values(option, value, tmp_path, capsys, no_model_loads):
    """The same table for the numbers of online's config (online, compare, tune read it) and of tune's
    trials file."""
    text = f"{option}: {YAML_VALUES[value]}\n"
    if option == "validation_size":
        from test_tune import write_config

        from cut.loop.tune import main

        cfg = write_config(tmp_path, "unused-model")
        trials = tmp_path / "trials.yaml"
        trials.write_text(f"output_dir: {tmp_path / 'out'}\n{text}trials:\n  cut: {{}}\n")
        argv = ["--config", str(cfg), "--trials", str(trials)]
    else:
        from cut.loop.online import main

        config = online_config(tmp_path, str(tmp_path / "m"), output_dir=str(tmp_path / "out"))
        conf = yaml.safe_load(config.read_text())
        conf[option] = yaml.safe_load(text)[option]
        config.write_text(yaml.safe_dump(conf))
        argv = ["--config", str(config)]
    assert call(main, argv) == 2
    refused_in_one_line(capsys, option)
    assert not (tmp_path / "out").exists()
