"""A run's experiment loggers and its W&B run's life cycle (RunLoggers): a resumed run continues its W&B run, and
every run ends its W&B run once, whatever ended the run. metrics.csv appends on a resume (AppendingCSVLogger), from
the row its checkpoint was saved at (training/log_rows.py).
W&B's own pieces (its mode, the logger, offline artifacts) are wandb_runs.py."""

from __future__ import annotations

import csv
import logging
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from vaelab.console import say
from vaelab.errors import VaelabError
from vaelab.files import atomic_write
from vaelab.training.log_rows import continue_wandb, own, rewind_files
from vaelab.training.wandb_runs import (  # noqa: F401 - wandb_logger, resolve_wandb_mode: their earlier home
    RowCountingWandbLogger,
    define_metrics,
    log_checkpoints_offline,
    resolve_wandb_mode,
    say_wandb_run,
    stop_wandb_service,
    wandb_logger,
    wandb_run_dir,
    wandb_service_pids,
)

log = logging.getLogger(__name__)


class AppendingWriter(ExperimentWriter):
    """Lightning's metrics.csv writer, keeping the file it finds (Lightning's deletes it, with a warning): a
    resumed run appends to the history it had before it was stopped. A header that grows is rewritten atomically,
    so a run killed mid-rewrite keeps the old file whole."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        lines = list(csv.reader(path.open(newline=""))) if path.is_file() else []
        self.metrics_keys = lines[0] if lines else []
        self.rows = max(0, len(lines) - 1)  # rows in the file (training/log_rows.py keeps them in checkpoints)

    def save(self) -> None:
        buffered = len(self.metrics)
        super().save()
        self.rows += buffered

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        with atomic_write(Path(self.metrics_file_path), "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, appending to an existing metrics.csv (AppendingWriter) instead of deleting it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class RunLoggers:
    """A run's loggers, and the life cycle of its W&B run (if it has one): `start` sends the config and gives the
    run id to keep for a resume, `finish` ends it once, `preempted` marks it as preempted first."""

    def __init__(self, loggers: list) -> None:
        self.loggers = loggers
        self.wandb = [lg for lg in loggers if isinstance(lg, WandbLogger)]
        self.tensorboard = [lg for lg in loggers if isinstance(lg, TensorBoardLogger)]
        self.run_config: dict = {}
        self.started = False  # whether start() began the W&B runs (rank 0 only: other DDP ranks hold none)
        self.resumed: dict = {}  # where the checkpoint this run resumes from left each history (log_rows.py)

    def rewind(self, where: dict, wandb_run_id: str | None, any_run: bool = False) -> None:
        """Before any logger opens its files: put metrics.csv and TensorBoard's event files back to where the
        checkpoint to resume from left them (when they are this run's own; any_run: positions naming no run, such
        as EMPTY_HISTORIES, are); W&B follows in start()."""
        csv_file = next((Path(lg.log_dir) / "metrics.csv" for lg in self.loggers if isinstance(lg, AppendingCSVLogger)), None)
        board = next((Path(lg.log_dir) for lg in self.tensorboard), None)
        self.resumed = own(where, csv_file, board, wandb_run_id, any_run)
        rewind_files(self.resumed)

    def start(self, run_config: dict, **extra) -> str | None:
        """Log the run's config to W&B as it is (the composed Hydra config, resolved), with vaelab's own facts
        (`extra`: parameter count, device, version) under one key of their own, `vaelab`; on rank 0 only (other
        DDP ranks hold no W&B run). Define its metrics as dashboards expect; return the W&B run id."""
        run_id = None
        self.run_config = run_config
        for lg in self.wandb:
            if rank_zero_only.rank == 0:
                self.started = True
                lg.experiment.config.update({**run_config, "vaelab": extra}, allow_val_change=True)
                define_metrics(lg.experiment)
                run_id = lg.experiment.id
                say_wandb_run(lg)
                if isinstance(lg, RowCountingWandbLogger) and (lost := continue_wandb(lg, self.resumed)):
                    say(lost)
        return run_id

    def log_results(self, row: dict) -> None:
        """The run's final results as one row of a W&B table (key `results`), so runs compare side by side; and
        TensorBoard's HParams tab: the run's config (flattened by Lightning, also hparams.yaml) with its test
        figures as the tab's metrics, under hp/ (the test/ curves keep their one point at the run's last step)."""
        for lg in self.wandb:
            lg.log_table(key="results", columns=list(row), data=[list(row.values())])
        metrics = {f"hp/{k}": float(v) for k, v in row.items() if k.startswith("test/")}
        for lg in self.tensorboard:
            lg.log_hyperparams(self.run_config, metrics=metrics)
            # Lightning writes hparams.yaml only when it is missing, and its first save left it {}
            save_hparams_to_yaml(Path(lg.log_dir) / lg.NAME_HPARAMS_FILE, lg.hparams)

    def results(self, checkpoint_callback) -> tuple[dict | None, Path | None]:
        """At the end of a finished run (rank 0): offline checkpoint artifacts, and the W&B run's id, mode and
        local directory for results.json."""
        entry, run_dir = None, None
        for lg in self.wandb:
            log_checkpoints_offline(lg, checkpoint_callback)
            run_dir = wandb_run_dir(lg)
            run = lg.experiment
            entry = {"id": run.id, "mode": run.settings.mode, "dir": str(run_dir) if run_dir else None,
                     "group": run.group or None, "project": run.project,
                     "url": run.url if run.settings.mode == "online" else None}
        return entry, run_dir

    def preempted(self) -> None:
        for lg in self.wandb if self.started else ():
            lg.experiment.mark_preempting()
        self.finish()

    def finish(self, exit_code: int = 0) -> None:
        """End the W&B run, so that each run of a sweep ends before the next starts; waiting at most the W&B
        logger's `finish_timeout` seconds for W&B's service, which can hang (a stuck wandb-core), after the run's
        results are saved."""
        if not self.wandb:
            return
        started = [lg.experiment for lg in self.wandb] if self.started else []
        self.started = False  # ended once
        if not started:
            return
        for lg in self.wandb:  # a stacked member's own console lines (its train.log), where W&B shows a run's logs
            own_lines = getattr(lg, "vaelab_console_log", None)
            if own_lines is not None and Path(own_lines).is_file() and getattr(lg.experiment, "dir", None):
                shutil.copyfile(own_lines, Path(lg.experiment.dir) / "output.log")
        timeout = getattr(self.wandb[0], "vaelab_finish_timeout", 60.0)
        run_dir = wandb_run_dir(self.wandb[0])
        ended = threading.Thread(target=lambda: [run.finish(exit_code=exit_code) for run in started], daemon=True)
        ended.start()
        ended.join(timeout)
        if ended.is_alive():
            say(f"vaelab: W&B did not finish within {timeout:g} s (its service is not answering); the run's results "
                f"are saved, and its W&B files are in {run_dir}: upload them later with wandb sync")
            stop_wandb_service()


@contextmanager
def finished_on_error(loggers: RunLoggers):
    """A run that ends in one of vaelab's errors ends its W&B run (exit code 1) before the error is said."""
    try:
        yield
    except VaelabError:
        loggers.finish(exit_code=1)
        raise
