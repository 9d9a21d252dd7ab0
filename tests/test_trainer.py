"""cut.trainer: the target-only head path against each architecture's own forward, and the
once-per-run check that stops training when the two disagree."""

from __future__ import annotations

import json

import pytest
import torch

from cut.errors import ConfigError
from cut.modeling import forward as cut_forward
from cut.modeling.forward import check_head_path, target_logprobs
from cut.modeling.tiny import small_config
from cut.training.train import main

V = 96


def _small(cls_config, vocab_size=V, pad=0, bos=1, eos=2, **kw):
    return small_config(
        cls_config,
        vocab_size,
        max_position_embeddings=128,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        **kw,
    )


def gemma2(softcap=2.0, **kw):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(_small(Gemma2Config, head_dim=16, final_logit_softcapping=softcap, **kw))


def cohere():
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(_small(CohereConfig, logit_scale=0.25))


def granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(_small(GraniteConfig, logits_scaling=4.0))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(_small(LlamaConfig))


ARCHS = {"gemma2": gemma2, "cohere": cohere, "granite": granite, "llama": llama}


def _model(name, **kw):
    torch.manual_seed(0)
    lm = ARCHS[name](**kw).eval()
    with torch.no_grad():  # large logits, so a missing softcap / scale moves log-probs by a lot
        lm.get_output_embeddings().weight.normal_(0, 3.0)
    return lm


def _batch(seq_lens=(11, 7), width=12, seed=0):
    """Right-padded rows and every next-token target, as CUTCollator lays them out."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(seq_lens), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pos, tgt = [], []
    for s, n in enumerate(seq_lens):
        ids[s, :n] = torch.randint(1, V, (n,), generator=g)
        mask[s, :n] = 1
        for t in range(1, n):
            pos.append(s * width + t - 1)
            tgt.append(int(ids[s, t]))
    return ids, mask, torch.tensor(pos), torch.tensor(tgt)


@pytest.mark.parametrize("name", list(ARCHS))
def test_target_logprobs_match_the_models_own_logits(name):
    lm = _model(name)
    ids, mask, pos, tgt = _batch()
    with torch.no_grad():
        ours = target_logprobs(lm, ids, mask, pos, tgt, chunk_size=4)
        full = torch.log_softmax(lm(input_ids=ids, attention_mask=mask).logits.float(), -1)  # (S, T, V)
    ref = full.flatten(0, 1)[pos, tgt]
    print(name, "max |ours - full-logit reference|", (ours - ref).abs().max().item())
    assert torch.allclose(ours, ref, atol=1e-5)
    assert check_head_path(lm, lm.forward, ids, mask, pos, tgt) < 1e-5


@pytest.mark.parametrize("name", ["gemma2", "cohere", "granite"])
def test_an_unknown_logit_post_processing_is_caught(name, monkeypatch):
    """Without the transform the head path is wrong, and the check says so instead of training."""
    lm = _model(name)
    ids, mask, pos, tgt = _batch()
    monkeypatch.setattr(cut_forward, "logit_transform", lambda config: None)
    with pytest.raises(ConfigError, match="post-processes its logits") as err:
        check_head_path(lm, lm.forward, ids, mask, pos, tgt)
    print(err.value)
    assert type(lm).__name__ in str(err.value)


def _packed(ids, mask, pos, tgt):
    """The same sequences and targets as one packed row (cut.pairs.pack)."""
    from cut.data.pairs import pack

    lens = mask.sum(1).tolist()
    row = pack([ids[s, :n].tolist() for s, n in enumerate(lens)])
    width = ids.shape[1]
    return row, row["cu_seq_lens"].long()[pos // width] + pos % width, tgt


@pytest.mark.parametrize("name", list(ARCHS))
def test_head_path_and_its_check_on_a_packed_row(name):
    """Packed: sequence 0 is the first cu_seq_lens[1] tokens; targets and log-probs as padded."""
    lm = _model(name)
    ids, mask, pos, tgt = _batch()
    row, ppos, ptgt = _packed(ids, mask, pos, tgt)
    with torch.no_grad():
        padded = target_logprobs(lm, ids, mask, pos, tgt)
        packed = target_logprobs(
            lm, row["input_ids"], None, ppos, ptgt, 0, row["position_ids"], row["cu_seq_lens"]
        )
    assert torch.allclose(packed, padded, atol=1e-5)
    diff = check_head_path(lm, lm.forward, row["input_ids"], None, ppos, ptgt, cu_seq_lens=row["cu_seq_lens"])
    assert diff < 1e-5


def test_the_check_on_a_packed_row_catches_a_wrong_head_and_reads_only_sequence_0(monkeypatch):
    lm = _model("gemma2").train()
    ids, mask, pos, tgt = _batch()
    row, ppos, ptgt = _packed(ids, mask, pos, tgt)
    cu = row["cu_seq_lens"]
    row["input_ids"][0, int(cu[1])] = -1  # sequence 1 is never read
    assert check_head_path(lm, lm.forward, row["input_ids"], None, ppos, ptgt, n=3, cu_seq_lens=cu) < 1e-5
    assert lm.training
    monkeypatch.setattr(cut_forward, "logit_transform", lambda config: None)
    with pytest.raises(ConfigError, match="post-processes its logits"):
        check_head_path(lm, lm.forward, row["input_ids"], None, ppos, ptgt, cu_seq_lens=cu)


def test_check_restores_training_mode_and_uses_only_row_0():
    lm = _model("llama").train()
    ids, mask, pos, tgt = _batch()
    ids[1, 0] = -1  # row 1 is never read: an invalid id there would fail the embedding lookup
    assert check_head_path(lm, lm.forward, ids, mask, pos, tgt, n=3) < 1e-5
    assert lm.training


def test_training_stops_with_a_named_error_when_the_head_path_is_wrong(
    tiny_model, tiny_data, tmp_path, monkeypatch, capsys
):
    """The check runs inside the real Trainer: a known softcap trains, an unknown one stops at step 1."""
    from transformers import AutoConfig

    llama_config = AutoConfig.from_pretrained(tiny_model)
    ids = {k: getattr(llama_config, k + "_token_id") for k in ("pad", "bos", "eos")}
    lm = _model("gemma2", softcap=1.0, vocab_size=llama_config.vocab_size, **ids)
    folder = tmp_path / "gemma2"
    lm.save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes((tiny_model / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_bytes((tiny_model / "tokenizer_config.json").read_bytes())
    out = tmp_path / "out"
    argv = ["--base_model", str(folder), "--data_path", str(tiny_data), "--output_dir", str(out)]
    argv += [
        "--max_steps",
        "1",
        "--batch_size",
        "4",
        "--micro_batch_size",
        "4",
        "--lora_target_modules",
        "all-linear",
    ]

    assert main(argv) == 0  # the known softcap passes the check
    assert json.loads((out / "metrics.json").read_text())["train"]["train_loss"] > 0

    monkeypatch.setattr(cut_forward, "logit_transform", lambda config: None)
    out2 = tmp_path / "out2"
    assert main(argv[:5] + [str(out2)] + argv[6:]) == 2
    err = capsys.readouterr().err
    assert "Gemma2ForCausalLM" in err and "post-processes its logits" in err
    assert not (out2 / "adapter_model.safetensors").exists()
