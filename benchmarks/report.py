"""The benchmark report: results.md (tables and targets) and results.png (one panel a section).

    python -m benchmarks.report benchmarks/results.json   # rewrites results.md and results.png beside it

`benchmarks.run` measures and calls `write_report` and `chart`; this entry point redraws both
from a saved results.json without measuring anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MEMORY_TARGET = "<= 0.35"  # (a)/(b) peak step memory at the largest vocabulary
MEMORY_PER_TOKEN_TARGET = "<= 1.3"  # (a)/(c) peak step memory per token
SPEEDUP_TARGET = ">= 1.5x"  # (b)/(a) epoch time
TIME_PER_TOKEN_TARGET = "<= 1.10"  # (a)/(c) and (a)/(d) epoch time per token
VARIANTS = {
    "cut": "(a) cut",
    "original": "(b) original formulation",
    "sft": "(c) SFT, this project",
    "trl": "(d) TRL SFTTrainer",
}


def fmt(s: dict[str, float] | None, digits: int = 0) -> str:
    if not s:
        return "OOM"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def ratio_text(x: float | None, missing: str) -> str:
    return missing if x is None else f"{x:.3f}"


def target(what: str, value: float | None, shown: str, bound: str) -> str:
    """One line of the targets; `bound` reads "<= 0.35" or ">= 1.5x". No value (the peer ran out
    of memory) meets it."""
    op, limit = bound.split(" ")
    limit_value = float(limit.rstrip("x"))
    ok = value is None or (value <= limit_value if op == "<=" else value >= limit_value)
    return f"{what}: {shown} (target {bound}: {'met' if ok else 'MISSED'})"


# ---------------------------------------------------------------- results.md


def write_report(out: Path, results: dict, scale_vocab: int) -> str:
    """Write out/results.md from a results dict (the layout of results.json); return its text."""
    memory, throughput = results["memory"], results["throughput"]
    lines = header(results["suite"], results["machine"])
    lines += memory_table(memory)
    lines += throughput_table(throughput) if throughput else throughput_skipped()
    lines += scaling_table(results["scaling"], scale_vocab)
    checks = memory_targets(memory) + (throughput_targets(throughput) if throughput else [])
    lines += ["", "## Targets", ""] + [f"- {c}" for c in checks] + [""]
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


def header(suite: str, info: dict) -> list[str]:
    return [
        f"# Benchmarks (suite `{suite}`)",
        "",
        f"`python -m benchmarks.run --suite {suite}`; machine: {info['cpu']}, {info['cores']} cores, "
        f"torch {info['torch']}, GPU: {info['gpu']}. Each figure: median (min-max) of the repeats; ratios "
        "within this run.",
        "",
    ]


def memory_ratios(row: dict) -> tuple[float | None, float | None]:
    """(a)/(b) peak memory and (a)/(c) peak memory per token; None where the other one ran out."""
    a, b, c = row["cut"], row["original"], row["sft"]
    ab = a["peak_mb"]["median"] / b["peak_mb"]["median"] if a["peak_mb"] and b["peak_mb"] else None
    if not (a["peak_mb"] and c["peak_mb"]):
        return ab, None
    return ab, (a["peak_mb"]["median"] / a["tokens"]) / (c["peak_mb"]["median"] / c["tokens"])


def memory_table(memory: list[dict]) -> list[str]:
    lines = [
        "## 1. One CUT step at a large vocabulary (2 negatives = 4 sequences, tiny-hidden Llama, LoRA)",
        "",
        "| vocab | seq | tokens | (a) cut MiB | (b) original MiB | (c) sft MiB | (a)/(b) | (a)/(c) per token | "
        "(a) step s | (b) step s | (c) step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in memory:
        a, b, c = r["cut"], r["original"], r["sft"]
        ab, ac = memory_ratios(r)
        lines.append(
            f"| {r['vocab']} | {r['seq']} | {a['tokens']} | {fmt(a['peak_mb'])} | {fmt(b['peak_mb'])} | "
            f"{fmt(c['peak_mb'])} | {ratio_text(ab, 'b OOM')} | {ratio_text(ac, 'c OOM')} | "
            f"{fmt(a['step_s'], 2)} | {fmt(b['step_s'], 2)} | {fmt(c['step_s'], 2)} |"
        )
    return lines + [
        "",
        "Peak memory is the step's own (peak RSS minus RSS before the step; on a GPU, "
        "max_memory_allocated minus allocated before). (a) and (b) computed the same loss on each batch.",
        "",
    ]


def memory_targets(memory: list[dict]) -> list[str]:
    checks = []
    for r in memory:
        ab, ac = memory_ratios(r)
        at = f"vocab {r['vocab']}, seq {r['seq']}"
        if r["vocab"] == max(x["vocab"] for x in memory):
            checks.append(target(f"(a)/(b) memory at {at}", ab, ratio_text(ab, "b OOM"), MEMORY_TARGET))
        shown = ratio_text(ac, "c OOM")
        checks.append(target(f"(a)/(c) memory per token at {at}", ac, shown, MEMORY_PER_TOKEN_TARGET))
    return checks


def throughput_table(t: dict) -> list[str]:
    lines = [
        f"## 2. One epoch on real judgment data ({t['records']} records of {t['data']}, {t['model']}, LoRA, "
        f"cutoff {t['cutoff']})",
        "",
        f"{t['examples']} examples trained: {t['positives']} positives, {t['negatives']} negatives "
        f"({t['failed_judgments']} failed judgments dropped). Loss of the first micro-batch: cut "
        f"{t['loss_cut']:.6f}, original {t['loss_original']:.6f}.",
        "",
        "| variant | wall s / epoch | tokens | tokens/s | s per 1k tokens |",
        "|---|---|---|---|---|",
    ]
    for k, name in VARIANTS.items():
        v = t["variants"][k]
        per_k = {x: 1000 * v["wall_s"][x] / v["tokens"] for x in ("median", "min", "max")}
        lines.append(
            f"| {name} | {fmt(v['wall_s'], 1)} | {v['tokens']} | {fmt(v['tokens_per_s'], 1)} | {fmt(per_k, 3)} |"
        )
    return lines + [""]


def throughput_skipped() -> list[str]:
    return [
        "## 2. Throughput on real judgment data",
        "",
        "skipped: ../shared/data/cut-online-iter/iter1.json is absent",
        "",
    ]


def throughput_targets(t: dict) -> list[str]:
    v = t["variants"]
    speedup = v["original"]["wall_s"]["median"] / v["cut"]["wall_s"]["median"]
    checks = [target("(b)/(a) epoch time", speedup, f"{speedup:.2f}x", SPEEDUP_TARGET)]
    per_token = {k: v[k]["wall_s"]["median"] / v[k]["tokens"] for k in ("cut", "sft", "trl")}
    for k, letter in (("sft", "c"), ("trl", "d")):
        ratio = per_token["cut"] / per_token[k]
        checks.append(target(f"(a)/({letter}) time per token", ratio, f"{ratio:.3f}", TIME_PER_TOKEN_TARGET))
    return checks


def scaling_table(scaling: list[dict], vocab: int) -> list[str]:
    lines = [
        f"## 3. Scaling with sequence length (1 negative = 2 sequences, vocab {vocab})",
        "",
        "| seq | tokens | cut step s | sft step s | cut MiB | sft MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in scaling:
        cut, sft = r["cut"], r["sft"]
        lines.append(
            f"| {r['seq']} | {cut['tokens']} | {fmt(cut['step_s'], 2)} | {fmt(sft['step_s'], 2)} | "
            f"{fmt(cut['peak_mb'])} | {fmt(sft['peak_mb'])} |"
        )
    return lines


# ---------------------------------------------------------------- results.png


def chart(out: Path, results: dict) -> None:
    """Write out/results.png: one panel for each of the three sections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    memory_panel(axes[0], results["memory"])
    throughput_panel(axes[1], results["throughput"])
    scaling_panel(axes[2], results["scaling"])
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)


def memory_panel(ax, memory: list[dict]) -> None:
    labels = [f"V={r['vocab'] // 1000}k\nT={r['seq']}" for r in memory]
    for i, (k, name) in enumerate([("cut", "(a) cut"), ("original", "(b) original"), ("sft", "(c) sft")]):
        vals = [r[k]["peak_mb"]["median"] if r[k]["peak_mb"] else 0 for r in memory]
        ax.bar([x + 0.27 * (i - 1) for x in range(len(memory))], vals, 0.27, label=name)
    ax.set_xticks(range(len(memory)), labels)
    ax.set_ylabel("peak step memory (MiB)")
    ax.set_title("1. one step, 2 negatives")
    ax.legend()


def throughput_panel(ax, throughput: dict | None) -> None:
    if not throughput:
        ax.set_title("2. skipped (no real data)")
        return
    v = throughput["variants"]
    keys = ["cut", "original", "sft", "trl"]
    ax.bar(
        ["(a) cut", "(b) original", "(c) sft", "(d) TRL"],
        [v[k]["tokens_per_s"]["median"] for k in keys],
        color=["C0", "C1", "C2", "C3"],
    )
    ax.set_ylabel("tokens / s")
    ax.set_title(f"2. epoch on {throughput['records']} real records ({throughput['model']})")


def scaling_panel(ax, scaling: list[dict]) -> None:
    """Step time (solid, left axis) and peak memory (dashed, right axis) against sequence length."""
    seqs = [r["seq"] for r in scaling]
    for k, style in (("cut", "C0"), ("sft", "C2")):
        ax.plot(seqs, [r[k]["step_s"]["median"] for r in scaling], "-o", color=style, label=f"{k} step s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("step time (s)")
    ax2 = ax.twinx()
    for k, style in (("cut", "C0"), ("sft", "C2")):
        mib = [r[k]["peak_mb"]["median"] if r[k]["peak_mb"] else float("nan") for r in scaling]
        ax2.plot(seqs, mib, "--s", color=style, alpha=0.6, label=f"{k} MiB")
    ax2.set_ylabel("peak step memory (MiB), dashed")
    ax.set_title("3. scaling, 1 negative")
    ax.legend(loc="upper left")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.report", description=__doc__.split("\n")[0])
    p.add_argument("results", help="a results.json written by benchmarks.run")
    args = p.parse_args(argv)
    path = Path(args.results)
    results = json.loads(path.read_text())
    from .run import SUITES  # the suite's settings live with the measuring; results.json names the suite

    write_report(path.parent, results, SUITES[results["suite"]]["scale_vocab"])
    chart(path.parent, results)
    print(f"wrote {path.parent / 'results.md'}, {path.parent / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
