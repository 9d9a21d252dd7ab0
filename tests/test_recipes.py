"""The CUT paper's recipes: configs/paper_*.yaml parse and validate through cut's loaders and hold
the release's hyper-parameters; the offline config's loss settings drive a tiny model's loss;
cut iterate replays judged rounds, each from the previous merged model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cut.errors import ConfigError
from cut.recipes import iterate
from cut.training.config import TrainConfig, load_yaml, parse_config
from cut.training.train import build_trainer, run

REPO = Path(__file__).resolve().parent.parent
OFFLINE = REPO / "configs" / "paper_offline_shepherd.yaml"
ONLINE = REPO / "configs" / "paper_online_13b.yaml"
SHARED = REPO.parent / "shared" / "data" / "cut-online-iter"

# the flags every released script passes (wwxu21/CUT README 3.2.1 / 3.2.2, fine-tuning-unlike.sh)
RELEASE_FLAGS = dict(
    batch_size=8,
    micro_batch_size=1,
    num_epochs=1.0,
    learning_rate=4e-4,
    cutoff_len=2048,
    val_set_size=0.0,
    lora_r=16,
    lora_alpha=16,
    lora_dropout=0.05,
    lora_target_modules=["gate_proj", "down_proj", "up_proj"],
    train_on_inputs=False,
    group_by_length=False,
    prompt_template_name="alpaca",
    lr_scheduler="cosine",
    warmup_steps=100,
    downsample=0.25,
    add_eos_token=True,  # the release's tokenize() appends EOS whatever --add_eos_token says
    combine="mean",
    precision="bf16",
)


def test_offline_config_parses_through_cut_train_and_is_the_release_recipe(tmp_path):
    cfg = parse_config(["--config", str(OFFLINE), "--output_dir", str(tmp_path / "out")])
    cfg.validate()
    assert (cfg.threshold, cfg.weight_unlike) == (1.2, 0.5)  # README 3.2.2: threshold=1.2, weight_unlike=0.5
    assert {k: getattr(cfg, k) for k in RELEASE_FLAGS} == RELEASE_FLAGS
    assert cfg.gradient_accumulation_steps(8) == 1  # 8 processes x micro-batch 1 = batch 8
    assert set(load_yaml(OFFLINE)) <= set(cfg.to_dict())


def test_online_config_parses_and_chains_five_iterations(tmp_path):
    cfg = iterate.load_config(str(ONLINE), {"output_dir": str(tmp_path / "run")})
    assert cfg.base_model == "meta-llama/Llama-2-13b-chat-hf"
    assert [Path(d).name for d in cfg.data] == [f"iter{i}.json" for i in range(1, 6)]
    assert (cfg.nproc_per_node, cfg.merge_dtype) == (8, "fp16")
    train = TrainConfig(**cfg.train, base_model="-", data_path="-", output_dir=str(tmp_path / "o"))
    assert (train.threshold, train.weight_unlike) == (1.1, 1.0)  # README 3.2.1
    assert {k: getattr(train, k) for k in RELEASE_FLAGS} == RELEASE_FLAGS
    steps = iterate.plan(cfg)
    assert [s.model_in for s in steps[1:]] == [str(s.merged) for s in steps[:-1]]
    assert steps[0].model_in == cfg.base_model and len(steps) == 5


def test_online_config_data_is_read_where_it_lies():
    if not SHARED.is_dir():
        pytest.skip(f"the released online data is not at {SHARED}")
    cfg = iterate.load_config(str(ONLINE))
    for path in cfg.data:  # the config names the released files; the test reads them where they lie
        assert (SHARED / Path(path).name).is_file()
    data = [str(SHARED / Path(d).name) for d in cfg.data]
    iterate.check_data(iterate.IterateConfig(**{**cfg.__dict__, "data": data}))


def test_iterate_config_errors_name_the_setting(tmp_path):
    bad = tmp_path / "bad.yaml"
    good = yaml.safe_load(ONLINE.read_text())
    cases = [
        ({"rounds": 3}, "unknown option(s): rounds"),
        ({"train": {**good["train"], "data_path": "x"}}, "train option(s) data_path are set per iteration"),
        ({"train": {**good["train"], "threshold": -1}}, "iterate: train: threshold must be > 0"),
        ({"train": {**good["train"], "thresold": 1}}, "unknown train option(s): thresold"),
        ({"data": []}, "data must be a non-empty list"),
        ({"nproc_per_node": 3}, "not a multiple of micro_batch_size x processes"),
    ]
    for patch, message in cases:
        bad.write_text(yaml.safe_dump({**good, **patch, "output_dir": str(tmp_path / "o")}))
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            iterate.load_config(str(bad))


def test_dry_run_prints_the_chain_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert iterate.main(["--config", str(ONLINE), "--output_dir", str(out), "--dry_run"]) == 0
    text = capsys.readouterr().out
    assert text.count("-m cut.train --config") == 5 and text.count("-m cut.merge") == 5
    assert "--nproc_per_node=8" in text and f"--base_model {out / 'iter_4' / 'merged'}" in text
    assert not out.exists()


def test_offline_loss_settings_drive_the_tiny_models_loss(tiny_model, tiny_data, tmp_path):
    """The paper's Shepherd knobs (threshold 1.2, alpha 0.5) reach the loss: one batch's loss equals
    cut_loss at those values, computed on log-probs gathered by hand; then two optimiser steps run."""
    import torch.nn.functional as F

    from cut.training.loss import cut_loss

    tiny = [
        "--base_model",
        str(tiny_model),
        "--data_path",
        str(tiny_data),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    tiny += ["--cutoff_len", "128", "--precision", "fp32", "--max_steps", "2", "--warmup_steps", "0"]
    tiny += ["--batch_size", "4", "--micro_batch_size", "4", "--learning_rate", "0.01", "--lora_dropout", "0"]
    cfg = parse_config(["--config", str(OFFLINE), *tiny])
    assert (cfg.threshold, cfg.weight_unlike, cfg.combine) == (1.2, 0.5, "mean")
    trainer, _ = build_trainer(cfg)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    batch = {k: v for k, v in batch.items()}
    lm = trainer.model.get_base_model()
    with torch.no_grad():  # peaky distributions, so the judgment moves p(y|x,j) / p(y|x) past 1.2
        lm.lm_head.weight.mul_(10)
    out = trainer.model(**batch)
    from cut.data.pairs import unpack

    ids, mask, pos = batch["input_ids"], batch.get("attention_mask"), batch["tgt_pos"]
    if mask is None:  # packed: one row
        ids, mask, pos = unpack(ids, batch["cu_seq_lens"], pos)
    with torch.no_grad():
        logp = F.log_softmax(lm(input_ids=ids, attention_mask=mask).logits.float(), -1).flatten(0, 1)
    logp = logp[pos, batch["tgt_ids"]]
    role, partner = batch["tgt_role"], batch["tgt_partner"]
    want = cut_loss(logp, role, partner, threshold=1.2, weight_unlike=0.5)
    assert torch.allclose(out["loss"], want.loss, atol=1e-5)
    assert want.flagged > 0, "no token flagged at 1.2: the threshold was not exercised"
    other = cut_loss(logp, role, partner, threshold=1.1, weight_unlike=1.0)  # the online knobs
    assert other.flagged > want.flagged, "a lower threshold flags more tokens"
    assert not torch.allclose(out["loss"], other.loss, atol=1e-3), "the offline knobs made no difference"
    cfg.output_dir = str(tmp_path / "run")  # build_trainer claimed the first folder
    metrics = run(cfg)
    saved = load_yaml(tmp_path / "run" / "cut_config.yaml")
    assert (saved["threshold"], saved["weight_unlike"]) == (1.2, 0.5)
    steps = [h for h in metrics["log_history"] if "loss" in h and "train_loss" not in h]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)


# a judged round in the released format: id, instruction, input, output, judgment (null, a
# critique or the judge's "$ERROR$")
def _round(k: int) -> list[dict]:
    return [
        {"id": f"{k}-0", "instruction": "What is the capital of France?", "input": "",
         "output": "The capital of France is Lyon.", "judgment": "Wrong city: it is Paris."},
        {"id": f"{k}-1", "instruction": "Add the numbers.", "input": "3 and 4", "output": "The sum is 7.",
         "judgment": None},
        {"id": f"{k}-2", "instruction": "Name a primary colour.", "input": "",
         "output": "Green is a primary colour.", "judgment": "Green is not a primary colour in paint."},
        {"id": f"{k}-3", "instruction": "Add the numbers.", "input": "3 and 4", "output": "7",
         "judgment": "$ERROR$"},
    ]  # fmt: skip


@pytest.mark.slow
def test_iterate_runs_two_rounds_each_from_the_last_merge_and_resumes(tiny_model, tmp_path):
    data = []
    for k in (1, 2):
        path = tmp_path / f"iter{k}.json"
        path.write_text(json.dumps(_round(k)))
        data.append(str(path))
    train = yaml.safe_load(ONLINE.read_text())["train"]
    train.update(cutoff_len=128, precision="fp32", max_steps=1, batch_size=2, micro_batch_size=2,
                 warmup_steps=0, learning_rate=0.05, lora_dropout=0.0, save_steps=100)  # fmt: skip
    conf = tmp_path / "run.yaml"
    out = tmp_path / "run"
    conf.write_text(yaml.safe_dump(dict(base_model=str(tiny_model), data=data, output_dir=str(out),
                                        nproc_per_node=1, merge_dtype="fp32", train=train)))  # fmt: skip
    assert iterate.main(["--config", str(conf)]) == 0
    second = yaml.safe_load((out / "iter_2" / "train_config.yaml").read_text())
    assert second["base_model"] == str(out / "iter_1" / "merged") and second["data_path"] == data[1]
    assert (second["threshold"], second["weight_unlike"]) == (1.1, 1.0)
    from safetensors.torch import load_file

    w = [
        load_file(next(p.glob("*.safetensors")))
        for p in (tiny_model, out / "iter_1" / "merged", out / "iter_2" / "merged")
    ]
    key = next(k for k in w[0] if "down_proj" in k)
    assert not torch.equal(w[0][key], w[1][key]) and not torch.equal(w[1][key], w[2][key])
    counts = json.loads((out / "iter_1" / "adapter" / "metrics.json").read_text())["counts"]
    assert counts["failed_judgment"] == 1, "the $ERROR$ record is dropped, not trained"
    # a rerun finds every iteration done and trains nothing
    stamp = (out / "iter_2" / "merged").stat().st_mtime_ns
    assert iterate.main(["--config", str(conf)]) == 0
    assert (out / "iter_2" / "merged").stat().st_mtime_ns == stamp
    # another setting in the same folder is refused
    conf.write_text(conf.read_text().replace("merge_dtype: fp32", "merge_dtype: bf16"))
    assert iterate.main(["--config", str(conf)]) == 2
