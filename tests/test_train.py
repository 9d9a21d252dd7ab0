"""cut.train on a tiny model built on the spot: the real Trainer, peft and the CUT forward."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from cut.training.config import TrainConfig, load_yaml
from cut.training.loss import cut_loss
from cut.training.train import build_trainer, main, run

from helpers import cli_args, tiny_train_config


def tiny_config(tiny_model, data, out, **kw) -> TrainConfig:
    """Four optimiser steps on batches of 8, no checkpoint on the way."""
    return tiny_train_config(
        tiny_model,
        data,
        out,
        **{"batch_size": 8, "micro_batch_size": 8, "max_steps": 4, "save_steps": 1000, **kw},
    )


def whole_batch(cfg: TrainConfig):
    """build_trainer(cfg)'s model, and its whole training set as features and as one collated batch."""
    trainer, _ = build_trainer(cfg)
    feats = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return trainer.model, feats, trainer.data_collator(feats)


@pytest.mark.parametrize("packing", [False, True])
def test_cut_forward_matches_full_logits_reference(tiny_model, tiny_data, tmp_path, packing):
    """The chunked, target-only forward equals log_softmax over full logits, gathered by hand
    (for a packed batch: over the same sequences in padded rows, one model call each row)."""
    from cut.data.pairs import unpack

    cfg = tiny_config(
        tiny_model,
        tiny_data,
        tmp_path / "out",
        threshold=1.0,
        weight_unlike=0.5,
        logits_chunk_size=5,
        packing=packing,
    )
    model, _, batch = whole_batch(cfg)
    out = model(**batch)

    lm = model.get_base_model()
    ids, mask, pos = batch["input_ids"], batch.get("attention_mask"), batch["tgt_pos"]
    if packing:
        assert mask is None and ids.shape[0] == 1  # one row, no padding
        ids, mask, pos = unpack(ids, batch["cu_seq_lens"], pos)
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask).logits  # (S, T, V)
    logp_all = F.log_softmax(logits.float(), -1).flatten(0, 1)  # (S*T, V)
    ref_logp = logp_all[pos, batch["tgt_ids"]]
    ref = cut_loss(ref_logp, batch["tgt_role"], batch["tgt_partner"], threshold=1.0, weight_unlike=0.5)
    print("cut forward loss", out["loss"].item(), "reference", ref.loss.item())
    assert torch.allclose(out["loss"], ref.loss, atol=1e-5)
    assert torch.allclose(out["mle"], ref.mle, atol=1e-5)
    assert torch.allclose(out["ul"], ref.ul, atol=1e-5)
    assert out["negatives"].item() == (batch["seq_role"] == 1).sum().item() > 0
    # a plain forward (no targets) still returns ordinary logits, for generation
    assert lm(input_ids=batch["input_ids"][:1]).logits.shape[-1] == lm.config.vocab_size


def test_lora_trains_adapter_only_and_loss_falls(tiny_model, tiny_data, tmp_path):
    cfg = tiny_config(
        tiny_model, tiny_data, tmp_path / "out", max_steps=40, learning_rate=1e-2, weight_unlike=1.0
    )
    trainer, counts = build_trainer(cfg)
    assert counts["failed_judgment"] == 1 and counts["negative"] == 3 and counts["positive"] == 4
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    assert all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in base), "a base weight moved"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("losses", [round(x, 3) for x in losses])
    assert losses[-1] < 0.85 * losses[0]
    logged = [h for h in trainer.state.log_history if "mle" in h]
    assert {"mle", "ul", "flagged", "positives", "negatives"} <= set(logged[0])
    assert all(h["positives"] + h["negatives"] == 7 for h in logged)  # all 7 examples in each step


def test_run_writes_adapter_config_metrics_and_evaluates(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(
        tiny_model,
        tiny_data,
        out,
        val_set_size=2,
        eval_steps=2,
        max_steps=4,
        micro_batch_size=2,
        batch_size=4,
    )
    metrics = run(cfg)
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert (out / "tokenizer.json").exists()
    assert load_yaml(out / "cut_config.yaml") == cfg.to_dict()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["counts"]["val_examples"] == 2 and saved["counts"]["train_examples"] == 5
    evals = [h for h in saved["log_history"] if "eval_loss" in h]
    assert len(evals) >= 2 and all(
        "eval_mle" in h for h in evals
    )  # evaluated at steps 2 and 4, and at the end
    assert metrics["eval"]["eval_loss"] > 0
    assert not list(out.glob("*.tmp"))
    card = (out / "README.md").read_text()  # cut's model card, not PEFT's empty template
    assert "[More Information Needed]" not in card
    assert yaml.safe_load(card.split("---")[1]) == {
        "base_model": str(tiny_model),
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["cut", "contrastive-unlikelihood-training", "judgments", "lora"],
    }
    counts = saved["counts"]
    for label, key in (("positives (trained by MLE)", "positive"), ("negatives", "negative")):
        assert f"| {label}" in card and f"| {counts[key]} |" in card
    assert (
        f"| failed judgments (dropped, or positives with on_failed_judgment positive) | {counts['failed_judgment']} |"
        in card
    )
    assert f"| train/train_loss | {saved['train']['train_loss']:.6g} |" in card
    assert f"| eval_loss | {saved['eval']['eval_loss']:.6g} |" in card
    assert "| `weight_unlike` | 0.1 |" in card and "| `threshold` | 1.1 |" in card
    resolved = yaml.safe_load(
        card.split("## Resolved config (`cut_config.yaml`)")[1].split("```yaml")[1].split("```")[0]
    )
    assert resolved == cfg.to_dict()


def test_trl_names_and_chat_records_train(tiny_model, tmp_path, monkeypatch):
    """A TRL user's command line and chat file: the options land on the fields they name and the
    chat negatives train against their judgment."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Add {a} and {b}."},
                {"role": "assistant", "content": out},
            ],
            **j,
        }
        for a, b, out, j in (
            (3, 4, "7", {}),
            (2, 2, "5", {"judgment": "5 is wrong: 2 + 2 = 4."}),
            (1, 5, "6", {}),
            (6, 1, "8", {"judgment": "8 is wrong: 6 + 1 = 7."}),
        )
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    argv = [
        f"--model_name_or_path={tiny_model}",
        f"--dataset_name={data}",
        f"--output_dir={out}",
        "--per_device_train_batch_size=2",
        "--gradient_accumulation_steps=2",
        "--max_steps=1",
        "--max_length=128",
        "--lora_target_modules=all-linear",
        "--warmup_steps=0",
        "--bf16=false",
    ]
    assert main(argv) == 0
    saved = load_yaml(out / "cut_config.yaml")
    assert (saved["batch_size"], saved["micro_batch_size"], saved["precision"]) == (4, 2, "fp32")
    counts = json.loads((out / "metrics.json").read_text())["counts"]
    assert (counts["positive"], counts["negative"]) == (2, 2)


def test_full_finetune_and_gradient_checkpointing(tiny_model, tiny_data, tmp_path):
    cfg = tiny_config(
        tiny_model,
        tiny_data,
        tmp_path / "out",
        full_finetune=True,
        gradient_checkpointing=True,
        max_steps=2,
        learning_rate=1e-3,
    )
    trainer, _ = build_trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert len(moved) > len(before) // 2


def test_chat_template_and_group_by_length(tiny_chat_model, tiny_data, tmp_path):
    cfg = tiny_config(
        tiny_chat_model,
        tiny_data,
        tmp_path / "out",
        prompt_template_name="chat",
        group_by_length=True,
        micro_batch_size=2,
        batch_size=2,
        max_steps=3,
    )
    metrics = run(cfg)
    assert metrics["train"]["train_loss"] > 0


def test_yaml_config_with_cli_override(tiny_model, tiny_data, tmp_path):
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump(tiny_config(tiny_model, tiny_data, tmp_path / "a").to_dict()))
    assert main(["--config", str(conf), "--output_dir", str(tmp_path / "b"), "--max_steps", "1"]) == 0
    assert (tmp_path / "b" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "a").exists()
    assert load_yaml(tmp_path / "b" / "cut_config.yaml")["max_steps"] == 1


@pytest.mark.parametrize(
    "record, field",
    [
        ({"instruction": "", "output": "x"}, "instruction"),
        ({"instruction": "Say hi.", "output": 3}, "output"),
        ({"instruction": "Say hi.", "output": "hi", "judgment": ["bad"]}, "judgment"),
    ],
)
def test_bad_data_stops_before_training_and_writes_nothing(tiny_model, tmp_path, capsys, record, field):
    data = tmp_path / "bad.json"
    good = {"instruction": "Say hi.", "input": "", "output": "hi", "judgment": None}
    data.write_text(json.dumps([good, good, record]))
    out = tmp_path / "out"
    assert main(["--base_model", str(tiny_model), "--data_path", str(data), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "record 2" in err and f"'{field}'" in err
    assert not out.exists()


def test_unknown_lora_target_is_a_clear_error(tiny_model, tiny_data, tmp_path, capsys):
    args = cli_args(
        base_model=tiny_model, data_path=tiny_data, output_dir=tmp_path / "o", lora_target_modules="[c_attn]"
    )
    assert main(args) == 2
    assert "match no module" in capsys.readouterr().err


def test_tensorboard_reporting(tiny_model, tiny_data, tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "out"
    run(tiny_config(tiny_model, tiny_data, out, max_steps=2, report_to="tensorboard"))
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_schedule_warns_when_warmup_never_ends(caplog):
    """The released recipe: 100 warm-up steps against ~45 optimiser steps peaks near 1.8e-4, not 4e-4."""
    import logging

    from cut.training.config import TrainConfig
    from cut.training.train import log_schedule, schedule, training_arguments

    cfg = TrainConfig(base_model="m", data_path="d", batch_size=16, num_epochs=3, learning_rate=4e-4)
    s = schedule(cfg, 240)  # 15 steps per epoch
    assert s == {"optimizer_steps": 45, "warmup_steps": 100, "peak_learning_rate": pytest.approx(1.8e-4)}
    with caplog.at_level(logging.WARNING, logger="cut.training.train"):
        log_schedule(cfg, 240)
    assert "reaches the run's 45 optimiser steps" in caplog.text and "peaks at 0.00018" in caplog.text

    ratio = TrainConfig(base_model="m", data_path="d", batch_size=16, num_epochs=3, warmup_ratio=0.1)
    assert schedule(ratio, 240)["warmup_steps"] == 5
    assert training_arguments(ratio, False).get_warmup_steps(45) == 5  # what the Trainer will use
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cut.training.train"):
        log_schedule(ratio, 240)
    assert "reaches" not in caplog.text


@pytest.mark.parametrize("packing", [False, True])
def test_npo_on_spans_against_a_naive_reference(tiny_model, tmp_path, packing):
    """unlikelihood npo, flags from spans, no MLE on failing text: positives' -log p plus, on the
    span tokens of negatives, (2/beta) softplus(beta (log pi - log pi_ref)) with pi_ref the model
    without its adapter, each a mean, halved (combine mean); computed here from full logits, by hand.
    A negative with spans gets no judged sequence (nothing reads it)."""
    from test_dpo import SPANNED, _randomise_lora, _seq_logps

    data = tmp_path / "spanned.json"
    data.write_text(json.dumps(SPANNED))
    beta = 2.0
    cfg = tiny_config(
        tiny_model,
        data,
        tmp_path / "out",
        flag_source="spans",
        unlikelihood="npo",
        npo_beta=beta,
        weight_unlike=1.0,
        weight_unflagged=0.0,
        weight_align_n=0.0,
        packing=packing,
    )
    model, feats, batch = whole_batch(cfg)
    _randomise_lora(model, seed=2)
    model.eval()
    negatives = [f for f in feats if f["judged_ids"]]
    assert negatives and all(f["span_mask"] for f in negatives)
    assert len(batch["seq_role"]) == len(feats), "a spanned negative has no judged sequence"
    with torch.no_grad():
        got = model(**batch)["loss"].item()
    mle = torch.cat(
        [_seq_logps(model, f["prompt_ids"], f["response_ids"]) for f in feats if not f["judged_ids"]]
    )
    push = []
    for f in negatives:
        pol = _seq_logps(model, f["prompt_ids"], f["response_ids"])
        with model.disable_adapter():
            ref = _seq_logps(model, f["prompt_ids"], f["response_ids"])
        keep = torch.tensor(f["span_mask"], dtype=torch.bool)
        push.append((2 / beta) * F.softplus(beta * (pol - ref))[keep])
    want = (-mle.mean() + torch.cat(push).mean()) / 2
    assert got == pytest.approx(want.item(), rel=1e-4, abs=1e-5)


def test_npo_trains_and_needs_lora(tiny_model, tmp_path, capsys):
    from test_dpo import SPANNED

    data = tmp_path / "spanned.json"
    data.write_text(json.dumps(SPANNED))
    kw = dict(flag_source="spans", unlikelihood="npo", weight_unflagged=0.0, weight_align_n=0.0)
    metrics = run(tiny_config(tiny_model, data, tmp_path / "out", **kw))
    steps = [h for h in metrics["log_history"] if "loss" in h and "train_loss" not in h]
    assert len(steps) == 4 and all(h["flagged"] > 0 for h in steps)
    with pytest.raises(Exception, match="unlikelihood npo needs"):
        tiny_config(tiny_model, data, tmp_path / "full", full_finetune=True, **kw).validate()


def test_readme_multinode_commands_parse(tmp_path):
    """The README's multi-node commands are valid for their launcher's own parser, its hostfile
    for DeepSpeed's reader, and the arguments they hand on for cut.train's."""
    from pathlib import Path

    from deepspeed.launcher import runner
    from torch.distributed.run import get_args_parser

    from cut.training.config import parse_config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("#### Multi-node launch")[1].split("\n#### ")[0]
    blocks = [b.split("```")[0] for b in section.split("```bash\n")[1:]]
    commands = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    torchruns = [c.split()[1:] for c in commands if c.startswith("torchrun ")]
    deepspeeds = [c.split()[1:] for c in commands if c.startswith("deepspeed ")]
    assert len(torchruns) == 2 and len(deepspeeds) == 1
    for argv in torchruns:
        args = get_args_parser().parse_args(argv)
        assert args.module and args.training_script == "cut.train" and args.nnodes == "2"
        cfg = parse_config(args.training_script_args)
        assert cfg.output_dir == "/shared/runs/cut-run-1"
    args = runner.parse_args(deepspeeds[0])
    assert args.module and args.user_script == "cut.train" and args.hostfile == "hostfile"
    assert parse_config([*args.user_args, "--local_rank=0"]).deepspeed == "configs/deepspeed/zero3.json"
    hosts = blocks[2].split("<<'HOSTS'\n")[1].split("HOSTS")[0]
    assert runner._parse_hostfile(hosts.splitlines()) == {"node0": 8, "node1": 8}
