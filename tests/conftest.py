"""Shared fixtures: the real data (or a clear skip), and ways to run the real app with small overrides."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("VAELAB_DATA_DIR", ROOT / "data"))
sys.path.insert(0, str(Path(__file__).parent))

# Small, fast, real: a subset of Fashion-MNIST, few epochs, few importance samples, W&B offline.
TINY = [
    "data.subset=400", "data.batch_size=50", "data.eval_batch_size=200", "trainer.max_epochs=2",
    "eval.importance_samples=32", "trainer.enable_progress_bar=false", "callbacks.image_grids.every_n_epochs=1",
    "loss.warmup_epochs=1", "trainer.log_every_n_steps=2",
]


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The data root holding Fashion-MNIST (made available by `make data`); never downloads."""
    from vaelab.data import load_images
    from vaelab.errors import DataError

    try:
        load_images("fashion_mnist", DATA_DIR, download=False)
    except DataError as exc:
        if os.environ.get("VAELAB_REQUIRE_DATA"):
            pytest.fail(str(exc))
        pytest.skip(f"{exc} (run `make data`)")
    return DATA_DIR


# One torch thread in every test process, set before any torch op: two test workers on two cores do not
# oversubscribe them, and the app's runs are forks of this process (run_app), which GNU OpenMP's thread pool does
# not survive (a fork of a process that ran a parallel region hangs in its first one).
import torch  # noqa: E402

torch.set_num_threads(1)


def app_env() -> dict:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="0",
               PYTHONUNBUFFERED="1", VAELAB_DATA_DIR=str(DATA_DIR),
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])))
    env.pop("WANDB_API_KEY", None)
    # the test worker's own W&B service (started by an in-process run), which a child would otherwise join: a run
    # killed there stays open in it, and the resumed run, joining it too, is refused ("run ID ... is in use")
    env.pop("WANDB_SERVICE", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# what a forked start cannot stand in for: launchers and strategies that start Python processes of their own
# (spawned from the fork, they would import the test worker's __main__), so these run in a fresh interpreter
NEEDS_FRESH = ("ddp", "hydra/launcher=joblib", "hydra/launcher=slurm", "hydra/launcher=submitit",
               "hydra.launcher.processes=", "hydra.launcher.n_jobs")


def run_app(*args: str, module: str = "vaelab.cli.train", timeout: int = 600, fresh: bool = False
            ) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, from the repo root, with the user's environment and arguments: in a
    fork of this test process (its imports done once: about 5 s less a start than a new interpreter), or, with
    fresh=True, for what starts processes of its own (NEEDS_FRESH) or under VAELAB_TEST_FRESH=1, in a new
    `python -m <module>`. Either way its own process: its exit status, stdout and stderr, and signals sent to it."""
    if fresh or os.environ.get("VAELAB_TEST_FRESH") or any(f in a for a in args for f in NEEDS_FRESH):
        return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=app_env(),
                              capture_output=True, text=True, timeout=timeout)
    return _run_in_fork(module, list(args), timeout)


def _run_in_fork(module: str, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        pid = os.fork()
        if pid == 0:  # the child: the entry point's main() with the user's argv, as the installed script calls it
            code = 1
            try:
                import faulthandler

                hung = open(Path(tmp) / "hung", "w")  # where the run stood, if it is still running at its timeout
                faulthandler.dump_traceback_later(max(1, timeout - 2), file=hung)
                code = _child_main(module, args, out_path, err_path)
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                time.sleep(3)  # the child's traceback dump
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                hung = (Path(tmp) / "hung").read_text()[-6000:]
                raise subprocess.TimeoutExpired([module, *args], timeout, output=hung) from AssertionError(hung)
            time.sleep(0.02)
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        return subprocess.CompletedProcess([module, *args], os.waitstatus_to_exitcode(status), read(out_path),
                                           read(err_path))


def _child_main(module: str, args: list[str], out_path: Path, err_path: Path) -> int:
    """In the forked child: a process as `python -m module args` would be (environment, working directory, argv,
    fresh stdout/stderr files, signal handlers and exit handlers of its own), then main()."""
    import atexit
    import importlib
    import io
    import logging
    import traceback

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    atexit._clear()  # the test process's exit handlers are not this run's (no public way to drop them)
    env = app_env()  # from the test process's environment, as subprocess.run(env=app_env()) gives it
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    logging.getLogger().handlers[:] = []  # pytest's capture handlers belong to the test process
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    sys.argv = [module, *args]
    try:
        importlib.import_module(module).main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as Python would: the traceback on stderr, status 1
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # the run's own exit handlers (W&B's, Lightning's), as interpreter exit runs them
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def fault(kind: str, name: str = "fault", **args) -> list[str]:
    """The overrides that add tests/fault_callbacks.py's `kind` to a run as callbacks.<name>, with its arguments
    (signals by number): fault("SignalAt", step=10, signum=signal.SIGTERM)."""
    values = {k: int(v) if isinstance(v, signal.Signals) else v for k, v in args.items()}
    return [f"+callbacks.{name}._target_=fault_callbacks.{kind}", *(f"+callbacks.{name}.{k}={v}" for k, v in values.items())]


def run_ok(*args: str, **kw) -> subprocess.CompletedProcess:
    """run_app, which must end with exit status 0 (else the test fails showing the output's tails)."""
    proc = run_app(*args, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def stopped_then_resumed(*args: str, fault_args: list[str], between=None, fault_on_resume: bool = True, **kw):
    """The shape of a fault run: the app stopped by a fault (it saves, says how to continue and exits 0), then the
    same command with resume=auto (`between()` runs in between). The resume keeps the fault, as a user repeats the
    command, unless fault_on_resume=False (a fault that would fire again where the resume passes). Returns both
    processes."""
    stopped = run_ok(*args, *fault_args, **kw)
    assert "resume=auto" in stopped.stdout + stopped.stderr, stopped.stdout[-3000:]
    if between is not None:
        between()
    return stopped, run_ok(*args, *(fault_args if fault_on_resume else []), "resume=auto", **kw)


@pytest.fixture
def train_run(tmp_path, fashion_mnist):
    """Train with TINY overrides (plus any given) into a fresh run directory; return (dir, results)."""

    def _run(*overrides: str, expect_ok: bool = True):
        run_dir = tmp_path / "run"
        proc = run_app(*TINY, f"hydra.run.dir={run_dir}", *overrides, timeout=600)
        if expect_ok:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            return run_dir, json.loads((run_dir / "results.json").read_text()), proc
        return run_dir, None, proc

    return _run


def compose(*overrides: str):
    """The app's config, composed in-process as `vaelab-train` would (for fast parametrised runs)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def train_in_process(tmp_path, fashion_mnist, monkeypatch):
    """Run vaelab.cli.train.train() in this process on composed config; returns results (results.json)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def _run(*overrides: str):
        cfg = compose(*TINY, f"paths.output_dir={tmp_path / 'run'}", f"data.root={fashion_mnist}", *overrides)
        out = Path(cfg.paths.output_dir)
        from vaelab.cli.train import train

        results = train(cfg)
        assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
        return out, results

    return _run


def pytest_collection_modifyitems(config, items) -> None:
    """`slow`: every test that trains or reads the real data set (the fashion_mnist fixture, which train_run and
    train_in_process use too). `pytest -m "not slow"` is then the quick loop of unit tests; `make test` runs all."""
    for item in items:
        if "fashion_mnist" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
