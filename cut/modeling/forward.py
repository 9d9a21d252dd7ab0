"""The causal LM's forward, for training on target tokens only: the plumbing under the CUT forward.

`decoder_hidden` runs the decoder once over a micro-batch (padded rows, or packed sequences);
`target_logprobs` takes the hidden states at the target positions only and scores them with the
chunked output head (`label_logprobs`: no full-vocabulary logits are built); `check_head_path`
checks once that this path gives the model's own log-probs (`logit_transform`: the heads that
post-process logits).

Packed micro-batches (`cut.data.pairs.pack`: one row, position_ids restarting per sequence,
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
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    eager_mask,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from cut.data.pairs import pack
from cut.errors import ConfigError

logger = logging.getLogger(__name__)


# ---- the output head, in chunks --------------------------------------------------------------------

# one chunk of logits holds at most this many float32 elements (64 MiB)
CHUNK_ELEMENTS = 1 << 24


def label_logp_chunk(head: Callable[[Tensor], Tensor], hidden: Tensor, labels: Tensor, transform) -> Tensor:
    logits = head(hidden).float()  # (C, V): one chunk only
    if transform is not None:
        logits = transform(logits)
    # log-softmax at the label, never log(softmax)
    return logits.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def label_logprobs(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    labels: Tensor,
    vocab_size: int,
    chunk_size: int = 0,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """log p(label) for each row of `hidden` (N, H), without materialising (N, V) logits.

    The output head runs over chunks of rows; each chunk's float32 logits live only inside that
    chunk and are recomputed in backward (activation checkpointing), so peak extra memory is one
    chunk of `chunk_size x vocab_size` floats instead of N x V. `head` is called as a module so
    that ZeRO-3 gathers its weight and LoRA on the head still applies.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    if chunk_size <= 0:
        chunk_size = max(1, CHUNK_ELEMENTS // vocab_size)
    out = []
    for h, y in zip(hidden.split(chunk_size), labels.split(chunk_size), strict=True):
        if torch.is_grad_enabled():
            out.append(checkpoint(label_logp_chunk, head, h, y, transform, use_reentrant=False))
        else:
            out.append(label_logp_chunk(head, h, y, transform))
    return torch.cat(out)


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


# ---- packed sequences ------------------------------------------------------------------------------

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

    Padded rows come with their attention_mask; a packed row (cut.data.pairs.pack) with position_ids
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
            "logits in a way cut.modeling.forward.logit_transform does not reproduce, so CUT would train on "
            "wrong probabilities"
        )
    return diff


def setup_packing(lm, input_ids: torch.Tensor) -> bool:
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
