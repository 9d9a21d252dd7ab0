"""cut.baselines.kto: every judged record as an unpaired example through TRL's KTOTrainer, spans optional."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from cut.training.kto import KTOOptions, add_kl_completions, build_trainer, main

from test_dpo import SPANNED, _randomise_lora, _seq_logps, tiny_dpo_config


def test_kl_completions_rotate_within_each_micro_batch():
    feats = [{"completion_ids": [i]} for i in range(5)]
    out = add_kl_completions(feats, 2)
    assert [f["KL_completion_ids"] for f in out] == [[1], [0], [3], [2], [4]]


@pytest.mark.parametrize("rejected_tokens", ["all", "spans"])
def test_kto_loss_against_a_naive_reference(tiny_model, tmp_path, rejected_tokens):
    """KTO (Ethayarajh et al. 2024, Eq. 7) written out: r = log pi/pi_ref of the completion (span
    tokens only for an undesirable one with spans), z = mean over the batch of the mismatched pairs'
    log-ratio, clamped at 0; loss = mean of w_D (1 - sigmoid(beta (r - z))) and (1 - sigmoid(beta (z - r)))."""
    data = tmp_path / "spanned.json"
    data.write_text(json.dumps(SPANNED))
    cfg = tiny_dpo_config(tiny_model, data, tmp_path / "out", micro_batch_size=8, batch_size=8)
    beta = 0.5
    trainer, counts = build_trainer(cfg, KTOOptions(beta=beta, rejected_tokens=rejected_tokens))
    # 7 records fit (the $ERROR$ one is out): 4 positive (one by its score), 3 negative
    assert (counts["train_desirable"], counts["train_undesirable"], counts["failed_judgment"]) == (4, 3, 1)
    assert counts["desirable_weight"] == pytest.approx(3 / 4)
    model = trainer.model
    _randomise_lora(model, seed=1)
    model.eval()
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        got = trainer.compute_loss(model, trainer._prepare_inputs(batch)).item()

    def logratio(prompt, completion, keep=None):
        pol = _seq_logps(model, prompt, completion)
        with model.disable_adapter():
            ref = _seq_logps(model, prompt, completion)
        keep = torch.ones_like(pol) if keep is None else torch.tensor(keep, dtype=pol.dtype)
        return ((pol - ref) * keep).sum()

    z = torch.stack([logratio(e["prompt_ids"], e["KL_completion_ids"]) for e in examples]).mean().clamp(min=0)
    losses = []
    for e in examples:
        keep = e["completion_span"] if rejected_tokens == "spans" and e["completion_span"] else None
        r = logratio(e["prompt_ids"], e["completion_ids"], keep)
        if e["label"]:
            losses.append(counts["desirable_weight"] * (1 - torch.sigmoid(beta * (r - z))))
        else:
            losses.append(1 - torch.sigmoid(beta * (z - r)))
    assert got == pytest.approx(torch.stack(losses).mean().item(), rel=1e-4, abs=1e-5)


def test_end_to_end_metrics_and_a_changed_adapter(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "kto"
    conf = tmp_path / "train_config.yaml"
    cfg = tiny_dpo_config(tiny_model, tiny_data, out, threshold=1.5)
    conf.write_text(yaml.safe_dump({**cfg.to_dict(), "kto_beta": 0.2}, sort_keys=False))
    assert main(["--config", str(conf), "--rejected_tokens", "spans"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"] == "kto" and metrics["beta"] == 0.2 and metrics["rejected_tokens"] == "spans"
    steps = [h for h in metrics["log_history"] if "loss" in h and "train_loss" not in h]
    assert len(steps) == 3 and all(math.isfinite(h["loss"]) for h in steps)
    assert yaml.safe_load((out / "kto_config.yaml").read_text())["beta"] == 0.2
    card = (out / "README.md").read_text()  # the model card, not PEFT's empty template
    assert "trained with KTO" in card and "More Information Needed" not in card and "spans" in card
    from safetensors.torch import load_file

    lora_b = [v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 0, "KTO changed nothing"


def test_bad_options_are_refused_before_any_work(tmp_path, capsys):
    args = ["--base_model", "m", "--data_path", "d", "--output_dir", str(tmp_path / "o")]
    for flag, value, message in (
        ("--beta", "nan", "beta must be a finite number"),
        ("--beta", "0", "beta must be > 0"),
        ("--desirable_weight", "-1", "desirable_weight must be >= 0"),
        ("--rejected_tokens", "some", "rejected_tokens must be one of"),
    ):
        assert main([*args, flag, value]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_only_one_kind_is_refused(tiny_model, tmp_path, capsys):
    data = tmp_path / "pos.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]))
    cfg = tiny_dpo_config(tiny_model, data, tmp_path / "o")
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["--config", str(conf)]) == 2
    assert "KTO needs desirable and undesirable examples" in capsys.readouterr().err
