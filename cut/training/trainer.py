"""A thin `transformers.Trainer` for CUT.

The loss is computed inside the causal LM's own forward: the Trainer wraps the model (a PeftModel
or the plain LM) in DDP / DeepSpeed, and that wrapped call must produce the loss so that gradients
are synchronised and ZeRO-3 gathers every weight it touches. `install_cut_forward` gives the LM
instance a forward that runs the decoder once over all sequences of the micro-batch, takes the
hidden states at the target positions only, and scores them with the chunked output head. No
full-vocabulary logits are built and no sequence is run that the loss does not use.

The forward plumbing (target-only decoder pass, chunked head, packed attention and the checks
of both) is cut.modeling.forward; the run folder's safety (atomic checkpoints) cut.training.runs.
"""

from __future__ import annotations

import logging
import types
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from transformers import Trainer

from cut.data.pairs import unpack
from cut.errors import ConfigError
from cut.modeling.forward import check_head_path, setup_packing, target_logprobs
from cut.training.loss import CUTLossConfig, Role
from cut.training.runs import AtomicCheckpoints

METRICS = ("mle", "ul", "flagged")
logger = logging.getLogger(__name__)


def install_cut_forward(
    model: torch.nn.Module,
    loss: CUTLossConfig | None = None,
    chunk_size: int = 0,
    check_head: bool = True,
    reference: Callable[[], AbstractContextManager] | None = None,
    **settings: Any,
) -> None:
    """Make `model(input_ids, attention_mask | position_ids + cu_seq_lens, tgt_*...)` return the
    CUT loss and its metrics, for padded or packed micro-batches (`cut.data.pairs.CUTCollator`).

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
            packing["ok"] = setup_packing(self, input_ids)
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
