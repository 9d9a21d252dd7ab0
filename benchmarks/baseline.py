"""The released CUT formulation, re-implemented here as the baseline we measure against.

What the released code does, and this module does on purpose:
- every record becomes a *pair* of rows in a doubled batch: (judged | plain) for a negative and
  (plain | all padding) for a positive, padded to one width, and the model runs over all 2B rows;
- the full-vocabulary logits are cast to float32 and softmaxed, and the MLE term is NLL over
  `log(softmax)`;
- the unlikelihood term gathers p(y|x,j) and p(y|x) from those probabilities.
The loss value equals `cut.loss.cut_loss(combine="mean")` on the same batch (checked by the
benchmark), up to the 1e-5 guard on 1 - p.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer


def original_collate(
    features: list[dict[str, Any]], pad_token_id: int, weight_unlike: float, multiple: int = 8
):
    """Doubled batch as the released collator builds it: labels -100 on prompts and padding."""
    width = max(len(f["judged_ids"] or f["prompt_ids"]) + len(f["response_ids"]) for f in features)
    width = (width + multiple - 1) // multiple * multiple

    def fill(prompt: list[int] | None, response: list[int]):
        ids = torch.full((width,), pad_token_id, dtype=torch.long)
        mask = torch.zeros(width, dtype=torch.long)
        labels = torch.full((width,), -100, dtype=torch.long)
        if prompt is not None:  # a positive's second row stays all padding, and is still run
            seq = prompt + response
            ids[: len(seq)] = torch.tensor(seq)
            mask[: len(seq)] = 1
            labels[len(prompt) : len(seq)] = torch.tensor(response)
        return ids, mask, labels

    first = [fill(f["judged_ids"] or f["prompt_ids"], f["response_ids"]) for f in features]
    second = [fill(f["prompt_ids"] if f["judged_ids"] else None, f["response_ids"]) for f in features]
    stack = lambda xs, i: torch.stack([x[i] for x in xs])  # noqa: E731
    return {
        "input_ids": stack(first, 0),
        "attention_mask": stack(first, 1),
        "labels": stack(first, 2),
        "input_ids_neg": stack(second, 0),
        "attention_mask_neg": stack(second, 1),
        "labels_neg": stack(second, 2),
        "weight_unlike": torch.tensor([weight_unlike if f["judged_ids"] else -1.0 for f in features]),
    }


def original_loss(model, batch: dict[str, torch.Tensor], threshold: float) -> torch.Tensor:
    input_ids = torch.cat([batch["input_ids"], batch["input_ids_neg"]])  # (2B, T)
    attention_mask = torch.cat([batch["attention_mask"], batch["attention_mask_neg"]])
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (2B, T, V)
    probs = torch.softmax(logits, dim=-1)  # full-vocabulary float32 probabilities
    b = batch["input_ids"].shape[0]
    labels = batch["labels"][:, 1:]
    labels_neg = batch["labels_neg"][:, 1:]
    shift = probs[:, :-1]  # (2B, T-1, V)
    mle = F.nll_loss(torch.log(shift[:b]).flatten(0, 1), labels.flatten(), ignore_index=-100)
    neg = batch["weight_unlike"] != -1
    if not neg.any():
        return mle
    lab, lab_neg = labels[neg], labels_neg[neg]
    p_judged = shift[:b][neg].gather(-1, lab.clamp_min(0)[..., None]).squeeze(-1)[lab != -100]
    p_plain = shift[b:][neg].gather(-1, lab_neg.clamp_min(0)[..., None]).squeeze(-1)[lab_neg != -100]
    flag = (p_judged / p_plain).detach() > threshold
    alpha = batch["weight_unlike"][neg][0]
    one_minus = (1 - p_plain).clamp_min(1e-5)
    per_token = torch.where(flag, -alpha * torch.log(one_minus), -torch.log(p_plain))
    return (mle + per_token.mean()) / 2


class OriginalTrainer(Trainer):
    """The released formulation inside the same Trainer loop, for side-by-side timing."""

    loss_is_scaled_for_ga = False  # a micro-batch mean, like CUTTrainer

    def __init__(self, *args, threshold: float = 1.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.threshold = threshold

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original_loss(model, inputs, self.threshold)
        return (loss, None) if return_outputs else loss
