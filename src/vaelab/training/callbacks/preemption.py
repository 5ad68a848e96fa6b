"""Stop signals never lose work: on SIGTERM, SIGUSR1, SIGUSR2 or Ctrl-C a run saves where it is and stops
cleanly, and under submitit its job is requeued to continue from that checkpoint."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import torch

from vaelab.training.stops import EarlyStops, first_stop


class Preemption(L.Callback):
    """On every signal a scheduler or a person sends before a run is stopped (SIGTERM, SIGUSR1, SIGUSR2 - which
    conf/hydra/launcher/slurm.yaml asks SLURM for before the time limit - and SIGINT, Ctrl-C): save
    checkpoints/last.ckpt (weights, optimiser, loop position, data order, RNG, the metrics so far) at the next point
    a resume continues from exactly, and stop. `resume=auto` with the same command then ends where the
    uninterrupted run ends. A second Ctrl-C stops at once, as Ctrl-C always does. Under submitit
    (hydra/launcher=slurm or submitit_local) the signal is then handed to submitit's own handler, which requeues
    the job; the requeued job continues from the checkpoint.

    Where a stop is saved (each a point Lightning's loops resume from without skipping or repeating anything):
    - inside an epoch: at the end of the execution the signal came in;
    - on an epoch's last execution, in that epoch's validation or its grids and checkpoints: once the epoch's
      validation and its callbacks are done (stop_after_validation, which VAEModule calls from its own
      on_validation_end, the hook Lightning runs after every callback's); a checkpoint saved after the last batch
      but before validation would resume in the next epoch, skipping this one's validation and epoch end;
    - after an epoch's validation (its train/ logging, the scheduler step): inside the next epoch, as above;
    - after training's last epoch, or in the test phase: training is saved whole (save_finished) and
      resume=auto tests again without training.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")

    def __init__(self, dirpath: str, filename: str = "last.ckpt", check_every_n_steps: int = 10) -> None:
        self.path = Path(dirpath) / filename
        self.check_every_n_steps = max(1, check_every_n_steps)  # DDP: how often ranks agree (one collective)
        self.signal_name: str | None = None
        self._previous: dict = {}
        self._agreed_at = 0  # global step of the ranks' last agreement

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The test phase after training stops on the same signals: training is saved already (last.ckpt), so the
        run stops at the next test batch, and resume=auto tests again without training."""
        self.on_train_start(trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if self.signal_name is not None and trainer.state.fn == "test":
            requeue = self.requeue_handler()
            self._restore()
            raise Preempted(self.signal_name, trainer.current_epoch, trainer.global_step, self.path, requeue,
                            phase="test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take over the signals once Lightning and submitit have set their own handlers: ours only raise a flag.
        The decision to stop is made at the end of an execution, agreed by all ranks (Lightning's SIGTERM handler
        runs a collective inside the signal handler, which can deadlock DDP ranks mid-step)."""
        self.watch()

    def watch(self) -> None:
        """Install the flagging handlers (again: Lightning restores its own at every fit's and test's end). The
        handlers found first are kept, to be restored and for submitit's requeue."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            # signal handlers can only be set from the main thread; a stacked sweep's member (a thread of the sweep's
            # process) is flagged by its group's handler instead (its runner registered this callback)
            return
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            current = signal.getsignal(signum)
            if current == EarlyStops.flag:  # set-up's recorder: the handler before it is the previous one
                current = EarlyStops.previous.get(signum, signal.SIG_DFL)
            if current != self._flag and signum not in self._previous:
                self._previous[signum] = current
            signal.signal(signum, self._flag)
        self.signal_name = self.signal_name or EarlyStops.take()  # a stop that came during set-up

    def _flag(self, signum, frame) -> None:
        self.signal_name = first_stop(signum, self.signal_name, "saving at the end of this step")

    def requeue_handler(self):
        """submitit's handler for the signal that stopped the run, as a callable that requeues the job (None
        outside submitit): USR2 is submitit's own requeue signal; for SIGTERM, which submitit ignores, its
        requeue is asked for all the same, since the run saved a checkpoint to continue from."""
        import signal

        if self.signal_name is None:
            return None
        owner = _submitit_owner(self._previous.get(getattr(signal, self.signal_name)))
        if owner is None:
            return None
        return lambda: owner.checkpoint_and_try_requeue(getattr(signal, self.signal_name))

    def agreed(self, trainer: L.Trainer, pl_module) -> bool:
        """Whether to stop now: this process was signalled, or under DDP any rank was (one collective)."""
        stop = self.signal_name is not None
        if trainer.world_size > 1:  # every rank must agree, or the collective save would hang
            flag = torch.tensor([1.0 if stop else 0.0], device=pl_module.device)
            stop = bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)
        return stop

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1:
            if trainer.global_step - self._agreed_at < self.check_every_n_steps:  # the same on every rank
                return
            self._agreed_at = trainer.global_step
        elif self.signal_name is None:
            return
        if not self.agreed(trainer, pl_module):
            return
        if ends_epoch(trainer):  # saved after this epoch's validation, or once training has ended
            return
        self._save_and_stop(trainer, pl_module)

    def stop_after_validation(self, trainer: L.Trainer, pl_module) -> None:
        """After an epoch's validation, its grids and its checkpoints (VAEModule.on_validation_end): stop here
        when a signal came since the epoch's last execution. Not after a validation inside an epoch (the next
        execution saves), nor when early stopping ends training here (the trainer's stop flag is not in
        checkpoints: training ends and save_finished keeps it ended)."""
        if trainer.state.fn != "fit" or trainer.sanity_checking or not epoch_trained(trainer):
            return
        if trainer.should_stop or not self.agreed(trainer, pl_module):
            return
        self._save_and_stop(trainer, pl_module)

    def save_finished(self, trainer: L.Trainer, pl_module) -> None:
        """Once training has ended: last.ckpt holds the finished training (its loops complete), so that a run
        stopped or killed from here on resumes to its test phase without repeating any of training's epoch ends."""
        if hasattr(pl_module, "raise_if_nonfinite"):
            pl_module.raise_if_nonfinite()
        if hasattr(pl_module, "training_finished"):
            pl_module.training_finished = True
        trainer.save_checkpoint(self.path, weights_only=False)

    def _save_and_stop(self, trainer: L.Trainer, pl_module) -> None:
        self.signal_name = self.signal_name or "SIGTERM"
        if hasattr(pl_module, "raise_if_nonfinite"):
            pl_module.raise_if_nonfinite()  # never save broken weights
        trainer.save_checkpoint(self.path, weights_only=False)  # everything a resume needs
        raise Preempted(self.signal_name, trainer.current_epoch, trainer.global_step, self.path,
                        self.requeue_handler())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The handlers stay: a signal from here to the test phase is a stop too (the app's finish_training)."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        import signal

        for signum, handler in self._previous.items():
            if handler is not None and signal.getsignal(signum) == self._flag:
                signal.signal(signum, handler)
        self._previous = {}

    def release(self) -> None:
        """Hand the signals back to the handlers found first (the app calls this when the run ends)."""
        self._restore()


def ends_epoch(trainer: L.Trainer) -> bool:
    """Whether the execution that just ran is its epoch's last, or the last of training (max_steps)."""
    loop = trainer.fit_loop.epoch_loop
    last = loop.batch_progress.is_last_batch or loop.batch_progress.current.ready >= trainer.num_training_batches
    return bool(last) or (trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps)


def epoch_trained(trainer: L.Trainer) -> bool:
    """Whether this validation comes after its epoch's last execution (not a validation inside the epoch)."""
    loop = trainer.fit_loop.epoch_loop
    return bool(loop.batch_progress.is_last_batch) or loop.batch_progress.current.ready >= trainer.num_training_batches


def _submitit_owner(handler):
    """submitit's signal-handling object behind `handler`, or None. Lightning wraps the SIGTERM handler it finds
    (submitit's) together with its own in a _HandlersCompose, whose `signal_handlers` hold both."""
    for candidate in getattr(handler, "signal_handlers", [handler]):
        if candidate == EarlyStops.flag:  # set-up's recorder, which holds the handler it found
            return _submitit_owner(EarlyStops.previous.get(signal.SIGUSR2)) or _submitit_owner(
                EarlyStops.previous.get(signal.SIGTERM))
        owner = getattr(candidate, "__self__", None)
        if owner is not None and type(owner).__module__.startswith("submitit"):
            return owner
    return None


class Preempted(SystemExit):
    """Raised after a preemption checkpoint is saved: ends the run cleanly (exit status 0)."""

    def __init__(self, signal_name: str, epoch: int, step: int, path: Path, requeue=None, phase: str = "train") -> None:
        super().__init__(0)
        self.signal_name, self.epoch, self.step, self.path, self.phase = signal_name, epoch, step, path, phase
        self.requeue = requeue  # submitit's requeue, to call once the run's state is written
