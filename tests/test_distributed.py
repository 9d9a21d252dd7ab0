"""torchrun on 2 CPU processes (gloo): DDP and DeepSpeed ZeRO-2 train adapters that merge.

Both runs see the same data in the same order, so with gradients averaged across the two
processes they must log the same losses and save (nearly) the same adapter.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from cut.modeling.merge import main as merge_main

from conftest import REPO

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tiny_model, data, out, *extra) -> subprocess.CompletedProcess:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        "cut.train",
        "--base_model",
        str(tiny_model),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        "--batch_size",
        "4",
        "--micro_batch_size",
        "2",
        "--max_steps",
        "3",
        "--learning_rate",
        "1e-2",
        "--lora_target_modules",
        "all-linear",
        "--lora_dropout",
        "0",
        "--warmup_steps",
        "0",
        "--seed",
        "0",
        *extra,
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/cut/torch_extensions"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def losses(out) -> list[float]:
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


@pytest.fixture(scope="module")
def ddp_run(tiny_model, tmp_path_factory):
    from conftest import TINY_RECORDS

    root = tmp_path_factory.mktemp("dist")
    data = root / "data.json"
    data.write_text(json.dumps(TINY_RECORDS))
    out = root / "ddp"
    torchrun(tiny_model, data, out)
    return data, out


def _merge_ok(tiny_model, adapter, dest):
    assert (
        merge_main(["--base_model", str(tiny_model), "--adapter", str(adapter), "--output_dir", str(dest)])
        == 0
    )
    assert (dest / "model.safetensors").exists()


def test_ddp_two_processes(tiny_model, ddp_run, tmp_path):
    _, out = ddp_run
    assert len(losses(out)) == 3
    log = json.loads((out / "metrics.json").read_text())["log_history"]
    # each optimiser step sees the global batch of 4 records across both processes
    assert all(h["positives"] + h["negatives"] == 4 for h in log if "positives" in h)
    _merge_ok(tiny_model, out, tmp_path / "merged")


def test_deepspeed_zero2_matches_ddp(tiny_model, ddp_run, tmp_path):
    data, ddp_out = ddp_run
    out = tmp_path / "zero2"
    torchrun(tiny_model, data, out, "--deepspeed", str(REPO / "configs/deepspeed/zero2.json"))
    print("ddp", losses(ddp_out), "zero2", losses(out))
    assert losses(out) == pytest.approx(losses(ddp_out), rel=1e-4)
    a = load_file(str(ddp_out / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |ddp - zero2| adapter weight difference: {worst:.2e}")
    assert worst < 1e-4
    assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 0  # it trained
    _merge_ok(tiny_model, out, tmp_path / "merged")


def test_deepspeed_zero3_matches_ddp(tiny_model, ddp_run, tmp_path):
    """ZeRO-3 partitions every weight; the CUT forward calls the head as a module so it is gathered."""
    data, ddp_out = ddp_run
    out = tmp_path / "zero3"
    torchrun(tiny_model, data, out, "--deepspeed", str(REPO / "configs/deepspeed/zero3.json"))
    assert losses(out) == pytest.approx(losses(ddp_out), rel=1e-4)
    a = load_file(str(ddp_out / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    _merge_ok(tiny_model, out, tmp_path / "merged")
