"""cut.online with a tiny model: two rounds, a kill in the middle of a stage, and a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from cut.loop.online import sample_instructions
from cut.tasks.arithmetic import make_problems

from helpers import start, write_online_config

pytestmark = pytest.mark.slow


def write_config(tmp: Path, tiny_model: Path) -> Path:
    """Two rounds of 8 arithmetic problems from a pool of 40, a checkpoint every step."""
    return write_online_config(
        tmp,
        tiny_model,
        make_problems(40, seed=3),
        make_problems(6, seed=4),
        rounds=2,
        instructions_per_round=8,
        seed=1,
        generate_with={"temperature": 1.0},
        train_with={"save_steps": 1, "learning_rate": 0.01},
    )


def launch(config: Path) -> subprocess.Popen:
    return start(["-m", "cut.online", "--config", str(config)])


def manifest(root: Path, r: int) -> dict:
    path = root / f"round_{r}" / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def test_sampling_is_seeded_and_never_reuses():
    pool = [{"instruction": str(i)} for i in range(30)]
    rounds = [sample_instructions(pool, 10, r, seed=5) for r in (1, 2, 3)]
    seen = [x["instruction"] for rnd in rounds for x in rnd]
    assert len(set(seen)) == 30
    assert rounds[0] == sample_instructions(pool, 10, 1, seed=5) != sample_instructions(pool, 10, 1, seed=6)
    with pytest.raises(ValueError):
        sample_instructions(pool, 10, 4, seed=5)


def test_two_rounds_killed_mid_stage_then_resumed(tiny_model, tmp_path):
    config = write_config(tmp_path, tiny_model)
    root = tmp_path / "online"
    proc = launch(config)
    deadline = time.time() + 240
    # kill the whole process group while round 2 is training (torchrun / cut.train child included)
    while time.time() < deadline and proc.poll() is None:
        if manifest(root, 2)["stages"].get("train", {}).get("status") == "running":
            time.sleep(0.3)
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    m2 = manifest(root, 2)
    assert m2["stages"]["train"]["status"] == "running" and "merge" not in m2["stages"]
    done_before = {s: v["wall_s"] for s, v in manifest(root, 1)["stages"].items()}

    proc = launch(config)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "round 2: held-out accuracy" in out and "was cut off; redoing it" in out

    # round 1 was complete and is not redone; round 2's train stage ran twice, the rest once
    m1, m2 = manifest(root, 1), manifest(root, 2)
    assert {s: v["wall_s"] for s, v in m1["stages"].items()} == done_before
    assert all(v["status"] == "done" for m in (m1, m2) for v in m["stages"].values())
    assert m2["stages"]["train"]["attempts"] == 2 and m2["stages"]["generate"]["attempts"] == 1
    assert m2["model_in"] == m1["outputs"]["model"]

    seen = []
    for r in (1, 2):
        d = root / f"round_{r}"
        instr = [x["instruction"] for x in json.loads((d / "instructions.json").read_text())]
        resp = [x["instruction"] for x in json.loads((d / "responses.json").read_text())]
        judged = json.loads((d / "judged.json").read_text())
        assert len(instr) == len(set(instr)) == 8
        assert resp == instr  # every instruction answered exactly once, in order
        assert sorted(x["instruction"] for x in judged) == sorted(instr)
        for rec in json.loads((d / "train.json").read_text()):
            assert not rec.get("judge_error")
        c = json.loads((d / "manifest.json").read_text())["counts"]
        assert c["positive"] + c["negative"] + c["failed_judgments"] == 8
        assert (d / "model" / "model.safetensors").exists() and (d / "eval.json").exists()
        seen += instr
    assert len(set(seen)) == 16  # no instruction reused across rounds
    summary = json.loads((root / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert 0.0 <= summary["baseline_accuracy"] <= 1.0
    # a stage whose output vanished is redone; changed settings are refused, not mixed in
    import shutil

    shutil.rmtree(root / "round_2" / "model")
    proc = launch(config)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    m2 = manifest(root, 2)
    assert m2["stages"]["merge"]["attempts"] == 2 and m2["stages"]["train"]["attempts"] == 2
    assert (root / "round_2" / "model" / "model.safetensors").exists()
    conf = yaml.safe_load(config.read_text())
    conf["seed"] = 99
    config.write_text(yaml.safe_dump(conf))
    proc = launch(config)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "other settings" in out


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"generate": {"prompt_template_name": "chat"}, "train": {"prompt_template_name": "alpaca"}},
            "template",
        ),
        ({"judge": {"kind": "openai"}}, "needs base_url and model"),
        ({"train": {"batch_size": 3, "micro_batch_size": 2}}, "not a multiple"),
        ({"train": {"full_finetune": True}}, "full_finetune"),
        ({"train": {"data_path": "x.json"}}, "set by the loop"),
        ({"bogus": 1}, "unknown option"),
        ({"generate": {"bogus": 1}}, "online: generate: unknown option(s): bogus"),
        ({"generate": {"top_p": 0}}, "top_p must be in (0, 1]"),
        ({"judge": {"bogus": 1}}, "online: judge: unknown key(s) bogus"),
        ({"positive_share": 1.0}, "positive_share must be a number in [0, 1)"),
        ({"positive_share": "half"}, "positive_share must be a number in [0, 1)"),
        ({"refine_tries": 0}, "refine_tries must be an integer >= 1"),
        (
            {"train": {"rejected_tokens": "spans"}},
            "unknown train option(s): rejected_tokens",
        ),  # objective cut
        ({"objective": "dpo", "train": {"rejected_tokens": "x"}}, "rejected_tokens must be one of"),
        ({"objective": "kto", "train": {"kto_beta": -1}}, "beta must be > 0"),
    ],
)
def test_bad_online_config_is_refused_before_any_work(tiny_model, tmp_path, change, message, capsys):
    from cut.loop.online import main

    config = write_config(tmp_path, tiny_model)
    conf = yaml.safe_load(config.read_text())
    for key, value in change.items():
        conf[key] = {**conf[key], **value} if isinstance(conf.get(key), dict) else value
    config.write_text(yaml.safe_dump(conf))
    assert main(["--config", str(config)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "online" / "round_1").exists()


def test_heldout_without_reference_names_file_record_field(tiny_model, tmp_path, capsys):
    from cut.loop.online import main

    config = write_config(tmp_path, tiny_model)
    heldout = tmp_path / "heldout.json"
    rows = json.loads(heldout.read_text())
    del rows[2]["reference"]
    heldout.write_text(json.dumps(rows))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(heldout) in err and "record 2" in err and "'reference'" in err


def test_sections_take_every_option_of_their_tools(tiny_model, tmp_path):
    """The YAML sections map onto GenerateConfig / JudgeConfig: no option of a tool is missing."""
    import dataclasses

    from cut.judges.judge import JudgeConfig
    from cut.loop.online import load_config
    from cut.modeling.generate import GenerateConfig

    config = write_config(tmp_path, tiny_model)
    conf = yaml.safe_load(config.read_text())
    conf["generate"].update(device="cpu", limit=5, trust_remote_code=False, dtype="bfloat16")
    conf["judge"].update(backoff=0.5, cache_file="", max_tokens=64)
    config.write_text(yaml.safe_dump(conf))
    cfg = load_config(str(config), {})
    assert (cfg.generate.device, cfg.generate.limit, cfg.generate.dtype) == ("cpu", 5, "bfloat16")
    assert (cfg.judge.backoff, cfg.judge.max_tokens) == (0.5, 64)
    assert cfg.generate.sampling.seed == conf["seed"]  # unset: the loop's seed
    assert set(GenerateConfig().flat()) >= {"device", "limit", "trust_remote_code", "engine", "dtype"}
    assert {f.name for f in dataclasses.fields(JudgeConfig)} >= {"backoff", "concurrency", "timeout"}


def test_positive_share_down_samples_negatives_only():
    from cut.loop.online import down_sample_negatives

    rows = [{"output": f"p{i}", "judgment": None} for i in range(3)] + [
        {"output": f"n{i}", "judgment": "bad"} for i in range(9)
    ]
    kept, dropped = down_sample_negatives(rows, 0.5, seed=0)
    assert dropped == 6 and sum(r["judgment"] is None for r in kept) == 3 and len(kept) == 6
    assert [r for r in kept if r["judgment"] is None] == rows[:3]
    assert [r["output"] for r in kept] == [r["output"] for r in rows if r in kept]  # file order kept
    assert down_sample_negatives(rows, 0.5, seed=0) == (kept, dropped)  # seeded
    assert {tuple(r["output"] for r in down_sample_negatives(rows, 0.5, s)[0]) for s in range(10)} != {
        tuple(r["output"] for r in kept)
    }
    kept, _ = down_sample_negatives(rows, 0.75, seed=0)
    assert len(kept) == 4  # 3 positives, 1 negative: 75%
    assert down_sample_negatives(rows, 0.2, seed=0) == (rows, 0)  # already 25% positive
    assert down_sample_negatives(rows, 0.0, seed=0) == (rows, 0)
    assert down_sample_negatives(rows[3:], 0.5, seed=0) == (rows[3:], 0)  # no positive: nothing to balance


def test_refine_requests_and_kept_rewrites():
    from cut.loop.online import passing_rewrites, refine_candidates, refine_requests

    judged = [
        {"instruction": "Say hi.", "input": "", "output": "Hello", "judgment": None, "constraints": [1]},
        {
            "instruction": "Say bye.",
            "input": "loud",
            "output": "bye",
            "judgment": "Not loud.",
            "constraints": [2],
        },
        {"instruction": "Count.", "input": "", "output": "1 2", "judgment": "$ERROR$", "judge_error": "x"},
    ]
    req = refine_requests(judged, 2)
    assert [(r["origin"], r["sample"]) for r in req] == [(1, 0), (1, 1)]
    assert "Say bye.\n\nloud" in req[0]["instruction"] and "bye" in req[0]["instruction"]
    assert "Not loud." in req[0]["instruction"]
    cands = refine_candidates(judged, [{**r, "output": o} for r, o in zip(req, ["BYE", "BYE!"], strict=True)])
    assert cands[0] == {
        "instruction": "Say bye.",
        "input": "loud",
        "constraints": [2],
        "output": "BYE",
        "origin": 1,
        "sample": 0,
    }
    judged_c = [
        {**cands[0], "judgment": "still bad"},
        {**cands[1], "judgment": None},
        {**cands[1], "judgment": None},
    ]
    assert passing_rewrites(judged_c) == [
        {"instruction": "Say bye.", "input": "loud", "constraints": [2], "output": "BYE!", "judgment": None}
    ]


def test_late_settings_at_their_default_keep_the_fingerprint(tiny_model, tmp_path):
    """A run started before refine_tries / positive_share existed resumes: at their defaults they
    are not part of the fingerprint; set, they are."""
    import dataclasses

    from cut.loop.online import OnlineConfig, fingerprint

    cfg = OnlineConfig(base_model=str(tiny_model), pool="p.json")
    old = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("rounds", "output_dir", "refine_tries", "positive_share")
    }
    import hashlib

    assert fingerprint(cfg) == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert fingerprint(dataclasses.replace(cfg, positive_share=0.5)) != fingerprint(cfg)


def test_forward_prediction_trains_positives_and_every_judgment(tmp_path):
    from cut.loop.objectives import PERFECT
    from cut.loop.online import build_training_file

    judged = [
        {"instruction": "Say hi.", "input": "", "output": "Hello", "judgment": None},
        {"instruction": "Say bye.", "input": "loud", "output": "bye", "judgment": "Not loud."},
        {"instruction": "Count.", "input": "", "output": "1 2", "judgment": "$ERROR$", "judge_error": "x"},
    ]
    (tmp_path / "judged.json").write_text(json.dumps(judged))
    counts = build_training_file(tmp_path / "judged.json", tmp_path / "train.json", "forward")["counts"]
    rows = json.loads((tmp_path / "train.json").read_text())
    assert rows[0] == judged[0] and all(r["judgment"] is None for r in rows)
    assert [r["output"] for r in rows[1:]] == [PERFECT, "Not loud."]  # the failed judgment is never a target
    assert "Say bye.\n\nloud" in rows[2]["instruction"] and "bye" in rows[2]["instruction"]
    assert counts["train_records"] == 3 and counts["train_critiques"] == 2 and counts["failed_left_out"] == 1


def test_one_round_on_the_continuous_engine(tiny_model, tmp_path):
    """generate.engine continuous: the loop samples, trains, merges and scores through transformers'
    generate_batch; round 0's held-out answers are the hf engine's greedy answers."""
    from cut.loop.online import evaluate, load_config

    config = write_online_config(
        tmp_path, tiny_model, make_problems(16, seed=3), make_problems(6, seed=4),
        rounds=1, instructions_per_round=8, seed=1,
        generate_with={"temperature": 1.0, "engine": "continuous"},
    )  # fmt: skip
    out, _ = launch(config).communicate(timeout=300)
    assert "round 1: held-out accuracy" in out, out[-4000:]
    root = tmp_path / "online"
    m1 = manifest(root, 1)
    assert all(v["status"] == "done" for v in m1["stages"].values())
    assert len(json.loads((root / "round_1" / "responses.json").read_text())) == 8
    cfg = load_config(str(config), {})
    heldout = json.loads((tmp_path / "heldout.json").read_text())
    assert cfg.generate.engine == "continuous"
    hf = evaluate(str(tiny_model), heldout, replace(cfg, generate=replace(cfg.generate, engine="hf")))
    assert json.loads((root / "round_0" / "eval.json").read_text())["answers"] == hf["answers"]
