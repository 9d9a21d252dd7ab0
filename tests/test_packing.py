"""Packed CUT micro-batches (cut.pairs.pack + cut.trainer) against the padded ones.

One row of back-to-back sequences, position_ids restarting per sequence, must give each target
token the log-prob it gets in a right-padded row: attention stays inside each sequence, sliding
windows included. Compared in fp32 on tiny models built here from configs (hidden 64, 2 layers),
for each attention implementation that runs on CPU; then the CUT loss and the LoRA gradient;
then whole training runs. An architecture that does not keep packed sequences apart (MPT's
ALiBi) is detected on the first micro-batch and trained padded.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cut.data.pairs import CUTCollator
from cut.modeling.forward import PACKED, check_packing, target_logprobs, use_packed_attention
from cut.modeling.tiny import small_config
from cut.training.config import load_yaml
from cut.training.trainer import install_cut_forward

from helpers import tiny_train_config

V = 96
WINDOW = 4  # sliding window, far shorter than the sequences below


def _small(cls_config, **kw):
    return small_config(cls_config, V, max_position_embeddings=256, pad_token_id=0, **kw)


def llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(_small(LlamaConfig, **kw))


def gemma2(sliding_window=WINDOW, **kw):
    """Sliding-window and global layers alternate; attention logits are soft-capped."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(_small(Gemma2Config, head_dim=16, sliding_window=sliding_window, **kw))


def mistral(sliding_window=WINDOW, **kw):
    """A sliding window in every layer."""
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(_small(MistralConfig, sliding_window=sliding_window, **kw))


ARCHS = {"llama": llama, "gemma2": gemma2, "mistral": mistral}


def _model(name, attn, **kw):
    torch.manual_seed(0)
    lm = ARCHS[name](**kw)
    try:
        lm.set_attn_implementation(attn)
    except ValueError as err:  # Gemma2 refuses sdpa: it soft-caps attention logits
        pytest.skip(f"{name} has no {attn} attention in this transformers: {str(err)[:80]}")
    return lm.eval()


def _features(n=6, seed=0):
    """Negatives (judged + plain contexts) and positives of lengths 3 to 45."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [
        {"prompt_ids": ids(2, 20), "judged_ids": ids(5, 25) if i % 3 else [], "response_ids": ids(1, 20)}
        for i in range(n)
    ]


def _logprobs(lm, batch):
    return target_logprobs(
        lm,
        batch["input_ids"],
        batch.get("attention_mask"),
        batch["tgt_pos"],
        batch["tgt_ids"],
        0,
        batch.get("position_ids"),
        batch.get("cu_seq_lens"),
    )


@pytest.fixture(scope="module")
def batches():
    feats = _features()
    return CUTCollator(0)(feats), CUTCollator(0, packing=True)(feats)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_packed_logprobs_equal_padded(name, attn, batches):
    padded, packed = batches
    lm = _model(name, attn)
    with torch.no_grad():
        ref = _logprobs(lm, padded)
        assert use_packed_attention(lm) == PACKED + attn
        ours = _logprobs(lm, packed)
    diff = (ours - ref).abs().max().item()
    print(f"{name} {attn}: {ref.numel()} targets, max |packed - padded| log-prob {diff:.2e}")
    assert ours.shape == ref.shape and diff < 1e-5
    assert check_packing(lm, packed["input_ids"]) == (0.0, pytest.approx(0.0, abs=1e-5))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["gemma2", "mistral"])
def test_the_sliding_window_matters_here(name, attn, batches):
    """Without the window the same weights give other log-probs: the comparison above covers it."""
    padded, packed = batches
    assert packed["cu_seq_lens"].diff().max() > 4 * WINDOW
    windowed, full = _model(name, attn), _model(name, attn, sliding_window=1024)
    full.load_state_dict(windowed.state_dict())
    with torch.no_grad():
        assert (_logprobs(windowed, padded) - _logprobs(full, padded)).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_transformers_own_packed_masks_agree_but_are_dense(attn, batches):
    """What transformers 5 does with packed position_ids and no cu_seq_lens: it finds the
    sequences and builds one (1, 1, N, N) block-diagonal mask (slow, but right); the per-sequence
    implementation hands the layers no mask at all."""
    padded, packed = batches
    lm = _model("mistral", attn)
    masks = []
    hook = lm.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    n = packed["input_ids"].shape[1]
    with torch.no_grad():
        ref = _logprobs(lm, padded)
        stock = _logprobs(lm, {**packed, "cu_seq_lens": None})  # position_ids only
        use_packed_attention(lm)
        ours = _logprobs(lm, packed)
    hook.remove()
    assert masks[1].shape[-2:] == (n, n) and masks[2] is None
    assert (stock - ref).abs().max() < 1e-5 and (ours - ref).abs().max() < 1e-5


def test_transformers_finds_packed_sequences_only_without_a_cache(batches):
    """transformers 5.23 detects packed sequences from position_ids only when there is no mask
    and no cache: with use_cache=True (most configs' default) the cache exists before the mask is
    made and packed sequences see each other. The CUT forward runs the decoder with use_cache=False."""
    _, packed = batches
    lm = _model("llama", "sdpa")
    cu = packed["cu_seq_lens"].tolist()
    second = packed["input_ids"][:, cu[1] : cu[2]]
    diff = {}
    with torch.no_grad():
        alone = lm.model(input_ids=second, use_cache=False).last_hidden_state[0]
        for use_cache in (False, True):
            out = lm.model(
                input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=use_cache
            )
            diff[use_cache] = (out.last_hidden_state[0, cu[1] : cu[2]] - alone).abs().max().item()
    print(
        f"sequence 1, max |packed - alone| hidden state: use_cache=False {diff[False]:.2g}, True {diff[True]:.2g}"
    )
    assert diff[False] < 1e-5  # (5.23: ~1 with use_cache=True; a later release may fix that)


def test_a_model_whose_own_packed_masks_leak_is_fixed_by_per_sequence_attention(batches):
    """OPT in transformers 5.23: packed position_ids through its own sdpa let sequences see each
    other (its masks ignore them); per-sequence attention keeps them apart."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        vocab_size=V,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
    )
    lm = OPTForCausalLM(cfg).eval()
    lm.set_attn_implementation("sdpa")
    leak, shift = check_packing(lm, batches[1]["input_ids"])
    print(f"OPT, its own sdpa, packed position_ids: leak {leak:.3g}, shift {shift:.3g}")  # 5.23: 0.11, 0.71
    assert use_packed_attention(lm) == PACKED + "sdpa"
    assert check_packing(lm, batches[1]["input_ids"]) == (0.0, pytest.approx(0.0, abs=1e-5))


def _lora(name, attn, gradient_checkpointing=False):
    from peft import LoraConfig, get_peft_model

    lm = _model(name, attn)
    model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero, which would leave A without a gradient
            torch.nn.init.normal_(p, std=0.1)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    # not threshold 1.0: past a sliding window's reach both contexts give a token the same
    # log-prob, a ratio of exactly 1 that rounding alone would flag or not, in either layout
    install_cut_forward(model.get_base_model(), threshold=1.1, weight_unlike=1.0)
    return model.train()


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize(
    "name,attn,ckpt",
    [
        ("llama", "sdpa", False),
        ("llama", "eager", False),
        ("gemma2", "eager", False),
        ("mistral", "sdpa", False),
        ("mistral", "eager", True),
    ],
)
def test_cut_loss_and_lora_gradients_equal(name, attn, ckpt, batches):
    padded, packed = batches
    model = _lora(name, attn, ckpt)
    a, grads_a = _loss_and_grads(model, padded)
    b, grads_b = _loss_and_grads(model, packed)  # the first packed call sets packing up and checks it
    assert model.get_base_model().config._attn_implementation == PACKED + attn
    print(f"{name} {attn} ckpt={ckpt}: loss padded {a['loss'].item():.7f} packed {b['loss'].item():.7f}")
    for key in ("loss", "mle", "ul", "flagged", "n_ul_tokens", "positives", "negatives"):
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    assert b["flagged"] > 0 and b["negatives"] > 0 and b["positives"] > 0
    worst = max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)
    print(f"  {len(grads_a)} LoRA tensors, max |grad padded - grad packed| {worst:.2e}")
    assert all(torch.allclose(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-6) for n in grads_a)
    assert max(g.abs().max().item() for g in grads_b.values()) > 1e-3  # not vacuous


def test_an_architecture_that_mixes_packed_sequences_trains_padded(batches, caplog):
    """MPT's ALiBi bias comes from the row, not from position_ids: packing would let sequences
    see each other. The first packed call finds out and every packed batch is unpacked."""
    from transformers import MptConfig, MptForCausalLM

    padded, packed = batches
    torch.manual_seed(0)
    lm = MptForCausalLM(MptConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=V, max_seq_len=256))
    leak, shift = check_packing(lm.eval(), packed["input_ids"])
    print(f"MPT: leak {leak:.3g}, shift {shift:.3g}")
    assert leak > 1e-2
    install_cut_forward(lm, threshold=1.0, weight_unlike=1.0)
    with caplog.at_level(logging.WARNING, logger="cut.modeling.forward"):
        b = lm(**packed)
    assert "training on padded micro-batches instead" in caplog.text and "MptForCausalLM" in caplog.text
    a = lm(**padded)
    assert torch.allclose(a["loss"], b["loss"], atol=1e-6)
    with torch.no_grad():  # and the packed forward, left alone, would have been wrong
        wrong = target_logprobs(
            lm, packed["input_ids"], None, packed["tgt_pos"], packed["tgt_ids"], 0, packed["position_ids"]
        )
        assert (wrong - _logprobs(lm, padded)).abs().max() > 1e-2


def _train(tiny_model, data, out, packing, **extra):
    from cut.training.train import run

    metrics = run(tiny_train_config(tiny_model, data, out, save_steps=1000, packing=packing, **extra))
    assert load_yaml(out / "cut_config.yaml")["packing"] is packing
    return [h["loss"] for h in metrics["log_history"] if "loss" in h], metrics


def test_training_runs_log_the_same_losses(tiny_model, tiny_data, tmp_path):
    kw = dict(max_steps=4, micro_batch_size=2, batch_size=4, val_set_size=2, eval_steps=2, logging_steps=1)
    padded, m_padded = _train(tiny_model, tiny_data, tmp_path / "padded", False, **kw)
    packed, m_packed = _train(tiny_model, tiny_data, tmp_path / "packed", True, **kw)
    print("padded", padded, "\npacked", packed)
    assert len(packed) == 4 and packed == pytest.approx(padded, rel=1e-5)
    assert m_packed["eval"]["eval_loss"] == pytest.approx(m_padded["eval"]["eval_loss"], rel=1e-5)
    saved = json.loads((tmp_path / "packed" / "metrics.json").read_text())
    assert saved["train"]["train_loss"] == pytest.approx(m_padded["train"]["train_loss"], rel=1e-5)


def test_the_packing_benchmark_runs(tmp_path):
    """benchmarks/packing.py on a tiny model: both layouts, the same losses, its three outputs."""
    from benchmarks.packing import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "packing.json").read_text())
    assert {r["layout"] for r in res["time"]["runs"]} == {"padded", "packed"}
    assert all(r["packed"] == 1.0 and r["padded"] > 1.0 for r in res["tokens"][0]["ratios"].values())
    assert (tmp_path / "packing.md").exists() and (tmp_path / "packing.png").exists()
