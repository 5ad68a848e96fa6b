"""Every logged row once, whatever stopped the run: where each logger's history stands when a checkpoint is saved
(`mark`, kept in the checkpoint), and each history put back to that point when a run resumes from it (`rewind`).

A resumed run redoes, identically, everything after its checkpoint, rows included. So at a checkpoint every row
logged so far is made durable first: metrics.csv's buffered rows written, TensorBoard's event file flushed, and W&B
waited for until its own local log holds every row sent (it writes that log every logger.wandb.flush_interval
seconds and drops what it has not written when its process is killed). A resume then cuts metrics.csv back to the
checkpoint's rows and TensorBoard's event files back to their sizes then (those begun later are removed), before
any logger starts; W&B's history cannot be cut, so the rows it already holds are counted and the resumed run does
not send them again (RowCountingWandbLogger). Histories are rewound only when the checkpoint is this run's own:
a checkpoint of another run (ckpt_path=...) starts a history of its own."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from vaelab.files import atomic_write
from vaelab.training.wandb_log import HistoryCount, rows_in_logs
from vaelab.training.wandb_runs import RowCountingWandbLogger

log = logging.getLogger(__name__)
EVENTS = "events.out.tfevents.*"


def mark(loggers) -> dict:
    """Make every row logged so far durable and say where each history stands (for the checkpoint)."""
    where: dict = {}
    for logger in loggers:
        if isinstance(logger, CSVLogger) and hasattr(logger.experiment, "rows"):  # AppendingCSVLogger
            logger.save()
            where["csv"] = {"file": str(Path(logger.experiment.metrics_file_path).resolve()),
                            "rows": logger.experiment.rows}
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.flush()
            folder = Path(logger.log_dir).resolve()
            where["tensorboard"] = {"dir": str(folder),
                                    "files": {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob(EVENTS)}}
        elif isinstance(logger, RowCountingWandbLogger) and logger.experiment.settings.mode != "disabled":
            run = logger.experiment
            wait_for_wandb(logger, Path(run.settings.sync_file))
            where["wandb"] = {"id": run.id, "rows": logger.rows}
    return where


def wait_for_wandb(logger: RowCountingWandbLogger, sync_file: Path) -> None:
    """Until W&B's local log holds every row this start of the run sent (a few flush intervals at most: W&B writes
    it every logger.wandb.flush_interval seconds)."""
    counter = getattr(logger, "vaelab_history_count", None)
    if counter is None or counter.path != sync_file:
        counter = logger.vaelab_history_count = HistoryCount(sync_file)
    interval = logger.experiment.settings.x_transaction_log_flush_interval
    deadline = time.monotonic() + max(2.0, 8 * interval)
    while counter.count() < logger.sent:
        if time.monotonic() > deadline:
            log.warning("W&B had written %d of the %d history rows sent when the checkpoint was saved; a kill now "
                        "could cost it the others", counter.rows, logger.sent)
            return
        time.sleep(min(0.02, interval / 4))


def rewind_files(where: dict) -> None:
    """Cut metrics.csv and the TensorBoard event files back to where a checkpoint left them (before any logger
    opens them again)."""
    if "csv" in where:
        keep_rows(Path(where["csv"]["file"]), where["csv"]["rows"])
    if "tensorboard" in where:
        folder, sizes = Path(where["tensorboard"]["dir"]), where["tensorboard"]["files"]
        for path in folder.rglob(EVENTS) if folder.is_dir() else ():
            size = sizes.get(str(path.relative_to(folder)))
            if size is None:  # begun after the checkpoint
                path.unlink()
            elif path.stat().st_size > size:
                with open(path, "r+b") as file:
                    file.truncate(size)


def keep_rows(path: Path, rows: int) -> None:
    """metrics.csv with its first `rows` rows (its header as it is), written atomically."""
    if not path.is_file():
        return
    with open(path, newline="") as file:
        lines = list(csv.reader(file))
    if len(lines) - 1 <= rows:
        return
    with atomic_write(path, "w", newline="") as file:
        csv.writer(file).writerows(lines[: rows + 1])


# where histories stand before anything is logged: a start killed before its first checkpoint is begun again
EMPTY_HISTORIES = {"csv": {"rows": 0}, "tensorboard": {"files": {}}, "wandb": {"rows": 0}}


def own(where: dict, csv_file: Path | None, tensorboard_dir: Path | None, wandb_id: str | None,
        any_run: bool = False) -> dict:
    """The part of a checkpoint's positions that is this run's: the same files, the same W&B run (`any_run`:
    positions that name no run, EMPTY_HISTORIES, are this run's)."""
    if any_run:
        where = {"csv": {**where["csv"], "file": str(Path(csv_file).resolve()) if csv_file else ""},
                 "tensorboard": {**where["tensorboard"], "dir": str(Path(tensorboard_dir).resolve()) if tensorboard_dir else ""},
                 "wandb": {**where["wandb"], "id": wandb_id}}
    mine = {}
    if "csv" in where and csv_file is not None and Path(where["csv"]["file"]) == Path(csv_file).resolve():
        mine["csv"] = where["csv"]
    if ("tensorboard" in where and tensorboard_dir is not None
            and Path(where["tensorboard"]["dir"]) == Path(tensorboard_dir).resolve()):
        mine["tensorboard"] = where["tensorboard"]
    if "wandb" in where and wandb_id is not None and where["wandb"]["id"] == wandb_id:
        mine["wandb"] = where["wandb"]
    return mine


def continue_wandb(logger: RowCountingWandbLogger, where: dict) -> str | None:
    """A resumed W&B run: it numbers rows from its checkpoint's, and sends none its earlier starts hold. Returns a
    sentence when W&B lost rows before the checkpoint (its service was killed with the run), else None."""
    if "wandb" not in where:
        return None
    run = logger.experiment
    at = where["wandb"]["rows"]
    held = rows_in_logs(Path(run.settings.wandb_dir), run.id, but=Path(run.settings.sync_file))
    logger.rows, logger.held = at, held
    if held < at:
        return (f"vaelab: W&B kept {held} of the {at} history rows its run {run.id} had logged by the checkpoint "
                "(it was killed before writing the others); they stay missing from its history")
    return None
