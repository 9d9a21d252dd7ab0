"""A thin `transformers.Trainer` for CUT.

The loss is computed inside the causal LM's own forward: the Trainer wraps the model (a PeftModel
or the plain LM) in DDP / DeepSpeed, and that wrapped call must produce the loss so that gradients
are synchronised and ZeRO-3 gathers every weight it touches. `install_cut_forward` gives the LM
instance a forward that runs the decoder once over all sequences of the micro-batch, takes the
hidden states at the target positions only, and scores them with the chunked output head. No
full-vocabulary logits are built and no sequence is run that the loss does not use.
"""

from __future__ import annotations

import logging
import types
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer

from .errors import ConfigError
from .loss import Role, cut_loss, label_logprobs

METRICS = ("mle", "ul", "flagged")
logger = logging.getLogger(__name__)


def _logit_transform(config) -> Any:
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


def target_logprobs(lm, input_ids, attention_mask, tgt_pos, tgt_ids, chunk_size: int = 0) -> torch.Tensor:
    """log p of each target token: one decoder pass, the output head on target positions only."""
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    hidden = hidden.flatten(0, 1).index_select(0, tgt_pos)  # (N, H): target positions only
    vocab_size = lm.config.get_text_config().vocab_size
    transform = _logit_transform(lm.config.get_text_config())
    return label_logprobs(hidden, lm.get_output_embeddings(), tgt_ids, vocab_size, chunk_size, transform)


def check_head_path(lm, model_forward, input_ids, attention_mask, tgt_pos, tgt_ids, n: int = 8) -> float:
    """Compare `target_logprobs` with the model's own forward on the first targets of sequence 0.

    `_logit_transform` knows the heads that post-process logits in the transformers releases we
    test; a model that does it some other way would train on wrong log-probs without a sound.
    This runs once per run, without gradients, in eval mode (no dropout), on one sequence cut
    just after its n-th target, with logits for those n positions only. Returns the largest
    difference in nats; raises ConfigError when it is more than rounding.
    """
    width = input_ids.shape[1]
    pos = tgt_pos[tgt_pos < width][:n]  # the first targets of row 0 (consecutive positions)
    ids = tgt_ids[tgt_pos < width][:n]
    if pos.numel() == 0:
        return 0.0
    length = int(pos.max()) + 1
    keep = length - int(pos.min())
    seq, mask = input_ids[:1, :length], attention_mask[:1, :length]
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
            "logits in a way cut.trainer._logit_transform does not reproduce, so CUT would train on "
            "wrong probabilities"
        )
    return diff


def install_cut_forward(
    model: torch.nn.Module,
    threshold: float,
    weight_unlike: float,
    combine: str = "mean",
    gamma: float = 0.0,
    chunk_size: int = 0,
    check_head: bool = True,
) -> None:
    """Make `model(input_ids, attention_mask, tgt_*...)` return the CUT loss and its metrics.

    `model` is the causal LM itself (under a PeftModel, `peft_model.get_base_model()`, whose
    LoRA layers are already in place). Generation and plain calls without `tgt_ids` keep the
    original forward. With `check_head`, the first call checks the head path once
    (`check_head_path`).
    """
    original_forward = model.forward
    unchecked = [True] if check_head else []  # the check runs on the first call only

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        tgt_pos=None,
        tgt_ids=None,
        tgt_role=None,
        tgt_partner=None,
        seq_role=None,
        **kwargs,
    ):
        if tgt_ids is None:
            return original_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if unchecked:
            unchecked.clear()
            diff = check_head_path(self, original_forward, input_ids, attention_mask, tgt_pos, tgt_ids)
            logger.info("output-head path matches the model's own forward (max difference %.2g nats)", diff)
        logp = target_logprobs(self, input_ids, attention_mask, tgt_pos, tgt_ids, chunk_size)
        out = cut_loss(logp, tgt_role, tgt_partner, threshold, weight_unlike, combine, gamma)
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


class CUTTrainer(Trainer):
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
