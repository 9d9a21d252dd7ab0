"""cut.baselines.dpo: pairs from judged records, cut's own tokenisation through TRL, a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from cut.data.records import validate
from cut.data.templates import load_template
from cut.errors import DataError
from cut.modeling.merge import merge
from cut.training.config import TrainConfig
from cut.training.dpo import DPOOptions, build_pairs, build_trainer, main, parse_config, run

from conftest import TINY_RECORDS
from helpers import tiny_train_config

# prompt A: 2 positives x 3 negatives = 6 combinations; B: only positives; C: only negatives;
# D: one pair, plus a failed judgment (judge_error) and an '$ERROR$' one that must not count
JUDGED = [
    {"instruction": "A", "output": "a1", "judgment": None},
    {"instruction": "A", "output": "a2", "judgment": "The response is perfect."},
    {"instruction": "A", "output": "a3", "judgment": "wrong"},
    {"instruction": "A", "output": "a4", "judgment": "wrong too"},
    {"instruction": "A", "output": "a5", "judgment": "also wrong"},
    {"instruction": "B", "output": "b1"},
    {"instruction": "B", "output": "b2", "judgment": None},
    {"instruction": "C", "output": "c1", "judgment": "bad"},
    {"instruction": "D", "input": "x", "output": "d1", "judgment": None},
    {"instruction": "D", "input": "x", "output": "d2", "judgment": "bad"},
    {"instruction": "D", "input": "x", "output": "d3", "judgment": "bad", "judge_error": "timeout"},
    {"instruction": "D", "input": "x", "output": "d4", "judgment": "$ERROR$"},
    {"instruction": "D", "input": "y", "output": "d5", "judgment": None},  # another input: another prompt
]


def _outputs(pairs):
    return [(p.chosen.output, p.rejected.output) for p in pairs]


def test_pairs_counts_caps_and_determinism():
    records = validate(JUDGED, "judged.json")
    pairs, counts = build_pairs(records, 7.0, 0, seed=0)
    assert _outputs(pairs) == [
        ("a1", "a3"),
        ("a1", "a4"),
        ("a1", "a5"),
        ("a2", "a3"),
        ("a2", "a4"),
        ("a2", "a5"),
        ("d1", "d2"),
    ]
    assert counts["pairs"] == 7 and counts["prompts_with_pairs"] == 2 and counts["prompts"] == 5
    assert counts["failed_judgment"] == 2 and counts["pairs_capped_away"] == 0

    capped, counts = build_pairs(records, 7.0, 4, seed=0)
    assert counts["pairs"] == 5 and counts["pairs_capped_away"] == 2
    assert sum(c == "d1" for c, _ in _outputs(capped)) == 1  # a prompt under the cap keeps all
    a_pairs = [p for p in _outputs(capped) if p[0] != "d1"]
    assert len(a_pairs) == 4 and set(a_pairs) <= set(_outputs(pairs))
    assert _outputs(build_pairs(records, 7.0, 4, seed=0)[0]) == _outputs(capped)  # same seed, same pairs
    others = {tuple(_outputs(build_pairs(records, 7.0, 4, seed=s)[0])) for s in range(1, 20)}
    assert len(others) > 1, "the seed chooses which pairs a capped prompt keeps"


def tiny_dpo_config(model, data, out, **kw) -> TrainConfig:
    """Three optimiser steps on batches of 2 at a learning rate of 5e-3."""
    base = {"batch_size": 2, "micro_batch_size": 2, "learning_rate": 5e-3, "max_steps": 3}
    return tiny_train_config(model, data, out, **{**base, **kw})


@pytest.mark.parametrize("chat", [False, True])
def test_tokenised_pair_is_the_cut_prompt_plus_response(
    tiny_model, tiny_chat_model, tiny_data, tmp_path, chat
):
    """What TRL's collator feeds the model is template.plain(...) + response + EOS, one BOS at most."""
    model = tiny_chat_model if chat else tiny_model
    cfg = tiny_dpo_config(
        model, tiny_data, tmp_path / "out", prompt_template_name="chat" if chat else "alpaca"
    )
    trainer, counts = build_trainer(cfg, DPOOptions())
    assert counts["pairs"] == 3  # Paris > Lyon, 7 > 8 (the $ERROR$ record is out), red > green
    tok = AutoTokenizer.from_pretrained(model)
    template = load_template(cfg.prompt_template_name, tok)
    example = trainer.train_dataset[0]
    batch = trainer.data_collator([example])
    chosen_row, rejected_row = batch["input_ids"]  # (2, T): chosen first, then rejected
    chosen_row = chosen_row[batch["attention_mask"][0].bool()].tolist()
    rejected_row = rejected_row[batch["attention_mask"][1].bool()].tolist()
    prompt = template.plain("What is the capital of France?", "")
    assert tok.decode(chosen_row) == prompt + "Paris." + tok.eos_token
    assert tok.decode(rejected_row) == prompt + "The capital of France is Lyon." + tok.eos_token
    bos = tok.bos_token_id
    assert chosen_row.count(bos) == prompt.count(tok.bos_token)  # the chat template's own <s>, none added
    if chat:
        assert chosen_row[0] == bos and chosen_row[1] != bos
    # the loss covers exactly the response and its EOS
    n_resp = len(example["chosen_ids"])
    assert batch["completion_mask"][0].sum().item() == n_resp
    assert tok.decode(chosen_row[-n_resp:]) == "Paris." + tok.eos_token


def test_end_to_end_adapter_metrics_and_merge(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "dpo"
    conf = tmp_path / "train_config.yaml"
    cfg = tiny_dpo_config(tiny_model, tiny_data, out, threshold=1.5, weight_unlike=1.0)
    conf.write_text(yaml.safe_dump({**cfg.to_dict(), "dpo_beta": 0.5}, sort_keys=False))
    assert main(["--config", str(conf), "--max_pairs_per_prompt", "1"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"] == "dpo" and metrics["beta"] == 0.5
    assert metrics["counts"]["pairs"] == 3 and metrics["counts"]["prompts_with_pairs"] == 3
    steps = [h for h in metrics["log_history"] if "loss" in h]
    assert len(steps) == 3
    for h in steps:
        assert math.isfinite(h["loss"]) and "rewards/margins" in h and "rewards/chosen" in h
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-3, "the adapter starts at zero: policy == reference"
    assert math.isfinite(metrics["train"]["train_loss"])
    assert yaml.safe_load((out / "dpo_config.yaml").read_text())["beta"] == 0.5
    assert yaml.safe_load((out / "cut_config.yaml").read_text())["prompt_template_name"] == "alpaca"
    card = (out / "README.md").read_text()  # the model card, not PEFT's empty template
    assert "trained with DPO" in card and "More Information Needed" not in card and str(tiny_model) in card

    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(out)(["What is the capital of France?"], return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**ids).logits
        peft_logits = PeftModel.from_pretrained(base, out).eval()(**ids).logits
    assert (peft_logits - base_logits).abs().max().item() > 1e-4, "DPO changed nothing"

    merged = merge(str(tiny_model), str(out), str(tmp_path / "merged"))
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged).eval()(**ids).logits
    assert (peft_logits - merged_logits).abs().max().item() < 1e-4


def test_every_loss_setting_is_ignored_by_dpo(tmp_path, caplog):
    """A new CUTLossConfig field is a TrainConfig option DPO has no use for: it is in IGNORED
    (derived from the loss config, not a hand list) and named in the 'ignores' line."""
    import dataclasses

    from cut.training import dpo
    from cut.training.loss import CUTLossConfig

    names = [f.name for f in dataclasses.fields(CUTLossConfig)]
    assert {"weight_unflagged", "weight_align_n", "npo_beta"} <= set(names) <= set(dpo.IGNORED)
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({n: getattr(TrainConfig(), n) for n in names}))
    with caplog.at_level("INFO", logger="cut.training.dpo"):
        parse_config(["--config", str(conf)])
    assert all(f"{n}=" in caplog.text for n in names)


def test_parse_config_reads_cut_yaml_and_dpo_keys(tmp_path, caplog):
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"base_model": "m", "threshold": 2.0, "dpo_beta": 0.3, "seed": 7}))
    with caplog.at_level("INFO", logger="cut.training.dpo"):
        cfg, opts = parse_config(["--config", str(conf), "--max_pairs_per_prompt", "2"])
    assert (cfg.seed, cfg.threshold, opts.beta, opts.max_pairs_per_prompt) == (7, 2.0, 0.3, 2)
    assert "ignores the CUT-only option(s): threshold=2.0" in caplog.text
    assert parse_config(["--config", str(conf), "--beta", "0.05"])[1].beta == 0.05  # flags win


def test_no_pairs_names_the_file(tiny_model, tmp_path, capsys):
    data = tmp_path / "only_positives.json"
    data.write_text(json.dumps([r for r in JUDGED if r["instruction"] == "B"]))
    with pytest.raises(DataError, match="only_positives.json: no preference pairs"):
        run(tiny_dpo_config(tiny_model, data, tmp_path / "out"), DPOOptions())
    assert (
        main(["--base_model", str(tiny_model), "--data_path", str(data), "--output_dir", str(tmp_path / "o")])
        == 2
    )
    assert "only_positives.json" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------- spans

SPANNED = [  # the wrong text of each negative marked, as the verifier does
    {**r, "spans": [[r["output"].index(w), r["output"].index(w) + len(w)]]}
    if r.get("judgment")
    and r["judgment"] != "$ERROR$"
    and "score" not in r
    and "perfect" not in r["judgment"]
    else r
    for r, w in zip(TINY_RECORDS, ["Lyon", "", "8", "", "Green", "", "", ""], strict=True)
]


def _randomise_lora(model, seed=0):
    """Move the policy away from the reference (LoRA B starts at zero: policy == reference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _seq_logps(model, prompt, completion):
    """log p of each completion token after prompt: a full forward and log_softmax, no cut or TRL code."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return torch.stack([logp[len(prompt) + k - 1, t] for k, t in enumerate(completion)])


@pytest.mark.parametrize("rejected_tokens", ["all", "spans"])
def test_span_dpo_loss_against_a_naive_reference(tiny_model, tmp_path, rejected_tokens):
    data = tmp_path / "spanned.json"
    data.write_text(json.dumps(SPANNED))
    cfg = tiny_dpo_config(tiny_model, data, tmp_path / "out")
    trainer, counts = build_trainer(cfg, DPOOptions(beta=0.5, rejected_tokens=rejected_tokens))
    model = trainer.model
    _randomise_lora(model)
    model.eval()
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert any(e["rejected_span"] for e in examples) and counts["pairs"] == 3
    batch = trainer.data_collator(examples)
    # the mask: rejected rows keep their span tokens only (spans), every completion token (all)
    for i, e in enumerate(examples):
        row = batch["completion_mask"][len(examples) + i]
        start, n = len(e["prompt_ids"]), len(e["rejected_ids"])
        want = e["rejected_span"] if rejected_tokens == "spans" and e["rejected_span"] else [1] * n
        assert row[start : start + n].tolist() == want and int(row.sum()) == sum(want)
    with torch.no_grad():
        got = trainer.compute_loss(model, trainer._prepare_inputs(batch)).item()
    losses = []
    for e in examples:
        pc = _seq_logps(model, e["prompt_ids"], e["chosen_ids"]).sum()
        pr_tok = _seq_logps(model, e["prompt_ids"], e["rejected_ids"])
        with model.disable_adapter():
            rc = _seq_logps(model, e["prompt_ids"], e["chosen_ids"]).sum()
            rr_tok = _seq_logps(model, e["prompt_ids"], e["rejected_ids"])
        keep = torch.tensor(
            e["rejected_span"] if rejected_tokens == "spans" and e["rejected_span"] else [1] * len(pr_tok)
        )
        margin = (pc - rc) - ((pr_tok - rr_tok) * keep).sum()
        losses.append(-torch.nn.functional.logsigmoid(0.5 * margin))
    assert got == pytest.approx(torch.stack(losses).mean().item(), rel=1e-4, abs=1e-5)


def test_span_dpo_loss_moves_only_through_span_tokens(tiny_model, tmp_path):
    """Rejected tokens after the marked text change DPO's loss, not span-DPO's; the marked ones change both."""
    data = tmp_path / "spanned.json"
    data.write_text(json.dumps(SPANNED))
    losses = {}
    for tokens in ("all", "spans"):
        cfg = tiny_dpo_config(tiny_model, data, tmp_path / tokens)
        trainer, _ = build_trainer(cfg, DPOOptions(rejected_tokens=tokens))
        _randomise_lora(trainer.model)
        trainer.model.eval()
        e = next(x for x in trainer.train_dataset if x["rejected_span"] and x["rejected_span"][-1] == 0)
        last = max(k for k, m in enumerate(e["rejected_span"]) if m)
        after = {
            **e,
            "rejected_ids": e["rejected_ids"][: last + 1] + [5] * (len(e["rejected_ids"]) - last - 1),
        }
        inside = {**e, "rejected_ids": [*e["rejected_ids"][:last], 5, *e["rejected_ids"][last + 1 :]]}
        with torch.no_grad():
            losses[tokens] = [
                trainer.compute_loss(
                    trainer.model, trainer._prepare_inputs(trainer.data_collator([x]))
                ).item()
                for x in (e, after, inside)
            ]
    base, after, inside = losses["spans"]
    assert after == pytest.approx(base, abs=1e-6) and abs(inside - base) > 1e-5
    base, after, inside = losses["all"]
    assert abs(after - base) > 1e-5 and abs(inside - base) > 1e-5


def test_dpo_refuses_non_finite_beta_and_unknown_tokens(tmp_path, capsys):
    for bad in ("nan", "inf"):
        assert (
            main(
                ["--base_model", "m", "--data_path", "d", "--output_dir", str(tmp_path / "o"), "--beta", bad]
            )
            == 2
        )
        assert "beta must be a finite number" in capsys.readouterr().err
    with pytest.raises(Exception, match="rejected_tokens"):
        DPOOptions(rejected_tokens="some")
