"""cut.demo end to end on a tiny model (the real run uses SmolLM2; this keeps the script honest)."""

from __future__ import annotations

import json

import pytest
import yaml

from cut.demo import main

pytestmark = pytest.mark.slow


def test_demo_trains_merges_and_reports(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    conf = {
        "base_model": str(tiny_model),
        "data_path": str(tiny_data),
        "output_dir": str(tmp_path / "demo" / "adapter"),
        "batch_size": 4,
        "micro_batch_size": 4,
        "max_steps": 3,
        "learning_rate": 0.01,
        "warmup_steps": 0,
        "lora_target_modules": ["all-linear"],
        "cutoff_len": 128,
        "save_steps": 1000,
        "threshold": 1.0,
    }
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(conf))
    merged = tmp_path / "demo" / "merged"
    # an extra flag goes to cut.train, and the merge and report follow it
    assert (
        main(["--config", str(path), "--merged_dir", str(merged), "--output_dir", str(tmp_path / "d2" / "a")])
        == 0
    )
    out = capsys.readouterr().out
    assert "loss per step (3 steps)" in out and "mean log p(y_t|x)" in out and "negative:" in out
    assert (merged / "model.safetensors").exists() and (merged / "cut_config.yaml").exists()
    report = json.loads((tmp_path / "d2" / "report.json").read_text())
    assert report["flagged_tokens"] > 0 and report["positive_logp_after"] != report["positive_logp_before"]
    assert 0 <= report["flagged_likely_tokens"] <= report["flagged_tokens"]
    if report["flagged_likely_tokens"]:  # the likely ones are a subset: their mean is at least the mean
        assert report["flagged_likely_logp_before"] >= report["flagged_logp_before"]
    assert not (tmp_path / "demo" / "adapter").exists()
