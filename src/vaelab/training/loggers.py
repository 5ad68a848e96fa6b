"""Experiment loggers and the W&B life cycle. W&B runs online when credentials and the network are there, else
offline; a resumed run continues its W&B run; every run ends its W&B run once, whatever ended the run."""

from __future__ import annotations

import contextlib
import csv
import logging
import netrc
import os
import threading
from pathlib import Path

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from vaelab.checks import one_of, positive
from vaelab.console import say
from vaelab.errors import ConfigError
from vaelab.files import atomic_write

log = logging.getLogger(__name__)


def wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_server() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def wandb_reachable(url: str | None = None, timeout: float = 5.0) -> bool:
    """Whether the W&B server answers an HTTP request within `timeout` seconds (any answer counts: a server that
    takes the connection and never answers does not)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url or wandb_server(), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False


def resolve_wandb_mode(mode: str = "auto", timeout: float = 5.0) -> str:
    """The mode W&B runs in. auto: WANDB_MODE if set, else online with credentials; and online only if the server
    answers within `timeout` seconds, else offline with one line saying how to upload later. online: the same
    checks, but a failing one is an error (ConfigError), not a fallback."""
    wandb_logger.ARGS["mode"].check(mode)
    wanted = mode
    if mode == "auto":
        env = os.environ.get("WANDB_MODE")
        wanted = {"dryrun": "offline"}.get(env, env) if env in ("online", "offline", "disabled", "dryrun") else "online"
    if wanted != "online":
        return wanted
    problem = None
    if not wandb_credentials():
        problem = "no W&B credentials were found (WANDB_API_KEY or `wandb login`)"
    elif not wandb_reachable(timeout=timeout):
        problem = f"the W&B server {wandb_server()} did not answer within {timeout:g} s"
    if problem is None:
        return "online"
    if mode == "online":
        raise ConfigError(f"logger.wandb.mode=online, but {problem}; log offline with logger.wandb.mode=offline and "
                          "upload later with wandb sync, or raise logger.wandb.network_timeout")
    if os.environ.get("WANDB_MODE") == "online" or wandb_credentials():
        say(f"vaelab: {problem}: W&B logs offline; upload the run later with wandb sync <run dir>/wandb/offline-run-*")
    return "offline"


def wandb_logger(
    save_dir: str,
    project: str = "vaelab",
    group: str | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
    job_type: str = "train",
    notes: str | None = None,
    mode: str = "auto",
    log_model: bool | str = False,
    run_id: str | None = None,
    network_timeout: float = 5.0,
    finish_timeout: float = 60.0,
) -> WandbLogger:
    """Lightning's WandbLogger, writing under the run directory, in the mode `resolve_wandb_mode` picks (waiting at
    most `network_timeout` seconds for the W&B server)."""
    import wandb

    resolved = resolve_wandb_mode(mode, network_timeout)
    # W&B reads its terminal settings once per process, from the environment, before any run's own settings:
    # its info lines off (WANDB_SHOW_INFO, unless set), vaelab says where the run is (RunLoggers.start)
    os.environ.setdefault("WANDB_SHOW_INFO", "false")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        save_dir=save_dir, project=project, group=group, name=name, tags=list(tags or []), job_type=job_type,
        notes=notes, offline=resolved == "offline", mode=resolved, id=run_id, resume="allow" if run_id else None,
        # Lightning uploads checkpoints only online; offline, vaelab logs them itself at the end of the run
        log_model=log_model if resolved == "online" else False,
        # no run history and summary at exit, and none of W&B's info lines (its start lines end with an
        # advertisement): vaelab says where the W&B run is and how to upload it (RunLoggers.start, print_summary);
        # W&B's warnings and errors stay
        settings=wandb.Settings(quiet=True, show_info=False),
        # each run is its own W&B run, also where several share a process (a stacked sweep's members): none is
        # wandb.run, so none finishes or logs into another
        reinit="create_new",
    )
    # Lightning 2.6 always passes `anonymous` (None by default) to wandb.init, and wandb 0.31 warns about any value
    # of that deprecated setting; vaelab never sets it, so it is not passed at all
    logger._wandb_init.pop("anonymous", None)
    logger.vaelab_log_model_offline = bool(log_model) and resolved == "offline"
    logger.vaelab_finish_timeout = finish_timeout
    return logger


wandb_logger.ARGS = {"mode": one_of("logger.wandb.mode", "auto", "online", "offline", "disabled"),
                     "network_timeout": positive("logger.wandb.network_timeout"),
                     "finish_timeout": positive("logger.wandb.finish_timeout")}


def log_checkpoints_offline(logger: WandbLogger, checkpoint_callback) -> None:
    """Offline runs with log_model: the best and last checkpoints as one W&B model artifact, stored in the
    offline run and uploaded by `wandb sync` (Lightning itself refuses log_model when offline)."""
    import wandb

    if not getattr(logger, "vaelab_log_model_offline", False) or checkpoint_callback is None:
        return
    paths = {p for p in (checkpoint_callback.best_model_path, checkpoint_callback.last_model_path) if p}
    if not paths:
        return
    score = checkpoint_callback.best_model_score
    artifact = wandb.Artifact(f"model-{logger.experiment.id}", type="model",
                              metadata={"monitor": checkpoint_callback.monitor,
                                        "best_score": float(score) if score is not None else None})
    for path in sorted(paths):
        artifact.add_file(path, name=Path(path).name)
    logger.experiment.log_artifact(artifact, aliases=["latest", "best"])


def say_wandb_run(logger: WandbLogger) -> None:
    """Where the run's W&B run is, in one line (W&B's own start lines are off): its page online; offline, its
    directory and the `wandb sync` that uploads it."""
    run = logger.experiment
    if run.settings.mode == "online":
        say(f"vaelab: W&B run {run.id}: {run.url}")
    elif (run_dir := wandb_run_dir(logger)) is not None and run.settings.mode == "offline":
        say(f"vaelab: W&B run {run.id} logs offline to {run_dir}; upload it later with wandb sync {run_dir}")


def wandb_run_dir(logger: WandbLogger) -> Path | None:
    """The run's local directory (…/wandb/offline-run-…), the one `wandb sync` takes."""
    run = logger.experiment
    files_dir = getattr(run, "dir", None)
    return Path(files_dir).parent if files_dir else None


class AppendingWriter(ExperimentWriter):
    """Lightning's metrics.csv writer, keeping the file it finds (Lightning's deletes it, with a warning): a
    resumed run appends to the history it had before it was stopped. A header that grows is rewritten atomically,
    so a run killed mid-rewrite keeps the old file whole."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        header = path.open().readline().strip() if path.is_file() else ""
        self.metrics_keys = header.split(",") if header else []

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


def define_metrics(run) -> None:
    """Epoch-level metrics plotted against the epoch, per-step curves against the optimiser step (Lightning's
    trainer/global_step), and run summaries that show the best validation values, not the last."""
    run.define_metric("epoch", hidden=True)
    for prefix in ("train", "val", "test", "perf"):
        run.define_metric(f"{prefix}/*", step_metric="epoch")
    run.define_metric("train_step/*", step_metric="trainer/global_step")
    for name, best in (("val/loss", "min"), ("val/elbo", "max"), ("val/recon", "min")):
        run.define_metric(name, step_metric="epoch", summary=best)


class RunLoggers:
    """A run's loggers, and the life cycle of its W&B run (if it has one): `start` sends the config and gives the
    run id to keep for a resume, `finish` ends it once, `preempted` marks it as preempted first."""

    def __init__(self, loggers: list) -> None:
        self.loggers = loggers
        self.wandb = [lg for lg in loggers if isinstance(lg, WandbLogger)]
        self.tensorboard = [lg for lg in loggers if isinstance(lg, TensorBoardLogger)]
        self.run_config: dict = {}

    def start(self, run_config: dict, **extra) -> str | None:
        """Log the run's config to W&B as it is (the composed Hydra config, resolved), with vaelab's own facts
        (`extra`: parameter count, device, version) under one key of their own, `vaelab`; on rank 0 only (other
        DDP ranks hold no W&B run). Define its metrics as dashboards expect; return the W&B run id."""
        run_id = None
        self.run_config = run_config
        if self.wandb:
            _open_runs().add(self)
        for lg in self.wandb:
            if rank_zero_only.rank == 0:
                lg.experiment.config.update({**run_config, "vaelab": extra}, allow_val_change=True)
                define_metrics(lg.experiment)
                run_id = lg.experiment.id
                say_wandb_run(lg)
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
        for lg in self.wandb:
            if lg._experiment is not None:
                lg.experiment.mark_preempting()
        self.finish()

    def finish(self, exit_code: int = 0) -> None:
        """End the W&B run, so that each run of a sweep ends before the next starts; waiting at most the W&B
        logger's `finish_timeout` seconds for W&B's service, which can hang (a stuck wandb-core), after the run's
        results are saved."""
        if not self.wandb:
            return
        import threading

        _open_runs().discard(self)
        started = [lg.experiment for lg in self.wandb if lg._experiment is not None]
        if not started:
            return
        timeout = getattr(self.wandb[0], "vaelab_finish_timeout", 60.0)
        run_dir = wandb_run_dir(self.wandb[0])
        ended = threading.Thread(target=lambda: [run.finish(exit_code=exit_code) for run in started], daemon=True)
        ended.start()
        ended.join(timeout)
        if ended.is_alive():
            say(f"vaelab: W&B did not finish within {timeout:g} s (its service is not answering); the run's results "
                f"are saved, and its W&B files are in {run_dir}: upload them later with wandb sync")
            stop_wandb_service()


def wandb_service_pids() -> list[int]:
    """The wandb-core service processes this process started (Linux /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
        except (OSError, ValueError):
            continue
        if "wandb-core" in stat and int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
            pids.append(int(proc.name))
    return pids


def stop_wandb_service() -> None:
    """Kill this process's wandb-core services, so that W&B's own exit handler does not wait on one that hangs."""
    import signal

    for pid in wandb_service_pids():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


_thread = threading.local()


def _open_runs() -> set:
    """The RunLoggers with a W&B run this thread started and has not finished (a stacked sweep's member is a thread)."""
    if not hasattr(_thread, "open"):
        _thread.open = set()
    return _thread.open


def finish_any_wandb_run(exit_code: int = 1) -> None:
    """End the W&B runs that an error left open in this thread."""
    for loggers in list(_open_runs()):
        loggers.finish(exit_code=exit_code)
