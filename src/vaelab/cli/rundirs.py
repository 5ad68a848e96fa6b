"""Run directories: where a run or a sweep writes (a new directory, or with resume=auto the one to continue),
whether a run has finished, which checkpoint a start continues from, and what survives a preemption besides
the checkpoint (run_state.json). Registers the resolvers conf/hydra/default.yaml names directories with."""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vaelab.checks import one_of
from vaelab.data.sources import default_data_dir
from vaelab.errors import SaveError
from vaelab.files import write_json
from vaelab.training.checkpoints import readable_checkpoints

RESUME = one_of("resume", None, "auto")
# a run's default directory: its start time and a short random id, so two runs started in the same second
# (another seed, another user on the same file system) never share one
_STARTED = f"{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"
_SWEEP_DIRS: dict[str, str] = {}


def _comparable(overrides) -> list[str]:
    return sorted(str(o) for o in overrides if not str(o).startswith(("resume=", "hydra.")))


def finished(run_dir: Path) -> bool:
    try:
        return json.loads((Path(run_dir) / "results.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def _read_overrides(path: Path, key: str | None = None) -> list | None:
    """A run's recorded overrides (overrides.yaml, or `key` of multirun.yaml), or None when the file cannot be
    read: one broken run directory never stops resume=auto from finding the right one. Said once per file."""
    try:
        value = OmegaConf.load(path)
        value = OmegaConf.select(value, key, default=None) if key else value
        return list(value) if value is not None else None
    except Exception as exc:  # noqa: BLE001 - YAML errors of every kind
        print(f"vaelab: skipped {path} while looking for the run to resume: it cannot be read "
              f"({type(exc).__name__})", file=sys.stderr, flush=True)
        return None


def run_dir(base: str, resume, overrides) -> str:
    """The run directory: a new timestamped one, or with resume=auto the newest unfinished run of the same
    command (same overrides, resume= aside) that has a checkpoint to continue from."""
    fresh = f"{base}/{_STARTED}"
    if str(resume) != "auto":
        return fresh
    want, found = _comparable(overrides), []
    for d in Path(base).glob("*"):
        overrides_file = d / ".hydra" / "overrides.yaml"
        saved = sorted((d / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if overrides_file.is_file() and saved and not finished(d):
            overrides_of = _read_overrides(overrides_file)
            if overrides_of is not None and _comparable(overrides_of) == want:
                found.append((saved[-1].stat().st_mtime, str(d)))
    return max(found)[1] if found else fresh


def sweep_dir(base: str, resume, overrides) -> str:
    """A sweep's directory: a new one, or with resume=auto the newest sweep of the same command (the same
    overrides, resume= aside, as its multirun.yaml records them), whose unfinished jobs then continue and whose
    finished jobs are not trained again. Resolved once per process: Hydra resolves it again for each job, whose
    own overrides are one point of the sweep's."""
    if base not in _SWEEP_DIRS:
        _SWEEP_DIRS[base] = _find_sweep_dir(base, resume, overrides)
    return _SWEEP_DIRS[base]


def _find_sweep_dir(base: str, resume, overrides) -> str:
    fresh = f"{base}/{_STARTED}"
    if str(resume) != "auto":
        return fresh
    want, found = _comparable(overrides), []
    for d in Path(base).glob("*"):
        saved = d / "multirun.yaml"
        if saved.is_file():
            task = _read_overrides(saved, "hydra.overrides.task")
            if task is not None and _comparable(task) == want:
                found.append((saved.stat().st_mtime, str(d)))
    return max(found)[1] if found else fresh


def resume_from(cfg: DictConfig, out_dir: Path) -> tuple[str | None, str | None]:
    """The one resume rule, used by the run guard and by train(): (the checkpoint to continue from, a sentence
    to say when unreadable checkpoints were passed over). ckpt_path if given; else with resume=auto (or in a job
    that submitit requeued) the run's newest readable checkpoint, by the step it holds (last.ckpt first among
    equals): a last.ckpt that a kill or a full disk left broken never strands the run."""
    resume = RESUME.check(cfg.get("resume"))
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path), None
    requeued = bool(os.environ.get("SUBMITIT_EXECUTOR")) and (out_dir / "run_state.json").is_file()
    if not (resume == "auto" or requeued):
        return None, None
    good, bad = readable_checkpoints(out_dir / "checkpoints")
    if not good:
        return None, None
    step, path = good[0]
    skipped = [p.name for p in bad if p.stat().st_mtime >= path.stat().st_mtime or p.name == "last.ckpt"]
    note = (f"vaelab: {', '.join(skipped)} in {path.parent} cannot be read (cut short by a kill or a full disk); "
            f"resuming from {path.name}, the newest whole checkpoint (step {step})") if skipped else None
    return str(path), note


@dataclass
class RunState:
    """What survives a preemption besides the checkpoint (run_state.json): the W&B run to continue, the training
    time so far, and how often the run was preempted."""

    train_time_s: float = 0.0
    preemptions: int = 0
    wandb_run_id: str | None = None

    @classmethod
    def load(cls, out_dir: Path) -> RunState:
        try:
            saved = json.loads((out_dir / "run_state.json").read_text())
            return cls(**{k: saved[k] for k in ("train_time_s", "preemptions", "wandb_run_id") if k in saved})
        except (OSError, ValueError, TypeError):
            return cls()

    def save(self, out_dir: Path) -> None:
        save_json(out_dir / "run_state.json", asdict(self))


def save_json(path: Path, value) -> None:
    """Write a JSON file a resume or a report reads, atomically; a failure is one sentence (SaveError)."""
    try:
        write_json(path, value)
    except OSError as exc:
        full = "no space left on the disk" if exc.errno == 28 else (exc.strerror or str(exc))
        raise SaveError(f"could not save {path} ({full}); the checkpoints in {path.parent / 'checkpoints'} are "
                        "intact: free space or make the directory writable, then rerun with resume=auto") from None


OmegaConf.register_new_resolver("vaelab_run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("vaelab_sweep_dir", sweep_dir, replace=True)
# ${vaelab_data_dir:}: VAELAB_DATA_DIR, else ./data in a vaelab checkout, else a per-user cache (conf/paths/default.yaml);
# not oc.env's default, which OmegaConf resolves (and default_data_dir says) even when the variable is set
OmegaConf.register_new_resolver("vaelab_data_dir", lambda: os.environ.get("VAELAB_DATA_DIR") or default_data_dir(),
                                replace=True)


def sweep_id(path) -> str:
    """A sweep's name for its W&B group: its directory's name and a short hash of its whole path, so that two
    sweeps in folders of the same name never share a group, and a resumed sweep keeps its own."""
    import hashlib

    folder = Path(str(path)).resolve()
    return f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:6]}"


OmegaConf.register_new_resolver("basename", lambda p: Path(str(p)).name, replace=True)
# ${vaelab_sweep_id:${hydra:sweep.dir}} names a sweep's W&B group after its directory (conf/experiment/*.yaml)
OmegaConf.register_new_resolver("vaelab_sweep_id", sweep_id, replace=True)
