"""A training run's folder, kept safe: one trainer at a time, nothing half-written, clear resumes.

cut.train and the preference baselines (cut.baselines.dpo / kto) share it:

- the lock: output_dir/.cut.lock, flock'd and holding the pid (`OutputLock`, `claim_output_dir`);
  a folder holding another run is refused unless overwritten or resumed (`check_output_dir`);
- atomic checkpoints: checkpoint-N appears only when complete (`AtomicCheckpoints`, a Trainer
  mixin), the final adapter is staged and moved in whole (`save_final`), and what a killed save
  leaves is cleared (`clean_checkpoint_leftovers`);
- the resume rules: `true` = the newest complete checkpoint (`resume_target`), and a resume into a
  finished run is refused (`check_resume_has_work`);
- failed writes (a full disk, a file-size limit) become one line naming the file (`writing`,
  `WriteFailed`);
- process death: children that die with their parent (`die_with_parent_hook`,
  `die_with_launcher`), and a distributed run's exit (`shutdown_distributed`,
  `exit_without_teardown`).
"""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cut.errors import ConfigError

if TYPE_CHECKING:
    from cut.training.config import TrainConfig

logger = logging.getLogger("cut.training.runs")


# ---- checkpoints that appear only when complete ---------------------------------------------------


STAGING = ".staging"  # output_dir/.staging/checkpoint-N: a checkpoint being written


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_step(path: Path) -> int | None:
    m = CHECKPOINT_NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """output_dir's checkpoint-N folders, complete or not, by step."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def checkpoint_complete(path: str | os.PathLike) -> bool:
    """A Trainer checkpoint is complete when its trainer_state.json (written last) reads as JSON."""
    try:
        return isinstance(json.loads((Path(path) / "trainer_state.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def clean_checkpoint_leftovers(run_dir: str | os.PathLike) -> None:
    """Remove what a killed save or rotation left: .staging/ and .old-checkpoint-N folders."""
    for p in [Path(run_dir) / STAGING, *Path(run_dir).glob(".old-checkpoint-*")]:
        if p.is_dir():
            logger.info("removing %s, left by a save that was cut off", p)
            shutil.rmtree(p)


def retire_checkpoint(path: Path) -> None:
    """Rename out of sight first, then delete: a kill mid-delete leaves no half checkpoint-N."""
    old = path.with_name(f".old-{path.name}")
    if old.exists():
        shutil.rmtree(old)
    os.rename(path, old)
    shutil.rmtree(old)


class AtomicCheckpoints:
    """Trainer mixin: a checkpoint-N folder appears in output_dir only once it is complete.

    transformers' `_save_checkpoint` writes the model, optimiser, scheduler, RNG states and
    trainer_state.json (last) one file at a time straight into output_dir/checkpoint-N, so a kill
    mid-save leaves a folder that `get_last_checkpoint` would pick. Here it writes into
    output_dir/.staging/ (it asks `_get_output_dir` for the run folder, the one hook needed);
    every process then waits, and the main process renames the finished folder into place (one
    rename on one file system) and deletes the oldest beyond save_total_limit, each renamed out
    of sight before it is deleted. `clean_checkpoint_leftovers` clears what a kill leaves."""

    _staging = False

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staged = run_dir / STAGING / name
        if self.args.should_save and staged.exists():  # a save of this step that was cut off
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every rank's shards and RNG state are written
        if self.args.should_save:
            if (run_dir / name).exists():  # an earlier run's checkpoint of the same step
                retire_checkpoint(run_dir / name)
            os.rename(staged, run_dir / name)
            try:
                (run_dir / STAGING).rmdir()
            except OSError:
                pass
            limit = self.args.save_total_limit
            if limit and limit > 0:  # among complete ones: an incomplete one resumes nothing
                for old in [p for p in list_checkpoints(run_dir) if checkpoint_complete(p)][:-limit]:
                    retire_checkpoint(old)
        self.accelerator.wait_for_everyone()


# ---- the folder: another run, the lock ------------------------------------------------------------


# what marks a folder as holding a run (of cut.train or a preference baseline)
RUN_FILES = (
    "cut_config.yaml",
    "dpo_config.yaml",
    "kto_config.yaml",
    "metrics.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
)


LOCK_NAME = ".cut.lock"


def previous_run(out: Path) -> list[str]:
    """The files and checkpoints in `out` that belong to a run."""
    if not out.is_dir():
        return []
    return [n for n in RUN_FILES if (out / n).exists()] + [p.name for p in list_checkpoints(out)]


def check_output_dir(cfg: TrainConfig, resumable: bool = True) -> None:
    """A folder holding another run is refused unless the user says to overwrite it or resume it;
    resumable False (a tool that saves no checkpoints) leaves resuming out of the advice."""
    out = Path(cfg.output_dir)
    resumes_here = cfg.resume_from_checkpoint.lower() == "true" or (
        cfg.resume_from_checkpoint and out.resolve() in Path(cfg.resume_from_checkpoint).resolve().parents
    )
    if cfg.overwrite_output_dir and resumes_here:
        raise ConfigError(
            "overwrite_output_dir would delete the checkpoint resume_from_checkpoint names: choose one"
        )
    found = previous_run(out)
    if found and not (cfg.overwrite_output_dir or cfg.resume_from_checkpoint):
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        resume = "--resume_from_checkpoint true to continue it, " if resumable else ""
        raise ConfigError(
            f"output_dir {out} holds another run ({shown}); pass --overwrite_output_dir true to replace "
            f"it, {resume}or choose another output_dir"
        )


class OutputLock:
    """output_dir/.cut.lock, held with flock by the training process and holding its pid.

    The kernel drops a flock when its process dies, however it dies, so a lock file left by a
    killed run is free: it is taken over with a warning naming the dead pid. A live holder makes
    a second trainer into the same folder a ConfigError. Released (the file removed) on exit."""

    def __init__(self, out: Path):
        self.created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.path = out, out / LOCK_NAME
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise ConfigError(
                    f"output_dir {out} is in use by another training process (pid {holder}, {self.path}); "
                    "wait for it to finish or choose another output_dir"
                ) from None
            try:  # the holder may have removed the file between our open and flock
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        stale = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if stale:
            logger.warning(
                "output_dir %s: taking over the lock left by pid %s, which no longer runs", out, stale
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        if self.created and not any(self.out.iterdir()):  # a run refused before writing anything
            self.out.rmdir()


def output_dir_in_use(out: Path) -> bool:
    """Whether a live process holds output_dir's lock (a probe: takes and drops the flock)."""
    try:
        fd = os.open(out / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def claim_output_dir(cfg: TrainConfig) -> OutputLock:
    """Lock output_dir, clear it when asked to overwrite, drop leftovers of a killed save, and
    remove metrics.json: from now on its presence means this run finished."""
    out = Path(cfg.output_dir)
    lock = OutputLock(out)
    try:
        if cfg.overwrite_output_dir:
            gone = [p for p in out.iterdir() if p.name != LOCK_NAME]
            for p in gone:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            if gone:
                logger.warning("overwrite_output_dir: cleared %d entries of %s", len(gone), out)
        clean_checkpoint_leftovers(out)
        (out / "metrics.json").unlink(missing_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock


# ---- resuming -------------------------------------------------------------------------------------


def resume_target(cfg: TrainConfig) -> tuple[str | None, Path | None]:
    """(Trainer checkpoint to resume, adapter file to seed the LoRA weights from), found before
    anything loads. `true` takes the newest complete checkpoint-N of output_dir and skips, with a
    warning, any whose save was cut off; an explicit incomplete checkpoint is an error."""
    value = cfg.resume_from_checkpoint
    if not value:
        return None, None
    if value.lower() == "true":
        found = list_checkpoints(cfg.output_dir)
        complete = [p for p in found if checkpoint_complete(p)]
        for p in found:
            if p not in complete:
                logger.warning(
                    "skipping %s: incomplete (no readable trainer_state.json; its save was cut off)", p
                )
        if not complete:
            what = (
                f"only incomplete ones ({', '.join(p.name for p in found)})"
                if found
                else "no checkpoint-* folder"
            )
            raise ConfigError(f"resume_from_checkpoint=true: {what} in {cfg.output_dir}")
        logger.info("resuming from %s", complete[-1])
        return str(complete[-1]), None
    path = Path(value)
    if checkpoint_complete(path):
        return str(path), None
    checkpoint_files = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")
    if checkpoint_step(path) is not None or any((path / f).exists() for f in checkpoint_files):
        raise ConfigError(
            f"resume_from_checkpoint={value}: an incomplete checkpoint (no readable trainer_state.json; "
            "its save was cut off); name an earlier one, or pass true for the newest complete one"
        )
    adapter = path / "adapter_model.safetensors"
    if adapter.exists() and not cfg.full_finetune:
        return None, adapter
    raise ConfigError(f"resume_from_checkpoint={value}: neither a Trainer checkpoint nor an adapter folder")


def check_resume_has_work(cfg: TrainConfig, checkpoint: str | None) -> None:
    """A resume from a checkpoint already at the run's end trains 0 steps. Into a finished run
    (metrics.json present) that is an error: it would replace the run's metrics with
    `train_loss 0.0` and its adapter with the same weights, and it is found before anything loads
    or output_dir is touched. Without metrics.json it is a warning and the run goes on: the final
    save was cut off (a kill, a full disk) after the last checkpoint, and this rerun writes the
    adapter from that checkpoint, which is how such a run is finished."""
    if checkpoint is None:
        return
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    step, epoch = state.get("global_step", 0), state.get("epoch") or 0.0
    if cfg.max_steps > 0:
        done, end = step >= cfg.max_steps, f"max_steps={cfg.max_steps}"
    else:
        done, end = epoch >= cfg.num_epochs - 1e-6, f"num_epochs={cfg.num_epochs:g}"
    if not done:
        return
    where = f"{checkpoint} is at step {step} (epoch {epoch:g}), the end of this run ({end})"
    if (Path(cfg.output_dir) / "metrics.json").exists():
        raise ConfigError(
            f"resume_from_checkpoint: {where}, and {cfg.output_dir} holds the finished run "
            "(metrics.json): nothing left to train; raise max_steps / num_epochs to train on, "
            "or use another output_dir"
        )
    logger.warning(
        "resume_from_checkpoint: %s: 0 steps to train; writing its weights as the final %s "
        "(train_loss in metrics.json will read 0)",
        where,
        "model" if cfg.full_finetune else "adapter",
    )


# ---- writes that fail mid-run ---------------------------------------------------------------------


class WriteFailed(OSError):
    """Writing an output failed mid-run: a full disk, a quota or file-size limit (an OSError:
    `run_cli` makes it exit 1, where refused input is 2)."""


# errno values that mean the file system took no more, not a bug
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}


def write_failure(err: BaseException) -> tuple[str | None, str] | None:
    """(file, reason) when `err` is a failed write, else None. Besides OSError, torch's zip writer
    raises a bare RuntimeError ("[enforce fail at inline_container.cc:...] unexpected pos", or
    "PytorchStreamWriter failed writing file") and safetensors a SafetensorError ("I/O error: ...
    (os error 28)"); neither says which file."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return err.filename, os.strerror(err.errno).lower()
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, RuntimeError) and ("inline_container.cc" in text or "PytorchStreamWriter" in text):
        return None, f"torch's file writer failed, most likely no space left on device ({text})"
    if type(err).__name__ == "SafetensorError" and "os error" in text:
        code = text.rsplit("os error", 1)[1].strip(" )")
        if code.isdigit() and int(code) in WRITE_ERRNOS:
            return None, os.strerror(int(code)).lower()
    return None


@contextmanager
def writing(what: Path | Callable[[], Path]):
    """Turn a failed write while producing `what` (or what it returns, asked after the failure)
    into WriteFailed naming the file."""
    try:
        yield
    except Exception as err:
        found = write_failure(err)
        if found is None:
            raise
        path, reason = found
        where = path or (what() if callable(what) else what)
        raise WriteFailed(f"could not write {where}: {reason}") from err


def save_final(trainer, out: Path) -> None:
    """The adapter (or model) and tokenizer go to output_dir/.staging/final and are moved into
    output_dir once all are written: a save cut off by a full disk or a kill leaves no half-written
    adapter beside the run's files (and `clean_checkpoint_leftovers` removes the staged one)."""
    staged = out / STAGING / "final"
    if trainer.args.should_save and staged.exists():
        shutil.rmtree(staged)
    trainer.save_model(str(staged))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        for p in sorted(staged.iterdir()):
            dst = out / p.name
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            os.replace(p, dst)
        staged.rmdir()
        try:
            (out / STAGING).rmdir()
        except OSError:  # a checkpoint is being staged beside it
            pass


# ---- process death and a distributed run's exit ---------------------------------------------------


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent_hook():
    """A `preexec_fn` for a child that must not outlive this process: in the child, Linux's
    prctl(PR_SET_PDEATHSIG, SIGKILL) makes the kernel kill it when its parent dies, SIGKILL
    included (the parent gets no chance to clean up). If the parent died before the call, the
    child exits at once. None off Linux. libc is resolved here, in the parent, before the fork."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return hook


def die_with_launcher() -> None:
    """cut.online sets CUT_DIE_WITH_PARENT: a torchrun worker then dies with torchrun as torchrun
    dies with cut.online (a direct child has it already from `die_with_parent_hook`)."""
    if os.environ.get("CUT_DIE_WITH_PARENT") == "1" and sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the launcher is already gone
            os._exit(1)


def shutdown_distributed() -> None:
    """Every rank waits for the others, then the process groups are torn down while Python is
    fully alive: the Trainer and the DeepSpeed engine hold them through reference cycles, so they
    are collected first."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def exit_without_teardown(code: int) -> None:
    """Leave a distributed run without interpreter teardown. A gloo worker thread still holding
    tensors when the interpreter finalises takes the GIL and aborts the process (SIGABRT,
    "terminate called without an active exception"; seen in about 1 of 10 ZeRO-3 runs on CPU).
    By now every output is written atomically and the process groups are destroyed; what atexit
    would still do is flush logs and close a wandb run, which is done here."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
