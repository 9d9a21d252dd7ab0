"""cut.train under kills and reruns: half-written checkpoints, finished output folders, a second
trainer into a busy folder, a trainer orphaned by a killed cut.online, and a chaos run killed at
random points that must end bit-identical to an uninterrupted one. Kills are real SIGKILLs of
real subprocesses."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cut.training.config import TrainConfig
from cut.training.runs import LOCK_NAME, STAGING, checkpoint_complete, list_checkpoints, output_dir_in_use
from cut.training.train import main, run

from conftest import REPO
from helpers import start, tiny_train_config

# the real cut.train CLI, with marker lines so a test can kill it during a step or a save:
# "STEP n" as an optimiser step's micro-batch starts, "SAVING n" mid-save (after the model and
# optimiser are written, before the RNG state and trainer_state.json), with pauses to land in
DRIVER = textwrap.dedent(
    """
    import sys, time
    import transformers
    from cut import trainer as T
    from cut.training.train import cli

    pause = float(sys.argv[1])
    step = T.CUTTrainer.training_step
    def training_step(self, *a, **k):
        print(f"STEP {self.state.global_step}", flush=True)
        time.sleep(pause)
        return step(self, *a, **k)
    T.CUTTrainer.training_step = training_step
    save_rng = transformers.Trainer._save_rng_state
    def save_rng_state(self, output_dir):
        print(f"SAVING {self.state.global_step}", flush=True)
        time.sleep(pause)
        return save_rng(self, output_dir)
    transformers.Trainer._save_rng_state = save_rng_state
    sys.exit(cli(sys.argv[2:]))
    """
)


def tiny_config(tiny_model, data, out, **kw) -> TrainConfig:
    """Four optimiser steps of two micro-batches of 2, a checkpoint every second step."""
    base = {"batch_size": 4, "micro_batch_size": 2, "max_steps": 4, "save_steps": 2}
    return tiny_train_config(tiny_model, data, out, **{**base, **kw})


def write_config(path: Path, cfg: TrainConfig) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def launch(tmp: Path, args: list[str], pause: float = 0.0) -> subprocess.Popen:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    return start([str(driver), str(pause), *args])


def wait_for(proc: subprocess.Popen, marker: str, timeout: float = 180) -> list[str]:
    """Read the child's output until a line starts with `marker`; the lines read."""
    lines: list[str] = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(marker):
            return lines
    proc.kill()
    raise AssertionError(f"no {marker!r} line:\n" + "".join(lines)[-3000:])


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def fake_cut_off_save(src: Path, dst: Path, empty: bool = False) -> None:
    """What a kill mid-save left before checkpoints were staged: no trainer_state.json."""
    dst.mkdir()
    if not empty:
        for f in src.iterdir():
            if f.name != "trainer_state.json" and f.is_file():
                shutil.copy(f, dst / f.name)


# 1. checkpoints --------------------------------------------------------------------------------


def test_resume_true_skips_incomplete_checkpoints(tiny_model, tiny_data, tmp_path, caplog):
    out = tmp_path / "out"
    run(tiny_config(tiny_model, tiny_data, out, max_steps=4))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert all(checkpoint_complete(p) for p in list_checkpoints(out)) and not (out / STAGING).exists()
    fake_cut_off_save(out / "checkpoint-4", out / "checkpoint-6")
    fake_cut_off_save(out / "checkpoint-4", out / "checkpoint-8", empty=True)

    with caplog.at_level(logging.INFO, logger="cut.training"):
        metrics = run(tiny_config(tiny_model, tiny_data, out, max_steps=6, resume_from_checkpoint="true"))
    assert "skipping" in caplog.text and "checkpoint-6" in caplog.text and "checkpoint-8" in caplog.text
    assert f"resuming from {out / 'checkpoint-4'}" in caplog.text
    assert metrics["train"]["train_loss"] > 0
    assert [h["step"] for h in metrics["log_history"] if "loss" in h][-3:] == [4, 5, 6]
    # the new checkpoint-6 replaced the incomplete one; rotation kept the newest two complete
    # ones and left the incomplete checkpoint-8 (warned about) alone
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert checkpoint_complete(out / "checkpoint-6") and not (out / STAGING).exists()


def test_explicit_incomplete_checkpoint_is_a_named_error(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    run(tiny_config(tiny_model, tiny_data, out, max_steps=2))
    fake_cut_off_save(out / "checkpoint-2", out / "checkpoint-3")
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "trainer_state.json").write_text("")
    conf = write_config(tmp_path / "c.yaml", tiny_config(tiny_model, tiny_data, out))
    for bad in ("checkpoint-3", "checkpoint-4"):
        assert main(["--config", str(conf), "--resume_from_checkpoint", str(out / bad)]) == 2
        err = capsys.readouterr().err
        assert "cut.train: error:" in err and "incomplete checkpoint" in err and bad in err
    assert (out / "metrics.json").exists()  # refused before touching the finished run

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    fake_cut_off_save(out / "checkpoint-2", only_bad / "checkpoint-2")
    conf = write_config(tmp_path / "d.yaml", tiny_config(tiny_model, tiny_data, only_bad))
    assert main(["--config", str(conf), "--resume_from_checkpoint", "true"]) == 2
    assert "only incomplete ones (checkpoint-2)" in capsys.readouterr().err


# 2. reruns into a finished output_dir ----------------------------------------------------------


def test_rerun_into_finished_output_dir_is_refused_unless_overwritten(
    tiny_model, tiny_data, tmp_path, capsys
):
    out = tmp_path / "out"
    run(tiny_config(tiny_model, tiny_data, out, max_steps=2))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    conf = write_config(tmp_path / "c.yaml", tiny_config(tiny_model, tiny_data, out, max_steps=3))
    assert main(["--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "metrics.json" in err and "--overwrite_output_dir" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    assert main(["--config", str(conf), "--overwrite_output_dir", "--resume_from_checkpoint", "true"]) == 2
    assert "choose one" in capsys.readouterr().err

    (out / "stray.txt").write_text("from the old run")
    assert main(["--config", str(conf), "--overwrite_output_dir"]) == 0
    assert not (out / "stray.txt").exists() and not (out / LOCK_NAME).exists()
    for p in list_checkpoints(out):  # the new run's, not the old
        assert json.loads((p / "trainer_state.json").read_text())["max_steps"] == 3
    saved = json.loads((out / "metrics.json").read_text())
    assert max(h["step"] for h in saved["log_history"]) == 3


@pytest.mark.slow
def test_metrics_json_goes_when_a_run_starts(tiny_model, tiny_data, tmp_path):
    """Killed midway, a resumed run into a finished folder leaves no old metrics.json behind."""
    out = tmp_path / "out"
    run(tiny_config(tiny_model, tiny_data, out, max_steps=2))
    conf = write_config(tmp_path / "c.yaml", tiny_config(tiny_model, tiny_data, out, max_steps=40))
    proc = launch(tmp_path, ["--config", str(conf), "--resume_from_checkpoint", "true"], pause=1.0)
    wait_for(proc, "STEP 2")
    assert not (out / "metrics.json").exists()
    assert (out / LOCK_NAME).read_text().strip() == str(proc.pid)
    sigkill(proc)
    assert not (out / "metrics.json").exists() and (out / "cut_config.yaml").exists()


# 5. locks and orphans --------------------------------------------------------------------------


@pytest.mark.slow
def test_second_trainer_is_refused_and_a_dead_ones_lock_is_taken_over(
    tiny_model, tiny_data, tmp_path, capsys, caplog
):
    out = tmp_path / "out"
    conf = write_config(tmp_path / "c.yaml", tiny_config(tiny_model, tiny_data, out, max_steps=40))
    proc = launch(tmp_path, ["--config", str(conf)], pause=1.0)
    try:
        wait_for(proc, "STEP 1")
        assert output_dir_in_use(out)
        # even told to overwrite, a second trainer leaves the live run alone
        assert main(["--config", str(conf), "--overwrite_output_dir", "--max_steps", "1"]) == 2
        err = capsys.readouterr().err
        assert f"in use by another training process (pid {proc.pid}" in err
        assert (out / "cut_config.yaml").exists() and proc.poll() is None
    finally:
        sigkill(proc)
    assert (out / LOCK_NAME).read_text().strip() == str(proc.pid) and not output_dir_in_use(out)
    with caplog.at_level(logging.WARNING, logger="cut.training"):
        assert main(["--config", str(conf), "--overwrite_output_dir", "--max_steps", "1"]) == 0
    assert f"taking over the lock left by pid {proc.pid}" in caplog.text
    assert (out / "metrics.json").exists() and not (out / LOCK_NAME).exists()


def test_online_will_not_delete_a_folder_a_live_trainer_holds(tmp_path):
    from types import SimpleNamespace

    from cut.errors import ConfigError
    from cut.loop.online import train_round
    from cut.training.runs import OutputLock

    held = OutputLock(tmp_path / "adapter")
    try:
        with pytest.raises(ConfigError, match="locked by a training process"):
            train_round(SimpleNamespace(), SimpleNamespace(dir=tmp_path), "model")
        assert (tmp_path / "adapter" / LOCK_NAME).exists()
    finally:
        held.release()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().split(")")[-1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_trainer_dies_with_a_killed_online_loop(tiny_model, tmp_path):
    """SIGKILL of the cut.online process alone (not its group) takes its cut.train child along."""
    from test_online import launch as launch_online
    from test_online import write_config as write_online_config

    proc = launch_online(write_online_config(tmp_path, tiny_model))
    trainer = None
    try:
        deadline = time.time() + 240
        while trainer is None and time.time() < deadline and proc.poll() is None:
            for c in _children(proc.pid):
                try:
                    if b"cut.train" in Path(f"/proc/{c}/cmdline").read_bytes():
                        trainer = c
                except OSError:
                    pass
            time.sleep(0.05)
        assert trainer is not None, "cut.online never started cut.train"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while _alive(trainer) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(trainer), "cut.train outlived the cut.online that started it"
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


# chaos -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_chaos_kills_during_steps_and_saves_end_identical(tiny_model, tiny_data, tmp_path):
    """Kill cut.train with SIGKILL at random steps and mid-save, resume each time with
    --resume_from_checkpoint true; the final adapter equals an uninterrupted run's."""
    cfg = dict(max_steps=10, save_steps=2, save_total_limit=2)
    ref_out, out = tmp_path / "ref", tmp_path / "chaos"
    ref_conf = write_config(tmp_path / "ref.yaml", tiny_config(tiny_model, tiny_data, ref_out, **cfg))
    conf = write_config(tmp_path / "chaos.yaml", tiny_config(tiny_model, tiny_data, out, **cfg))
    proc = launch(tmp_path, ["--config", str(ref_conf)])
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]

    rng = random.Random(11)
    # (marker to kill at, extra delay): mid-save at steps 2 and 6, during steps 5 and 9
    kills = [("SAVING 2", 0.1), ("STEP 5", 0.05), ("SAVING 6", 0.2), ("STEP 9", 0.0)]

    def next_args() -> list[str]:  # resume when a complete checkpoint exists, else start again
        if any(checkpoint_complete(p) for p in list_checkpoints(out)):
            return ["--config", str(conf), "--resume_from_checkpoint", "true"]
        return ["--config", str(conf), "--overwrite_output_dir"] if out.exists() else ["--config", str(conf)]

    for marker, delay in kills:
        proc = launch(tmp_path, next_args(), pause=0.3)
        wait_for(proc, marker)
        time.sleep(delay * rng.random())
        sigkill(proc)
        # nothing half-written is visible: a save cut off sits in .staging only
        assert all(checkpoint_complete(p) for p in list_checkpoints(out))
        if marker.startswith("SAVING"):
            step = marker.split()[1]
            assert (out / STAGING / f"checkpoint-{step}").exists() and not (
                out / f"checkpoint-{step}"
            ).exists()
        assert not (out / "metrics.json").exists()
    args = next_args()
    assert args[-1] == "true"
    proc = launch(tmp_path, args)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert "resuming from" in log and "checkpoint-8" in log
    assert not (out / STAGING).exists()

    ref, got = adapter(ref_out), adapter(out)
    assert ref.keys() == got.keys()
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    print("largest difference from the uninterrupted adapter:", worst)
    assert worst <= 1e-6


# 8. a full disk while writing ------------------------------------------------------------------


def _file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes of any file fail with EFBIG (SIGXFSZ ignored, so the
    write returns the error instead of killing the process), as on a disk that fills mid-save."""
    import resource

    def hook() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return hook


@pytest.mark.slow
@pytest.mark.parametrize(
    "limit, writer",
    [(100_000, "file too large"), (200_000, "torch's file writer failed")],
    ids=["adapter-safetensors", "optimizer-torch-zip"],
)
def test_full_disk_while_saving_a_checkpoint_is_a_named_error(tiny_model, tiny_data, tmp_path, limit, writer):
    """The tiny run's checkpoint holds a 135 kB adapter and a 286 kB optimizer.pt: a 100 kB limit
    fails the adapter's write (safetensors), 200 kB the optimizer's (torch's zip writer)."""
    out = tmp_path / "out"
    conf = write_config(tmp_path / "c.yaml", tiny_config(tiny_model, tiny_data, out, max_steps=4))
    proc = subprocess.run(
        [sys.executable, "-m", "cut.train", "--config", str(conf)],
        cwd=REPO,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_size_limit(limit),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cut.train: error: could not write {out / STAGING / 'checkpoint-2'}"), last
    assert writer in last and "rerun with --overwrite_output_dir" in last
    # nothing half-written is visible, and the cut-off save's space is freed
    assert list_checkpoints(out) == [] and not (out / STAGING).exists()
    assert not (out / "metrics.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert not (out / LOCK_NAME).exists()


def test_write_failures_at_the_end_are_named_and_a_rerun_finishes_the_run(
    tiny_model, tiny_data, tmp_path, monkeypatch, capsys, caplog
):
    import errno

    import cut.training.train as train_mod

    out = tmp_path / "out"
    conf = write_config(tmp_path / "c.yaml", tiny_config(tiny_model, tiny_data, out, max_steps=2))
    real_save = train_mod.CUTTrainer.save_model

    def save_fills_the_disk(self, output_dir=None, _internal_call=False):
        if _internal_call:  # a checkpoint's save: let it through
            return real_save(self, output_dir, _internal_call)
        part = Path(output_dir) / "adapter_model.safetensors"
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(b"\0" * 100)  # half an adapter
        raise OSError(errno.ENOSPC, "No space left on device", str(part))

    monkeypatch.setattr(train_mod.CUTTrainer, "save_model", save_fills_the_disk)
    assert main(["--config", str(conf)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    staged = out / STAGING / "final" / "adapter_model.safetensors"
    assert err == (
        f"cut.train: error: could not write {staged}: no space left on device; "
        "free some space and rerun with --resume_from_checkpoint true"
    )
    assert not (out / "adapter_model.safetensors").exists() and not (out / STAGING).exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert checkpoint_complete(out / "checkpoint-2") and not (out / "metrics.json").exists()

    # the rerun the message asks for: 0 steps left (a warning), the adapter written this time,
    # and a metrics.json that does not fit is named too
    monkeypatch.setattr(train_mod.CUTTrainer, "save_model", real_save)

    def metrics_too_large(path, obj):
        raise OSError(errno.EFBIG, "File too large", str(path))

    monkeypatch.setattr(train_mod, "write_json_atomic", metrics_too_large)
    with caplog.at_level(logging.WARNING, logger="cut.training"):
        assert main(["--config", str(conf), "--resume_from_checkpoint", "true"]) == 1
    assert "0 steps to train; writing its weights as the final adapter" in caplog.text
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(f"cut.train: error: could not write {out / 'metrics.json'}: file too large")
    )
    assert not (out / "metrics.json").exists()
    ref, got = adapter(out / "checkpoint-2"), adapter(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


# 3 (of 11's item 2). resuming a finished run -------------------------------------------------


def test_resuming_a_finished_run_is_a_named_error(tiny_model, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    run(tiny_config(tiny_model, tiny_data, out, max_steps=2))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    conf = write_config(tmp_path / "c.yaml", tiny_config(tiny_model, tiny_data, out, max_steps=2))
    for resume in ("true", str(out / "checkpoint-2")):
        assert main(["--config", str(conf), "--resume_from_checkpoint", resume]) == 2
        err = capsys.readouterr().err
        assert "cut.train: error: resume_from_checkpoint:" in err
        assert "is at step 2" in err and "max_steps=2" in err and "nothing left to train" in err
    epochs = write_config(
        tmp_path / "e.yaml", tiny_config(tiny_model, tiny_data, out, max_steps=-1, num_epochs=1)
    )
    assert main(["--config", str(epochs), "--resume_from_checkpoint", "true"]) == 2
    assert "num_epochs=1" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # metrics.json kept


# 8. cut.online's own output folder -------------------------------------------------------------


def test_online_refuses_an_unwritable_output_dir_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from test_online import write_config as write_online_config

    import cut.modeling.loading
    from cut.loop.online import main as online_main

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cut.modeling.loading, "load_model", no_loading)
    monkeypatch.setattr(cut.modeling.loading, "load_tokenizer", no_loading)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a folder under a regular file cannot be made, not even by root
    conf = write_online_config(tmp_path, tmp_path / "no-model-needed")
    assert online_main(["--config", str(conf), "--output_dir", str(blocker / "online")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"cut.online: error: output_dir {blocker / 'online'}: cannot be written: {blocker} is a file, not a folder"
    )


# the DPO baseline's output folder: checked and locked as cut.train's ----------------------------


def test_dpo_refuses_another_runs_folder_and_a_locked_one(tiny_model, tmp_path, capsys):
    from cut.training.dpo import main as dpo_main
    from cut.training.runs import OutputLock

    from test_dpo import JUDGED

    data = tmp_path / "judged.json"
    data.write_text(json.dumps(JUDGED))
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # a finished run's
    argv = ["--base_model", str(tiny_model), "--data_path", str(data), "--output_dir", str(out)]
    argv += ["--batch_size", "2", "--micro_batch_size", "2"]
    assert dpo_main(argv) == 2
    assert "holds another run (metrics.json)" in capsys.readouterr().err
    assert dpo_main([*argv, "--resume_from_checkpoint", "true"]) == 2
    assert "resume_from_checkpoint is not supported" in capsys.readouterr().err
    held = OutputLock(out)
    try:
        assert dpo_main([*argv, "--overwrite_output_dir"]) == 2
        assert f"in use by another training process (pid {os.getpid()}" in capsys.readouterr().err
        assert (out / "metrics.json").exists()
    finally:
        held.release()
