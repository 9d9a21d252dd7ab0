"""A thin `transformers.Trainer` for CUT.

The loss is computed inside the causal LM's own forward: the Trainer wraps the model (a PeftModel
or the plain LM) in DDP / DeepSpeed, and that wrapped call must produce the loss so that gradients
are synchronised and ZeRO-3 gathers every weight it touches. `install_cut_forward` gives the LM
instance a forward that runs the decoder once over all sequences of the micro-batch, takes the
hidden states at the target positions only, and scores them with the chunked output head. No
full-vocabulary logits are built and no sequence is run that the loss does not use.

Packed micro-batches (`cut.pairs.pack`: one row, position_ids restarting per sequence,
cu_seq_lens) pay for real tokens only. Attention must stay inside each sequence:
- flash_attention_2/3 (GPU): transformers runs flash-attention varlen from the cu_seq_lens_q/k and
  max_length_q/k keyword arguments, passed through the decoder as its own collator does.
- sdpa and eager: transformers 5 would detect the packing from position_ids and build one dense
  (N, N) block-diagonal mask per forward: N^2 memory and N^2 attention work where the sequences
  need sum(n_i^2), as slow on CPU as the padding it replaces. So the model gets a thin attention
  implementation, `cut_packed_sdpa` / `cut_packed_eager`, that runs the model's own sdpa or eager
  function on each sequence of the row (with its causal or sliding-window mask), and builds no
  (N, N) mask while a packed forward runs. Every other call goes to the original unchanged.
- anything else (flex_attention, a kernel): transformers' own packed-sequence masks.
`check_packing` verifies on the first packed micro-batch that the architecture keeps two packed
sequences apart (ALiBi models or token-mixing convolutions would not); where it does not, the
run falls back to padded micro-batches with a warning.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import types
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from transformers import AttentionInterface, Trainer
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    eager_mask,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from cut.data.pairs import pack, unpack
from cut.errors import ConfigError
from cut.training.loss import CUTLossConfig, Role, label_logprobs
from cut.training.runs import AtomicCheckpoints

METRICS = ("mle", "ul", "flagged")
logger = logging.getLogger(__name__)


def logit_transform(config) -> Any:
    """The few heads that post-process logits (Gemma softcap, Cohere / Granite scaling)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    granite = getattr(config, "logits_scaling", None)
    if softcap:
        return lambda z: softcap * torch.tanh(z / softcap)
    if scale and scale != 1:
        return lambda z: z * scale
    if granite and granite != 1:
        return lambda z: z / granite
    return None


# ---------------------------------------------------------------- packed sequences

PACKED = "cut_packed_"  # + sdpa | eager: the per-sequence attention implementations
PACKING_LEAK_TOL = 1e-4  # sequences kept apart are computed bit for bit alike: any change is a leak
# set while a packed forward runs: the model then builds no (N, N) attention masks
_packed_forward = contextvars.ContextVar("cut_packed_forward", default=False)


def _model_attention(module: torch.nn.Module, kind: str):
    """The model's own sdpa / eager attention function (its modeling file may override either)."""
    code = sys.modules[type(module).__module__]
    if kind == "eager":
        return code.eager_attention_forward
    interface = getattr(code, "ALL_ATTENTION_FUNCTIONS", None) or AttentionInterface()
    return interface["sdpa"]


def _sequence_mask(kind: str, n: int, window: int | None, dtype, device) -> torch.Tensor | None:
    """The mask transformers would give one unpadded sequence of n tokens (None: sdpa's is_causal)."""
    if window and n > window:
        fn = sliding_window_causal_mask_function(window)
    elif kind == "sdpa":
        return None
    else:
        fn = causal_mask_function
    if kind == "sdpa":
        return sdpa_mask(1, n, n, mask_function=fn, allow_is_causal_skip=False, device=device)
    return eager_mask(1, n, n, mask_function=fn, dtype=dtype, device=device)


def _per_sequence_attention(kind: str):
    def attention(
        module,
        query,  # (1, heads, N, D)
        key,  # (1, kv_heads, N, D)
        value,
        attention_mask=None,
        cu_seq_lens_q=None,
        cu_seq_lens_k=None,
        max_length_q=None,
        max_length_k=None,
        **kwargs,
    ):
        base = _model_attention(module, kind)
        if cu_seq_lens_q is None:  # not a packed forward: the original, unchanged
            return base(module, query, key, value, attention_mask, **kwargs)
        if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
            raise ValueError(f"{PACKED}{kind}: packed sequences come as one row without a cache")
        window = kwargs.get("sliding_window")
        bounds = cu_seq_lens_q.tolist()
        out = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            mask = _sequence_mask(kind, b - a, window, query.dtype, query.device)
            o, _ = base(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], mask, **kwargs)
            out.append(o)  # (1, n, heads, D)
        return torch.cat(out, 1), None

    return attention


def _no_mask_while_packed(base):
    def mask(*args, **kwargs):
        return None if _packed_forward.get() else base(*args, **kwargs)

    return mask


for _kind, _mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
    AttentionInterface.register(PACKED + _kind, _per_sequence_attention(_kind))
    AttentionMaskInterface.register(PACKED + _kind, _no_mask_while_packed(_mask))


def _attn_implementation(lm) -> str:
    return lm.config.get_text_config()._attn_implementation or "eager"


def use_packed_attention(lm) -> str:
    """Give an sdpa / eager model the per-sequence implementation; returns the one in use."""
    impl = _attn_implementation(lm)
    # models whose attention does not go through transformers' AttentionInterface keep theirs
    settable = getattr(lm, "_can_set_attn_implementation", lambda: False)
    if impl in ("sdpa", "eager") and hasattr(lm, "set_attn_implementation") and settable():
        lm.set_attn_implementation(PACKED + impl)
    return _attn_implementation(lm)


def decoder_hidden(lm, input_ids, attention_mask=None, position_ids=None, cu_seq_lens=None) -> torch.Tensor:
    """The decoder's last hidden states (B, T, H); a packed row with its cu_seq_lens keeps
    attention inside each sequence (see the module docstring)."""
    kwargs: dict[str, Any] = {}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    impl = _attn_implementation(lm)
    packed = cu_seq_lens is not None
    if packed and (impl.startswith(PACKED) or impl.startswith("flash_attention")):
        longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
        kwargs.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens)
        kwargs.update(max_length_q=longest, max_length_k=longest)
    token = _packed_forward.set(packed and impl.startswith(PACKED))
    try:
        return lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
        )[0]
    finally:
        _packed_forward.reset(token)


def check_packing(lm, input_ids: torch.Tensor) -> tuple[float, float]:
    """Does the model keep sequences packed in one row apart? Returns (leak, shift).

    Sequence B is packed after A, after A' (A reversed) and run alone. leak: how much B's
    decoder hidden states change when A changes; sequences kept apart give exactly the same
    arithmetic, so 0 in every dtype, while attention across the boundary (ALiBi models, a
    transformers model that ignores packed position_ids) or a token-mixing convolution moves
    them. shift: packed B against B alone; rounding only (~1e-6 in fp32) when positions restart.
    Both are the largest per-token |difference| / |hidden state|. The tokens come from the
    micro-batch, longer than a sliding window of up to 1024 tokens; every process runs the same
    three forwards (ZeRO-3 gathers weights for each). Once per run, without gradients, eval mode.
    """
    window = getattr(lm.config.get_text_config(), "sliding_window", None)
    n = window + 4 if isinstance(window, int) and window <= 1024 else 24
    ids = input_ids.flatten()
    ids = ids.repeat(-(-(2 * n + 3) // ids.numel()))
    a, b = ids[:n], ids[n : 2 * n + 3]  # n and n + 3 tokens

    def packed(first: torch.Tensor) -> torch.Tensor:  # B's hidden states packed after `first`
        row = {k: v.to(ids.device) for k, v in pack([first.tolist(), b.tolist()]).items()}
        h = decoder_hidden(lm, row["input_ids"], None, row["position_ids"], row["cu_seq_lens"])
        return h[0, n:].float()

    def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
        return ((x - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)).max().item()

    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            after_a, after_flipped = packed(a), packed(a.flip(0))
            alone = decoder_hidden(lm, b[None])[0].float()
    finally:
        lm.train(was_training)
    return rel(after_flipped, after_a), rel(after_a, alone)


def target_logprobs(
    lm,
    input_ids,
    attention_mask,
    tgt_pos,
    tgt_ids,
    chunk_size: int = 0,
    position_ids=None,
    cu_seq_lens=None,
) -> torch.Tensor:
    """log p of each target token: one decoder pass, the output head on target positions only.

    Padded rows come with their attention_mask; a packed row (cut.pairs.pack) with position_ids
    and cu_seq_lens and no mask. tgt_pos indexes the flattened (B*T) hidden states either way.
    """
    hidden = decoder_hidden(lm, input_ids, attention_mask, position_ids, cu_seq_lens)
    hidden = hidden.flatten(0, 1).index_select(0, tgt_pos)  # (N, H): target positions only
    vocab_size = lm.config.get_text_config().vocab_size
    transform = logit_transform(lm.config.get_text_config())
    return label_logprobs(hidden, lm.get_output_embeddings(), tgt_ids, vocab_size, chunk_size, transform)


def check_head_path(
    lm, model_forward, input_ids, attention_mask, tgt_pos, tgt_ids, n: int = 8, cu_seq_lens=None
) -> float:
    """Compare `target_logprobs` with the model's own forward on the first targets of sequence 0.

    `logit_transform` knows the heads that post-process logits in the transformers releases we
    test; a model that does it some other way would train on wrong log-probs without a sound.
    This runs once per run, without gradients, in eval mode (no dropout), on one sequence cut
    just after its n-th target, with logits for those n positions only. Sequence 0 is row 0 of a
    padded batch, or the first cu_seq_lens[1] tokens of a packed row (no mask then). Returns the
    largest difference in nats; raises ConfigError when it is more than rounding.
    """
    width = input_ids.shape[1] if cu_seq_lens is None else int(cu_seq_lens[1])
    pos = tgt_pos[tgt_pos < width][:n]  # the first targets of sequence 0 (consecutive positions)
    ids = tgt_ids[tgt_pos < width][:n]
    if pos.numel() == 0:
        return 0.0
    length = int(pos.max()) + 1
    keep = length - int(pos.min())
    seq = input_ids[:1, :length]
    mask = attention_mask[:1, :length] if attention_mask is not None else None
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            ours = target_logprobs(lm, seq, mask, pos, ids).float()
            try:
                logits = model_forward(
                    input_ids=seq, attention_mask=mask, use_cache=False, logits_to_keep=keep
                )
            except TypeError:  # a forward without logits_to_keep: logits for the whole prefix
                logits = model_forward(input_ids=seq, attention_mask=mask, use_cache=False)
            logits = logits["logits"][0, -keep:].float()  # (keep, V)
            ref = torch.log_softmax(logits, dim=-1)[pos - int(pos.min()), ids]
    finally:
        lm.train(was_training)
    diff = (ours - ref).abs().max().item()
    dtype = lm.get_output_embeddings().weight.dtype
    tol = 1e-3 if dtype == torch.float32 else 0.25
    if not diff <= tol:  # also catches nan
        raise ConfigError(
            f"{type(lm).__name__}: log-probs from cut's output-head path differ from the model's own "
            f"forward by {diff:.3g} nats (tolerance {tol}); this architecture post-processes its "
            "logits in a way cut.trainer.logit_transform does not reproduce, so CUT would train on "
            "wrong probabilities"
        )
    return diff


def install_cut_forward(
    model: torch.nn.Module,
    loss: CUTLossConfig | None = None,
    chunk_size: int = 0,
    check_head: bool = True,
    reference: Callable[[], AbstractContextManager] | None = None,
    **settings: Any,
) -> None:
    """Make `model(input_ids, attention_mask | position_ids + cu_seq_lens, tgt_*...)` return the
    CUT loss and its metrics, for padded or packed micro-batches (`cut.pairs.CUTCollator`).

    `loss` holds the objective's settings (`CUTLossConfig`; or give them as keywords:
    `install_cut_forward(lm, threshold=1.1, weight_unlike=1.0)`). `model` is the causal LM
    itself (under a PeftModel, `peft_model.get_base_model()`, whose LoRA layers are already in
    place). Generation and plain calls without `tgt_ids` keep the original forward. With
    `check_head`, the first call checks the head path once (`check_head_path`). The first packed
    call sets up per-sequence attention and checks it (`check_packing`); a model that fails the
    check gets every packed micro-batch unpacked into padded rows instead. With unlikelihood
    "npo", `reference()` is a context in which `model` is the reference (a PeftModel's
    `disable_adapter`: the round's starting model), and each call also scores the plain-context
    targets of negatives under it, without gradients.
    """
    if loss is None:
        loss = CUTLossConfig(**settings)
    elif settings:
        raise TypeError(
            f"install_cut_forward: give the loss settings in `loss` or as keywords, not both: {settings}"
        )
    if loss.unlikelihood == "npo" and reference is None:
        raise ConfigError(
            "unlikelihood npo needs a reference model: train a LoRA adapter (not full_finetune)"
        )
    original_forward = model.forward
    unchecked = [True] if check_head else []  # the check runs on the first call only
    packing: dict[str, Any] = {}  # after the first packed call: {"ok": bool}

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        tgt_pos=None,
        tgt_ids=None,
        tgt_role=None,
        tgt_partner=None,
        tgt_span=None,
        seq_role=None,
        position_ids=None,
        cu_seq_lens=None,
        **kwargs,
    ):
        if tgt_ids is None:
            if position_ids is not None:
                kwargs["position_ids"] = position_ids
            return original_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if cu_seq_lens is not None and not packing:
            packing["ok"] = _setup_packing(self, input_ids)
        if cu_seq_lens is not None and not packing["ok"]:
            input_ids, attention_mask, tgt_pos = unpack(input_ids, cu_seq_lens, tgt_pos)
            position_ids = cu_seq_lens = None
        if unchecked:
            unchecked.clear()
            diff = check_head_path(
                self, original_forward, input_ids, attention_mask, tgt_pos, tgt_ids, cu_seq_lens=cu_seq_lens
            )
            logger.info("output-head path matches the model's own forward (max difference %.2g nats)", diff)
        logp = target_logprobs(
            self, input_ids, attention_mask, tgt_pos, tgt_ids, chunk_size, position_ids, cu_seq_lens
        )
        ref_logp = None
        if loss.unlikelihood == "npo":  # the reference's log-probs, on the targets the NPO term reads only
            ref_logp = torch.zeros_like(logp)
            plain = tgt_role == Role.MISALIGN_N
            if plain.any():
                with torch.no_grad(), reference():
                    ref_logp[plain] = target_logprobs(
                        self,
                        input_ids,
                        attention_mask,
                        tgt_pos[plain],
                        tgt_ids[plain],
                        chunk_size,
                        position_ids,
                        cu_seq_lens,
                    ).to(ref_logp.dtype)
        out = loss(logp, tgt_role, tgt_partner, tgt_span, ref_logp)
        return {
            "loss": out.loss,
            "mle": out.mle,
            "ul": out.ul,
            "flagged": out.flagged,
            "n_ul_tokens": out.n_ul_tokens,
            "positives": (seq_role == Role.ALIGN_P).sum(),
            "negatives": (seq_role == Role.ALIGN_N).sum(),
        }

    model.forward = types.MethodType(forward, model)


def _setup_packing(lm, input_ids: torch.Tensor) -> bool:
    """Per-sequence attention for packed rows, then `check_packing`; False: use padded rows."""
    before = _attn_implementation(lm)
    impl = use_packed_attention(lm)
    dtype = lm.get_output_embeddings().weight.dtype
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    try:
        leak, shift = check_packing(lm, input_ids)
        if leak > PACKING_LEAK_TOL:
            problem = f"a packed sequence's hidden states depend on the one before it (by {leak:.3g})"
        elif not shift <= tol:  # also catches nan
            problem = f"packed and alone, a sequence's hidden states differ by {shift:.3g} (tolerance {tol})"
        else:
            problem = ""
    except (TypeError, ValueError, RuntimeError) as err:  # e.g. a forward without position_ids
        problem = f"a packed forward fails: {type(err).__name__}: {err}"
    if not problem:
        logger.info("packed micro-batches: attention %s keeps sequences apart (difference %.2g)", impl, shift)
        return True
    if impl != before:
        lm.set_attn_implementation(before)
    logger.warning(
        "%s (attention %s): %s; training on padded micro-batches instead (slower, same loss)",
        type(lm).__name__,
        impl,
        problem,
    )
    return False


class CUTTrainer(AtomicCheckpoints, Trainer):
    """Trainer whose compute_loss reads the CUT forward's output and keeps its metrics."""

    # cut_loss averages within the micro-batch, as the released code: scale by accumulation
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        mode = "train" if model.training else "eval"
        m = self._metrics[mode]
        for key in METRICS:
            m[key].append(out[key].detach().float())
        m["ul_tokens"].append(out["n_ul_tokens"].detach().float())
        m["positives"].append(out["positives"].detach().float())
        m["negatives"].append(out["negatives"].detach().float())
        return (out["loss"], out) if return_outputs else out["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        m = self._metrics[mode]
        if m:
            prefix = "eval_" if mode == "eval" else ""
            stacked = {k: self.accelerator.gather(torch.stack(v)) for k, v in m.items()}
            for key in METRICS:
                if key == "mle":
                    logs[prefix + key] = stacked[key].mean().item()
                else:  # ul and flagged are averaged over the micro-batches that have negatives
                    has_neg = stacked["ul_tokens"] > 0
                    logs[prefix + key] = stacked[key][has_neg].mean().item() if has_neg.any() else 0.0
            logs[prefix + "positives"] = int(stacked["positives"].sum().item())
            logs[prefix + "negatives"] = int(stacked["negatives"].sum().item())
            m.clear()
        super().log(logs, start_time)
