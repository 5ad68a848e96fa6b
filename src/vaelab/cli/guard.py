"""Before a run writes anything: a Hydra callback that checks the run directory can be written, that no live
run owns it, that the config's values are valid and that a checkpoint to continue from fits the configured
model, all before Hydra saves `.hydra/` into the directory, so a refused start changes nothing on disk.
While a run is live it holds `run.lock` (its pid and host) in its directory; a lock whose process is gone is
taken over."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vaelab.errors import ConfigError, VaelabError

LOCK = "run.lock"
_held: set[Path] = set()
_created: set[Path] = set()  # run directories this start made (a refused start removes them again)


def is_launcher_process() -> bool:
    """False in the extra processes of a DDP or SLURM job (rank > 0): the first process checks and locks."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def check_run_dir(run_dir: Path) -> None:
    """The run directory and the folders the run writes into can be created and written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"the run directory {run_dir} is a file; choose another hydra.run.dir (or paths.log_dir)")
    for sub in ("checkpoints", "samples", ".hydra"):
        if (run_dir / sub).exists() and not (run_dir / sub).is_dir():
            raise ConfigError(f"{run_dir / sub} is a file where the run keeps its {sub}; move it away or choose "
                              "another hydra.run.dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run directory {run_dir} ({exc.strerror or exc}); choose another "
                          "hydra.run.dir or paths.log_dir") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"the run directory {run_dir} cannot be written; choose another hydra.run.dir or paths.log_dir")


def _owner(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def _alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: it cannot be checked from here
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def acquire(run_dir: Path) -> None:
    """Take run_dir's lock, or refuse in one sentence while a live run holds it."""
    lock = run_dir / LOCK
    if lock in _held:
        return
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(lock)
            if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                _held.add(lock)
                return
            if owner is None or _alive(owner):
                who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "a run that is starting"
                raise ConfigError(f"{run_dir} is in use by another run ({who}); choose another hydra.run.dir, or "
                                  f"wait for it to end (if it is gone, delete {lock})")
            lock.unlink(missing_ok=True)  # its process is gone: a stale lock
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        _held.add(lock)
        return
    raise ConfigError(f"could not lock {run_dir}: another run keeps taking it; choose another hydra.run.dir")


def release(run_dir: Path | None = None) -> None:
    """Drop this process's locks (run_dir's, or all); a directory that became read-only keeps its stale lock,
    which the next start takes over (its process is gone)."""
    for lock in list(_held):
        if run_dir is None or lock.parent == Path(run_dir):
            owner = _owner(lock)
            if owner is not None and owner.get("pid") == os.getpid():
                with contextlib.suppress(OSError):
                    lock.unlink(missing_ok=True)
            _held.discard(lock)


atexit.register(release)


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    """A checkpoint this start would continue from (ckpt_path, or the run's last.ckpt with resume=auto) must be
    readable and hold the configured model's weights."""
    from vaelab.cli.config import build_model
    from vaelab.cli.rundirs import resume_from
    from vaelab.data import SOURCES
    from vaelab.training.checkpoints import check_fits, load_checkpoint

    path, _ = resume_from(cfg, run_dir)
    if path and not cfg.get("train", True):  # train=false tests the checkpoint's own model: readable is enough
        load_checkpoint(path)
    elif path:
        source = SOURCES.get(cfg.data.name)
        if source is not None and source.image_shape is not None:  # your own images: checked once they are read
            check_fits(build_model(cfg, source.image_shape), path)


def discard_if_stub(run_dir: Path) -> None:
    """Remove a run directory this start created, when the start was refused before it saved anything of value
    (no checkpoint, no results.json): a refused start leaves nothing behind."""
    run_dir = Path(run_dir).absolute()
    if run_dir not in _created or any((run_dir / "checkpoints").glob("*.ckpt")) or (run_dir / "results.json").exists():
        return
    release(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)


def refuse(exc: VaelabError) -> None:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(1)


class RunGuard(Callback):
    """Hydra callback (conf/hydra/default.yaml): checks and locks a run's directory before Hydra writes to it."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if not is_launcher_process():
            return
        from vaelab.cli.config import validate

        run_dir = Path(str(config.hydra.run.dir)).absolute()
        if not run_dir.exists():
            _created.add(run_dir)
        try:
            validate(config)
            check_run_dir(run_dir)
            acquire(run_dir)
            check_resume(config, run_dir)
        except VaelabError as exc:
            release(run_dir)
            discard_if_stub(run_dir)
            refuse(exc)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if is_launcher_process():  # (a sweep's job: its directory is its own, numbered in the sweep)
            try:
                acquire(Path(str(config.hydra.runtime.output_dir)))
            except VaelabError as exc:
                refuse(exc)

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        release(Path(str(config.hydra.runtime.output_dir)))
