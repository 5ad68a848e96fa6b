"""Callbacks the fault tests add to the real app through config (+callbacks.x._target_=...): they cause a
real fault at a chosen step, so tests need no timing luck."""

import errno
import os
import signal

import lightning as L
import torch

from vaelab.data.batches import batch_counts, execution_plan_of, step_images


def reaches(trainer, batch: object, step: int) -> bool:
    """Whether this training batch runs optimiser step `step` (a batch may be an execution of several steps)."""
    steps = batch_counts(batch, execution_plan_of(trainer))[0]
    return trainer.global_step <= step < trainer.global_step + steps


class SignalAt(L.Callback):
    """Send a real signal to the main process when training reaches `step`, as `kill <pid>` would (under DDP
    only rank 0 gets it; the run must still stop every rank at the same batch)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if reaches(trainer, batch, self.step) and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)


class PoisonBatch(L.Callback):
    """Put a NaN into the training batch at `step`: corrupt data as it would reach the model."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if reaches(trainer, batch, self.step):
            images = step_images(batch, self.step - trainer.global_step, execution_plan_of(trainer))  # a view
            images[0, 0, 0, 0] = torch.nan


class BugAt(L.Callback):
    """Raise a plain RuntimeError (not one of vaelab's sentences: a bug) when training reaches `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if reaches(trainer, batch, self.step):
            raise RuntimeError(f"a bug at step {self.step}")


class FreezeAt(L.Callback):
    """Freeze (SIGSTOP) the process of DDP rank `rank` when training reaches `step`: a hung process or node."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and reaches(trainer, batch, self.step):
            os.kill(os.getpid(), signal.SIGSTOP)


class SlowSave(L.Callback):
    """Every checkpoint save writes half its bytes, prints a marker, pauses, then writes the rest: a wide window
    for a SIGKILL inside a save (the test reads the marker and kills at a random moment of the pause)."""

    def __init__(self, seconds: float = 0.3) -> None:
        self.seconds = seconds

    def setup(self, trainer, pl_module, stage) -> None:
        import io
        import time

        real = torch.save
        if getattr(real, "slow", False):
            return

        def slow(obj, f, *args, **kwargs):
            if not hasattr(f, "write"):
                return real(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            print("fault_callbacks: saving", flush=True)
            time.sleep(self.seconds)
            f.write(data[len(data) // 2 :])

        slow.slow = True
        torch.save = slow


class FillDiskAt(L.Callback):
    """At the end of training epoch `epoch`, fill the run directory's filesystem but `leave` bytes: the next
    checkpoint finds no space, as on a real full disk."""

    def __init__(self, path: str, epoch: int = 1, leave: int = 64_000) -> None:
        self.path, self.epoch, self.leave = path, epoch, leave

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
            try:
                with open(os.path.join(self.path, "filler"), "xb") as f:
                    f.write(b"\0" * max(0, free - self.leave))
            except (FileExistsError, OSError):  # another run of the sweep filled the disk first: it is full
                pass


class NoSpaceAt(L.Callback):
    """At the end of training epoch `epoch`, a write of `path` meets a full disk: the OSError that write raises."""

    def __init__(self, path: str, epoch: int = 1) -> None:
        self.path, self.epoch = path, epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)


class SignalAtTest(L.Callback):
    """Send a real signal to the process at test batch `batch`: a stop that comes during the test phase."""

    def __init__(self, batch: int, signum: int) -> None:
        self.batch, self.signum = batch, signum

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


class FreezeWandbAtTestEnd(L.Callback):
    """Freeze (SIGSTOP) this process's wandb-core service when the test phase ends: a hung W&B at exit."""

    def on_test_end(self, trainer, pl_module) -> None:
        from vaelab.training.wandb_runs import wandb_service_pids

        for pid in wandb_service_pids():
            os.kill(pid, signal.SIGSTOP)
            print(f"fault_callbacks: froze wandb-core {pid}", flush=True)


class SignalLauncherAt(L.Callback):
    """In sweep job `job`: send `signum` to the sweep's process (the stacked launcher's, which runs its members as
    threads) when training reaches `step`, as a cluster's stop signal to the whole job would arrive there."""

    def __init__(self, step: int, signum: int = signal.SIGTERM, job: int = 0) -> None:
        self.step, self.signum, self.job = step, signum, job

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().job.num == self.job and reaches(trainer, batch, self.step):
            os.kill(os.getpid(), self.signum)


class StopAt(L.Callback):
    """Send a real stop signal to this process at one point of a run, named `where` (a stacked sweep's member, a
    thread of the sweep's process, is flagged as the signal flags every member, but alone: each member stops at its
    own point while the others go on):
    step:N (the execution holding optimiser step N starts), val:E (a validation batch of epoch E), checkpoint:E
    (epoch E's validation has ended: its grids are drawn, its checkpoints are about to be saved), epoch_end:E
    (epoch E's train/ figures are being logged), train_end (training has ended) and test:B (test batch B).
    In a sweep, `where` may be a list: job i stops at where[i] (none past its end)."""

    def __init__(self, where, signum: int = signal.SIGTERM) -> None:
        if not isinstance(where, str):
            from hydra.core.hydra_config import HydraConfig

            num = int(HydraConfig.get().job.num)
            where = where[num] if num < len(where) else "never"
        kind, _, at = where.partition(":")
        self.kind, self.at, self.signum, self.sent = kind, int(at) if at else None, signum, False
        self.module = None

    def setup(self, trainer, pl_module, stage) -> None:
        self.module = pl_module

    def _send(self, kind: str, at: int | None = None) -> None:
        if not self.sent and kind == self.kind and at == self.at:
            self.sent = True
            member = getattr(self.module.runner, "member", None) if self.module is not None else None
            if member is not None:  # a stacked sweep's member: the group flags it, as its signal handler would
                member.stop(signal.Signals(self.signum).name)
            else:
                os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.kind == "step" and reaches(trainer, batch, self.at):
            self._send("step", self.at)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == "fit" and batch_idx == 0:
            self._send("val", trainer.current_epoch)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._send("checkpoint", trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._send("epoch_end", trainer.current_epoch)

    def on_train_end(self, trainer, pl_module) -> None:
        self._send("train_end")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._send("test", batch_idx)


class StallAt(L.Callback):
    """In sweep job `job`: before optimiser step `step`, stall (a member busy elsewhere: a long validation, a slow
    disk) for up to `seconds`, until a stop signal reaches this process."""

    def __init__(self, step: int, seconds: float = 60.0, job: int = 1) -> None:
        self.step, self.seconds, self.job, self.done = step, seconds, job, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import time

        from hydra.core.hydra_config import HydraConfig

        from vaelab.training.callbacks import Preemption

        if self.done or HydraConfig.get().job.num != self.job or trainer.global_step < self.step:
            return
        self.done = True
        watch = [c for c in trainer.callbacks if isinstance(c, Preemption)]
        until = time.monotonic() + self.seconds
        while time.monotonic() < until and not any(c.signal_name for c in watch):
            time.sleep(0.05)


class RecordProcess(L.Callback):
    """Write where this run trains (process id, thread name, child processes) to where.json in its run directory."""

    def on_train_start(self, trainer, pl_module) -> None:
        import json
        import multiprocessing
        import threading
        from pathlib import Path

        where = {"pid": os.getpid(), "thread": threading.current_thread().name,
                 "children": len(multiprocessing.active_children()), "threads": torch.get_num_threads(),
                 "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
        (Path(trainer.default_root_dir) / "where.json").write_text(json.dumps(where))


class KillAt(L.Callback):
    """SIGKILL this process (nothing saved, no handler runs: the OOM killer, a node lost) at one point of a run,
    named `where`: step:N (the execution holding optimiser step N starts), val:E (epoch E's first validation
    batch), saved:K (the K-th checkpoint file, counting from 1, has just been written in place), epoch_end:E
    (epoch E's end, before its train/ figures are logged), train_end (training has ended) and test:B (test batch
    B). Prints `fault_callbacks: killing at <where>` first."""

    def __init__(self, where: str) -> None:
        kind, _, at = where.partition(":")
        self.where, self.kind, self.at, self.saves = where, kind, int(at) if at else None, 0

    def _kill(self, kind: str, at: int | None = None) -> None:
        if kind == self.kind and at == self.at:
            print(f"fault_callbacks: killing at {self.where}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def setup(self, trainer, pl_module, stage) -> None:
        io = trainer.strategy.checkpoint_io
        real = io.save_checkpoint

        def save_then_maybe_kill(*args, **kwargs):
            real(*args, **kwargs)
            self.saves += 1
            self._kill("saved", self.saves)

        io.save_checkpoint = save_then_maybe_kill

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.kind == "step" and reaches(trainer, batch, self.at):
            self._kill("step", self.at)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and batch_idx == 0:
            self._kill("val", trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._kill("epoch_end", trainer.current_epoch)

    def on_train_end(self, trainer, pl_module) -> None:
        self._kill("train_end")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._kill("test", batch_idx)
