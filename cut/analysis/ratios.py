"""See what a judgment flags: p(y_t|x,j) / p(y_t|x) for every response token of every negative.

    python -m cut.analysis.inspect --data_path data/demo_judgments.json \
        --model saved_models/SmolLM2-135M-Instruct --output_dir runs/inspect \
        [--after_model saved_models/demo/merged] [--threshold 1.1] [--limit N]

CUT flags a response token y_t of a negative record when the judgment explains it: the ratio
p(y_t|x,j) / p(y_t|x) exceeds the threshold lambda (the paper uses 1.1 or 1.2), and gives flagged
tokens unlikelihood. This tool scores both contexts of every negative with the training code's
own tokenisation (`cut.data.pairs.tokenize_example`), collator and target-only forward
(`cut.modeling.forward.target_logprobs`), one forward per micro-batch, and writes into --output_dir:

  index.html    every negative's response tokens coloured by log p(y|x,j) - log p(y|x), flagged
                tokens underlined, span tokens (the record's `spans`) boxed, numbers on hover;
                paged, filtered and sorted in the page (one self-contained file)
  lambda.png    the flagged fraction against lambda (1.0 .. 3.0) and, where records carry spans,
                precision / recall / F1 of the flags against the span tokens
  inspect.json  the same numbers, per-record summaries and the per-token log-probs

With --after_model (e.g. the model after CUT training, same tokenizer) every token also gets
p_after(y|x), and the page shows how far each flagged token moved. Only negatives are scored:
records whose judgment is missing or says "perfect" (or scores >= 7) have nothing to flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect as pyinspect
import io
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cut.analysis.page import render_page
from cut.args import INT_MAX, Options, integer, number, opt, run_cli
from cut.data.files import check_writable, write_bytes_atomic, write_json_atomic, write_text_atomic
from cut.data.pairs import CUTCollator, response_char_ranges, tokenize_example
from cut.data.records import Example, build_examples, load_records
from cut.data.templates import Template, load_template, resolve_template_name, trained_template
from cut.errors import ConfigError, DataError
from cut.modeling.loading import (
    DTYPES,
    check_model_path,
    device_option,
    load_model,
    load_tokenizer,
    model_name,
)
from cut.training.config import TrainConfig
from cut.training.loss import Role

logger = logging.getLogger("cut.analysis.ratios")

LAMBDAS = tuple(round(1.0 + 0.05 * k, 2) for k in range(41))  # 1.0 .. 3.0
PAPER_LAMBDAS = (1.1, 1.2)
COLOUR_NATS = 2.0  # the colour scale saturates at +-2 nats (a ratio of e^2 = 7.4)
_TRAIN = TrainConfig()
# a prompt field (instruction, input, judgment) longer than this many characters per token of
# cutoff_len is tokenised from its tail only, when that tail alone is over cutoff_len + TAIL_MARGIN
# tokens: the prompt keeps at most its last cutoff_len tokens, and a 4 MB instruction took minutes
PROMPT_CHARS_PER_TOKEN = 16
TAIL_MARGIN = 64


@dataclass
class Placement(Options):
    """Where the models of an analysis run and in which dtype (cut inspect's and cut tds's options)."""

    dtype: str = opt("auto", "auto (bf16 on a GPU, else fp32) | bf16 | fp16 | fp32.", choices=tuple(DTYPES))
    device: str = opt("auto", "auto | cpu | cuda | cuda:N (every model goes there).", parse=device_option)


@dataclass
class InspectOptions(Placement):
    """See what a judgment flags: p(y_t|x,j) / p(y_t|x) for every response token of every negative."""

    data_path: str = opt("", "Judged records: .json list, .jsonl or a datasets folder.", required=True)
    model: str = opt(
        "", "Model folder or name, or a LoRA adapter folder, whose ratio flags tokens.", required=True
    )
    output_dir: str = opt("", "Folder for index.html, lambda.png and inspect.json.", required=True)
    after_model: str = opt("", "A second model with the same tokenizer (e.g. after CUT): its p(y|x) too.")
    threshold: float = opt(
        1.1,
        "lambda: a token is flagged when p(y|x,j) / p(y|x) exceeds it (paper: 1.1, 1.2).",
        parse=number(0, 1000, lo_open=True),
    )
    prompt_template_name: str = opt(
        "auto",
        "alpaca | chat | path to a .json template | auto: the one either model was CUT-trained "
        "with (its cut_config.yaml), else chat if the tokenizer has a chat template, else alpaca.",
    )
    cutoff_len: int = opt(
        _TRAIN.cutoff_len, "Maximum tokens of one sequence, as in training.", parse=integer(2, 2**20)
    )
    micro_batch_size: int = opt(8, "Negatives per forward (each is two sequences).", parse=integer(1, 4096))
    limit: int = opt(0, "Score only the first N negatives of the file; 0 = all.", parse=integer(0, INT_MAX))

    def __post_init__(self) -> None:
        for name in ("data_path", "model", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if not self.threshold > 0:
            raise ConfigError(f"threshold must be > 0, got {self.threshold}")
        if self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.cutoff_len < 2:
            raise ConfigError(f"cutoff_len must be >= 2, got {self.cutoff_len}")
        if self.limit < 0:
            raise ConfigError(f"limit must be >= 0 (0 = all), got {self.limit}")
        self.check_fields()  # dtype among DTYPES, device usable here, numbers in range

    def check_paths(self) -> None:
        """The models are there and the output folder can be one (before anything loads)."""
        for name in ("model", "after_model"):
            if getattr(self, name):
                check_model_path(getattr(self, name))
        check_output_folder(self.output_dir)


def check_output_folder(output_dir: str) -> None:
    """--output_dir is a folder or not there yet (cut inspect's and cut tds's)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --output_dir exists and is not a folder")


@dataclass
class Scored:
    """One negative, scored: per response token of its plain context (all lists of length T)."""

    example: Example
    ids: list[int]
    text: list[str]  # the token's text in the output ('' for a piece of a split character)
    special: list[bool]  # a special token (the added EOS): text is its name, not output text
    span: list[int]  # 1 inside the record's spans; [] when the record has none
    lp_plain: Tensor  # (T,) log p(y_t | x)
    lp_judged: Tensor  # (T,) log p(y_t | x, j)
    lp_after: Tensor | None = None  # (T,) log p_after(y_t | x)


def flags(lp_plain: Tensor, lp_judged: Tensor, threshold: float) -> Tensor:
    """The tokens cut.training.loss.cut_loss flags: p(y|x,j) / p(y|x) > threshold, computed as it does."""
    return (lp_judged - lp_plain).exp() > threshold


# ---------------------------------------------------------------- inputs


def load_negatives(opts: InspectOptions) -> tuple[list[Example], dict[str, int]]:
    """The negatives of the data file (the first `limit`), and the counts of what was read."""
    examples, counts = build_examples(
        load_records(opts.data_path), _TRAIN.score_threshold, _TRAIN.on_failed_judgment
    )
    negatives = [e for e in examples if e.is_negative]
    if not negatives:
        raise DataError(
            f"{opts.data_path}: no negative records ({counts['records']} records: {counts['positive']} "
            f"positive, {counts['failed_judgment']} with a failed judgment): a judgment that finds "
            "fault is what flags tokens"
        )
    if opts.limit:
        counts["limited_away"] = max(0, len(negatives) - opts.limit)
        negatives = negatives[: opts.limit]
    return negatives, counts


def resolve_template(opts: InspectOptions, tokenizer) -> Template:
    name = opts.prompt_template_name
    if name == "auto" and opts.after_model and not trained_template(opts.model):
        name = trained_template(opts.after_model) or name  # the template CUT trained the second with
    return load_template(resolve_template_name(name, opts.model, tokenizer), tokenizer)


def check_same_tokenizer(tokenizer, after_model: str) -> None:
    other = load_tokenizer(after_model)
    if other.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"{after_model}: its tokenizer differs from the first model's; the two models must score "
            "the same tokens"
        )


def token_texts(
    tokenizer, template: Template, example: Example, ids: list[int]
) -> tuple[list[str], list[bool]]:
    """Each response token's text, cut from the output by its character range: the texts join to the
    output (gaps, e.g. a space trimmed from an offset, go to the next token); special tokens (an
    added EOS) are shown by name."""
    output = example.record.output
    plain, _ = template.prompts(example.record, None)
    add_special = template.adds_special_tokens
    plain_ids = tokenizer(plain, add_special_tokens=add_special)["input_ids"]
    ranges = response_char_ranges(tokenizer, plain, plain_ids, output, add_special, len(ids))
    specials = set(tokenizer.all_special_ids)
    texts, special, end, last = [], [], 0, -1
    for k, (tid, (_, b)) in enumerate(zip(ids, ranges, strict=True)):
        if tid in specials and b <= end:
            texts.append(tokenizer.decode([tid]))
            special.append(True)
            continue
        texts.append(output[end:b] if b > end else "")
        special.append(False)
        end, last = max(end, b), k
    if end < len(output) and last >= 0:
        texts[last] += output[end:]
    return texts, special


def bounded(example: Example, tokenizer, cutoff_len: int) -> Example:
    """The example with every prompt field (instruction, input, judgment, each history turn) longer than
    PROMPT_CHARS_PER_TOKEN * cutoff_len characters cut to that many from its end, where those
    characters alone make more than cutoff_len + TAIL_MARGIN tokens; other fields stay whole.

    Training cuts a prompt from the left to at most cutoff_len tokens, and these all lie in such a
    tail; tokenisation is local (a word's tokens do not depend on text far before it), so the kept
    tokens are those of the whole text, and the work is bounded by cutoff_len, not the input's size.
    A prompt that fits is never cut: its fields hold fewer tokens than that."""
    keep = PROMPT_CHARS_PER_TOKEN * cutoff_len

    def tail(text: str | None) -> str | None:
        if text is None or len(text) <= keep:
            return text
        end = text[-keep:]
        too_many = len(tokenizer(end, add_special_tokens=False)["input_ids"]) > cutoff_len + TAIL_MARGIN
        return end if too_many else text  # long tokens: the whole text, as training tokenises it

    r = example.record
    fields = {"instruction": tail(r.instruction), "input": tail(r.input), "judgment": tail(r.judgment)}
    history = tuple((role, tail(text)) for role, text in r.history)  # chat turns, each a prompt field
    if all(fields[k] is getattr(r, k) for k in fields) and history == r.history:
        return example
    fields["history"] = history
    judgment = fields["judgment"] if example.judgment == r.judgment else tail(example.judgment)
    return Example(dataclasses.replace(r, **fields), judgment)


def prepare(
    negatives: list[Example], template: Template, tokenizer, cutoff_len: int
) -> tuple[list[tuple[Example, dict]], int]:
    """Tokenise as training does; (example, features) for those that fit, and how many did not.
    Over-long prompt fields are tokenised from their tail only (`bounded`), to the same tokens."""
    kept = []
    for ex in negatives:
        feat = tokenize_example(
            bounded(ex, tokenizer, cutoff_len), template, tokenizer, cutoff_len, _TRAIN.add_eos_token
        )
        if feat is not None:
            kept.append((ex, feat))
    if not kept:
        raise DataError(
            f"no negative fits cutoff_len={cutoff_len} tokens (response and at least one prompt token); "
            "raise --cutoff_len"
        )
    return kept, len(negatives) - len(kept)


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def score_batch(
    lm, features: list[dict], pad_token_id: int, check: bool = False
) -> list[tuple[Tensor, Tensor | None]]:
    """(log p(y|x), log p(y|x,j)) of each feature's response tokens, from one forward of the micro-
    batch that the training collator builds (judged is None for a feature with no judged_ids).

    The collator's tensors go to `target_logprobs` by name, so whatever it adds that the forward
    takes (e.g. position_ids of a packed batch) travels along. `check` compares the target-only
    head path with the model's own forward first (cut.modeling.forward.check_head_path).
    """
    from cut.modeling.forward import check_head_path, target_logprobs  # imports transformers: seconds

    batch = CUTCollator(pad_token_id)(features)
    device = lm.get_output_embeddings().weight.device
    takes = pyinspect.signature(target_logprobs).parameters
    args = {k: v.to(device) for k, v in batch.items() if k in takes}
    if check and "position_ids" not in args:
        check_head_path(
            lm, lm.forward, args["input_ids"], args["attention_mask"], args["tgt_pos"], args["tgt_ids"]
        )
    logp = target_logprobs(lm, **args).float().cpu()  # (N,) over every target of the batch
    role, partner = batch["tgt_role"], batch["tgt_partner"]
    plain_at = ((role == Role.MISALIGN_N) | (role == Role.ALIGN_P)).nonzero().squeeze(1)
    sizes = [len(f["response_ids"]) for f in features]
    out = []
    for f, at in zip(features, plain_at.split(sizes), strict=True):
        out.append((logp[at], logp[partner[at]] if f["judged_ids"] else None))
    return out


def score_all(
    lm, features: list[dict], pad_token_id: int, micro_batch_size: int, bar: tqdm | None = None
) -> list[tuple[Tensor, Tensor | None]]:
    """score_batch over micro-batches of similar length (longest first: a memory limit shows at once)."""
    order = sorted(range(len(features)), key=lambda i: -features[i]["length"])
    out: list[Any] = [None] * len(features)
    for start in range(0, len(order), micro_batch_size):
        idx = order[start : start + micro_batch_size]
        for i, scored in zip(
            idx, score_batch(lm, [features[i] for i in idx], pad_token_id, start == 0), strict=True
        ):
            out[i] = scored
        if bar is not None:
            bar.update(1)
    return out


def _load_lm(path: str, opts: InspectOptions):
    lm = load_model(path, opts.dtype, opts.device)
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # LoRA layers stay in place


def score_examples(
    opts: InspectOptions,
    tokenizer,
    template: Template,
    prepared: list[tuple[Example, dict]],
    progress: bool = True,
) -> list[Scored]:
    """Load the model (and the after model), score every prepared negative."""
    features = [f for _, f in prepared]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    n_batches = math.ceil(len(features) / opts.micro_batch_size)
    models = [opts.model] + ([opts.after_model] if opts.after_model else [])
    with tqdm(
        total=n_batches * len(models), desc="scoring", unit="batch", disable=None if progress else True
    ) as bar:
        lm = _load_lm(opts.model, opts)
        both = score_all(lm, features, pad, opts.micro_batch_size, bar)
        del lm
        after: list[Any] = [(None, None)] * len(features)
        if opts.after_model:
            lm = _load_lm(opts.after_model, opts)
            plain_only = [{**f, "judged_ids": []} for f in features]
            after = score_all(lm, plain_only, pad, opts.micro_batch_size, bar)
            del lm
    scored = []
    for (ex, feat), (lp, lj), (la, _) in zip(prepared, both, after, strict=True):
        short = bounded(ex, tokenizer, opts.cutoff_len)  # the text its features were tokenised from
        text, special = token_texts(tokenizer, template, short, feat["response_ids"])
        scored.append(Scored(ex, feat["response_ids"], text, special, feat["span_mask"], lp, lj, la))
    return scored


# ---------------------------------------------------------------- numbers


def lambda_curve(scored: list[Scored], lambdas: tuple[float, ...] = LAMBDAS) -> list[dict[str, Any]]:
    """Per lambda: flagged tokens and their fraction over all plain-context response tokens, the
    fraction of records with a flag, and precision / recall / F1 of the flags against the span
    tokens of the records that carry spans (None where no record does)."""
    ratio = torch.cat([(s.lp_judged - s.lp_plain).exp() for s in scored])  # (T_all,)
    rec_of = torch.cat([torch.full((len(s.ids),), k) for k, s in enumerate(scored)])
    has_span = torch.cat([torch.tensor([bool(s.span)] * len(s.ids), dtype=torch.bool) for s in scored])
    span = torch.cat([torch.tensor(s.span or [0] * len(s.ids), dtype=torch.bool) for s in scored])
    n_span = int(span.sum())
    rows = []
    for lam in lambdas:
        flag = ratio > lam
        row: dict[str, Any] = {
            "lambda": lam,
            "flagged_tokens": int(flag.sum()),
            "flagged_fraction": float(flag.float().mean()),
            "records_with_flags": float(
                torch.zeros(len(scored)).index_add_(0, rec_of, flag.float()).gt(0).float().mean()
            ),
            "precision": None,
            "recall": None,
            "f1": None,
        }
        if has_span.any():
            tp, n_flag = int((flag & span).sum()), int((flag & has_span).sum())
            row["precision"] = tp / n_flag if n_flag else None
            row["recall"] = tp / n_span if n_span else None
            row["f1"] = 2 * tp / (n_flag + n_span) if n_flag + n_span else None
        rows.append(row)
    return rows


def best_f1(curve: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row of the highest F1 (the smallest lambda among ties); None without spans."""
    rows = [r for r in curve if r["f1"] is not None]
    return max(rows, key=lambda r: (r["f1"], -r["lambda"])) if rows else None


def _mean(x: Tensor) -> float | None:
    return float(x.mean()) if x.numel() else None


def record_summary(s: Scored, threshold: float) -> dict[str, Any]:
    flag = flags(s.lp_plain, s.lp_judged, threshold)
    log_ratio = s.lp_judged - s.lp_plain
    span = torch.tensor(s.span, dtype=torch.bool) if s.span else None
    out = {
        "index": s.example.record.index,
        "n_tokens": len(s.ids),
        "n_flagged": int(flag.sum()),
        "flagged_fraction": float(flag.float().mean()),
        "mean_log_ratio": float(log_ratio.mean()),
        "max_log_ratio": float(log_ratio.max()),
        "n_span": int(span.sum()) if span is not None else 0,
        "n_span_flagged": int((span & flag).sum()) if span is not None else 0,
        "moved": None,
        "moved_other": None,
    }
    if s.lp_after is not None:
        change = s.lp_after - s.lp_plain  # log p_after(y|x) - log p(y|x)
        out["moved"] = _mean(change[flag])  # how far the flagged tokens moved
        out["moved_other"] = _mean(change[~flag])
    return out


def build_result(scored: list[Scored], threshold: float, meta: dict[str, Any]) -> dict[str, Any]:
    """Everything inspect.json holds (full precision; rounded when written)."""
    curve = lambda_curve(scored, tuple(sorted({*LAMBDAS, threshold})))
    at = next(r for r in curve if r["lambda"] == threshold)
    records = []
    for s in scored:
        r = s.example.record
        rec = {
            **record_summary(s, threshold),
            "instruction": r.instruction,
            "input": r.input,
            "judgment": s.example.judgment,
            "output": r.output,
            "tokens": s.text,
            "ids": s.ids,
            "special": [int(x) for x in s.special],
            "span": s.span,
            "flagged": flags(s.lp_plain, s.lp_judged, threshold).int().tolist(),
            "lp_plain": s.lp_plain.tolist(),
            "lp_judged": s.lp_judged.tolist(),
        }
        if s.lp_after is not None:
            rec["lp_after"] = s.lp_after.tolist()
        records.append(rec)
    after = None
    if scored and scored[0].lp_after is not None:
        lp = torch.cat([s.lp_plain for s in scored])
        change = torch.cat([s.lp_after for s in scored]) - lp
        flag = torch.cat([flags(s.lp_plain, s.lp_judged, threshold) for s in scored])
        after = {"flagged_logp_change": _mean(change[flag]), "other_logp_change": _mean(change[~flag])}
    return {
        **meta,
        "threshold": threshold,
        "counts": {
            **meta.get("counts", {}),
            "scored": len(scored),
            "tokens": sum(len(s.ids) for s in scored),
            "flagged_tokens": at["flagged_tokens"],
            "span_records": sum(bool(s.span) for s in scored),
            "span_tokens": sum(sum(s.span) for s in scored),
        },
        "at_threshold": at,
        "paper_lambdas": {str(lam): next(r for r in curve if r["lambda"] == lam) for lam in PAPER_LAMBDAS},
        "best_f1": best_f1(curve),
        "after": after,
        "lambda_curve": [r for r in curve if r["lambda"] in LAMBDAS],
        "records": records,
    }


# ---------------------------------------------------------------- outputs


def rounded(obj: Any, digits: int = 5) -> Any:
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, list):
        return [rounded(x, digits) for x in obj]
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    return obj


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("lambda.png needs matplotlib: pip install matplotlib") from None


def plot_lambda(result: dict[str, Any]) -> bytes:
    """lambda.png: flagged fraction (and span precision / recall / F1) against lambda."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curve = result["lambda_curve"]
    lams = [r["lambda"] for r in curve]
    fig = Figure(figsize=(8, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    frac = [r["flagged_fraction"] for r in curve]
    ax.plot(lams, frac, color="#111827", lw=2.2, label="flagged fraction of response tokens")
    has_spans = curve[0]["f1"] is not None
    if has_spans:
        nan = float("nan")
        for key, colour, style in (
            ("precision", "#2563eb", "--"),
            ("recall", "#ea580c", "--"),
            ("f1", "#16a34a", "-"),
        ):
            vals = [nan if r[key] is None else r[key] for r in curve]
            ax.plot(
                lams, vals, color=colour, ls=style, lw=1.8, label=f"{key.replace('f1', 'F1')} vs span tokens"
            )
    top = 1.0 if has_spans else max(0.05, max(frac) * 1.15)
    lines = []
    for lam in PAPER_LAMBDAS:
        r = result["paper_lambdas"][str(lam)]
        ax.axvline(lam, color="#9ca3af", ls=":", lw=1.2)
        ax.plot([lam], [r["flagged_fraction"]], "o", color="#111827", ms=5, zorder=3)
        lines.append(f"λ = {lam}: {r['flagged_fraction']:.1%} flagged")
    ax.text(PAPER_LAMBDAS[1] + 0.02, top * 0.98, "paper's λ", fontsize=8, color="#6b7280", va="top")
    best = result["best_f1"]
    if best is not None:
        ax.axvline(best["lambda"], color="#16a34a", lw=1.2, alpha=0.7)
        ax.plot([best["lambda"]], [best["f1"]], "o", color="#16a34a", ms=5, zorder=3)
        lines.append(
            f"best F1 {best['f1']:.2f} at λ = {best['lambda']} "
            f"(P {_num(best['precision'])}, R {_num(best['recall'])})"
        )
    ax.text(
        0.98,
        0.62 if has_spans else 0.80,
        "\n".join(lines),
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=9,
        bbox={"boxstyle": "round,pad=0.4", "fc": "white", "ec": "#d1d5db"},
    )
    c = result["counts"]
    ax.set_title(
        f"p(y|x,j) / p(y|x) > λ  —  {result['model_name']}, {c['scored']} negatives, {c['tokens']:,} tokens",
        fontsize=10,
    )
    ax.set_xlabel("λ (threshold on the ratio)")
    ax.set_ylabel("fraction")
    ax.set_xlim(lams[0], lams[-1])
    ax.set_ylim(0, top)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8.5, loc="upper right", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def page_records(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The compact per-record data the page's script reads (log-probs to 4 decimals)."""
    out = []
    for r in result["records"]:
        rec = {
            "i": r["index"],
            "ins": r["instruction"],
            "inp": r["input"],
            "jud": r["judgment"],
            "tok": r["tokens"],
            "sp": [k for k, x in enumerate(r["special"]) if x],
            "sn": r["span"],
            "fl": r["flagged"],
            "lp": rounded(r["lp_plain"], 4),
            "lj": rounded(r["lp_judged"], 4),
        }
        if "lp_after" in r:
            rec["la"] = rounded(r["lp_after"], 4)
        out.append(rec)
    return out


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def page_html(result: dict[str, Any], png: bytes) -> str:
    c, at = result["counts"], result["at_threshold"]
    lam = result["threshold"]
    summary = [
        (
            "negatives",
            f"{c['scored']}" + (f" ({c['dropped_too_long']} too long)" if c.get("dropped_too_long") else ""),
        ),
        ("response tokens", f"{c['tokens']:,}"),
        (f"flagged at λ={lam}", f"{at['flagged_tokens']:,} ({_pct(at['flagged_fraction'])})"),
    ]
    summary += [
        (f"at λ={k}", _pct(r["flagged_fraction"]))
        for k, r in result["paper_lambdas"].items()
        if float(k) != lam
    ]
    if at["f1"] is not None:
        summary.append(
            (
                f"vs spans at λ={lam}",
                f"P {_pct(at['precision'])} · R {_pct(at['recall'])} · F1 {at['f1']:.2f}",
            )
        )
        best = result["best_f1"]
        summary.append(("best F1", f"{best['f1']:.2f} at λ={best['lambda']}"))
    if result["after"]:
        a = result["after"]
        summary.append(
            (
                "Δ log p(y|x) flagged",
                f"{a['flagged_logp_change']:+.3f}" if a["flagged_logp_change"] is not None else "–",
            )
        )
        summary.append(
            (
                "Δ other tokens",
                f"{a['other_logp_change']:+.3f}" if a["other_logp_change"] is not None else "–",
            )
        )
    models = result["model"] + (f"  →  after: {result['after_model']}" if result["after_model"] else "")
    subtitle = f"{models}  ·  data: {result['data_path']}  ·  template: {result['prompt_template']}"
    extra = {
        "threshold": lam,
        "scale": COLOUR_NATS,
        "after": bool(result["after_model"]),
        "spans": c["span_records"] > 0,
    }
    return render_page(
        "What the judgment flags",
        page_records(result),
        VIEW_JS,
        subtitle=subtitle,
        summary=summary,
        figures=[("λ curve (lambda.png)", png)],
        extra=extra,
    )


def write_outputs(result: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """lambda.png, inspect.json, then index.html, each written whole (temp file + rename)."""
    out = Path(output_dir)
    png = plot_lambda(result)
    paths = {"lambda": out / "lambda.png", "json": out / "inspect.json", "page": out / "index.html"}
    write_bytes_atomic(paths["lambda"], png)
    write_json_atomic(paths["json"], rounded(result))
    write_text_atomic(paths["page"], page_html(result, png))
    return paths


# ---------------------------------------------------------------- the pipeline


def inspect_records(progress: bool = True, **options: Any) -> dict[str, Any]:
    """Score every negative of `data_path` under `model` (and `after_model`), write index.html,
    lambda.png and inspect.json into `output_dir`, return what inspect.json holds. Options are
    InspectOptions' fields; every check on them and on the data runs before any model loads."""
    t0 = time.perf_counter()
    opts = InspectOptions(**options)
    opts.check_paths()
    check_writable(opts.output_dir, "--output_dir")
    negatives, counts = load_negatives(opts)
    check_matplotlib()
    tokenizer = load_tokenizer(opts.model)
    if opts.after_model:
        check_same_tokenizer(tokenizer, opts.after_model)
    template = resolve_template(opts, tokenizer)
    prepared, dropped = prepare(negatives, template, tokenizer, opts.cutoff_len)
    counts["dropped_too_long"] = dropped
    t1 = time.perf_counter()
    scored = score_examples(opts, tokenizer, template, prepared, progress)
    t2 = time.perf_counter()
    meta = {
        "model": opts.model,
        "model_name": model_name(opts.model),
        "after_model": opts.after_model or None,
        "data_path": opts.data_path,
        "prompt_template": template.name,
        "cutoff_len": opts.cutoff_len,
        "counts": counts,
    }
    result = build_result(scored, opts.threshold, meta)
    result["seconds"] = {"prepare": t1 - t0, "models_and_scoring": t2 - t1}
    write_outputs(result, opts.output_dir)
    result["seconds"]["total"] = time.perf_counter() - t0  # with the writing
    return result


@dataclass
class InspectCommand(InspectOptions):
    """cut inspect's options: the library's, and whether to draw a progress bar."""

    no_progress: bool = opt(False, "no progress bar")


REQUIRED = ("data_path", "model", "output_dir")


def build_parser() -> argparse.ArgumentParser:
    """cut inspect's parser (InspectCommand's); every option not given holds its default."""
    parser = InspectCommand.build_parser("cut.analysis.inspect")
    fields = InspectCommand.option_fields().items()
    parser.set_defaults(**{k: f.default for k, (f, _, _) in fields if k not in REQUIRED})
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_analysis(InspectCommand, argv, "cut.analysis.inspect", inspect_records, summary)


def run_analysis(
    command: type[Options],
    argv: list[str] | None,
    prog: str,
    run: Callable[..., dict[str, Any]],
    summary: Callable[[dict[str, Any], str], str],
) -> int:
    """The main of cut inspect and cut tds: `command`'s options (the library's plus no_progress),
    `run(progress, **the library's options)`, and its summary printed."""
    opts = command.parse(argv, prog=prog)
    options = {k: v for k, v in opts.flat().items() if k != "no_progress"}

    def body() -> None:
        print(summary(run(not opts.get("no_progress"), **options), opts.get("output_dir")))

    return run_cli(prog, body)


def summary(result: dict[str, Any], output_dir: str) -> str:
    """What cut inspect prints: the flagged fractions and where the page went."""
    at, c = result["at_threshold"], result["counts"]
    return (
        f"{c['scored']} negatives, {c['tokens']} response tokens; flagged at λ={result['threshold']}: "
        f"{at['flagged_tokens']} ({at['flagged_fraction']:.1%}); "
        + ", ".join(f"λ={k}: {r['flagged_fraction']:.1%}" for k, r in result["paper_lambdas"].items())
        + (
            f"; best F1 {result['best_f1']['f1']:.3f} at λ={result['best_f1']['lambda']}"
            if result["best_f1"]
            else ""
        )
        + f"\nwrote {Path(output_dir) / 'index.html'}, lambda.png, inspect.json "
        f"in {result['seconds']['total']:.1f} s"
    )


# ---------------------------------------------------------------- the page's script

VIEW_JS = r"""
const VIEW = {
  state: {lam: D.threshold, colour: 'ratio'},
  sorts: [
    {key: 'index', label: 'index', dir: 'asc', value: r => r.i},
    {key: 'flagged', label: 'flagged fraction', dir: 'desc', value: r => r._frac},
  ].concat(D.after ? [{key: 'moved', label: 'flags moved', dir: 'asc', value: r => r._moved}] : [])
   .concat([{key: 'ratio', label: 'strongest ratio', dir: 'desc', value: r => r._max}])
   .concat(D.spans ? [{key: 'f1', label: 'F1 vs spans', dir: 'desc', value: r => r._f1}] : [])
   .concat([{key: 'length', label: 'response length', dir: 'desc', value: r => r.tok.length}]),
  _lam: null,
  prepare(r) {
    r._hay = [r.ins, r.inp, r.jud, r.tok.join('')].join('\n').toLowerCase();
    r._lr = r.lp.map((p, i) => r.lj[i] - p);
    r._max = Math.max(...r._lr);
    r._sp = new Set(r.sp);
  },
  refresh(state) {
    const lam = +state.lam;
    if (lam === this._lam) return;
    this._lam = lam;
    for (const r of D.records) {
      // the run's own flags at its threshold; elsewhere recomputed from the rounded log-probs
      r._fl = lam === D.threshold ? r.fl : r._lr.map(d => Math.exp(d) > lam ? 1 : 0);
      let nf = 0, moved = 0, tp = 0, ns = 0;
      r._fl.forEach((f, i) => {
        nf += f; if (r.sn.length) { ns += r.sn[i]; tp += f && r.sn[i]; }
        if (f && r.la) moved += r.la[i] - r.lp[i];
      });
      r._nf = nf; r._frac = nf / r._fl.length; r._tp = tp; r._ns = ns;
      r._moved = r.la && nf ? moved / nf : null;
      r._f1 = r.sn.length && (nf + ns) ? 2 * tp / (nf + ns) : null;
    }
  },
  controls(state) {
    return `<label>λ <input id="lam" type="number" step="0.05" min="0.05" value="${state.lam}"></label>` +
      (D.after ? `<label>colour <select id="colour"><option value="ratio">log ratio</option>` +
        `<option value="change">after − before</option></select></label>` : '');
  },
  bind(state, update) {
    const lam = document.getElementById('lam');
    lam.addEventListener('change', () => { if (+lam.value > 0) { state.lam = +lam.value; update(false); } });
    const col = document.getElementById('colour');
    if (col) { col.value = state.colour; col.addEventListener('change', () => { state.colour = col.value; update(false); }); }
  },
  legend(state) {
    const what = state.colour === 'change' && D.after
      ? 'colour: log p<sub>after</sub>(y|x) − log p(y|x) — blue: training pushed the token down'
      : 'colour: log p(y|x,j) − log p(y|x) — red: the judgment makes the token more likely';
    return `<span class="cbar">−${D.scale}${colourBar(D.scale)}+${D.scale} nats</span><span>${what}</span>` +
      `<span><span class="sw flagged">flagged</span> p(y|x,j) / p(y|x) &gt; λ = ${state.lam}</span>` +
      (D.spans ? `<span><span class="sw span">span</span> inside the record's spans</span>` : '') +
      '<span>hover a token for its numbers</span>';
  },
  text(r, i) {
    if (r._sp.has(i)) return esc(r.tok[i]);
    const t = r.tok[i];
    if (!t) return '';
    return esc(t).replace(/\n/g, '<i class="nl">↵</i>\n');
  },
  card(r, k, state) {
    const change = state.colour === 'change' && r.la;
    const toks = r.tok.map((_, i) => {
      const v = change ? r.la[i] - r.lp[i] : r._lr[i];
      const cls = 't' + (r._fl[i] ? ' flagged' : '') + (r.sn[i] ? ' span' : '') +
        (r._sp.has(i) ? ' sp' : '') + (r.tok[i] ? '' : ' e');
      return `<span class="${cls}" data-i="${i}" style="background:${diverging(v, D.scale)}">${this.text(r, i)}</span>`;
    }).join('');
    const ins = r.ins + (r.inp ? '\n' + r.inp : '');
    const short = ins.length > 220
      ? `${esc(ins.slice(0, 200))}… <details><summary>all of it</summary>${esc(ins)}</details>`
      : esc(ins);
    let head = `<span class="idx">#${r.i}</span><span>${r._nf} of ${r.tok.length} tokens flagged (${(100 * r._frac).toFixed(1)}%)</span>` +
      `<span>strongest ratio ${Math.exp(r._max).toFixed(2)}</span>`;
    if (r.sn.length) head += `<span>spans: ${r._ns} tokens, ${r._tp} flagged</span>`;
    if (r._moved != null) head += `<span>flags moved <b class="${r._moved < 0 ? 'down' : 'up'}">${fmtNum(r._moved)}</b></span>`;
    let moves = '';
    if (r.la && r._nf) {
      const chips = [];
      r._fl.forEach((f, i) => {
        if (!f || chips.length >= 40) return;
        const d = r.la[i] - r.lp[i];
        chips.push(`<span class="mv"><span class="tk">${esc(JSON.stringify(r.tok[i]))}</span> ` +
          `${fmtP(Math.exp(r.lp[i]))} → ${fmtP(Math.exp(r.la[i]))} <b class="${d < 0 ? 'down' : 'up'}">${fmtNum(d, 2)}</b></span>`);
      });
      const more = r._nf > chips.length ? `<span class="count">… ${r._nf - chips.length} more</span>` : '';
      moves = `<div class="moves"><span class="lab">flagged p(y|x) before → after</span>${chips.join('')}${more}</div>`;
    }
    return `<article class="card" data-r="${k}"><header>${head}</header>` +
      `<div class="ins"><span class="lab">instruction</span>${short}</div>` +
      `<div class="jud"><span class="lab">judgment</span>${esc(r.jud)}</div>` +
      `<div class="resp">${toks}</div>${moves}</article>`;
  },
  tip(r, i, state) {
    const p = Math.exp(r.lp[i]), pj = Math.exp(r.lj[i]), ratio = pj / p;
    const rows = [['p(y|x)', fmtP(p)], ['p(y|x,j)', fmtP(pj)],
      ['ratio', ratio.toPrecision(3) + (r._fl[i] ? ` &gt; ${state.lam}` : '')]];
    if (r.la) {
      rows.push(['p<sub>after</sub>(y|x)', fmtP(Math.exp(r.la[i]))]);
      rows.push(['Δ log p(y|x)', fmtNum(r.la[i] - r.lp[i])]);
    }
    const notes = [r._fl[i] ? 'flagged' : '', r.sn[i] ? 'in a span' : '', r._sp.has(i) ? 'special token' : '']
      .filter(Boolean).join(' · ');
    return `<div class="tt">${esc(JSON.stringify(r.tok[i]))} <span style="opacity:.6">#${i}</span></div>` +
      `<table>${rows.map(([a, b]) => `<tr><td>${a}</td><td>${b}</td></tr>`).join('')}</table>` +
      (notes ? `<div class="note">${notes}</div>` : '');
  },
};
"""


if __name__ == "__main__":
    sys.exit(main())
