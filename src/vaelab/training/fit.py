"""trainer.fit, with the two ways a run can end early turned into values and sentences: a stop signal's
checkpoint (Preempted, returned), a DDP peer that stopped answering (DistributedError, raised) and a full disk met
by any write (SaveError, raised)."""

from __future__ import annotations

import errno
import signal
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from vaelab.errors import ConfigError, DistributedError, SaveError
from vaelab.training.callbacks.preemption import Preempted
from vaelab.training.checkpoints import checkpoint_dir, save_failure
from vaelab.training.module import VAEModule


def fit(trainer: L.Trainer, module: VAEModule, datamodule, ckpt_path: str | None) -> Preempted | None:
    """Train; return the Preempted stop when a signal ended training (its checkpoint saved), else None."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except Preempted as stop:
        return stop
    except MisconfigurationException as exc:  # e.g. a limit_train_batches fraction that leaves no batch
        raise ConfigError(f"Lightning rejected the run's settings: {str(exc).splitlines()[0]}") from None
    except RuntimeError as exc:
        stop_other_processes(trainer)
        if trainer.world_size > 1 and collective_failed(exc):
            raise lost_process(trainer) from None
        raise
    except OSError as exc:  # a full disk met by a write other than a checkpoint's (a log, metrics.csv): one sentence
        stop_other_processes(trainer)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        checkpoints = checkpoint_dir(trainer)
        where = exc.filename or (checkpoints.parent if checkpoints else trainer.default_root_dir)
        raise SaveError(save_failure(exc, Path(where), checkpoints)) from None
    except BaseException:
        stop_other_processes(trainer)
        raise
    finally:
        module.runner.leave()  # a stacked sweep's member leaves its stack, however its training ended
    return None


def stop_other_processes(trainer: L.Trainer) -> None:
    """A DDP run's first process leaving training with an error stops the processes it started (Lightning's launcher
    does so on Ctrl+C only): without it they cannot go on, and one that is frozen would be left behind for good."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if trainer.world_size > 1 and trainer.is_global_zero and launcher is not None:
        launcher.kill(signal.SIGKILL)


def collective_failed(exc: BaseException) -> bool:
    """A DDP collective that timed out or lost its peer (torch's DistError, or gloo's and NCCL's messages)."""
    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "NCCL"))


def lost_process(trainer: L.Trainer) -> DistributedError:
    """One sentence for a DDP run whose other processes stopped answering (those this one started are stopped
    already). No public way gives the strategy's collective timeout, so its field is read for the sentence;
    tests/test_scale.py pins the sentence's figure."""
    timeout = trainer.strategy._timeout if isinstance(trainer.strategy, DDPStrategy) else None
    seconds = f"{timeout.total_seconds():.0f} s" if timeout is not None else "the collective timeout"
    return DistributedError(
        f"rank {trainer.global_rank}: another process of this DDP run stopped answering for {seconds} (frozen, "
        "killed or its node lost); checkpoints saved so far are intact: continue with resume=auto, and if the "
        "processes were only slow, raise trainer.strategy.timeout.seconds")
