"""The benchmark script's fast suite (tiny sizes, so the script cannot rot) and its report writer."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks.report import main as report_main
from benchmarks.run import main

from conftest import REPO

pytestmark = pytest.mark.slow


def test_fast_suite_writes_tables_chart_and_agreeing_losses(tmp_path):
    assert main(["--suite", "fast", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    for heading in ("## 1. One CUT step", "## 2. One epoch", "## 3. Scaling", "## Targets"):
        assert heading in text
    assert (tmp_path / "results.png").stat().st_size > 10_000
    res = json.loads((tmp_path / "results.json").read_text())
    thr = res["throughput"]
    assert abs(thr["loss_cut"] - thr["loss_original"]) < 1e-4  # same loss, or speed means nothing
    assert set(thr["variants"]) == {"cut", "original", "sft", "trl"}
    for row in res["memory"]:
        assert abs(row["cut"]["loss"] - row["original"]["loss"]) < 1e-4
        # (a) runs fewer sequences than (b) for the same negatives: 4 real rows, never padding rows
        assert row["cut"]["tokens"] == row["original"]["tokens"]
    # cut processes n_pos + 2 n_neg sequences; SFT one per record
    assert thr["variants"]["cut"]["tokens"] > thr["variants"]["sft"]["tokens"]


def test_report_redraws_the_committed_results_md_from_results_json(tmp_path):
    shutil.copy(REPO / "benchmarks" / "results.json", tmp_path)
    assert report_main([str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "results.md").read_text() == (REPO / "benchmarks" / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_packing_benchmark_quick(tmp_path):
    """benchmarks.packing on a tiny model: padded and packed give the same losses; packed feeds no padding."""
    import json

    from benchmarks import packing

    assert packing.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "packing.json").read_text())
    assert (tmp_path / "packing.md").exists() and (tmp_path / "packing.png").exists()
    text = json.dumps(results)
    assert "packed" in text and "padded" in text


def test_engines_benchmark_quick(tmp_path):
    """benchmarks.engines on a tiny model: each engine in its own process, the continuous engine's
    greedy answers equal the hf engine's, and the table names both."""
    from benchmarks import engines

    assert engines.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "engines.json").read_text())
    hf, cb = report["results"]["hf"], report["results"]["continuous"]
    assert report["prompts"] == 12 and hf["identical_to_hf"] == 12
    assert cb["identical_to_hf"] == 12, "generate_batch's greedy answers differ from the hf engine's"
    assert hf["generate_s"] > 0 and cb["answer_tokens"] == hf["answer_tokens"] > 0
    assert "| continuous |" in (tmp_path / "engines.md").read_text()
