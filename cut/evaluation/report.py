"""Reports people read: a markdown table and a PNG per evaluation run, and runs side by side.

write_report(summary, folder) writes report.md and report.png (matplotlib; without it, the PNG is
left out with a warning). compare_runs(runs, labels, folder) reads two or more score / safety
run folders and writes comparison.md, comparison.json and comparison.png: each run's means with
their intervals, and for every run after the first its paired difference from the first: the
mean over the records both runs scored (matched by instruction + input) of (this run's score -
the first's), with a 95% percentile-bootstrap interval; an interval that excludes 0 is a change
the sample supports.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cut.data.files import check_writable, write_bytes_atomic, write_json_atomic, write_text_atomic
from cut.errors import DataError
from cut.evaluation import intervals

logger = logging.getLogger("cut.evaluation")

REPORT_MD, REPORT_PNG = "report.md", "report.png"
COMPARE_MD, COMPARE_JSON, COMPARE_PNG = "comparison.md", "comparison.json", "comparison.png"


# --------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------


class Raw(str):
    """Markdown this module wrote itself (bold, a line break): esc and _table leave it as it is."""


MD_ESCAPES = {
    **{c: "\\" + c for c in "\\`*_[]"},  # markdown's own punctuation, shown as itself
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    "|": "&#124;",  # a table splits cells on a bare pipe, even inside other markup
}
NEWLINES = re.compile(r"\r\n|\r|\n")


def esc(value: Any) -> str:
    """Text from records, files or options as literal markdown: no HTML, no extra table column,
    no link or emphasis, one line. Raw (this module's own markup) passes unchanged."""
    if isinstance(value, Raw):
        return value
    text = "".join(MD_ESCAPES.get(c, c) for c in str(value))
    return NEWLINES.sub("<br>", text)


def _num(x: float | None, fmt: str = ".2f") -> Raw:
    return Raw("–" if x is None else format(x, fmt))


def _ci(s: dict) -> Raw:
    return Raw(f"[{_num(s['ci'][0])}, {_num(s['ci'][1])}]")


def _mean_ci(s: dict) -> Raw:
    if s.get("mean") is None:
        return Raw("–")
    return Raw(f"{s['mean']:.2f} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]")


def _pct(r: dict) -> Raw:
    if r.get("rate") is None:
        return Raw("–")
    return Raw(f"{r['rate']:.0%} [{r['ci'][0]:.0%}, {r['ci'][1]:.0%}]")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table; every cell is escaped (esc), so record text cannot add a column."""
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


def _failures(s: dict) -> str:
    text = f"{s['n']} records: {s['n_ok']} evaluated, {s['n_failed']} failed"
    if s["failed_reasons"]:
        text += " (" + ", ".join(f"{esc(r)}: {n}" for r, n in s["failed_reasons"].items()) + ")"
    return text


def _length(x: dict) -> str:
    return f"{_num(x['chars'], '.0f')} characters, {_num(x['words'], '.0f')} words"


def score_markdown(summary: dict[str, Any]) -> str:
    setup = summary["setup"]
    lines = [
        f"# Evaluation ({esc(setup['mode'])}) by {esc(setup['judge'])}",
        "",
        f"Answers: {esc(summary.get('input_file'))}. {_failures(summary)}; failures are counted, never averaged.",
        f"Mean answer length: {_length(summary['length'])}. Intervals: {esc(summary.get('interval', '95%'))}.",
        "",
    ]
    subset = summary.get("subset") or {}
    if subset.get("excluded"):
        lines[-1:-1] = [f"Subset: {esc(subset['name'])} ({subset['excluded']} other records left out)."]
    na = setup.get("na_score")
    rows = [[a, _num(s["mean"]), _ci(s), s["n"], s.get("n_na", 0)] for a, s in summary["aspects"].items()]
    if "overall" in summary:
        o = summary["overall"]
        rows.append([Raw("**overall**"), _num(o["mean"]), _ci(o), o["n"], ""])
    lines += _table(["aspect", "mean (1-5)", "95% CI", "n", "N/A"], rows)
    if any(s.get("n_na") for s in summary["aspects"].values()):
        counted = f"scored {na:g}" if _number(na) else {"skip": "left out of the means"}.get(na, "read")
        lines += ["", f"N/A replies: {counted} (--na_score; Just-Eval scores them 5)."]
    for field, groups in summary.get("groups", {}).items():
        aspects = list(summary["aspects"])
        lines += ["", f"## By {esc(field)}", ""]
        body = [
            [
                v,
                g["n"],
                g["n_failed"],
                *(_mean_ci(g["aspects"][a]) for a in aspects),
                _num(g["length"]["words"], ".0f"),
            ]
            for v, g in groups.items()
        ]
        lines += _table([field, "n", "failed", *aspects, "words"], body)
    return "\n".join(lines) + "\n"


def pair_markdown(summary: dict[str, Any]) -> str:
    setup, gen = summary["setup"], summary.get("generators", {})
    la, lb = summary["length"]["a"], summary["length"]["b"]
    lines = [
        f"# Pairwise evaluation by {esc(setup['judge'])}",
        "",
        f"A: {esc(summary.get('output_a'))} ({esc(gen.get('a') or 'generator unknown')}), mean length {_length(la)}.",
        f"B: {esc(summary.get('output_b'))} ({esc(gen.get('b') or 'generator unknown')}), mean length {_length(lb)}.",
        "",
        f"{_failures(summary)}; {summary['swapped']} of the judged records showed B first (order seeded, "
        f"undone when read). Intervals: {esc(summary.get('interval', '95%'))}.",
        "",
    ]
    rows = [
        [a, _pct(s["win"]), _pct(s["tie"]), _pct(s["lose"]), s["n"]] for a, s in summary["aspects"].items()
    ]
    lines += _table(["aspect", "A wins", "tie", "B wins", "n"], rows)
    first = summary["shown_first"]
    lines += [
        "",
        f"Position check: of the decided verdicts, the answer shown first won {_pct(first)} "
        f"(n = {first['n']}); "
        "near 50% means little position bias.",
    ]
    for field, groups in summary.get("groups", {}).items():
        aspects = list(summary["aspects"])
        lines += ["", f"## By {esc(field)}", ""]
        body = [
            [v, g["n"], g["n_failed"], *(_wtl(g["aspects"][a]) for a in aspects)] for v, g in groups.items()
        ]
        lines += _table([field, "n", "failed", *(Raw(f"{esc(a)} (A/tie/B)") for a in aspects)], body)
    return "\n".join(lines) + "\n"


def _wtl(s: dict) -> Raw:
    if not s["n"]:
        return Raw("–")
    return Raw(f"{s['win']['rate']:.0%} / {s['tie']['rate']:.0%} / {s['lose']['rate']:.0%}")


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot state); None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no PNG (pip install matplotlib)")
        return None
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())


def _aspect_chart(summary: dict[str, Any], margin: float):
    """(figure, axes, the aspects, their bars' y positions, the first on top) of a chart with one
    bar per aspect; None without matplotlib."""
    aspects = list(summary["aspects"])
    fig = _figure(7, 0.5 * len(aspects) + margin)
    if fig is None:
        return None
    return fig, fig.add_subplot(), aspects, list(range(len(aspects)))[::-1]


def score_figure(summary: dict[str, Any], path: Path) -> bool:
    chart = _aspect_chart(summary, 1.6)
    if chart is None:
        return False
    fig, ax, aspects, ys = chart
    for y, a in zip(ys, aspects, strict=True):
        s = summary["aspects"][a]
        if s["mean"] is None:
            ax.text(1.05, y, "no scores", va="center", color="grey")
            continue
        err = [[s["mean"] - s["ci"][0]], [s["ci"][1] - s["mean"]]]
        ax.barh(y, s["mean"] - 1, left=1, color="#4c72b0", xerr=err, capsize=4)
        ax.text(min(s["ci"][1] + 0.05, 4.6), y, f"{s['mean']:.2f}", va="center")
    ax.set_yticks(ys, aspects)
    ax.set_xlim(1, 5)
    ax.set_xlabel("mean score (1-5), 95% bootstrap interval")
    ax.set_title(
        f"{summary['setup']['mode']} by {summary['setup']['judge']}: {summary['n_ok']} scored, {summary['n_failed']} failed",
        fontsize=9,
    )
    _save(fig, path)
    return True


def pair_figure(summary: dict[str, Any], path: Path) -> bool:
    chart = _aspect_chart(summary, 1.8)
    if chart is None:
        return False
    fig, ax, aspects, ys = chart
    colours = {"win": "#55a868", "tie": "#bbbbbb", "lose": "#c44e52"}
    for y, a in zip(ys, aspects, strict=True):
        s, left = summary["aspects"][a], 0.0
        for part in ("win", "tie", "lose"):
            r = s[part]["rate"] or 0.0
            ax.barh(y, r, left=left, color=colours[part], label=part if y == ys[0] else None)
            if r >= 0.08:
                ax.text(left + r / 2, y, f"{r:.0%}", ha="center", va="center", fontsize=8)
            left += r
    ax.set_yticks(ys, aspects)
    ax.set_xlim(0, 1)
    la, lb = summary["length"]["a"]["words"], summary["length"]["b"]["words"]
    ax.set_xlabel(f"A wins / tie / B wins  (mean words: A {_num(la, '.0f')}, B {_num(lb, '.0f')})")
    ax.legend(["A wins", "tie", "B wins"], loc="lower right", fontsize=7)
    ax.set_title(
        f"pairwise by {summary['setup']['judge']}: {summary['n_ok']} judged, {summary['n_failed']} failed",
        fontsize=9,
    )
    _save(fig, path)
    return True


def write_report(summary: dict[str, Any], folder: str | Path) -> None:
    """report.md and report.png of one run."""
    folder = Path(folder)
    pairwise = summary["setup"]["mode"] == "pairwise"
    write_text_atomic(folder / REPORT_MD, (pair_markdown if pairwise else score_markdown)(summary))
    (pair_figure if pairwise else score_figure)(summary, folder / REPORT_PNG)


# --------------------------------------------------------------------------------------------
# runs side by side
# --------------------------------------------------------------------------------------------


def read_run(folder: str) -> tuple[dict, list[dict]]:
    """(summary, results records) of a score / safety run folder; DataError names the file and
    the field of anything that is not what cut.evaluation.evaluate writes."""
    from cut.evaluation.evaluate import RESULTS, SUMMARY, read_json, read_results

    path = Path(folder) / SUMMARY
    if not path.exists():
        raise DataError(f"{folder}: no {SUMMARY}; give the --output_dir of a score or safety run")
    summary = read_json(path, "not a summary of cut.evaluation")
    check_summary(summary, path)
    results = Path(folder) / RESULTS
    records = read_results(results)["records"]
    check_scored(records, list(summary["aspects"]), results)
    return summary, records


def _number(value: Any, none: bool = False) -> bool:
    if none and value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bad(path: Path, where: str, want: str, got: Any) -> DataError:
    return DataError(f"{path}: field '{where}': {want}, got {_shown(got)} (not what cut.evaluation writes)")


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_summary(summary: Any, path: Path) -> None:
    """The fields of a score / safety summary.json that compare reads, with their types."""
    if not isinstance(summary, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    setup = summary.get("setup")
    if not isinstance(setup, dict):
        raise _bad(path, "setup", "expected an object", setup)
    if setup.get("mode") not in ("score", "safety"):
        raise DataError(f"{path}: mode {setup.get('mode')!r}; compare reads score or safety runs")
    if not isinstance(setup.get("judge"), str):
        raise _bad(path, "setup.judge", "expected a string", setup.get("judge"))
    for name in ("n", "n_failed"):
        if not _count(summary.get(name)):
            raise _bad(path, name, "expected a whole number >= 0", summary.get(name))
    if not isinstance(summary.get("input_file"), (str, type(None))):
        raise _bad(path, "input_file", "expected a string", summary.get("input_file"))
    length = summary.get("length")
    if not isinstance(length, dict):
        raise _bad(path, "length", "expected an object", length)
    for name in ("chars", "words"):
        if not _number(length.get(name), none=True):
            raise _bad(path, f"length.{name}", "expected a number or null", length.get(name))
    aspects = summary.get("aspects")
    if not isinstance(aspects, dict) or not aspects:
        raise _bad(path, "aspects", "expected an object of aspect summaries", aspects)
    for name, a in aspects.items():
        where = f"aspects.{name}"
        if not isinstance(a, dict):
            raise _bad(path, where, "expected an object", a)
        if not _number(a.get("mean"), none=True):
            raise _bad(path, f"{where}.mean", "expected a number or null", a.get("mean"))
        ci = a.get("ci")
        if not (isinstance(ci, list) and len(ci) == 2 and all(_number(x, none=True) for x in ci)):
            raise _bad(path, f"{where}.ci", "expected [low, high]", ci)
        if (a["mean"] is None) != (ci[0] is None) or (ci[0] is None) != (ci[1] is None):
            raise _bad(path, f"{where}.ci", "expected numbers with a mean, nulls without", ci)
        if not _count(a.get("n")):
            raise _bad(path, f"{where}.n", "expected a whole number >= 0", a.get("n"))


def check_scored(records: list, aspects: list[str], path: Path) -> None:
    """The fields of results.json that the paired differences read, with their types."""
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i}: expected an object, got {type(r).__name__}")
        if not isinstance(r.get("instruction"), str):
            raise _bad(path, f"records[{i}].instruction", "expected a string", r.get("instruction"))
        if not isinstance(r.get("input"), (str, type(None))):
            raise _bad(path, f"records[{i}].input", "expected a string", r.get("input"))
        ev = r.get("evaluation")
        if not (isinstance(ev, dict) and isinstance(ev.get("status"), str)):
            raise _bad(path, f"records[{i}].evaluation", "expected an object with a status", ev)
        if ev["status"] != "ok":
            continue
        scores = ev.get("scores")
        if not isinstance(scores, dict):
            raise _bad(path, f"records[{i}].evaluation.scores", "expected an object", scores)
        for a in aspects:  # null: an N/A the run skipped (--na_score skip)
            if a not in scores or not _number(scores[a], none=True):
                raise _bad(
                    path, f"records[{i}].evaluation.scores.{a}", "expected a number or null", scores.get(a)
                )


def paired_differences(base: list[dict], other: list[dict], aspect: str) -> list[float]:
    """other's score - base's, over the records both scored (matched by instruction + input, in
    order); an aspect either run has no score for (a skipped N/A) is left out of its differences."""
    from collections import defaultdict, deque

    pool: dict[tuple, deque] = defaultdict(deque)
    for r in base:
        pool[(r["instruction"], r.get("input") or "")].append(r)
    diffs = []
    for r in other:
        same = pool.get((r["instruction"], r.get("input") or ""))
        if not same:
            continue
        b = same.popleft()
        if r["evaluation"]["status"] == "ok" and b["evaluation"]["status"] == "ok":
            mine, theirs = r["evaluation"]["scores"].get(aspect), b["evaluation"]["scores"].get(aspect)
            if mine is not None and theirs is not None:
                diffs.append(mine - theirs)
    return diffs


def compare(
    runs: Sequence[tuple[str, dict, list[dict]]], seed: int = 0, resamples: int = intervals.RESAMPLES
) -> dict:
    """The comparison of (label, summary, records) runs: every run's aspects and its paired
    difference from the first."""
    modes = {s["setup"]["mode"] for _, s, _ in runs}
    if len(modes) > 1:
        raise DataError(f"compare: the runs mix modes {', '.join(sorted(modes))}")
    aspects = list(runs[0][1]["aspects"])
    for label, summary, _ in runs[1:]:
        if set(summary["aspects"]) != set(aspects):
            raise DataError(
                f"compare: run {label} has the aspects {', '.join(summary['aspects'])}, "
                f"run {runs[0][0]} {', '.join(aspects)}"
            )
    out = {
        "mode": modes.pop(),
        "aspects": aspects,
        "runs": [],
        "interval": f"95% percentile bootstrap, {resamples} resamples, seed {seed}",
    }
    for i, (label, summary, records) in enumerate(runs):
        entry = {
            "label": label,
            "judge": summary["setup"]["judge"],
            "input_file": summary.get("input_file"),
            "n": summary["n"],
            "n_failed": summary["n_failed"],
            "length": summary["length"],
            "aspects": {a: summary["aspects"].get(a) for a in aspects},
        }
        if i:
            entry["difference"] = {
                a: intervals.summary(paired_differences(runs[0][2], records, a), seed, resamples)
                for a in aspects
            }
        out["runs"].append(entry)
    judges = {r["judge"] for r in out["runs"]}
    if len(judges) > 1:
        logger.warning("compare: the runs were scored by different judges (%s)", ", ".join(sorted(judges)))
    return out


def compare_markdown(cmp: dict) -> str:
    runs, aspects = cmp["runs"], cmp["aspects"]
    base = runs[0]["label"]
    header = [
        "aspect",
        *(r["label"] for r in runs),
        *(Raw(f"{esc(r['label'])} − {esc(base)}") for r in runs[1:]),
    ]
    rows = []
    for a in aspects:
        diffs = [r["difference"][a] for r in runs[1:]]
        rows.append([a, *(_mean_ci(r["aspects"][a] or {}) for r in runs), *(_signed(d) for d in diffs)])
    rows.append(["n (failed)", *(f"{r['n']} ({r['n_failed']})" for r in runs), *("" for _ in runs[1:])])
    rows.append(["mean words", *(_num(r["length"]["words"], ".0f") for r in runs), *("" for _ in runs[1:])])
    lines = [f"# Comparison ({esc(cmp['mode'])})", ""]
    lines += [f"- {esc(r['label'])}: {esc(r['input_file'])}, judged by {esc(r['judge'])}" for r in runs]
    lines += [
        "",
        f"Means with 95% intervals; a difference is paired (the same instructions, both scored), "
        f"n pairs shown. Intervals: {esc(cmp['interval'])}.",
        "",
    ]
    return "\n".join(lines + _table(header, rows)) + "\n"


def _signed(s: dict) -> Raw:
    if s.get("mean") is None:
        return Raw("–")
    return Raw(f"{s['mean']:+.2f} [{s['ci'][0]:+.2f}, {s['ci'][1]:+.2f}] (n={s['n']})")


def compare_figure(cmp: dict, path: Path) -> bool:
    aspects, runs = cmp["aspects"], cmp["runs"]
    fig = _figure(max(6, 1.3 * len(aspects) + 2), 3.6)
    if fig is None:
        return False
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    for k, r in enumerate(runs):
        xs, means, errs = [], [], [[], []]
        for i, a in enumerate(aspects):
            s = r["aspects"][a] or {}
            if s.get("mean") is None:
                continue
            xs.append(i + (k - (len(runs) - 1) / 2) * width)
            means.append(s["mean"])
            errs[0].append(s["mean"] - s["ci"][0])
            errs[1].append(s["ci"][1] - s["mean"])
        ax.bar(xs, [m - 1 for m in means], width, bottom=1, yerr=errs, capsize=3, label=r["label"])
    ax.set_xticks(range(len(aspects)), aspects)
    ax.set_ylim(1, 5)
    ax.set_ylabel("mean score (1-5)")
    ax.legend(fontsize=8)
    ax.set_title(f"{cmp['mode']}: " + " vs ".join(r["label"] for r in runs), fontsize=9)
    _save(fig, path)
    return True


def compare_runs(
    folders: Sequence[str],
    labels: Sequence[str] = (),
    output_dir: str = ".",
    seed: int = 0,
    resamples: int = intervals.RESAMPLES,
) -> dict:
    """comparison.md / .json / .png in output_dir for the score or safety runs in folders."""
    check_writable(output_dir, "output_dir")
    labels = list(labels) or [Path(f).name or str(f) for f in folders]
    runs = [(label, *read_run(f)) for label, f in zip(labels, folders, strict=True)]
    cmp = compare(runs, seed, resamples)
    out = Path(output_dir)
    write_json_atomic(out / COMPARE_JSON, cmp)
    write_text_atomic(out / COMPARE_MD, compare_markdown(cmp))
    compare_figure(cmp, out / COMPARE_PNG)
    logger.info("comparison of %s written to %s", ", ".join(labels), out)
    return cmp
