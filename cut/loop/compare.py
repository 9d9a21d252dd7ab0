"""Run the online loop once per objective on identical data and compare them on the held-out set.

    python -m cut.compare --config configs/online_instructions.yaml            (all objectives)
    python -m cut.compare --config configs/online_instructions.yaml --objectives cut,sft --rounds 1

Objectives (one online run each, in output_dir/<name>/, same prompts, seed and step budget):

    cut        the paper's objective (the config's train section as it is: flags from the ratio)
    cut_spans  the same with train.flag_source = spans (the judge's marked text is what UL pushes down)
    sft        MLE on the positives only (rejection-sampling fine-tuning)
    hindsight  Align-P + Align-N, no Misalign-N (judgment-conditioned MLE alone)
    dpo        TRL's DPOTrainer with LoRA on (passing, failing) answers of the same prompt
    kto        TRL's KTOTrainer with LoRA on every passing / failing answer (unpaired)
    ilf        imitation learning from language feedback: the model rewrites each failing answer given its
               judgment (refine_tries samples), the judge keeps the first rewrite that passes, and the
               positives plus the kept rewrites are trained by MLE
    forward    forward prediction: the positives by MLE, and the model learns to write each answer's judgment
    cut_npo    positives by MLE; the span tokens of negatives pushed below the round's starting model by a
               per-token NPO loss (no MLE on failing text in any context)
    span_dpo   DPO whose rejected log-ratio sums only the tokens inside the judgment's spans
    span_kto   KTO whose undesirable log-ratio sums only the tokens inside the judgment's spans

Round 0 (the starting model's held-out answers) and round 1's sampled answers are computed once and
copied into every objective's folder, so every objective trains on the same round-1 samples; later
rounds sample from each objective's own model. Objectives run round by round (all of round 1, then
all of round 2, ...); every objective's run is resumable on its own (rerun the same command), and
the report is rewritten after every round. Writes output_dir/comparison.{json,md,png}: held-out scores per round per
objective, exact McNemar p-values against the start and against sft, and wall time per stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from cut.args import INT_MAX, integer, opt, run_cli
from cut.data.files import write_bytes_atomic, write_json_atomic
from cut.errors import ConfigError, DataError
from cut.evaluation.stats import mcnemar_exact
from cut.loop import objectives
from cut.loop.config import LoopArgs
from cut.loop.online import (
    STAGES,
    OnlineConfig,
    check_pool_size,
    check_same_run,
    ensure_base_model,
    headline,
    load_config,
    read_problems,
)

logger = logging.getLogger("cut.loop.compare")

# name -> (loop objective, train overrides, loop setting overrides): the objectives declared in
# cut.loop.objectives, as they were when this module loaded (variant_config reads the registry itself)
VARIANTS: dict[str, tuple] = objectives.variants()
SHARED = (("round_0", "eval.json"), ("round_1", "responses.json"))


def variant_config(base: OnlineConfig, name: str, variants: dict[str, tuple] | None = None) -> OnlineConfig:
    """The online config that runs objective `name` in its own subfolder of base.output_dir;
    `variants` (name -> (objective, train[, loop settings])) defaults to the objectives registry."""
    objective, train, *rest = variants[name] if variants is not None else objectives.variant(name)
    # a preference recipe's own settings (dpo_beta, rejected_tokens, ...) in the base config belong to
    # the base's objective: a variant names its own, so `dpo` stays plain DPO whatever the base says
    shared = {k: v for k, v in base.train.items() if k not in objectives.all_recipe_keys()}
    cfg = dataclasses.replace(
        base,
        **(rest[0] if rest else {}),
        objective=objective,
        output_dir=str(Path(base.output_dir) / name),
        train={**shared, **train},
        generate=dataclasses.replace(base.generate),
    )
    for key in objectives.get(objective).implied:  # the objective sets it (hindsight: misalign)
        cfg.train.pop(key, None)
    return cfg


def share(first: Path, other: Path) -> None:
    """Round 0's evaluation and round 1's samples, made once, copied (they are identical inputs)."""
    for folder, name in SHARED:
        src, dst = first / folder / name, other / folder / name
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def run_all(
    base: OnlineConfig,
    names: list[str],
    variants: dict[str, tuple] | None = None,
    split: str = "held-out",
) -> dict[str, Any]:
    from cut.loop.online import run

    preflight(base, names, variants)
    root = Path(base.output_dir)
    results: dict[str, Any] = {name: {"ok": True} for name in names}
    # round-major: every objective finishes round r before any starts round r + 1, so a run cut
    # short (or a machine's time running out) leaves all objectives at the same round
    for r in range(1, base.rounds + 1):
        for i, name in enumerate(names):
            if not results[name]["ok"]:
                continue
            cfg = dataclasses.replace(variant_config(base, name, variants), rounds=r)
            if i:
                share(root / names[0], Path(cfg.output_dir))
            changed = {k: v for k, v in cfg.train.items() if base.train.get(k) != v}
            print(
                f"== round {r}/{base.rounds}, {name}: {cfg.objective}, "
                f"flag_source {cfg.train.get('flag_source', 'ratio')}"
                + "".join(f", {k} {v}" for k, v in changed.items() if k != "flag_source"),
                flush=True,
            )
            try:
                run(cfg)
            except (DataError, subprocess.CalledProcessError) as err:  # one objective failing leaves the rest
                logger.error("%s failed: %s", name, err)
                results[name] = {"ok": False, "error": str(err)}
        write_report(root, collect(root, names, base.rounds), split)
    report = collect(root, names, base.rounds)
    for name, res in results.items():
        report["objectives"][name].update(res)
    write_report(root, report, split)
    return report


def preflight(base: OnlineConfig, names: list[str], variants: dict[str, tuple] | None = None) -> None:
    """Every objective's settings, the folder it would resume and the pool's size for all rounds,
    checked before the first objective loads a model (not when round r of objective k gets there)."""
    pool, _ = read_problems(base)
    check_pool_size(base, pool)
    for name in names:
        variant_config(base, name, variants).validate()
        # the folder is checked with the config run() gets (validate coerces the train section,
        # 0 -> 0.0, and the rounds' fingerprints were taken before that)
        check_same_run(variant_config(base, name, variants))


def check_has_runs(root: Path, names: list[str]) -> None:
    """--report_only reports runs that exist: a folder holding none of the objectives' is refused."""
    found = any(
        (root / name / "round_0" / "eval.json").exists() or any((root / name).glob("round_*/manifest.json"))
        for name in names
    )
    if not found:
        raise ConfigError(
            f"--report_only: {root} holds no run of {', '.join(names)}; nothing to report (run without it first)"
        )


def _eval(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _passes(ev: dict[str, Any]) -> list[bool]:
    return [bool(a["correct"]) for a in ev["answers"]]


def collect(root: Path, names: list[str], rounds: int) -> dict[str, Any]:
    """Per objective and round: the held-out scores, McNemar against the start and against sft,
    and the stage wall times from each round's manifest."""
    start = _eval(root / names[0] / "round_0" / "eval.json")
    report: dict[str, Any] = {"rounds": rounds, "start": _scores(start), "objectives": {}}
    if start is not None:
        report["start"]["mean_length"] = sum(len(a.get("output") or "") for a in start["answers"]) / max(
            1, len(start["answers"])
        )
        if "per_type" in start:
            report["start"]["per_type"] = {t: v["strict"] for t, v in start["per_type"].items()}
            report["start"]["per_type_n"] = {t: v["n"] for t, v in start["per_type"].items()}
    evals = {
        name: [_eval(root / name / f"round_{r}" / "eval.json") for r in range(1, rounds + 1)]
        for name in names
    }
    for name in names:
        rows = []
        for r, ev in enumerate(evals[name], start=1):
            if ev is None:
                rows.append(None)
                continue
            row = {"round": r, **_scores(ev)}
            if start is not None:
                row["vs_start"] = mcnemar_exact(_passes(ev), _passes(start))
            for other in ("sft", "dpo"):  # the baselines every objective is read against
                peer = evals.get(other, [None] * rounds)[r - 1]
                if peer is not None and name != other:
                    row[f"vs_{other}"] = mcnemar_exact(_passes(ev), _passes(peer))
            row["mean_length"] = sum(len(a.get("output") or "") for a in ev["answers"]) / max(
                1, len(ev["answers"])
            )
            if "per_type" in ev:
                row["per_type"] = {t: v["strict"] for t, v in ev["per_type"].items()}
            path = root / name / f"round_{r}" / "manifest.json"
            if path.exists():
                manifest = json.loads(path.read_text())
                stages = manifest["stages"]
                row["wall_s"] = {s: stages[s].get("wall_s") for s in STAGES if s in stages}
                row["counts"] = manifest.get("counts", {})
            rows.append(row)
        report["objectives"][name] = {"rounds": rows}
    return report


def _scores(ev: dict[str, Any] | None) -> dict[str, Any] | None:
    """The loop's own headline numbers, with the prompt counts McNemar's table is read against."""
    if ev is None:
        return None
    return {**headline(ev), **{k: ev[k] for k in ("correct", "total") if k in ev}}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _p(test: dict[str, Any] | None) -> str:
    if not test:
        return "—"
    return f"{test['p_value']:.3g} (+{test['only_a']}/−{test['only_b']})"


def markdown(report: dict[str, Any]) -> str:
    rounds = report["rounds"]
    start = report["start"] or {}
    loose = "prompt_level_loose" in start
    head = ["objective"] + [f"round {r}" for r in range(rounds + 1)]
    if loose:
        head += ["final: prompt loose", "instr. strict", "instr. loose"]
    head += ["p vs start", "p vs sft", "p vs dpo", "mean length", "train s", "generate+eval s"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, obj in report["objectives"].items():
        rows = obj["rounds"]
        last = next((row for row in reversed(rows) if row), None)
        cells = [name, _pct(start.get("accuracy"))] + [_pct(row["accuracy"]) if row else "—" for row in rows]
        if loose:
            cells += [
                _pct(last.get("prompt_level_loose")) if last else "—",
                _pct(last.get("instruction_level_strict")) if last else "—",
                _pct(last.get("instruction_level_loose")) if last else "—",
            ]
        walls = [row.get("wall_s", {}) for row in rows if row]
        train_s = sum(w.get("train") or 0 for w in walls)
        gen_s = sum((w.get("generate") or 0) + (w.get("eval") or 0) for w in walls)
        cells += [
            _p(last.get("vs_start")) if last else "—",
            _p(last.get("vs_sft")) if last else "—",
            _p(last.get("vs_dpo")) if last else "—",
            f"{last['mean_length']:.0f}" if last and "mean_length" in last else "—",
            f"{train_s:.0f}",
            f"{gen_s:.0f}",
        ]
        if not obj.get("ok", True):
            cells[0] += f" (failed: {obj.get('error', '')[:80]})"
        lines.append("| " + " | ".join(cells) + " |")
    split = report.get("split", "held-out")
    what = f"{split} prompts passing every instruction (strict), %" if loose else f"{split} accuracy, %"
    note = (
        f"Rounds 0..{rounds}: {what}. p: exact McNemar test of the last round against the starting "
        "model / against sft / against dpo on the same prompts, (+prompts only this objective passes / "
        "−prompts only the other passes). Mean length: characters per answer in the last round (start: "
        f"{start.get('mean_length', float('nan')):.0f}). Seconds summed over rounds."
    )
    return "\n".join(lines) + "\n\n" + note + "\n" + per_type_table(report)


def per_type_table(report: dict[str, Any]) -> str:
    """Strict pass rate per constraint type (%), the start and each objective's last round."""
    start = report["start"] or {}
    types = sorted(start.get("per_type", {}))
    if not types:
        return ""
    n = start.get("per_type_n", {})
    head = ["model"] + [f"`{t}` ({n.get(t, '?')})" for t in types]
    lines = ["", "Per constraint type, last round (strict %, prompts with the type in brackets):", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| start | " + " | ".join(_pct(start["per_type"][t]) for t in types) + " |")
    for name, obj in report["objectives"].items():
        last = next((row for row in reversed(obj["rounds"]) if row), None)
        if last and "per_type" in last:
            lines.append(f"| {name} | " + " | ".join(_pct(last["per_type"].get(t)) for t in types) + " |")
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = report["start"] or {}
    keys = [("accuracy", "prompt-level strict" if "prompt_level_strict" in start else "accuracy")]
    if "instruction_level_loose" in start:
        keys.append(("instruction_level_loose", "instruction-level loose"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        for name, obj in report["objectives"].items():
            xs, ys = [0], [100 * start.get(key, float("nan"))]
            for row in obj["rounds"]:
                if row:
                    xs.append(row["round"])
                    ys.append(100 * row[key])
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{report.get('split', 'held-out')} {label}, %")
        ax.set_xticks(range(report["rounds"] + 1))
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, tmp.read_bytes())
    tmp.unlink()


def write_report(root: Path, report: dict[str, Any], split: str = "held-out") -> None:
    report["split"] = split
    write_json_atomic(root / "comparison.json", report)
    write_bytes_atomic(root / "comparison.md", markdown(report).encode())
    try:
        chart(report, root / "comparison.png")
    except ImportError:
        logger.warning("matplotlib is not installed: no comparison.png (pip install matplotlib)")
    print(markdown(report), flush=True)


def run_or_report(
    base: OnlineConfig,
    names: list[str],
    variants: dict[str, tuple] | None = None,
    split: str = "held-out",
    report_only: bool = False,
) -> None:
    """Run every objective (cut compare, cut tune), or with report_only rewrite the report from
    the runs already in base.output_dir."""
    if report_only:
        root = Path(base.output_dir)
        check_has_runs(root, names)
        write_report(root, collect(root, names, base.rounds), split)
        return
    ensure_base_model(base)
    run_all(base, names, variants, split)


@dataclasses.dataclass
class CompareArgs(LoopArgs):
    """Run the online loop once per objective on identical data and compare them on the held-out set."""

    objectives: str = opt(
        ",".join(VARIANTS),
        f"comma-separated, from {', '.join(VARIANTS)} (default: all; the first one samples round 1)",
    )
    output_dir: str | None = opt(None, "override the config's output_dir (each objective in a subfolder)")
    rounds: int | None = opt(None, "override the number of rounds", parse=integer(1, INT_MAX))
    report_only: bool = opt(False, "rewrite the table and chart from the runs")


def main(argv: list[str] | None = None) -> int:
    args = CompareArgs.parse(argv, prog="cut.compare")

    def body() -> None:
        from cut.llm.client import quiet_http_logs

        quiet_http_logs()
        names = [n.strip() for n in args.objectives.split(",") if n.strip()]
        known = objectives.variants()
        unknown = [n for n in names if n not in known]
        if unknown or not names or len(set(names)) != len(names):
            raise ConfigError(
                f"--objectives: {', '.join(unknown) or 'empty or repeated'}; choose from {', '.join(known)}"
            )
        base = load_config(args.config, {"output_dir": args.output_dir, "rounds": args.rounds})
        run_or_report(base, names, report_only=args.report_only)

    return run_cli("cut.compare", body)


if __name__ == "__main__":
    sys.exit(main())
