"""W&B for a run: the mode it runs in (online when credentials and the server are there, else offline, said in one
line), Lightning's WandbLogger as vaelab configures it (conf/logger/wandb.yaml), the metrics' axes and summaries,
where the run is and how to upload it, offline checkpoint artifacts, and stopping a W&B service that hangs.
loggers.py's RunLoggers holds a run's loggers and its W&B run's life cycle."""

from __future__ import annotations

import contextlib
import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from vaelab.checks import one_of, positive
from vaelab.console import say
from vaelab.errors import ConfigError


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
    flush_interval: float = 0.25,
    console: str = "auto",
) -> WandbLogger:
    """Lightning's WandbLogger (RowCountingWandbLogger), writing under the run directory, in the mode
    `resolve_wandb_mode` picks (waiting at most `network_timeout` seconds for the W&B server). W&B writes its local
    log every `flush_interval` seconds (its own default is 15): what it holds when its process is killed outright."""
    import wandb

    resolved = resolve_wandb_mode(mode, network_timeout)
    # W&B reads its terminal settings once per process, from the environment, before any run's own settings:
    # its info lines off (WANDB_SHOW_INFO, unless set), vaelab says where the run is (RunLoggers.start)
    os.environ.setdefault("WANDB_SHOW_INFO", "false")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = RowCountingWandbLogger(
        save_dir=save_dir, project=project, group=group, name=name, tags=list(tags or []), job_type=job_type,
        notes=notes, offline=resolved == "offline", mode=resolved, id=run_id, resume="allow" if run_id else None,
        # Lightning uploads checkpoints only online; offline, vaelab logs them itself at the end of the run
        log_model=log_model if resolved == "online" else False,
        # no run history and summary at exit, and none of W&B's info lines (its start lines end with an
        # advertisement): vaelab says where the W&B run is and how to upload it (RunLoggers.start, print_summary);
        # W&B's warnings and errors stay
        settings=wandb.Settings(quiet=True, show_info=False, x_transaction_log_flush_interval=flush_interval,
                                console=console),
        # each run is its own W&B run, also where several share a process (a stacked sweep's members): none is
        # wandb.run, so none finishes or logs into another
        reinit="create_new",
    )
    # Lightning 2.6 always passes `anonymous` (None by default) to wandb.init, and wandb 0.31 warns about any value
    # of that deprecated setting; vaelab never sets it, so it is not passed at all. No public way: WandbLogger keeps
    # wandb.init's arguments in its private _wandb_init (tests/test_what_people_see.py pins that no warning shows)
    logger._wandb_init.pop("anonymous", None)
    logger.vaelab_log_model_offline = bool(log_model) and resolved == "offline"
    logger.vaelab_finish_timeout = finish_timeout
    return logger


wandb_logger.ARGS = {"mode": one_of("logger.wandb.mode", "auto", "online", "offline", "disabled"),
                     "network_timeout": positive("logger.wandb.network_timeout"),
                     "finish_timeout": positive("logger.wandb.finish_timeout"),
                     "flush_interval": positive("logger.wandb.flush_interval"),
                     "console": one_of("logger.wandb.console", "auto", "off", "wrap", "redirect")}


class RowCountingWandbLogger(WandbLogger):
    """Lightning's WandbLogger, numbering the history rows it logs (every row goes through log_metrics: images and
    tables too). A resumed run starts at the row its checkpoint was saved at; the rows its W&B run already holds
    from before the stop (`held`) are logged again by the resumed run, identically, and not sent twice."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows = 0  # the index of the next history row
        self.held = 0  # rows below this the W&B run holds already
        self.sent = 0  # rows this start of the run sent to W&B

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        send = self.rows >= self.held
        self.rows += 1
        if send:
            self.sent += 1
            super().log_metrics(metrics, step)


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


def define_metrics(run) -> None:
    """Epoch-level metrics plotted against the epoch, per-step curves against the optimiser step (Lightning's
    trainer/global_step), and run summaries that show the best validation values, not the last."""
    run.define_metric("epoch", hidden=True)
    for prefix in ("train", "val", "test", "perf"):
        run.define_metric(f"{prefix}/*", step_metric="epoch")
    run.define_metric("train_step/*", step_metric="trainer/global_step")
    for name, best in (("val/loss", "min"), ("val/elbo", "max"), ("val/recon", "min")):
        run.define_metric(name, step_metric="epoch", summary=best)


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
